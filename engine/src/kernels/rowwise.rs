//! Row-wise and element-wise CPU kernels (safe code, parallel over rows with rayon).

use rayon::prelude::*;

use super::vmath;
use crate::ir::Activation;

/// Rows shorter than this run serially: splitting tiny work costs more than it saves.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 14;

fn for_rows(data: &mut [f32], width: usize, f: impl Fn(&mut [f32]) + Sync + Send) {
    if width == 0 {
        return;
    }
    if data.len() >= PAR_MIN_ELEMS {
        data.par_chunks_mut(width).for_each(f);
    } else {
        data.chunks_mut(width).for_each(f);
    }
}

/// Sum of a row in 8 interleaved lanes (so the loop vectorises; a single running sum cannot,
/// as float addition is not associative), then the lanes pairwise.
#[inline(always)]
fn lane_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += f(*v);
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for v in rest {
        s += f(*v);
    }
    s
}

/// LayerNorm of one row in place: two-pass mean and biased variance, as PyTorch does.
#[inline(always)]
fn layer_norm_row(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let n = row.len() as f32;
    let mean = lane_sum(row, |v| v) / n;
    let var = lane_sum(row, |v| (v - mean) * (v - mean)) / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
        *v = (*v - mean) * inv * g + b;
    }
}

/// RMSNorm over rows of `width`, in place: `x / sqrt(mean(x²) + eps) · gamma`, as Hugging
/// Face's `LlamaRMSNorm` computes it in f32.
pub fn rms_norm(x: &mut [f32], width: usize, gamma: &[f32], eps: f32) {
    for_rows(x, width, |row| {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, g) in row.iter_mut().zip(gamma) {
            *v = g * (*v * inv);
        }
    });
}

/// Rotary embedding in place over `rows` head rows of `d` channels: row `i` turns its first
/// `2r` channels by the angles whose cosines and sines are `cos[table(i)·r..]` (rotate-half:
/// channel `j` pairs with `j + r`).
pub fn rope(
    x: &mut [f32],
    d: usize,
    cos: &[f32],
    sin: &[f32],
    r: usize,
    table: impl Fn(usize) -> usize + Sync,
) {
    let body = |(i, row): (usize, &mut [f32])| {
        let t = table(i) * r;
        let (c, s) = (&cos[t..t + r], &sin[t..t + r]);
        let (lo, hi) = row[..2 * r].split_at_mut(r);
        for j in 0..r {
            let (a, b) = (lo[j], hi[j]);
            lo[j] = a * c[j] - b * s[j];
            hi[j] = b * c[j] + a * s[j];
        }
    };
    if x.len() >= PAR_MIN_ELEMS {
        x.par_chunks_mut(d).enumerate().for_each(body);
    } else {
        x.chunks_mut(d).enumerate().for_each(body);
    }
}

simd_dispatch!(
    fn layer_norm_rows(x: &mut [f32], width: usize, gamma: &[f32], beta: &[f32], eps: f32) {
        x.chunks_mut(width)
            .for_each(|row| layer_norm_row(row, gamma, beta, eps));
    }
);

simd_dispatch!(
    fn add_layer_norm_rows(
        x: &mut [f32],
        residual: &[f32],
        width: usize,
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) {
        for (row, r) in x.chunks_mut(width).zip(residual.chunks(width)) {
            row.iter_mut().zip(r).for_each(|(a, b)| *a += b);
            layer_norm_row(row, gamma, beta, eps);
        }
    }
);

/// Rows per parallel task: enough work to cover rayon's hand-off.
fn rows_per_task(width: usize) -> usize {
    (PAR_MIN_ELEMS / 4 / width.max(1)).max(1)
}

/// LayerNorm over rows of `width`, in place.
pub fn layer_norm(x: &mut [f32], width: usize, gamma: &[f32], beta: &[f32], eps: f32) {
    if width == 0 {
        return;
    }
    if x.len() >= PAR_MIN_ELEMS {
        x.par_chunks_mut(rows_per_task(width) * width)
            .for_each(|c| layer_norm_rows(c, width, gamma, beta, eps));
    } else {
        layer_norm_rows(x, width, gamma, beta, eps);
    }
}

/// `LayerNorm(x + residual)` over rows of `width`, into `x`, in one pass over each row: the
/// same arithmetic as [`layer_norm`] after an element-wise add, so the results are identical.
pub fn add_layer_norm(
    x: &mut [f32],
    residual: &[f32],
    width: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    if width == 0 {
        return;
    }
    if x.len() >= PAR_MIN_ELEMS {
        let chunk = rows_per_task(width) * width;
        x.par_chunks_mut(chunk)
            .zip(residual.par_chunks(chunk))
            .for_each(|(c, r)| add_layer_norm_rows(c, r, width, gamma, beta, eps));
    } else {
        add_layer_norm_rows(x, residual, width, gamma, beta, eps);
    }
}

/// Element-wise `a += b`.
pub fn add(a: &mut [f32], b: &[f32]) {
    if a.len() >= PAR_MIN_ELEMS {
        a.par_chunks_mut(4096)
            .zip(b.par_chunks(4096))
            .for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(p, q)| *p += q));
    } else {
        a.iter_mut().zip(b).for_each(|(p, q)| *p += q);
    }
}

fn activation_fn(act: Activation) -> fn(&mut [f32]) {
    match act {
        Activation::Gelu => vmath::gelu_slice,
        Activation::GeluTanh => vmath::gelu_tanh_slice,
        Activation::Silu => vmath::silu_slice,
        Activation::Relu => |c| c.iter_mut().for_each(|v| *v = v.max(0.0)),
        Activation::Tanh => |c| c.iter_mut().for_each(|v| *v = v.tanh()),
    }
}

/// An activation over a slice, in place (vectorised for GELU, tanh-GELU and SiLU), split over
/// threads when the slice is large.
pub fn activation(x: &mut [f32], act: Activation) {
    let f = activation_fn(act);
    if x.len() >= PAR_MIN_ELEMS {
        x.par_chunks_mut(4096).for_each(f);
    } else {
        f(x);
    }
}

/// [`activation`] on the calling thread (for kernels that are already split over threads).
pub fn activation_serial(x: &mut [f32], act: Activation) {
    activation_fn(act)(x);
}

/// Softmax over rows of `width`, in place, max-subtracted.
pub fn softmax(x: &mut [f32], width: usize) {
    for_rows(x, width, |row| {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        row.iter_mut().for_each(|v| *v /= sum);
    });
}

/// `x / max(||x||₂, 1e-12)` per row, as `torch.nn.functional.normalize`.
pub fn l2_normalize(x: &mut [f32], width: usize) {
    for_rows(x, width, |row| {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= norm);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_of_constant_row_is_beta() {
        let mut x = vec![3.0f32; 8];
        layer_norm(&mut x, 4, &[2.0; 4], &[0.5; 4], 1e-12);
        assert!(x.iter().all(|&v| (v - 0.5).abs() < 1e-6));
    }

    #[test]
    fn layer_norm_matches_a_f64_reference_and_add_layer_norm_equals_add_then_norm() {
        let width = 37;
        let x: Vec<f32> = (0..width * 5)
            .map(|i| ((i * 7919) % 101) as f32 / 13.0 - 3.0)
            .collect();
        let r: Vec<f32> = (0..width * 5)
            .map(|i| ((i * 104_729) % 89) as f32 / 29.0)
            .collect();
        let gamma: Vec<f32> = (0..width).map(|i| 0.5 + i as f32 / 40.0).collect();
        let beta: Vec<f32> = (0..width).map(|i| i as f32 / 80.0 - 0.2).collect();
        let mut got = x.clone();
        layer_norm(&mut got, width, &gamma, &beta, 1e-12);
        for (row, out) in x.chunks(width).zip(got.chunks(width)) {
            let n = width as f64;
            let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let var = row
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / n;
            for (j, o) in out.iter().enumerate() {
                let want = (f64::from(row[j]) - mean) / (var + 1e-12).sqrt() * f64::from(gamma[j])
                    + f64::from(beta[j]);
                assert!((f64::from(*o) - want).abs() < 1e-5, "{o} vs {want}");
            }
        }
        let mut unfused = x.clone();
        add(&mut unfused, &r);
        layer_norm(&mut unfused, width, &gamma, &beta, 1e-12);
        let mut fused = x.clone();
        add_layer_norm(&mut fused, &r, width, &gamma, &beta, 1e-12);
        assert_eq!(fused, unfused);
    }

    #[test]
    fn gelu_matches_known_values() {
        let mut x = vec![-1.0f32, 0.0, 1.0, 3.0];
        activation(&mut x, Activation::Gelu);
        let want = [-0.158_655_25, 0.0, 0.841_344_8, 2.995_950_4];
        for (a, b) in x.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_even_with_large_values() {
        let mut x = vec![1000.0f32, 1001.0, 999.0, -5.0, 0.0, 5.0];
        softmax(&mut x, 3);
        for row in x.chunks(3) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn l2_normalize_leaves_zero_rows_zero() {
        let mut x = vec![3.0f32, 4.0, 0.0, 0.0];
        l2_normalize(&mut x, 2);
        assert_eq!(x, vec![0.6, 0.8, 0.0, 0.0]);
    }
}
