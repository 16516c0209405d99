//! f32 matrix multiply through the `gemm` crate, writing into a caller-owned buffer.
//!
//! burn-flex calls the same micro-kernels but allocates and zero-fills a fresh output per call;
//! writing straight into the output (which already holds the bias) saves that pass and lets the
//! bias add ride along as `C = C + A·B`.

/// Problems smaller than this many multiply-adds run on one thread: below it, waking the pool
/// costs more than it saves (measured on MiniLM's 1×16 shapes).
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// Row-major `c[m×n] = (accumulate ? c : 0) + a[m×k] · b[k×n]`.
///
/// Panics if a slice is shorter than its shape says: callers derive both from checked shapes,
/// and the check guards the raw-pointer call below.
#[allow(clippy::too_many_arguments, unsafe_code)]
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
    assert!(
        c.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
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
    // SAFETY: the assert above guarantees `c` holds m·n, `a` m·k and `b` k·n elements; the
    // strides below describe exactly those dense row-major layouts (column stride 1, row stride
    // = row length), so every address gemm computes is in bounds. `c` is borrowed mutably and
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
            1,
            n as isize,
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
