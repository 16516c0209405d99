//! The scalar reference every int8 kernel is tested against: quantize, multiply in i64, and
//! dequantize with the same f32 operations as the kernels' epilogue. Written for clarity, not speed.

use super::{ActParams, ActQuant};

/// Quantizes `m × k` activations row by row: the u8 values and each row's parameters.
pub fn quantize_activations(
    x: &[f32],
    m: usize,
    k: usize,
    act: ActQuant,
) -> (Vec<u8>, Vec<ActParams>) {
    let mut q = Vec::with_capacity(m * k);
    let mut params = Vec::with_capacity(m);
    for row in x.chunks(k).take(m) {
        let p = match act {
            ActQuant::Static(p) => p,
            ActQuant::Dynamic => {
                let lo = row.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                ActParams::from_range(lo, hi)
            }
        };
        q.extend(row.iter().map(|&v| p.quantize(v)));
        params.push(p);
    }
    (q, params)
}

/// `y[i, j] = (Σ_k (q[i,k] − z_i) · w_q[j,k]) · (s_i · s_j) + bias[j]` for `[n, k]` weights `w_q`
/// with per-channel scales.
#[allow(clippy::too_many_arguments)]
pub fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    w_q: &[i8],
    w_scales: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    act: ActQuant,
) -> Vec<f32> {
    let (q, params) = quantize_activations(x, m, k, act);
    let mut y = vec![0.0f32; m * n];
    for i in 0..m {
        let z = i64::from(params[i].zero_point);
        for j in 0..n {
            let acc: i64 = (0..k)
                .map(|p| (i64::from(q[i * k + p]) - z) * i64::from(w_q[j * k + p]))
                .sum();
            let acc = i32::try_from(acc).expect("int8 sums fit i32 for k ≤ MAX_K");
            y[i * n + j] =
                (acc as f32) * (params[i].scale * w_scales[j]) + bias.map_or(0.0, |b| b[j]);
        }
    }
    y
}
