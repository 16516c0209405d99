//! The math kernel: the reference every other attention kernel is tested against.
//!
//! For each query row it computes every score, subtracts the row maximum, exponentiates,
//! normalises and takes the weighted sum of values. One row of scores is held at a time
//! (`kv_len` floats per worker), so memory is `O(kv_len)` per thread, not `O(q_len * kv_len)`.
//! Work is split over `batch * q_heads` with rayon. No `unsafe`: this is the safe reference.

use rayon::prelude::*;

use crate::params::{CausalAlign, Mask, SdpaParams};

/// Number of keys query `i` may see from the start of the sequence (causal limit), or `kv_len`.
fn visible_keys(mask: &Mask<'_>, i: usize, q_len: usize, kv_len: usize) -> usize {
    match mask {
        Mask::Causal(CausalAlign::TopLeft) => (i + 1).min(kv_len),
        Mask::Causal(CausalAlign::BottomRight) => (i + 1 + kv_len - q_len).min(kv_len),
        Mask::None | Mask::KeyPadding(_) | Mask::Bool { .. } => kv_len,
    }
}

/// Dot product with eight independent partial sums, which the compiler can vectorise.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (ca, cb) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut tail = 0.0;
    for (x, y) in a[chunks..].iter().zip(&b[chunks..]) {
        tail += x * y;
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
}

/// Runs the math kernel. The caller has validated the buffer lengths
/// ([`SdpaParams::validate`]); a fully masked query row produces zeros.
pub fn sdpa(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], params: &SdpaParams<'_>) {
    let s = params.shape;
    let d = s.head_dim;
    let scale = params.scale();
    let group = s.q_heads / s.kv_heads;
    let head_out = s.q_len * d;
    if head_out == 0 {
        return;
    }
    out.par_chunks_mut(head_out)
        .enumerate()
        .for_each(|(bh, out_head)| {
            let b = bh / s.q_heads;
            let h = bh % s.q_heads;
            let kvh = h / group;
            let q_head = &q[bh * head_out..(bh + 1) * head_out];
            let kv_off = (b * s.kv_heads + kvh) * s.kv_len * d;
            let k_head = &k[kv_off..kv_off + s.kv_len * d];
            let v_head = &v[kv_off..kv_off + s.kv_len * d];
            // Per query row `i`, the keys it may attend (None = all within the causal limit).
            let bool_strides = match params.mask {
                Mask::Bool { dims, .. } => Mask::bool_strides(dims),
                _ => [0; 4],
            };
            let key_ok = |i: usize| -> Option<&[bool]> {
                match params.mask {
                    Mask::KeyPadding(m) => Some(&m[b * s.kv_len..(b + 1) * s.kv_len]),
                    Mask::Bool { data, dims } => {
                        let st = bool_strides;
                        let start = b * st[0] + h * st[1] + i * st[2];
                        let len = if dims[3] == 1 { 1 } else { s.kv_len };
                        Some(&data[start..start + len])
                    }
                    Mask::None | Mask::Causal(_) => None,
                }
            };
            let mut scores = vec![0.0f32; s.kv_len];
            for i in 0..s.q_len {
                let qi = &q_head[i * d..(i + 1) * d];
                let oi = &mut out_head[i * d..(i + 1) * d];
                oi.fill(0.0);
                let visible = visible_keys(&params.mask, i, s.q_len, s.kv_len);
                let row_ok = key_ok(i);
                let mut max = f32::NEG_INFINITY;
                for j in 0..visible {
                    let allowed = row_ok.is_none_or(|m| if m.len() == 1 { m[0] } else { m[j] });
                    scores[j] = if allowed {
                        dot(qi, &k_head[j * d..(j + 1) * d]) * scale
                    } else {
                        f32::NEG_INFINITY
                    };
                    max = max.max(scores[j]);
                }
                if max == f32::NEG_INFINITY {
                    continue; // every key masked: defined as a zero output row
                }
                let mut sum = 0.0f32;
                for sc in &mut scores[..visible] {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                let inv = 1.0 / sum;
                for (j, &p) in scores[..visible].iter().enumerate() {
                    if p == 0.0 {
                        continue;
                    }
                    let w = p * inv;
                    for (o, x) in oi.iter_mut().zip(&v_head[j * d..(j + 1) * d]) {
                        *o += w * x;
                    }
                }
            }
        });
}
