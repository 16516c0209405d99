//! f32 matrix multiply through the `gemm` crate, writing into a caller-owned buffer.
//!
//! burn-flex calls the same micro-kernels but allocates and zero-fills a fresh output per call;
//! writing straight into the output (which already holds the bias) saves that pass and lets the
//! bias add ride along as `C = C + A·B`.

/// Problems smaller than this many multiply-adds run on one thread: below it, waking the pool
/// costs more than it saves (measured on MiniLM's 1×16 shapes).
pub const PARALLEL_MIN_MACS: usize = 1 << 18;

use crate::ir::Activation;
use crate::kernels::rowwise;

/// A linear layer on a weight pre-packed as `[in, out]`: `y[m×n] = act(x[m×k] · w[k×n] + bias)`.
/// The bias is written into `y` first so the GEMM adds onto it (`C = C + A·B`), and the
/// activation runs over `y` as the epilogue.
#[allow(clippy::too_many_arguments)]
pub fn linear(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    bias: Option<&[f32]>,
    act: Option<Activation>,
    threads: usize,
) {
    if let Some(b) = bias {
        for row in y[..m * n].chunks_mut(n.max(1)) {
            row.copy_from_slice(&b[..n]);
        }
    }
    matmul(y, x, w, m, k, n, bias.is_some(), threads);
    if let Some(act) = act {
        rowwise::activation(&mut y[..m * n], act);
    }
}

/// Row-major `c[m×n] = (accumulate ? c : 0) + a[m×k] · b[k×n]`.
///
/// Panics if a slice is shorter than its shape says: callers derive both from checked shapes,
/// and the check guards the raw-pointer call below.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
    threads: usize,
) {
    gemm_strided(c, a, b, (m, k, n), (n, 1), accumulate, threads);
}

/// `c[m×n] = a[m×k] · B` where `B[p][j] = b[p·rs + j·cs]` (so `(1, k)` reads `b` as `[n, k]`,
/// transposed).
pub fn matmul_strided(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    (m, k, n): (usize, usize, usize),
    (rs, cs): (usize, usize),
    threads: usize,
) {
    gemm_strided(c, a, b, (m, k, n), (rs, cs), false, threads);
}

#[allow(unsafe_code)]
fn gemm_strided(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    (m, k, n): (usize, usize, usize),
    (b_rs, b_cs): (usize, usize),
    accumulate: bool,
    threads: usize,
) {
    let b_needed = if k == 0 || n == 0 {
        Some(0)
    } else {
        (k - 1)
            .checked_mul(b_rs)
            .zip((n - 1).checked_mul(b_cs))
            .and_then(|(x, y)| x.checked_add(y)?.checked_add(1))
    };
    assert!(
        super::holds(c.len(), m, n)
            && super::holds(a.len(), m, k)
            && b_needed.is_some_and(|need| b.len() >= need),
        "matmul: buffers too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let parallelism = if threads > 1 && m * n * k >= PARALLEL_MIN_MACS {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the assert above guarantees `c` holds m·n and `a` m·k elements (dense row-major:
    // column stride 1, row stride = row length), and that `b`'s largest address under its
    // strides, (k-1)·rs + (n-1)·cs, is in bounds; so every address gemm computes is in bounds. `c` is borrowed mutably and
    // does not alias `a` or `b` (distinct borrows). With `read_dst = false` gemm never reads `c`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The reference: a triple loop in f64.
pub fn matmul_reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f64;
            for p in 0..k {
                acc += f64::from(a[i * k + p]) * f64::from(b[p * n + j]);
            }
            c[i * n + j] = acc as f32;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_reference_on_awkward_shapes() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 7, 5),
            (17, 33, 9),
            (64, 384, 96),
            (129, 65, 257),
        ] {
            let a = fill(m * k, 1);
            let b = fill(k * n, 2);
            for threads in [1, 2] {
                let mut c = vec![f32::NAN; m * n];
                matmul(&mut c, &a, &b, m, k, n, false, threads);
                let want = matmul_reference(&a, &b, m, k, n);
                for (x, y) in c.iter().zip(&want) {
                    assert!(
                        (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                        "{m}x{k}x{n}: {x} vs {y}"
                    );
                }
            }
        }
    }

    #[test]
    fn strided_b_reads_a_transposed_matrix() {
        let (m, k, n) = (5, 7, 3);
        let a = fill(m * k, 5);
        let bt = fill(n * k, 6); // [n, k]
        let mut b = vec![0.0; k * n];
        for p in 0..k {
            for j in 0..n {
                b[p * n + j] = bt[j * k + p];
            }
        }
        let mut c = vec![0.0; m * n];
        matmul_strided(&mut c, &a, &bt, (m, k, n), (1, k), 1);
        let want = matmul_reference(&a, &b, m, k, n);
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-5);
        }
    }

    #[test]
    fn accumulates_into_existing_output() {
        let (m, k, n) = (4, 6, 3);
        let a = fill(m * k, 3);
        let b = fill(k * n, 4);
        let mut c = vec![1.0f32; m * n];
        matmul(&mut c, &a, &b, m, k, n, true, 1);
        let want = matmul_reference(&a, &b, m, k, n);
        for (x, y) in c.iter().zip(&want) {
            assert!((x - (y + 1.0)).abs() < 1e-5);
        }
    }
}
