//! Attention on bf16 or f16 inputs, accumulating in f32.
//!
//! `q`, `k` and `v` arrive in a 16-bit float type (as a bf16 fast-math plan or an f16 checkpoint
//! would hold them); they are widened to f32 once per call (exact: every bf16 and f16 value is an
//! f32) and every kernel then computes scores, softmax and the weighted sum in f32, so the result
//! equals the f32 kernels on the widened inputs. The output is f32. Widening costs one pass over
//! q, k and v (2 bytes read, 4 written per element), small beside the O(seq²) attention itself.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::{
    Kernel, KernelChoice, SdpaError, SdpaParams, VarlenParams, scaled_dot_product_attention,
    scaled_dot_product_attention_varlen,
};

/// A 16-bit float attention input.
pub trait HalfElement: Copy + Send + Sync + 'static {
    /// Writes `src` widened to f32 into `dst` (same length).
    fn widen(src: &[Self], dst: &mut [f32]);
}

impl HalfElement for bf16 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

impl HalfElement for f16 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

fn widened<T: HalfElement>(x: &[T]) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    T::widen(x, &mut out);
    out
}

/// [`scaled_dot_product_attention`] with bf16 or f16 `q`, `k`, `v` and an f32 `out`.
pub fn scaled_dot_product_attention_half<T: HalfElement>(
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [f32],
    params: &SdpaParams<'_>,
    choice: KernelChoice,
) -> Result<Kernel, SdpaError> {
    params.validate(q.len(), k.len(), v.len(), out.len())?;
    let (q, k, v) = (widened(q), widened(k), widened(v));
    scaled_dot_product_attention(&q, &k, &v, out, params, choice)
}

/// [`scaled_dot_product_attention_varlen`] with bf16 or f16 `q`, `k`, `v` and an f32 `out`.
pub fn scaled_dot_product_attention_varlen_half<T: HalfElement>(
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [f32],
    params: &VarlenParams<'_>,
    choice: KernelChoice,
) -> Result<Kernel, SdpaError> {
    params.validate(q.len(), k.len(), v.len(), out.len())?;
    let (q, k, v) = (widened(q), widened(k), widened(v));
    scaled_dot_product_attention_varlen(&q, &k, &v, out, params, choice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CausalAlign, Mask, SdpaShape};

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 - 0.5) * 4.0
            })
            .collect()
    }

    /// Each kernel on 16-bit inputs equals the f32 reference on the same (widened) values.
    fn check<T: HalfElement>(from: fn(f32) -> T) {
        let shape = SdpaShape {
            batch: 2,
            q_heads: 4,
            kv_heads: 2,
            q_len: 37,
            kv_len: 37,
            head_dim: 24,
        };
        let n = 2 * 4 * 37 * 24;
        let nk = 2 * 2 * 37 * 24;
        let (q, k, v): (Vec<T>, Vec<T>, Vec<T>) = (
            data(n, 1).into_iter().map(from).collect(),
            data(nk, 2).into_iter().map(from).collect(),
            data(nk, 3).into_iter().map(from).collect(),
        );
        for mask in [Mask::None, Mask::Causal(CausalAlign::TopLeft)] {
            let params = SdpaParams {
                shape,
                mask,
                scale: None,
            };
            let mut want = vec![0.0; n];
            crate::reference::sdpa(&widened(&q), &widened(&k), &widened(&v), &mut want, &params);
            for kernel in Kernel::ALL {
                let mut got = vec![f32::NAN; n];
                let ran = scaled_dot_product_attention_half(
                    &q,
                    &k,
                    &v,
                    &mut got,
                    &params,
                    KernelChoice::Force(kernel),
                )
                .unwrap();
                assert_eq!(ran, kernel);
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (g - w).abs() / (1.0 + w.abs()))
                    .fold(0.0f32, f32::max);
                assert!(err < 1e-5, "{kernel:?} {mask:?}: relative error {err}");
            }
        }
        // Varlen: two sequences of 5 and 9 tokens.
        let cu = [0usize, 5, 14];
        let params = VarlenParams {
            q_heads: 4,
            kv_heads: 2,
            head_dim: 24,
            cu_seqlens_q: &cu,
            cu_seqlens_k: &cu,
            causal: None,
            scale: None,
        };
        let (qv, kv) = (&q[..4 * 14 * 24], &k[..2 * 14 * 24]);
        let mut half_out = vec![0.0; 4 * 14 * 24];
        scaled_dot_product_attention_varlen_half(
            qv,
            kv,
            kv,
            &mut half_out,
            &params,
            KernelChoice::Auto,
        )
        .unwrap();
        let mut f32_out = vec![0.0; 4 * 14 * 24];
        scaled_dot_product_attention_varlen(
            &widened(qv),
            &widened(kv),
            &widened(kv),
            &mut f32_out,
            &params,
            KernelChoice::Auto,
        )
        .unwrap();
        assert_eq!(half_out, f32_out);
        // Lengths are checked before anything is widened.
        let mut short = vec![0.0; 3];
        let bad = SdpaParams {
            shape,
            mask: Mask::None,
            scale: None,
        };
        assert!(
            scaled_dot_product_attention_half(&q, &k, &v, &mut short, &bad, KernelChoice::Auto)
                .is_err()
        );
    }

    #[test]
    fn bf16_inputs_accumulate_in_f32() {
        check(bf16::from_f32);
    }

    #[test]
    fn f16_inputs_accumulate_in_f32() {
        check(f16::from_f32);
    }
}
