//! Kernel selection: for each linear, which GEMM kernel runs it and so which format its weight
//! is packed in (a pure rule, [`select_linear`]); for each attention node, which kernel the
//! backend's selector picks at short and long sequences, and why (reported; the choice itself is
//! made per call, per sequence length, at run time). The graph is not changed; `prepack` reads
//! the chosen formats.
//!
//! Quantized and bf16 linears (chosen per layer by the quantization options, as
//! [`crate::quantize::linear_formats`] decides) keep a plain weight in the plan; the backend packs
//! it for its int8 or bf16 kernel at load. Storing those packed forms in the plan cache too needs
//! a weight format per kernel here and a packing function in `prepack`.

use std::collections::{HashMap, HashSet};

use kiln_attention::{MaskKind, ProblemSummary, SdpaShape};

use super::{CompileTarget, Context, KernelNote};
use crate::error::Result;
use crate::ir::{AttnMask, ConstRole, Dim, Graph, Op};
use crate::kernels::gemm::PARALLEL_MIN_MACS;
use crate::quantize::{LinearFormat, linear_formats};
use crate::storage::WeightFormat;

/// The format of a `[out, in]` f32 linear weight on `target` when the linear runs as
/// `linear` (f32, or int8/bf16 by the quantization options), and why.
pub fn select_linear(
    out: usize,
    inn: usize,
    target: &CompileTarget,
    linear: LinearFormat,
) -> (WeightFormat, String) {
    let _ = (out, inn);
    if matches!(linear, LinearFormat::Int8(_))
        && target
            .linear_formats
            .contains(&WeightFormat::Int8PerChannel)
    {
        return (
            WeightFormat::Int8PerChannel,
            format!(
                "{linear}: s8 weights quantized once, here (per output channel), stored in the \
                 plan; packed for the int8 kernel at load"
            ),
        );
    }
    if linear != LinearFormat::F32 {
        return (
            WeightFormat::Plain,
            format!(
                "{linear}: stored plain in the plan and packed for the {linear} kernel at load"
            ),
        );
    }
    // The backend lists its f32 formats fastest first (for its CPU features).
    match target.linear_formats.first() {
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
    }
}

/// The attention problem an `Sdpa` node poses at sequences of `seq` tokens.
pub(crate) fn sdpa_problem(g: &Graph, node: usize, seq: usize) -> Option<ProblemSummary> {
    let n = &g.nodes[node];
    // A paged node is planned as a whole prompt of `seq` tokens (bottom-right causal, varlen);
    // its decode steps are the same problem with one query row.
    let mask = match n.op {
        Op::Sdpa { mask, .. } => Some(mask),
        Op::PagedSdpa { .. } => None,
        _ => return None,
    };
    let ty = |i: usize| &g.nodes[n.inputs[i].0].ty;
    let dim = |d: Dim| match d {
        Dim::Fixed(n) => n,
        Dim::Batch | Dim::Sequences => 1,
        Dim::Seq => seq,
    };
    let (q, k) = (ty(0), ty(1));
    Some(ProblemSummary {
        shape: SdpaShape {
            batch: 1,
            q_heads: dim(q.dims[1]),
            kv_heads: dim(k.dims[1]),
            q_len: dim(q.dims[2]),
            kv_len: dim(k.dims[2]),
            head_dim: dim(q.dims[3]),
        },
        mask: match mask {
            Some(AttnMask::None | AttnMask::Varlen) => MaskKind::None,
            Some(AttnMask::VarlenCausal | AttnMask::Causal) => MaskKind::CausalTopLeft,
            Some(AttnMask::KeyPadding) => MaskKind::KeyPadding,
            None => MaskKind::CausalBottomRight,
        },
        varlen: matches!(mask, Some(AttnMask::Varlen | AttnMask::VarlenCausal) | None),
    })
}

pub(crate) fn run(g: Graph, cx: &mut Context<'_>) -> Result<(Graph, Vec<String>)> {
    let mut notes = Vec::new();
    let quantized: HashMap<usize, LinearFormat> = linear_formats(&g, cx.quant)?
        .into_iter()
        .map(|c| (c.weight.0, c.format))
        .collect();
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
                let linear = quantized.get(&w).copied().unwrap_or(LinearFormat::F32);
                let (format, reason) = select_linear(out, inn, cx.target, linear);
                cx.formats.insert(w, format);
                // One note per distinct weight shape: the rule only depends on it.
                if seen_linear.insert((out, inn, linear.name())) {
                    let min_rows = PARALLEL_MIN_MACS.div_ceil(out * inn).max(1);
                    let kernel = match (linear, format) {
                        (LinearFormat::Int8(_), _) | (_, WeightFormat::Int8PerChannel) => {
                            "int8 GEMM"
                        }
                        (LinearFormat::Bf16, _) => "bf16 GEMM",
                        (_, WeightFormat::F32Panels16) => "kiln panel GEMM",
                        (_, WeightFormat::F32InOut) => "gemm crate",
                        (_, WeightFormat::Plain) => "backend default",
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
            Op::Sdpa { .. } | Op::PagedSdpa { .. } => {
                for seq in [128, 2048] {
                    let Some(problem) = sdpa_problem(&g, i, seq) else {
                        continue;
                    };
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
        let f32 = LinearFormat::F32;
        let avx2 = CompileTarget {
            linear_formats: vec![WeightFormat::F32Panels16, WeightFormat::F32InOut],
        };
        assert_eq!(select_linear(8, 4, &avx2, f32).0, WeightFormat::F32Panels16);
        let other = CompileTarget {
            linear_formats: vec![WeightFormat::F32InOut, WeightFormat::Plain],
        };
        assert_eq!(select_linear(8, 4, &other, f32).0, WeightFormat::F32InOut);
        let bare = CompileTarget::default();
        let (format, reason) = select_linear(8, 4, &bare, f32);
        assert_eq!(format, WeightFormat::Plain);
        assert!(reason.contains("converts the weight at upload"));
    }

    #[test]
    fn int8_linears_are_stored_quantized_where_the_backend_takes_it_else_plain() {
        let int8 = LinearFormat::Int8(kiln_quant::ActQuant::Dynamic);
        let f32_only = CompileTarget {
            linear_formats: vec![WeightFormat::F32Panels16, WeightFormat::F32InOut],
        };
        let with_int8 = CompileTarget {
            linear_formats: vec![WeightFormat::F32Panels16, WeightFormat::Int8PerChannel],
        };
        let (format, reason) = select_linear(8, 4, &with_int8, int8);
        assert_eq!(format, WeightFormat::Int8PerChannel);
        assert!(reason.contains("quantized once"), "{reason}");
        // f32 linears on the same backend still get its fastest f32 format.
        let f32 = LinearFormat::F32;
        assert_eq!(
            select_linear(8, 4, &with_int8, f32).0,
            WeightFormat::F32Panels16
        );
        // A backend without int8 weights, and bf16 everywhere: plain, converted at load.
        for (target, linear) in [(&f32_only, int8), (&with_int8, LinearFormat::Bf16)] {
            let (format, reason) = select_linear(8, 4, target, linear);
            assert_eq!(format, WeightFormat::Plain, "{linear}");
            assert!(reason.contains("at load"), "{reason}");
        }
    }
}
