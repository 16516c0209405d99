//! The executor: runs a checked graph for one batch on one backend.
//!
//! [`Plan::new`] uploads constants once (in the layout each backend wants) and computes, for every
//! value, the last node that reads it. [`Plan::run`] binds the symbolic dimensions from the
//! inputs, validates every input before any backend call, and walks the nodes in order, handing a
//! value to its last reader by move so buffers are freed (or reused in place) as soon as possible.

use std::collections::HashMap;

use kiln_attention::KernelChoice;

use crate::backend::{Backend, SdpaMaskArg};
use crate::compile::MemoryPlan;
use crate::compile::kernels::sdpa_problem;
use crate::error::{EngineError, Result, graph_err};
use crate::ir::{AttnMask, Bindings, Dim, Graph, Op, TensorType, ValueId};
use crate::kv::{KvCache, KvCacheSpec, PagedBatch};
use crate::quantize::{LinearChoice, LinearFormat, QuantOptions, linear_formats};
use crate::tensor::{HostData, HostTensor};

/// Options that change how a graph is executed (not what it computes, up to the precision the
/// quantization and math-mode options trade away).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecOptions {
    /// The attention kernel: `Auto` lets the selector decide.
    pub sdpa_kernel: KernelChoice,
    /// int8 quantization and bf16 fast-math of `Linear` layers.
    pub quant: QuantOptions,
}

struct InputSpec {
    name: String,
    ty: TensorType,
    value: ValueId,
    /// When the input feeds an embedding as ids: the table's row count.
    id_limit: Option<usize>,
}

/// A graph prepared for one backend.
pub struct Plan<B: Backend> {
    backend: B,
    graph: Graph,
    constants: HashMap<usize, B::Tensor>,
    last_use: Vec<usize>,
    inputs: Vec<InputSpec>,
    options: ExecOptions,
    memory: MemoryPlan,
    sdpa_calls: KernelCounts,
    linears: Vec<LinearChoice>,
}

/// How many attention calls each kernel has run since the plan was built (cumulative, for the
/// `kiln_sdpa_kernel_calls_total` metric and tests that force a kernel).
#[derive(Default)]
pub struct KernelCounts(std::sync::Mutex<Vec<(&'static str, u64)>>);

impl KernelCounts {
    fn record(&self, kernel: &'static str) {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match counts.iter_mut().find(|(k, _)| *k == kernel) {
            Some((_, n)) => *n += 1,
            None => counts.push((kernel, 1)),
        }
    }

    /// `(kernel name, calls)` pairs in first-use order.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

const KEEP: usize = usize::MAX;

impl<B: Backend> Plan<B> {
    pub fn new(graph: Graph, backend: B, options: ExecOptions) -> Result<Self> {
        graph.check()?;
        let n = graph.nodes.len();
        let mut last_use = vec![0usize; n];
        for (i, node) in graph.nodes.iter().enumerate() {
            for v in &node.inputs {
                last_use[v.0] = i;
            }
        }
        for (_, v) in &graph.outputs {
            last_use[v.0] = KEEP;
        }
        let linears = linear_formats(&graph, &options.quant)?;
        let format_of = |i: usize| {
            linears
                .iter()
                .find(|c| c.weight.0 == i)
                .map(|c| c.format)
                .filter(|f| *f != LinearFormat::F32)
        };
        let mut constants = HashMap::new();
        for (i, node) in graph.nodes.iter().enumerate() {
            let t = match &node.op {
                Op::Constant { value, role, name } => match format_of(i) {
                    Some(format) => backend.upload_linear(value, &format),
                    None => backend.upload(value, *role),
                }
                .map_err(|e| graph_err(format!("uploading `{name}`: {e}")))?,
                Op::Weight { name, weight } => match format_of(i) {
                    // An int8 linear's weight is stored quantized in a compiled plan (packed for
                    // the kernel here); a bf16 one is stored plain and converted here.
                    Some(format) => backend.upload_stored_linear(weight, &format),
                    None => backend.upload_stored(weight),
                }
                .map_err(|e| graph_err(format!("uploading `{name}`: {e}")))?,
                _ => continue,
            };
            constants.insert(i, t);
        }
        let mut inputs: Vec<InputSpec> = graph
            .inputs()
            .map(|(name, ty, value)| InputSpec {
                name: name.to_string(),
                ty: ty.clone(),
                value,
                id_limit: None,
            })
            .collect();
        for node in &graph.nodes {
            if let Op::Embedding = node.op {
                let vocab = graph.nodes[node.inputs[0].0].ty.fixed_shape().map(|s| s[0]);
                if let Some(spec) = inputs.iter_mut().find(|s| s.value == node.inputs[1]) {
                    spec.id_limit = match (spec.id_limit, vocab) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
            }
        }
        Ok(Self {
            memory: MemoryPlan::of(&graph),
            backend,
            graph,
            constants,
            last_use,
            inputs,
            options,
            sdpa_calls: KernelCounts::default(),
            linears,
        })
    }

    /// Every `Linear` layer's weight format (f32, int8, bf16), in graph order.
    pub fn linear_choices(&self) -> &[LinearChoice] {
        &self.linears
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The attention kernel each distinct `Sdpa` node would run with sequences of `seq` tokens,
    /// and why: `(node label, kernel, reason)`. An error if a forced kernel cannot run a node
    /// (e.g. flash with head_dim 512), so an impossible override fails at load, not per request.
    pub fn attention_plan(&self, seq: usize) -> Result<Vec<(String, &'static str, String)>> {
        let mut seen = Vec::new();
        let mut plan = Vec::new();
        for (i, node) in self.graph.nodes.iter().enumerate() {
            let Some(problem) = sdpa_problem(&self.graph, i, seq) else {
                continue;
            };
            if seen.contains(&problem) {
                continue;
            }
            seen.push(problem);
            let (kernel, reason) = self
                .backend
                .sdpa_plan(&problem, self.options.sdpa_kernel)
                .map_err(|e| graph_err(format!("{}: {e}", node.label)))?;
            plan.push((node.label.clone(), kernel, reason));
        }
        Ok(plan)
    }

    /// Checks the feeds against the graph's inputs and binds `batch` and `seq`.
    fn bind(&self, feeds: &[(String, HostTensor)]) -> Result<Bindings> {
        let mut batch = None;
        let mut seq = None;
        let mut sequences = None;
        let mut lengths: Option<(&str, &[i64])> = None;
        for spec in &self.inputs {
            let bad = |reason: String| EngineError::Input {
                name: spec.name.clone(),
                reason,
            };
            let t = feeds
                .iter()
                .find(|(n, _)| *n == spec.name)
                .map(|(_, t)| t)
                .ok_or_else(|| bad("missing".into()))?;
            if t.dtype() != spec.ty.dtype {
                return Err(bad(format!(
                    "expected {:?}, got {:?}",
                    spec.ty.dtype,
                    t.dtype()
                )));
            }
            if t.shape.len() != spec.ty.dims.len() {
                return Err(bad(format!(
                    "expected shape {}, got {:?}",
                    spec.ty, t.shape
                )));
            }
            for (&dim, &size) in spec.ty.dims.iter().zip(&t.shape) {
                let slot = match dim {
                    Dim::Batch => &mut batch,
                    Dim::Seq => &mut seq,
                    Dim::Sequences => &mut sequences,
                    Dim::Fixed(n) if n == size => continue,
                    Dim::Fixed(n) => return Err(bad(format!("dimension must be {n}, got {size}"))),
                };
                match *slot {
                    Some(prev) if prev != size => {
                        return Err(bad(format!(
                            "{dim} is {size} here but {prev} in another input"
                        )));
                    }
                    _ => *slot = Some(size),
                }
            }
            if spec.ty.dims == [Dim::Sequences]
                && let HostData::I64(l) = &t.data
            {
                lengths = Some((&spec.name, l));
            }
            if let (Some(limit), HostData::I64(ids)) = (spec.id_limit, &t.data)
                && let Some(bad_id) = ids.iter().find(|&&id| id < 0 || id as u64 >= limit as u64)
            {
                return Err(bad(format!(
                    "id {bad_id} is outside the vocabulary of {limit}"
                )));
            }
        }
        let b = Bindings {
            batch: batch.unwrap_or(1),
            seq: seq.unwrap_or(1),
            sequences: sequences.unwrap_or(0),
        };
        if let Some((name, lens)) = lengths {
            // A packed batch: lengths must tile the token dimension exactly.
            let bad = |reason: String| EngineError::Input {
                name: name.to_string(),
                reason,
            };
            if b.batch != 1 {
                return Err(bad(format!("a packed batch has batch 1, got {}", b.batch)));
            }
            if let Some(l) = lens.iter().find(|&&l| l <= 0) {
                return Err(bad(format!("sequence length {l} must be positive")));
            }
            let total: i64 = lens.iter().sum();
            if total != b.seq as i64 {
                return Err(bad(format!(
                    "sequence lengths sum to {total} but the batch has {} tokens",
                    b.seq
                )));
            }
        }
        if b.batch == 0 || b.seq == 0 {
            return Err(EngineError::Input {
                name: self
                    .inputs
                    .first()
                    .map_or_else(String::new, |s| s.name.clone()),
                reason: format!("empty batch (batch {}, seq {})", b.batch, b.seq),
            });
        }
        Ok(b)
    }

    /// Runs the graph once. Returns the graph's outputs, by name, in declaration order.
    pub fn run(&self, feeds: &[(String, HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
        self.execute(feeds, None)
    }

    /// Allocates a paged KV cache on this plan's backend, for [`Plan::run_paged`].
    pub fn new_kv_cache(&self, spec: KvCacheSpec) -> Result<KvCache> {
        KvCache::check_spec(&spec)?;
        let store = self.backend.kv_cache_alloc(&spec)?;
        KvCache::new(spec, self.backend.name(), store)
    }

    /// Runs a graph with `PagedSdpa` nodes for one packed step: `batch` says which of the
    /// step's tokens belong to which sequence and where each sequence's keys live in `cache`.
    pub fn run_paged(
        &self,
        feeds: &[(String, HostTensor)],
        cache: &mut KvCache,
        batch: &PagedBatch,
    ) -> Result<Vec<(String, HostTensor)>> {
        if cache.backend() != self.backend.name() {
            return Err(graph_err(format!(
                "the KV cache was allocated by backend `{}`, not `{}`",
                cache.backend(),
                self.backend.name()
            )));
        }
        self.execute(feeds, Some((cache, batch)))
    }

    fn execute(
        &self,
        feeds: &[(String, HostTensor)],
        mut paged: Option<(&mut KvCache, &PagedBatch)>,
    ) -> Result<Vec<(String, HostTensor)>> {
        let bindings = self.bind(feeds)?;
        if let Some((cache, batch)) = &paged {
            batch.validate(cache.spec(), bindings.batch * bindings.seq)?;
            if bindings.batch != 1 {
                return Err(graph_err(format!(
                    "a paged step is one packed batch (batch 1), got batch {}",
                    bindings.batch
                )));
            }
        }
        let be = &self.backend;
        be.reserve(&self.memory.buffer_elems(&bindings));
        let mut values: Vec<Option<B::Tensor>> = vec![None; self.graph.nodes.len()];
        for (i, node) in self.graph.nodes.iter().enumerate() {
            // Take a value out on its last read (the last mention within this node), else clone.
            let mut args: Vec<B::Tensor> = Vec::with_capacity(node.inputs.len());
            for (pos, v) in node.inputs.iter().enumerate() {
                let last_here = !node.inputs[pos + 1..].contains(v);
                let t = if let Some(c) = self.constants.get(&v.0) {
                    Some(c.clone())
                } else if self.last_use[v.0] == i && last_here {
                    values[v.0].take()
                } else {
                    values[v.0].clone()
                };
                args.push(t.ok_or_else(|| {
                    graph_err(format!("{}: input {} not computed", node.label, v.0))
                })?);
            }
            let mut args = args.into_iter();
            let mut next = || args.next().expect("arity checked by the graph");
            let out = match &node.op {
                Op::Input { name, .. } => {
                    let t = &feeds
                        .iter()
                        .find(|(n, _)| n == name)
                        .expect("bound above")
                        .1;
                    Some(be.upload(t, crate::ir::ConstRole::Other)?)
                }
                Op::Constant { .. } | Op::Weight { .. } => None,
                Op::Embedding => Some(be.embedding(next(), next())?),
                Op::Linear => {
                    let (x, w) = (next(), next());
                    let b = (node.inputs.len() == 3).then(&mut next);
                    if paged.is_some() {
                        Some(be.linear_decode(x, w, b)?)
                    } else {
                        Some(be.linear(x, w, b)?)
                    }
                }
                Op::Add => Some(be.add(next(), next())?),
                Op::LayerNorm { eps } => Some(be.layer_norm(next(), next(), next(), *eps)?),
                Op::Activation(a) => Some(be.activation(next(), *a)?),
                Op::SplitHeads { heads } => Some(be.split_heads(next(), *heads)?),
                Op::MergeHeads => Some(be.merge_heads(next())?),
                Op::Sdpa { mask, scale } => {
                    let (q, k, v) = (next(), next(), next());
                    let mask = match mask {
                        AttnMask::None => SdpaMaskArg::None,
                        AttnMask::Causal => SdpaMaskArg::Causal,
                        AttnMask::KeyPadding => SdpaMaskArg::KeyPadding(next()),
                        AttnMask::Varlen => SdpaMaskArg::Varlen(next()),
                        AttnMask::VarlenCausal => SdpaMaskArg::VarlenCausal(next()),
                    };
                    let (out, kernel) = be.sdpa(q, k, v, mask, *scale, self.options.sdpa_kernel)?;
                    self.sdpa_calls.record(kernel);
                    Some(out)
                }
                Op::Pool { mode } => Some(be.pool(next(), next(), *mode)?),
                Op::L2Normalize => Some(be.l2_normalize(next())?),
                Op::Softmax => Some(be.softmax(next())?),
                Op::MatMul { transpose_b } => Some(be.matmul(next(), next(), *transpose_b)?),
                Op::Scale { factor } => Some(be.scale(next(), *factor)?),
                Op::CausalMask => Some(be.causal_mask(next())?),
                Op::SliceLast { start, len } => Some(be.slice_last(next(), *start, *len)?),
                Op::LinearAct { act } => {
                    let (x, w) = (next(), next());
                    let b = (node.inputs.len() == 3).then(&mut next);
                    Some(be.linear_act(x, w, b, *act)?)
                }
                Op::AddLayerNorm { eps } => {
                    Some(be.add_layer_norm(next(), next(), next(), next(), *eps)?)
                }
                Op::SliceSplitHeads {
                    heads,
                    start,
                    width,
                } => Some(be.slice_split_heads(next(), *heads, *start, *width)?),
                Op::RmsNorm { eps } => Some(be.rms_norm(next(), next(), *eps)?),
                Op::Mul => Some(be.mul(next(), next())?),
                Op::Rope => Some(be.rope(next(), next(), next())?),
                Op::PagedSdpa { layer, scale } => {
                    let (cache, batch) = paged.as_mut().ok_or_else(|| {
                        graph_err(format!(
                            "{}: a graph with a KV cache runs with run_paged, not run",
                            node.label
                        ))
                    })?;
                    let spec = *cache.spec();
                    if *layer >= spec.layers {
                        return Err(graph_err(format!(
                            "{}: layer {layer} is outside the KV cache of {} layers",
                            node.label, spec.layers
                        )));
                    }
                    let (q, k, v) = (next(), next(), next());
                    let (out, kernel) = be.paged_sdpa(
                        q,
                        k,
                        v,
                        cache.store.as_mut(),
                        &spec,
                        *layer,
                        batch,
                        *scale,
                        self.options.sdpa_kernel,
                    )?;
                    self.sdpa_calls.record(kernel);
                    Some(out)
                }
            };
            if let Some(out) = out
                && self.last_use[i] != 0
            {
                values[i] = Some(out);
            }
        }
        let outputs = &self.graph.outputs;
        outputs
            .iter()
            .enumerate()
            .map(|(i, (name, v))| {
                // The last mention of a value hands its buffer over (no copy); earlier ones copy.
                let last = !outputs[i + 1..].iter().any(|(_, w)| w == v);
                let t = match self.constants.get(&v.0) {
                    Some(c) => Some(c.clone()),
                    None if last => values[v.0].take(),
                    None => values[v.0].clone(),
                };
                let t = t.ok_or_else(|| graph_err(format!("output `{name}` not computed")))?;
                Ok((name.clone(), be.download(t)?))
            })
            .collect()
    }
}

/// A plan with its backend erased, for callers that pick the device at run time.
pub trait Runnable: Send + Sync {
    fn run(&self, feeds: &[(String, HostTensor)]) -> Result<Vec<(String, HostTensor)>>;
    fn backend_name(&self) -> String;
    fn graph(&self) -> &Graph;
    /// Attention calls per kernel since the plan was built.
    fn sdpa_kernel_counts(&self) -> Vec<(&'static str, u64)>;
    /// See [`Plan::attention_plan`].
    fn attention_plan(&self, seq: usize) -> Result<Vec<(String, &'static str, String)>>;
    /// See [`Plan::new_kv_cache`].
    fn new_kv_cache(&self, spec: KvCacheSpec) -> Result<KvCache>;
    /// See [`Plan::run_paged`].
    fn run_paged(
        &self,
        feeds: &[(String, HostTensor)],
        cache: &mut KvCache,
        batch: &PagedBatch,
    ) -> Result<Vec<(String, HostTensor)>>;
    /// See [`Plan::linear_choices`].
    fn linear_choices(&self) -> &[LinearChoice];
}

impl<B: Backend> Runnable for Plan<B> {
    fn run(&self, feeds: &[(String, HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
        Plan::run(self, feeds)
    }

    fn backend_name(&self) -> String {
        self.backend.name()
    }

    fn graph(&self) -> &Graph {
        &self.graph
    }

    fn sdpa_kernel_counts(&self) -> Vec<(&'static str, u64)> {
        self.sdpa_calls.snapshot()
    }

    fn attention_plan(&self, seq: usize) -> Result<Vec<(String, &'static str, String)>> {
        Plan::attention_plan(self, seq)
    }

    fn new_kv_cache(&self, spec: KvCacheSpec) -> Result<KvCache> {
        Plan::new_kv_cache(self, spec)
    }

    fn run_paged(
        &self,
        feeds: &[(String, HostTensor)],
        cache: &mut KvCache,
        batch: &PagedBatch,
    ) -> Result<Vec<(String, HostTensor)>> {
        Plan::run_paged(self, feeds, cache, batch)
    }

    fn linear_choices(&self) -> &[LinearChoice] {
        Plan::linear_choices(self)
    }
}

/// Convenience for building feeds.
pub fn feed(name: &str, t: HostTensor) -> (String, HostTensor) {
    (name.to_string(), t)
}
