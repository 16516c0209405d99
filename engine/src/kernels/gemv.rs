//! Matrix products with few rows (`m <= SMALL_M`): decoding one token per sequence.
//!
//! A decode step multiplies a handful of rows (one per sequence in the batch) by every weight
//! matrix, so it is bound by reading the weights, not by arithmetic. The `gemm` crate runs such
//! problems single-threaded below its size threshold and packs the weights for a GEMM's reuse
//! that a GEMV does not have. Here the weights (`[k, n]` row-major, the layout linear weights are
//! uploaded in) are read exactly once, in column blocks split across threads: each block keeps the
//! `m × block` accumulators in L1 and adds `x[r, i] · w[i, block]` for every row `i` of the
//! weights, an AXPY the compiler vectorises. On x86-64 the same loop is compiled a second time
//! with AVX2 and FMA enabled, chosen at run time.

use rayon::prelude::*;

/// Most rows this path takes; above it the GEMM is faster (the weights are reused enough).
pub const SMALL_M: usize = 8;

/// Most columns per block: `SMALL_M × MAX_COLS` accumulators stay in L1.
const MAX_COLS: usize = 256;
/// Fewest columns per block (64 floats: each weight row segment is four whole cache lines).
const MIN_COLS: usize = 64;

/// Columns per block for `n` columns on `threads` threads: as wide as possible, but narrow
/// enough for about four blocks per thread. A 768-wide output in 256-column blocks is three
/// blocks, so one of two threads would do two of them and the other one (measured: GPT-2's
/// 3072→768 projection, a third of each layer's weights, ran at two thirds of the bandwidth).
fn block_cols(n: usize, threads: usize) -> usize {
    let per = n.div_ceil(4 * threads.max(1));
    per.next_multiple_of(16).clamp(MIN_COLS, MAX_COLS)
}

/// Below this many weight elements one thread does it all.
const PARALLEL_MIN: usize = 1 << 16;

/// `acc[r, ..] += Σ_i x[r, i] · w[i, c0..c0 + acc_width]` for the rows of `x`.
#[inline(always)]
fn block_body(acc: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize, c0: usize) {
    let width = acc.len() / m;
    for i in 0..k {
        let wrow = &w[i * n + c0..i * n + c0 + width];
        for r in 0..m {
            let a = x[r * k + i];
            if a == 0.0 {
                continue;
            }
            let out = &mut acc[r * width..(r + 1) * width];
            for (o, &b) in out.iter_mut().zip(wrow) {
                *o += a * b;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn block_avx2(acc: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize, c0: usize) {
    block_body(acc, x, w, m, k, n, c0);
}

#[allow(unsafe_code)]
fn block(acc: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize, c0: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above), which is all that
        // `block_avx2` requires; its body is the same safe code as the portable path.
        unsafe { block_avx2(acc, x, w, m, k, n, c0) };
        return;
    }
    block_body(acc, x, w, m, k, n, c0);
}

/// Row-major `y[m×n] = (accumulate ? y : 0) + x[m×k] · w[k×n]` for `m <= SMALL_M`.
///
/// Panics if a slice is shorter than its shape says (callers derive both from checked shapes).
#[allow(clippy::too_many_arguments)]
pub fn matmul_small_m(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
    threads: usize,
) {
    assert!(
        m <= SMALL_M && y.len() >= m * n && x.len() >= m * k && w.len() >= k * n,
        "matmul_small_m: bad shapes"
    );
    if m == 0 || n == 0 {
        return;
    }
    if !accumulate {
        y[..m * n].fill(0.0);
    }
    let cols = block_cols(n, threads);
    let blocks: Vec<usize> = (0..n).step_by(cols).collect();
    let run = |c0: usize| -> Vec<f32> {
        let width = cols.min(n - c0);
        let mut acc = vec![0.0f32; m * width];
        for r in 0..m {
            acc[r * width..(r + 1) * width].copy_from_slice(&y[r * n + c0..r * n + c0 + width]);
        }
        block(&mut acc, x, w, m, k, n, c0);
        acc
    };
    let results: Vec<Vec<f32>> = if threads > 1 && k * n >= PARALLEL_MIN {
        blocks.par_iter().map(|&c0| run(c0)).collect()
    } else {
        blocks.iter().map(|&c0| run(c0)).collect()
    };
    for (&c0, acc) in blocks.iter().zip(results) {
        let width = cols.min(n - c0);
        for r in 0..m {
            y[r * n + c0..r * n + c0 + width].copy_from_slice(&acc[r * width..(r + 1) * width]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm::matmul_reference;

    #[test]
    fn matches_the_reference_for_every_small_m() {
        let fill = |n: usize, s: u32| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(s) % 1000) as f32 / 500.0
                        - 1.0
                })
                .collect()
        };
        for &(k, n) in &[(1, 1), (7, 3), (64, 300), (96, 513), (300, 1000)] {
            for m in 1..=SMALL_M {
                let x = fill(m * k, 1);
                let w = fill(k * n, 2);
                let want = matmul_reference(&x, &w, m, k, n);
                for threads in [1, 2] {
                    let mut y = vec![1.0f32; m * n];
                    matmul_small_m(&mut y, &x, &w, m, k, n, true, threads);
                    for (a, b) in y.iter().zip(&want) {
                        assert!(
                            (a - (b + 1.0)).abs() <= 1e-4 * (1.0 + b.abs()),
                            "{m}x{k}x{n}"
                        );
                    }
                    let mut y = vec![f32::NAN; m * n];
                    matmul_small_m(&mut y, &x, &w, m, k, n, false, threads);
                    for (a, b) in y.iter().zip(&want) {
                        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{m}x{k}x{n}");
                    }
                }
            }
        }
    }
}
