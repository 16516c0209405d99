//! Kernel selection: for each linear, which GEMM kernel runs it and so which format its weight
//! is packed in (a pure rule, [`select_linear`]); for each attention node, which kernel the
//! backend's selector picks at short and long sequences, and why (reported; the choice itself is
//! made per call, per sequence length, at run time). The graph is not changed; `prepack` reads
//! the chosen formats.
//!
//! The seam for quantized and bf16 kernels: they add weight formats (see
//! [`WeightFormat`]), a rule here keyed on [`CompileOptions::quantize`] and
//! [`CompileOptions::math_mode`] and on the formats the backend lists, and a packing function in
//! `prepack`. Everything else — the plan, the cache, the executor — carries any format.

use std::collections::HashSet;

use kiln_attention::{MaskKind, ProblemSummary, SdpaShape};

use super::{CompileOptions, CompileTarget, Context, KernelNote, MathMode, Quantize};
use crate::error::Result;
use crate::ir::{AttnMask, ConstRole, Dim, Graph, Op};
use crate::kernels::gemm::PARALLEL_MIN_MACS;
use crate::storage::WeightFormat;

/// The format of a `[out, in]` f32 linear weight on `target` under `options`, and why.
pub fn select_linear(
    out: usize,
    inn: usize,
    target: &CompileTarget,
    options: &CompileOptions,
) -> (WeightFormat, String) {
    let _ = (out, inn);
    match (options.quantize, options.math_mode) {
        // The backend lists its f32 formats fastest first (for its CPU features).
        (Quantize::None, MathMode::Precise) => match target.linear_formats.first() {
            Some(WeightFormat::F32Panels16) => (
                WeightFormat::F32Panels16,
                "kiln's 6×16 AVX2/FMA GEMM on weights packed once, here, into 16-column panels \
                 (nothing packed per call); bias and activation as the tile epilogue"
                    .into(),
            ),
            Some(WeightFormat::F32InOut) => (
                WeightFormat::F32InOut,
                "the gemm crate's f32 GEMM on a weight transposed to [in, out] once, here, \
                 instead of at every load"
                    .into(),
            ),
            _ => (
                WeightFormat::Plain,
                "the backend lists no packed f32 format; it converts the weight at upload".into(),
            ),
        },
    }
}

/// The attention problem an `Sdpa` node poses at sequences of `seq` tokens.
pub(crate) fn sdpa_problem(g: &Graph, node: usize, seq: usize) -> ProblemSummary {
    let n = &g.nodes[node];
    let Op::Sdpa { mask, .. } = n.op else {
        unreachable!("called on sdpa nodes only")
    };
    let ty = |i: usize| &g.nodes[n.inputs[i].0].ty;
    let dim = |d: Dim| match d {
        Dim::Fixed(n) => n,
        Dim::Batch | Dim::Sequences => 1,
        Dim::Seq => seq,
    };
    let (q, k) = (ty(0), ty(1));
    ProblemSummary {
        shape: SdpaShape {
            batch: 1,
            q_heads: dim(q.dims[1]),
            kv_heads: dim(k.dims[1]),
            q_len: dim(q.dims[2]),
            kv_len: dim(k.dims[2]),
            head_dim: dim(q.dims[3]),
        },
        mask: match mask {
            AttnMask::None | AttnMask::Varlen => MaskKind::None,
            AttnMask::KeyPadding => MaskKind::KeyPadding,
            AttnMask::Causal => MaskKind::CausalTopLeft,
        },
        varlen: mask == AttnMask::Varlen,
    }
}

pub(crate) fn run(g: Graph, cx: &mut Context<'_>) -> Result<(Graph, Vec<String>)> {
    let mut notes = Vec::new();
    let mut seen_linear = HashSet::new();
    let mut seen_sdpa = Vec::new();
    for (i, node) in g.nodes.iter().enumerate() {
        match node.op {
            Op::Linear | Op::LinearAct { .. } => {
                let w = node.inputs[1].0;
                let Op::Constant {
                    value,
                    role: ConstRole::LinearWeight,
                    ..
                } = &g.nodes[w].op
                else {
                    continue;
                };
                let (out, inn) = (value.shape[0], value.shape[1]);
                let (format, reason) = select_linear(out, inn, cx.target, cx.options);
                cx.formats.insert(w, format);
                // One note per distinct weight shape: the rule only depends on it.
                if seen_linear.insert((out, inn)) {
                    let min_rows = PARALLEL_MIN_MACS.div_ceil(out * inn).max(1);
                    let kernel = match format {
                        WeightFormat::F32Panels16 => "kiln panel GEMM",
                        WeightFormat::F32InOut => "gemm crate",
                        WeightFormat::Plain => "backend default",
                    };
                    cx.kernels.push(KernelNote {
                        node: format!("linear [{inn}→{out}] (e.g. {})", node.label),
                        kernel: format!("{kernel}, weight {format}"),
                        reason: format!(
                            "{reason}; one thread below {min_rows} rows, all threads from there"
                        ),
                    });
                }
            }
            Op::Sdpa { .. } => {
                for seq in [128, 2048] {
                    let problem = sdpa_problem(&g, i, seq);
                    if seen_sdpa.contains(&problem) {
                        continue;
                    }
                    seen_sdpa.push(problem);
                    let (kernel, reason) = (cx.sdpa_plan)(&problem)?;
                    cx.kernels.push(KernelNote {
                        node: format!("attention at {seq} tokens (e.g. {})", node.label),
                        kernel: kernel.into(),
                        reason,
                    });
                }
            }
            _ => {}
        }
    }
    let packed = cx.formats.len();
    if packed > 0 {
        notes.push(format!("chose formats for {packed} linear weights"));
    }
    Ok((g, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_linears_get_the_backends_preferred_packed_format() {
        let opts = CompileOptions::default();
        let avx2 = CompileTarget {
            linear_formats: vec![WeightFormat::F32Panels16, WeightFormat::F32InOut],
        };
        assert_eq!(select_linear(8, 4, &avx2, &opts).0, WeightFormat::F32Panels16);
        let other = CompileTarget {
            linear_formats: vec![WeightFormat::F32InOut, WeightFormat::Plain],
        };
        assert_eq!(select_linear(8, 4, &other, &opts).0, WeightFormat::F32InOut);
        let bare = CompileTarget::default();
        let (format, reason) = select_linear(8, 4, &bare, &opts);
        assert_eq!(format, WeightFormat::Plain);
        assert!(reason.contains("converts the weight at upload"));
    }
}
