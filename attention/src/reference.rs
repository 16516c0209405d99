//! The safe reference: a plain loop every kernel is tested against.
//!
//! For each query row it computes every score, subtracts the row maximum, exponentiates,
//! normalises and takes the weighted sum of values. No `unsafe`, no GEMM: five lines of
//! arithmetic per row, so a disagreement with a fast kernel points at the fast kernel.

use rayon::prelude::*;

use crate::params::SdpaParams;

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

/// Reference attention. The caller has validated the buffer lengths
/// ([`SdpaParams::validate`](crate::SdpaParams::validate)); a fully masked query row produces
/// zeros.
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
            let mut scores = vec![0.0f32; s.kv_len];
            for i in 0..s.q_len {
                let qi = &q_head[i * d..(i + 1) * d];
                let oi = &mut out_head[i * d..(i + 1) * d];
                oi.fill(0.0);
                let visible = params.mask.visible_keys(i, s.q_len, s.kv_len);
                let row_ok = params.mask.row(b, h, i, s.kv_len);
                let mut max = f32::NEG_INFINITY;
                for j in 0..visible {
                    scores[j] = if row_ok.allows(j) {
                        dot(qi, &k_head[j * d..(j + 1) * d]) * scale + row_ok.bias(j)
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
