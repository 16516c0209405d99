//! kiln's GEMM for linear layers, on weights pre-packed into column panels, with the bias and
//! the activation applied as the epilogue of each output tile.
//!
//! Layout: the `[out, in]` weight is transposed and cut into panels of [`NR`] = 16 output
//! columns; panel `p` holds `w[p·16 + j][kk]` at `p·in·16 + kk·16 + j` (zero past `out`). One
//! `kk` step of a panel is one 64-byte line, the panel is contiguous, so the micro-kernel streams
//! it without a stride and nothing is packed at run time (the `gemm` crate re-packs the weight on
//! every call, which at 16 rows costs as much as the arithmetic).
//!
//! Micro-kernel: [`MR`] = 6 rows × 16 columns in twelve AVX2 accumulators, FMA over the whole
//! `k`, started from the bias; the tile is stored and the activation runs on it while it is in
//! L1. Every output element is `fma(x[k-1], w[k-1], … fma(x[0], w[0], bias))` in `k` order,
//! whatever the shape, tiling or thread count, so a row's result does not depend on the other
//! rows in the batch (a sequence gives bit-identical outputs alone or batched).
//!
//! Work split: row blocks of [`ROW_BLOCK`] rows in parallel when there are enough rows; below
//! that (small batches, e.g. one 16-token request), the panels are split across threads instead,
//! each writing its columns into a scratch tile that is then copied into place.

use rayon::prelude::*;

use crate::ir::Activation;
use crate::kernels::rowwise;

/// Panel width in output columns (two 8-float AVX2 registers).
pub const NR: usize = 16;
/// Rows per micro-tile.
pub const MR: usize = 6;
/// Rows per parallel task when splitting by rows.
const ROW_BLOCK: usize = 48;

/// Floats a packed `[out, in]` weight takes.
pub fn packed_len(out: usize, inn: usize) -> usize {
    out.div_ceil(NR) * inn * NR
}

/// Packs a row-major `[out, in]` weight into panels.
pub fn pack(w: &[f32], out: usize, inn: usize) -> Vec<f32> {
    let mut p = vec![0.0f32; packed_len(out, inn)];
    for o in 0..out {
        let (panel, j) = (o / NR, o % NR);
        let base = panel * inn * NR + j;
        for (kk, &v) in w[o * inn..(o + 1) * inn].iter().enumerate() {
            p[base + kk * NR] = v;
        }
    }
    p
}

/// `y[m×n] = act(x[m×k] · W + bias)` for a weight packed by [`pack`] (`n` = out, `k` = in).
///
/// Panics if a slice is shorter than its shape says (callers derive both from checked shapes).
#[allow(clippy::too_many_arguments)]
pub fn linear(
    y: &mut [f32],
    x: &[f32],
    panels: &[f32],
    m: usize,
    k: usize,
    n: usize,
    bias: Option<&[f32]>,
    act: Option<Activation>,
    threads: usize,
) {
    assert!(
        y.len() >= m * n
            && x.len() >= m * k
            && panels.len() >= packed_len(n, k)
            && bias.is_none_or(|b| b.len() >= n),
        "panel linear: buffers too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    let y = &mut y[..m * n];
    let x = &x[..m * k];
    let n_panels = n.div_ceil(NR);
    let macs = m * n * k;
    if threads <= 1 || macs < super::gemm::PARALLEL_MIN_MACS {
        tile(y, n, 0, x, k, panels, 0..n_panels, n, bias, act);
    } else if m >= 2 * ROW_BLOCK * threads {
        y.par_chunks_mut(ROW_BLOCK * n)
            .zip(x.par_chunks(ROW_BLOCK * k))
            .for_each(|(yb, xb)| tile(yb, n, 0, xb, k, panels, 0..n_panels, n, bias, act));
    } else {
        // Few rows: split the panels. Each part computes its columns into a scratch tile.
        let parts = threads.min(n_panels).max(1);
        let per = n_panels.div_ceil(parts);
        let tiles: Vec<(usize, usize, Vec<f32>)> = (0..parts)
            .into_par_iter()
            .map(|t| {
                let (p0, p1) = (t * per, ((t + 1) * per).min(n_panels));
                let (c0, c1) = (p0 * NR, (p1 * NR).min(n));
                let width = c1.saturating_sub(c0);
                let mut scratch = vec![0.0f32; m * width];
                if width > 0 {
                    tile(&mut scratch, width, c0, x, k, panels, p0..p1, n, bias, act);
                }
                (c0, width, scratch)
            })
            .collect();
        for (c0, width, scratch) in tiles {
            if width == 0 {
                continue;
            }
            for (row, src) in y.chunks_mut(n).zip(scratch.chunks(width)) {
                row[c0..c0 + width].copy_from_slice(src);
            }
        }
    }
}

/// Computes columns of panels `panels_range` for all rows of `x` into `out` (rows of `ld`
/// floats; column `c` of the full output is at `c - col0`), then the activation.
#[allow(clippy::too_many_arguments)]
fn tile(
    out: &mut [f32],
    ld: usize,
    col0: usize,
    x: &[f32],
    k: usize,
    panels: &[f32],
    panels_range: std::ops::Range<usize>,
    n: usize,
    bias: Option<&[f32]>,
    act: Option<Activation>,
) {
    let rows = x.len() / k.max(1);
    let (first, last) = (panels_range.start * NR, (panels_range.end * NR).min(n));
    for p in panels_range {
        let c = p * NR;
        let width = NR.min(n - c);
        let panel = &panels[p * k * NR..(p + 1) * k * NR];
        let b = bias.map(|b| &b[c..c + width]);
        let mut r = 0;
        while r < rows {
            let mr = MR.min(rows - r);
            micro(
                out,
                ld,
                c - col0,
                width,
                &x[r * k..(r + mr) * k],
                k,
                panel,
                b,
                r,
                mr,
            );
            r += mr;
        }
    }
    // The epilogue: the activation over this block's outputs while they are still in cache.
    if let Some(act) = act {
        for row in out.chunks_mut(ld).take(rows) {
            rowwise::activation_serial(&mut row[first - col0..last - col0], act);
        }
    }
}

/// One micro-tile: rows `r0..r0+mr` of `out` (of `ld` floats), columns `c..c+width`.
#[allow(clippy::too_many_arguments)]
fn micro(
    out: &mut [f32],
    ld: usize,
    c: usize,
    width: usize,
    x: &[f32],
    k: usize,
    panel: &[f32],
    bias: Option<&[f32]>,
    r0: usize,
    mr: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // Always all 16 columns (a panel is zero-padded past `out`); only `width` are stored.
        let mut acc = [[0.0f32; NR]; MR];
        if let Some(b) = bias {
            for row in &mut acc[..mr] {
                row[..width].copy_from_slice(b);
            }
        }
        #[allow(unsafe_code)]
        // SAFETY: the CPU has AVX2 and FMA (checked by `avx2_fma`); `x` holds `mr` rows of `k`
        // floats and `panel` `k` lines of `NR` floats (sliced by the caller from checked
        // shapes), which is exactly what the kernel reads for `R = mr`; it writes only `acc`.
        unsafe {
            match mr {
                6 => x86::micro::<6>(x, k, panel, &mut acc),
                5 => x86::micro::<5>(x, k, panel, &mut acc),
                4 => x86::micro::<4>(x, k, panel, &mut acc),
                3 => x86::micro::<3>(x, k, panel, &mut acc),
                2 => x86::micro::<2>(x, k, panel, &mut acc),
                _ => x86::micro::<1>(x, k, panel, &mut acc),
            }
        };
        for (i, row) in acc.iter().take(mr).enumerate() {
            let at = (r0 + i) * ld + c;
            out[at..at + width].copy_from_slice(&row[..width]);
        }
        return;
    }
    micro_portable(out, ld, c, width, x, k, panel, bias, r0, mr);
}

/// The safe reference micro-kernel (also the path for edge tiles and CPUs without AVX2/FMA):
/// the same `fma` chain per element as the AVX2 kernel, so results are bit-identical.
#[allow(clippy::too_many_arguments)]
fn micro_portable(
    out: &mut [f32],
    ld: usize,
    c: usize,
    width: usize,
    x: &[f32],
    k: usize,
    panel: &[f32],
    bias: Option<&[f32]>,
    r0: usize,
    mr: usize,
) {
    for i in 0..mr {
        let xr = &x[i * k..(i + 1) * k];
        let o = &mut out[(r0 + i) * ld + c..(r0 + i) * ld + c + width];
        for (j, oj) in o.iter_mut().enumerate() {
            let mut acc = bias.map_or(0.0, |b| b[j]);
            for (kk, &a) in xr.iter().enumerate() {
                acc = a.mul_add(panel[kk * NR + j], acc);
            }
            *oj = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// `acc[i][j] = fma(x[i][kk], panel[kk][j], …)` over `kk` in order, for `R` rows × 16
    /// columns, starting from `acc`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `x` must hold `R·k` floats and `panel` `k·NR`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(unsafe_code)]
    pub unsafe fn micro<const R: usize>(
        x: &[f32],
        k: usize,
        panel: &[f32],
        acc: &mut [[f32; NR]; MR],
    ) {
        debug_assert!(R <= MR && x.len() >= R * k && panel.len() >= k * NR);
        // SAFETY (for every pointer operation below): `kk < k` and rows `i < R`; the reads are
        // `x[i·k + kk]` (< R·k) and `panel[kk·NR .. kk·NR + 16]` (< k·NR), in bounds by the
        // caller's contract; `loadu`/`storeu` need no alignment; `acc` is a local array.
        unsafe {
            let mut c = [[_mm256_setzero_ps(); 2]; R];
            for (i, ci) in c.iter_mut().enumerate() {
                ci[0] = _mm256_loadu_ps(acc[i].as_ptr());
                ci[1] = _mm256_loadu_ps(acc[i].as_ptr().add(8));
            }
            let xp = x.as_ptr();
            let mut bp = panel.as_ptr();
            for kk in 0..k {
                let b0 = _mm256_loadu_ps(bp);
                let b1 = _mm256_loadu_ps(bp.add(8));
                for (i, ci) in c.iter_mut().enumerate() {
                    let a = _mm256_broadcast_ss(&*xp.add(i * k + kk));
                    ci[0] = _mm256_fmadd_ps(a, b0, ci[0]);
                    ci[1] = _mm256_fmadd_ps(a, b1, ci[1]);
                }
                bp = bp.add(NR);
            }
            for (i, ci) in c.iter().enumerate() {
                _mm256_storeu_ps(acc[i].as_mut_ptr(), ci[0]);
                _mm256_storeu_ps(acc[i].as_mut_ptr().add(8), ci[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm::matmul_reference;

    fn fill(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn transpose(w: &[f32], out: usize, inn: usize) -> Vec<f32> {
        crate::backend::transpose(w, out, inn)
    }

    #[test]
    fn matches_the_reference_on_awkward_shapes_and_thread_counts() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 7, 3),
            (6, 16, 16),
            (7, 33, 17),
            (16, 384, 1152),
            (100, 65, 47),
            (300, 40, 70),
        ] {
            let x = fill(m * k, 1);
            let w = fill(n * k, 2); // [out, in]
            let bias = fill(n, 3);
            let packed = pack(&w, n, k);
            let mut want = matmul_reference(&x, &transpose(&w, n, k), m, k, n);
            for (i, v) in want.iter_mut().enumerate() {
                *v += bias[i % n];
            }
            for threads in [1, 2, 3] {
                let mut y = vec![f32::NAN; m * n];
                linear(&mut y, &x, &packed, m, k, n, Some(&bias), None, threads);
                for (a, b) in y.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{m}x{k}x{n}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_in_any_batch_on_any_path() {
        let (k, n) = (96, 40);
        let x = fill(200 * k, 4);
        let w = fill(n * k, 5);
        let bias = fill(n, 6);
        let packed = pack(&w, n, k);
        let run = |m: usize, threads: usize| {
            let mut y = vec![0.0; m * n];
            let act = Some(Activation::Gelu);
            linear(
                &mut y,
                &x[..m * k],
                &packed,
                m,
                k,
                n,
                Some(&bias),
                act,
                threads,
            );
            y
        };
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let alone = run(1, 1);
        for (m, threads) in [(7, 1), (7, 2), (200, 2), (200, 4)] {
            let batch = run(m, threads);
            assert_eq!(bits(&batch[..n]), bits(&alone), "m {m}, {threads} threads");
        }
        // The portable kernel (CPUs without AVX2/FMA) computes the same bits.
        let mut portable = vec![0.0; 7 * n];
        for p in 0..n.div_ceil(NR) {
            let c = p * NR;
            let width = NR.min(n - c);
            let panel = &packed[p * k * NR..(p + 1) * k * NR];
            micro_portable(
                &mut portable,
                n,
                c,
                width,
                &x[..6 * k],
                k,
                panel,
                Some(&bias[c..c + width]),
                0,
                6,
            );
            micro_portable(
                &mut portable,
                n,
                c,
                width,
                &x[6 * k..7 * k],
                k,
                panel,
                Some(&bias[c..c + width]),
                6,
                1,
            );
        }
        rowwise::activation(&mut portable, Activation::Gelu);
        assert_eq!(bits(&portable), bits(&run(7, 1)));
    }
}
