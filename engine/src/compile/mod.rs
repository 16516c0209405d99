//! The graph compiler: passes that rewrite an engine graph for one backend without changing what
//! it computes, then a memory plan.
//!
//! Each pass is a small unit in its own file with its own tests on small graphs. A pass takes a
//! checked graph and returns a checked graph (every rewrite goes through
//! [`crate::ir::GraphBuilder`], so types are re-inferred), plus notes for `kiln compile
//! --explain`. Passes only rewrite what they match and copy every other op unchanged, so ops
//! added later (by other models) pass through untouched.
//!
//! | pass | what it does |
//! |---|---|
//! | `dce` | drops nodes no output depends on |
//! | `fold` | evaluates ops whose inputs are all constants, once, at compile time |
//! | `sdpa` | `softmax(q·kᵀ·scale [+ causal mask])·v` spelled out → one `Sdpa` node |
//! | `qkv` | linears reading the same input → one GEMM on concatenated weights, read by head |
//! | `bias-act` | `Linear` + activation → `LinearAct` (the activation as the GEMM's epilogue) |
//! | `add-norm` | residual `Add` + `LayerNorm` → `AddLayerNorm` (one pass over each row) |
//! | `kernels` | chooses each linear's kernel and weight format, reports attention kernels |
//! | `prepack` | stores every constant in the chosen format (what the plan cache maps back) |
//!
//! `--no-fuse` turns off `sdpa`, `qkv`, `bias-act` and `add-norm`; any pass can be turned off by
//! name. All passes off runs the model builder's graph as it is.

mod add_norm;
mod bias_act;
mod dce;
mod fold;
pub(crate) mod kernels;
pub mod memory;
mod prepack;
mod qkv;
pub(crate) mod rewrite;
mod sdpa;

use std::collections::{BTreeSet, HashMap};
use std::fmt::{self, Write as _};
use std::str::FromStr;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use kiln_attention::ProblemSummary;

use crate::backend::Backend;
use crate::error::{Result, graph_err};
use crate::exec::ExecOptions;
use crate::ir::{Bindings, Dim, Graph};
use crate::quantize::QuantOptions;
use crate::storage::WeightFormat;

pub use kernels::select_linear;
pub use memory::MemoryPlan;

/// What the compiler may emit for one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileTarget {
    /// Formats [`crate::backend::Backend::upload_stored`] accepts for a linear weight, preferred
    /// first. `Plain` (convert at upload) is always accepted.
    pub linear_formats: Vec<WeightFormat>,
}

impl Default for CompileTarget {
    fn default() -> Self {
        Self {
            linear_formats: vec![WeightFormat::Plain],
        }
    }
}

/// A compiler pass, by its command-line name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PassId {
    #[serde(rename = "dce")]
    Dce,
    #[serde(rename = "fold")]
    Fold,
    #[serde(rename = "sdpa")]
    SdpaPattern,
    #[serde(rename = "qkv")]
    QkvMerge,
    #[serde(rename = "bias-act")]
    BiasAct,
    #[serde(rename = "add-norm")]
    AddNorm,
    #[serde(rename = "kernels")]
    Kernels,
    #[serde(rename = "prepack")]
    Prepack,
}

impl PassId {
    /// Every pass, in the order they run.
    pub const ALL: [PassId; 8] = [
        PassId::Dce,
        PassId::Fold,
        PassId::SdpaPattern,
        PassId::QkvMerge,
        PassId::BiasAct,
        PassId::AddNorm,
        PassId::Kernels,
        PassId::Prepack,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PassId::Dce => "dce",
            PassId::Fold => "fold",
            PassId::SdpaPattern => "sdpa",
            PassId::QkvMerge => "qkv",
            PassId::BiasAct => "bias-act",
            PassId::AddNorm => "add-norm",
            PassId::Kernels => "kernels",
            PassId::Prepack => "prepack",
        }
    }

    /// The passes that fuse ops (what `--no-fuse` turns off).
    pub fn is_fusion(self) -> bool {
        matches!(
            self,
            PassId::SdpaPattern | PassId::QkvMerge | PassId::BiasAct | PassId::AddNorm
        )
    }
}

impl fmt::Display for PassId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PassId {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        PassId::ALL
            .into_iter()
            .find(|p| p.name() == s.trim())
            .ok_or_else(|| {
                let names: Vec<&str> = PassId::ALL.iter().map(|p| p.name()).collect();
                format!("unknown pass `{s}` (passes: {})", names.join(", "))
            })
    }
}

/// How to compile.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CompileOptions {
    /// Passes turned off (by name).
    pub disabled: BTreeSet<PassId>,
}

impl CompileOptions {
    /// Every pass off: the model builder's graph runs as it is.
    pub fn none() -> Self {
        Self {
            disabled: PassId::ALL.into_iter().collect(),
        }
    }

    /// Fusion passes off (`--no-fuse`), the others on.
    pub fn no_fuse() -> Self {
        Self {
            disabled: PassId::ALL.into_iter().filter(|p| p.is_fusion()).collect(),
        }
    }

    pub fn enabled(&self, pass: PassId) -> bool {
        !self.disabled.contains(&pass)
    }

    /// Turns off passes named in a comma-separated list (`all` and `fuse` name groups).
    pub fn disable(&mut self, list: &str) -> std::result::Result<(), String> {
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match name {
                "all" => self.disabled.extend(PassId::ALL),
                "fuse" => self
                    .disabled
                    .extend(PassId::ALL.into_iter().filter(|p| p.is_fusion())),
                _ => {
                    self.disabled.insert(name.parse()?);
                }
            }
        }
        Ok(())
    }

    /// A short description, e.g. `all passes` or `passes off: qkv, bias-act`.
    pub fn describe(&self) -> String {
        if self.disabled.is_empty() {
            "all passes".into()
        } else {
            let off: Vec<&str> = self.disabled.iter().map(|p| p.name()).collect();
            format!("passes off: {}", off.join(", "))
        }
    }
}

/// One kernel decision, for `--explain` and logs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelNote {
    pub node: String,
    pub kernel: String,
    pub reason: String,
}

/// What one pass did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PassReport {
    pub pass: PassId,
    pub enabled: bool,
    pub nodes_before: usize,
    pub nodes_after: usize,
    /// Op histograms before and after, `(op name, count)`.
    pub ops_before: Vec<(String, usize)>,
    pub ops_after: Vec<(String, usize)>,
    /// Fused groups and other decisions, one line each.
    pub notes: Vec<String>,
    /// Time the pass took, in microseconds.
    pub micros: u64,
}

/// Memory plan figures at two reference shapes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemorySummary {
    pub buffers: usize,
    /// `(shape label, planned bytes, bytes without reuse)`.
    pub at: Vec<(String, usize, usize)>,
}

/// Everything the compiler did, kept with the plan in the cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompileReport {
    pub options: CompileOptions,
    /// The quantization and math mode the plan was compiled for, e.g. `quantize none, math
    /// precise`.
    pub precision: String,
    pub passes: Vec<PassReport>,
    pub kernels: Vec<KernelNote>,
    pub memory: MemorySummary,
    /// Time the whole compilation took, in microseconds.
    pub micros: u64,
}

/// A compiled graph and its report.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub graph: Graph,
    pub report: CompileReport,
}

/// The backend's attention selector: which kernel it runs for a problem, and why.
pub(crate) type SdpaPlanFn<'a> = &'a dyn Fn(&ProblemSummary) -> Result<(&'static str, String)>;

/// Shared state of one compilation.
pub(crate) struct Context<'a> {
    pub target: &'a CompileTarget,
    /// Which linears run int8 or bf16 (their weights stay plain in the plan and are quantized
    /// at load, by the backend's `upload_linear`).
    pub quant: &'a QuantOptions,
    pub sdpa_plan: SdpaPlanFn<'a>,
    /// The format kernel selection chose for each linear weight, by the weight's node index
    /// (`prepack` runs right after `kernels`, on the same graph).
    pub formats: HashMap<usize, WeightFormat>,
    pub kernels: Vec<KernelNote>,
}

#[cfg(test)]
fn cpu_sdpa_plan(p: &ProblemSummary) -> Result<(&'static str, String)> {
    let s = kiln_attention::select(p, kiln_attention::Isa::detect(), Default::default())?;
    Ok((s.kernel.name(), s.reason))
}

#[cfg(test)]
impl<'a> Context<'a> {
    pub fn for_tests(target: &'a CompileTarget) -> Self {
        static F32: std::sync::OnceLock<QuantOptions> = std::sync::OnceLock::new();
        Self {
            target,
            quant: F32.get_or_init(QuantOptions::default),
            sdpa_plan: &cpu_sdpa_plan,
            formats: HashMap::new(),
            kernels: Vec::new(),
        }
    }
}

type PassFn = fn(Graph, &mut Context<'_>) -> Result<(Graph, Vec<String>)>;

fn pass_fn(p: PassId) -> PassFn {
    match p {
        PassId::Dce => dce::run,
        PassId::Fold => fold::run,
        PassId::SdpaPattern => sdpa::run,
        PassId::QkvMerge => qkv::run,
        PassId::BiasAct => bias_act::run,
        PassId::AddNorm => add_norm::run,
        PassId::Kernels => kernels::run,
        PassId::Prepack => prepack::run,
    }
}

fn histogram(g: &Graph) -> Vec<(String, usize)> {
    g.op_histogram()
        .into_iter()
        .map(|(n, c)| (n.to_string(), c))
        .collect()
}

/// Runs the enabled passes over `graph` for `backend` (its weight formats, its attention
/// selector under `exec.sdpa_kernel`).
pub fn compile<B: Backend>(
    graph: Graph,
    backend: &B,
    options: &CompileOptions,
    exec: ExecOptions,
) -> Result<Compiled> {
    let started = Instant::now();
    graph.check()?;
    let target = backend.compile_target();
    let sdpa_plan = |p: &ProblemSummary| backend.sdpa_plan(p, exec.sdpa_kernel);
    let mut cx = Context {
        target: &target,
        quant: &exec.quant,
        sdpa_plan: &sdpa_plan,
        formats: HashMap::new(),
        kernels: Vec::new(),
    };
    let mut graph = graph;
    let mut passes = Vec::new();
    for pass in PassId::ALL {
        let before = histogram(&graph);
        let nodes_before = graph.nodes.len();
        let t = Instant::now();
        let notes = if options.enabled(pass) {
            let (g, notes) = pass_fn(pass)(graph, &mut cx)
                .map_err(|e| graph_err(format!("compiler pass `{pass}`: {e}")))?;
            g.check()
                .map_err(|e| graph_err(format!("compiler pass `{pass}` broke the graph: {e}")))?;
            graph = g;
            notes
        } else {
            Vec::new()
        };
        passes.push(PassReport {
            pass,
            enabled: options.enabled(pass),
            nodes_before,
            nodes_after: graph.nodes.len(),
            ops_before: before,
            ops_after: histogram(&graph),
            notes,
            micros: t.elapsed().as_micros() as u64,
        });
    }
    let memory = memory_summary(&graph);
    Ok(Compiled {
        report: CompileReport {
            options: options.clone(),
            precision: format!(
                "quantize {}, math {}",
                exec.quant.quantize, exec.quant.math_mode
            ),
            passes,
            kernels: cx.kernels,
            memory,
            micros: started.elapsed().as_micros() as u64,
        },
        graph,
    })
}

/// The reference shapes of `--explain`: 1 sequence of 16 tokens and 32 of 128, in the graph's
/// own layout (a packed graph has batch 1 and `seq` = all tokens).
fn reference_shapes(g: &Graph) -> [(String, Bindings); 2] {
    let packed = g.inputs().any(|(_, ty, _)| ty.dims == [Dim::Sequences]);
    let bind = |b: usize, s: usize| {
        if packed {
            Bindings {
                batch: 1,
                seq: b * s,
                sequences: b,
            }
        } else {
            Bindings {
                batch: b,
                seq: s,
                sequences: b,
            }
        }
    };
    [
        ("1×16".into(), bind(1, 16)),
        ("32×128".into(), bind(32, 128)),
    ]
}

fn memory_summary(g: &Graph) -> MemorySummary {
    let plan = MemoryPlan::of(g);
    MemorySummary {
        buffers: plan.slots.len(),
        at: reference_shapes(g)
            .into_iter()
            .map(|(label, b)| (label, plan.bytes(&b), MemoryPlan::unshared_bytes(g, &b)))
            .collect(),
    }
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

impl CompileReport {
    /// The human-readable account `kiln compile --explain` prints.
    pub fn explain(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "compiled with {} in {:.1} ms ({})",
            self.options.describe(),
            self.micros as f64 / 1e3,
            self.precision
        );
        for p in &self.passes {
            if !p.enabled {
                let _ = writeln!(out, "\n[{}] off", p.pass);
                continue;
            }
            let _ = writeln!(
                out,
                "\n[{}] {} → {} nodes ({:.1} ms)",
                p.pass,
                p.nodes_before,
                p.nodes_after,
                p.micros as f64 / 1e3
            );
            let changed = diff_ops(&p.ops_before, &p.ops_after);
            if !changed.is_empty() {
                let _ = writeln!(out, "  ops: {changed}");
            }
            for n in &p.notes {
                let _ = writeln!(out, "  {n}");
            }
        }
        if !self.kernels.is_empty() {
            let _ = writeln!(out, "\nkernels:");
            for k in &self.kernels {
                let _ = writeln!(out, "  {}: {} — {}", k.node, k.kernel, k.reason);
            }
        }
        let _ = writeln!(
            out,
            "\nmemory plan: {} intermediate buffers",
            self.memory.buffers
        );
        for (shape, planned, unshared) in &self.memory.at {
            let _ = writeln!(
                out,
                "  at {shape}: {} (without reuse: {})",
                mib(*planned),
                mib(*unshared)
            );
        }
        out
    }
}

/// `linear 36→24, linear_act 0→6` style changes between two histograms.
fn diff_ops(before: &[(String, usize)], after: &[(String, usize)]) -> String {
    let count = |h: &[(String, usize)], name: &str| {
        h.iter().find(|(n, _)| n == name).map_or(0, |(_, c)| *c)
    };
    let mut names: Vec<&str> = before.iter().map(|(n, _)| n.as_str()).collect();
    for (n, _) in after {
        if !names.contains(&n.as_str()) {
            names.push(n);
        }
    }
    names
        .into_iter()
        .filter_map(|n| {
            let (b, a) = (count(before, n), count(after, n));
            (a != b).then(|| format!("{n} {b}→{a}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers for the passes' tests: tiny graphs and running them on the CPU backend.

    use crate::backend::CpuBackend;
    use crate::exec::{ExecOptions, Plan};
    use crate::ir::Graph;
    use crate::tensor::HostTensor;

    pub fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 20_000) as f32 / 10_000.0 - 1.0
            })
            .collect()
    }

    pub fn tensor(shape: &[usize], seed: u64) -> HostTensor {
        HostTensor::f32(shape.to_vec(), values(shape.iter().product(), seed)).unwrap()
    }

    pub fn eval(g: &Graph, feeds: &[(String, HostTensor)]) -> Vec<f32> {
        let plan = Plan::new(g.clone(), CpuBackend::new(2), ExecOptions::default()).unwrap();
        plan.run(feeds).unwrap().remove(0).1.into_f32().unwrap()
    }

    pub fn count(g: &Graph, name: &str) -> usize {
        g.nodes.iter().filter(|n| n.op.name() == name).count()
    }

    pub fn ctx_run(pass: super::PassFn, g: Graph) -> (Graph, Vec<String>) {
        let target = crate::backend::Backend::compile_target(&CpuBackend::new(1));
        let mut cx = super::Context::for_tests(&target);
        let (g, notes) = pass(g, &mut cx).unwrap();
        g.check().unwrap();
        (g, notes)
    }

    pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }
}
