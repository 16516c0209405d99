//! Row-wise and element-wise CPU kernels (safe code, parallel over rows with rayon).

use rayon::prelude::*;

use super::vmath;
use crate::ir::Activation;

/// Rows shorter than this run serially: splitting tiny work costs more than it saves.
const PAR_MIN_ELEMS: usize = 1 << 14;

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

/// LayerNorm over rows of `width`, in place: two-pass mean and biased variance, as PyTorch does.
pub fn layer_norm(x: &mut [f32], width: usize, gamma: &[f32], beta: &[f32], eps: f32) {
    for_rows(x, width, |row| {
        let n = row.len() as f32;
        let mean = row.iter().sum::<f32>() / n;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
            *v = (*v - mean) * inv * g + b;
        }
    });
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

pub fn activation(x: &mut [f32], act: Activation) {
    // The GELUs and SiLU go through `vmath`'s branch-free versions, which vectorise (libm's
    // `erff`/`tanhf`/`expf` are scalar calls: ~15% of a GPT-2 prefill and ~20 ms per MiniLM
    // layer at 32×128 before).
    let f: fn(&mut [f32]) = match act {
        Activation::Gelu => vmath::gelu_slice,
        Activation::GeluTanh => vmath::gelu_tanh_slice,
        Activation::Relu => |c| c.iter_mut().for_each(|v| *v = v.max(0.0)),
        Activation::Tanh => |c| c.iter_mut().for_each(|v| *v = v.tanh()),
        Activation::Silu => vmath::silu_slice,
    };
    if x.len() >= PAR_MIN_ELEMS {
        x.par_chunks_mut(4096).for_each(f);
    } else {
        f(x);
    }
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
