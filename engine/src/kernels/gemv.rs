//! Matrix products with few rows (`m <= SMALL_M`): decoding one token per sequence.
//!
//! A decode step multiplies a handful of rows (one per sequence in the batch) by every weight
//! matrix, so it is bound by reading the weights, not by arithmetic. The `gemm` crate runs such
//! problems single-threaded below its size threshold and packs the weights for a GEMM's reuse
//! that a GEMV does not have. Here the weights (`[k, n]` row-major, the layout linear weights are
//! uploaded in) are read exactly once, in wide column blocks (whole rows for one sequence)
//! split across threads by column block and range of rows: each task keeps its
//! `m × block` accumulators in L1 and adds `x[r, i] · w[i, block]` for every row `i` of the
//! weights, an AXPY the compiler vectorises. On x86-64 the same loop is compiled a second time
//! with AVX2 and FMA enabled, chosen at run time.

use rayon::prelude::*;

/// Most rows this path takes; above it the GEMM is faster (the weights are reused enough).
pub const SMALL_M: usize = 8;

/// Bytes of accumulators one block keeps (`m × width` f32): half of a 32 KiB L1 data cache.
const ACC_BYTES: usize = 16 << 10;

/// Below this many weight elements one thread does it all.
const PARALLEL_MIN: usize = 1 << 16;

/// Columns per block for `m` rows: as wide as the accumulator budget allows, so that each weight
/// row segment a block reads is long and contiguous (for `m = 1` a 768- or 3072-wide layer is
/// read row after row, start to end). Narrow blocks of a wide matrix read short pieces of many
/// rows a whole row apart: every piece is a new page for the TLB and a fresh start for the
/// prefetcher (measured: GPT-2's 50257-wide head in 256-column blocks ran well below the
/// bandwidth a sequential read gets).
fn block_cols(n: usize, m: usize) -> usize {
    let budget = (ACC_BYTES / 4 / m.max(1)) / 16 * 16;
    budget.max(16).min(n)
}

/// `acc[r, ..] += Σ_{i in rows} x[r, i] · w[i, c0..c0 + acc_width]` for the rows of `x`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block_body(
    acc: &mut [f32],
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    c0: usize,
    rows: (usize, usize),
) {
    let width = acc.len() / m;
    for i in rows.0..rows.1 {
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
#[allow(clippy::too_many_arguments)]
fn block_avx2(
    acc: &mut [f32],
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    c0: usize,
    rows: (usize, usize),
) {
    block_body(acc, x, w, m, k, n, c0, rows);
}

#[allow(unsafe_code, clippy::too_many_arguments)]
fn block(
    acc: &mut [f32],
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    c0: usize,
    rows: (usize, usize),
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above), which is all that
        // `block_avx2` requires; its body is the same safe code as the portable path.
        unsafe { block_avx2(acc, x, w, m, k, n, c0, rows) };
        return;
    }
    block_body(acc, x, w, m, k, n, c0, rows);
}

/// Row-major `y[m×n] = (accumulate ? y : 0) + x[m×k] · w[k×n]` for `m <= SMALL_M`.
///
/// The work is split into tasks of (column block, range of weight rows), at least four per
/// thread when there is enough of it; tasks that share a column block each sum their rows into
/// their own accumulators, added together at the end.
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
        m <= SMALL_M
            && super::holds(y.len(), m, n)
            && super::holds(x.len(), m, k)
            && super::holds(w.len(), k, n),
        "matmul_small_m: bad shapes"
    );
    if m == 0 || n == 0 {
        return;
    }
    if !accumulate {
        y[..m * n].fill(0.0);
    }
    let parallel = threads > 1 && k * n >= PARALLEL_MIN;
    let cols = block_cols(n, m);
    let col_blocks = n.div_ceil(cols);
    let want = if parallel { 4 * threads } else { 1 };
    // Split the weight rows only as far as needed for `want` tasks, and never below 64 rows.
    let splits = want.div_ceil(col_blocks).min(k / 64).max(1);
    let tasks: Vec<(usize, (usize, usize))> = (0..col_blocks)
        .flat_map(|b| (0..splits).map(move |s| (b * cols, (k * s / splits, k * (s + 1) / splits))))
        .collect();
    let run = |&(c0, rows): &(usize, (usize, usize))| -> Vec<f32> {
        let width = cols.min(n - c0);
        let mut acc = vec![0.0f32; m * width];
        block(&mut acc, x, w, m, k, n, c0, rows);
        acc
    };
    let results: Vec<Vec<f32>> = if parallel {
        tasks.par_iter().map(run).collect()
    } else {
        tasks.iter().map(run).collect()
    };
    for (&(c0, _), acc) in tasks.iter().zip(results) {
        let width = cols.min(n - c0);
        for r in 0..m {
            let dst = &mut y[r * n + c0..r * n + c0 + width];
            for (d, a) in dst.iter_mut().zip(&acc[r * width..(r + 1) * width]) {
                *d += a;
            }
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
