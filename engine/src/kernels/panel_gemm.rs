//! kiln's GEMM for linear layers, on weights pre-packed into column panels, with the bias and
//! the activation applied as the epilogue of each output tile.
//!
//! Layout: the `[out, in]` weight is transposed and cut into panels of [`NR`] = 16 output
//! columns; panel `p` holds `w[p·16 + j][kk]` at `p·in·16 + kk·16 + j` (zero past `out`). One
//! `kk` step of a panel is one 64-byte line, the panel is contiguous, so the micro-kernel streams
//! it without a stride and nothing is packed at run time (the `gemm` crate re-packs the weight on
//! every call, which at 16 rows costs as much as the arithmetic).
//!
//! Micro-kernels, chosen at run time: on CPUs with AVX-512, [`MR_512`] = 12 rows × 32 columns
//! (two panels side by side) in 24 zmm accumulators; otherwise [`MR`] = 6 rows × 16 columns in
//! twelve AVX2 accumulators; a portable loop without either. Each runs FMA over the whole `k`,
//! started from the bias; the tile is stored and the activation runs on it while it is in L1.
//! Every output element is `fma(x[k-1], w[k-1], … fma(x[0], w[0], bias))` in `k` order, whatever
//! the kernel, shape, tiling or thread count, so a row's result does not depend on the other rows
//! in the batch (a sequence gives bit-identical outputs alone or batched) nor on the CPU.
//!
//! Why 12 × 32 on AVX-512: two 512-bit FMAs per cycle with a 4-cycle latency need at least 8
//! independent accumulators; 24 leave room for the two weight vectors and a broadcast in 32
//! registers, and each `k` step then does 24 FMAs for 14 loads. The panels stay 16 wide, so the
//! packed weights (and plan-cache entries) are the same for every kernel.
//!
//! Work split: row blocks of [`ROW_BLOCK`] rows in parallel when there are enough rows; below
//! that (small batches, e.g. one 16-token request), the panels are split across threads instead,
//! each writing its columns into a scratch tile that is then copied into place. Prefill-sized
//! batches on AVX-512 take the cache-blocked path of [`blocked`] instead (packed rows, depth
//! blocks; same results bit for bit).

use rayon::prelude::*;

use crate::ir::Activation;
use crate::kernels::rowwise;

/// Panel width in output columns (two 8-float AVX2 registers).
pub const NR: usize = 16;
/// Rows per AVX2 micro-tile.
pub const MR: usize = 6;
/// Rows per AVX-512 micro-tile (which spans two panels).
pub const MR_512: usize = 12;
/// A micro-tile's sums for the AVX2 and portable kernels (the AVX-512 kernel keeps its tile in
/// registers and reads the bias and writes the output directly).
type Acc = [[f32; 2 * NR]; MR_512];
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
    linear_on(Kernel::detect(), y, x, panels, m, k, n, bias, act, threads);
}

/// [`linear`] on a given micro-kernel (tests run each one this CPU has).
#[allow(clippy::too_many_arguments)]
fn linear_on(
    kernel: Kernel,
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
        super::holds(y.len(), m, n)
            && super::holds(x.len(), m, k)
            && m.checked_mul(n).and_then(|mn| mn.checked_mul(k)).is_some()
            && n.div_ceil(NR)
                .checked_mul(k)
                .and_then(|p| p.checked_mul(NR))
                .is_some_and(|need| panels.len() >= need)
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
    if kernel == Kernel::Avx512 && blocked::applies(m, k) {
        blocked::linear(y, x, panels, m, k, n, bias, act, threads);
    } else if threads <= 1 || macs < super::gemm::PARALLEL_MIN_MACS {
        tile(kernel, y, n, 0, x, k, panels, 0..n_panels, n, bias, act);
    } else if m >= 2 * ROW_BLOCK * threads {
        y.par_chunks_mut(ROW_BLOCK * n)
            .zip(x.par_chunks(ROW_BLOCK * k))
            .for_each(|(yb, xb)| tile(kernel, yb, n, 0, xb, k, panels, 0..n_panels, n, bias, act));
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
                    tile(
                        kernel,
                        &mut scratch,
                        width,
                        c0,
                        x,
                        k,
                        panels,
                        p0..p1,
                        n,
                        bias,
                        act,
                    );
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
    kernel: Kernel,
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
    let (mr_max, step) = match kernel {
        Kernel::Avx512 => (MR_512, 2),
        Kernel::Avx2 => (MR, 1),
        Kernel::Portable => (MR_512, 2),
    };
    let mut p = panels_range.start;
    while p < panels_range.end {
        let np = step.min(panels_range.end - p);
        let c = p * NR;
        let width = (np * NR).min(n - c);
        let pair = Panels {
            first: &panels[p * k * NR..(p + 1) * k * NR],
            second: (np == 2).then(|| &panels[(p + 1) * k * NR..(p + 2) * k * NR]),
        };
        let b = bias.map(|b| &b[c..c + width]);
        let mut r = 0;
        while r < rows {
            let mr = mr_max.min(rows - r);
            micro(
                kernel,
                out,
                ld,
                c - col0,
                width,
                &x[r * k..(r + mr) * k],
                k,
                pair,
                b,
                r,
                mr,
            );
            r += mr;
        }
        p += np;
    }
    // The epilogue: the activation over this block's outputs while they are still in cache.
    if let Some(act) = act {
        for row in out.chunks_mut(ld).take(rows) {
            rowwise::activation_serial(&mut row[first - col0..last - col0], act);
        }
    }
}

/// One or two adjacent panels (a micro-tile's 16 or 32 columns).
#[derive(Clone, Copy)]
struct Panels<'a> {
    first: &'a [f32],
    second: Option<&'a [f32]>,
}

/// Which micro-kernel this CPU runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Kernel {
    Avx512,
    Avx2,
    Portable,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if avx2_fma() {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// Every kernel this CPU can run, fastest first.
    #[cfg(test)]
    fn available() -> Vec<Kernel> {
        let mut all = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if avx2_fma() {
                all.insert(0, Kernel::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                all.insert(0, Kernel::Avx512);
            }
        }
        all
    }
}

/// One micro-tile: rows `r0..r0+mr` of `out` (of `ld` floats), columns `c..c+width` (`width` ≤
/// 16 for one panel, ≤ 32 for two).
#[allow(clippy::too_many_arguments)]
fn micro(
    kernel: Kernel,
    out: &mut [f32],
    ld: usize,
    c: usize,
    width: usize,
    x: &[f32],
    k: usize,
    panels: Panels<'_>,
    bias: Option<&[f32]>,
    r0: usize,
    mr: usize,
) {
    assert!(
        (1..=MR_512).contains(&mr)
            && x.len() >= mr * k
            && panels.first.len() >= k * NR
            && panels.second.is_none_or(|p| p.len() >= k * NR),
        "panel micro-tile: inputs too short"
    );
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512 {
        // Reads the bias and writes the tile straight from and to registers (masked to `width`).
        assert!(
            width <= 2 * NR
                && (width <= NR || panels.second.is_some())
                && bias.is_none_or(|b| b.len() >= width)
                && (r0 + mr - 1) * ld + c + width <= out.len(),
            "panel micro-tile: output too short"
        );
        let io = x86::TileIo {
            bias: bias.map_or(std::ptr::null(), |b| b.as_ptr()),
            out: out[r0 * ld + c..].as_mut_ptr(),
            ld,
            width,
        };
        avx512_tile(x, k, panels, io, mr);
        return;
    }
    // Always all 16 (or 32) columns (a panel is zero-padded past `out`); only `width` are stored.
    let mut acc: Acc = [[0.0f32; 2 * NR]; MR_512];
    if let Some(b) = bias {
        for row in &mut acc[..mr] {
            row[..width].copy_from_slice(b);
        }
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 if mr <= MR && panels.second.is_none() => {
            avx2_tile(x, k, panels.first, &mut acc, mr)
        }
        _ => micro_portable(x, k, panels, &mut acc, mr),
    }
    for (i, row) in acc.iter().take(mr).enumerate() {
        let at = (r0 + i) * ld + c;
        out[at..at + width].copy_from_slice(&row[..width]);
    }
}

/// The AVX-512 kernel on `mr` ≤ [`MR_512`] rows of one or two panels.
#[cfg(target_arch = "x86_64")]
fn avx512_tile(x: &[f32], k: usize, panels: Panels<'_>, io: x86::TileIo, mr: usize) {
    assert!(std::arch::is_x86_feature_detected!("avx512f"));
    macro_rules! rows {
        ($kernel:ident, $($args:expr),*) => {
            match mr {
                12 => x86::$kernel::<12>($($args),*),
                11 => x86::$kernel::<11>($($args),*),
                10 => x86::$kernel::<10>($($args),*),
                9 => x86::$kernel::<9>($($args),*),
                8 => x86::$kernel::<8>($($args),*),
                7 => x86::$kernel::<7>($($args),*),
                6 => x86::$kernel::<6>($($args),*),
                5 => x86::$kernel::<5>($($args),*),
                4 => x86::$kernel::<4>($($args),*),
                3 => x86::$kernel::<3>($($args),*),
                2 => x86::$kernel::<2>($($args),*),
                _ => x86::$kernel::<1>($($args),*),
            }
        };
    }
    #[allow(unsafe_code)]
    // SAFETY: the CPU has AVX-512F (asserted above); `x` holds `mr` rows of `k` floats, each
    // panel `k` lines of `NR` floats, `io.bias` (when not null) `io.width` floats and `io.out`
    // `mr` rows `io.ld` apart of `io.width` floats, with `io.width` ≤ 16 for one panel and ≤ 32
    // for two (all asserted by `micro`, the only caller): exactly what the kernels read and
    // write for `R = mr` ≤ 12.
    unsafe {
        match panels.second {
            Some(second) => rows!(avx512_pair, x, k, panels.first, second, io),
            None => rows!(avx512_one, x, k, panels.first, io),
        }
    }
}

/// The AVX2 kernel on `mr` ≤ [`MR`] rows of one panel.
#[cfg(target_arch = "x86_64")]
fn avx2_tile(x: &[f32], k: usize, panel: &[f32], acc: &mut Acc, mr: usize) {
    assert!(avx2_fma() && mr <= MR);
    #[allow(unsafe_code)]
    // SAFETY: the CPU has AVX2 and FMA (asserted above); `x` holds `mr` rows of `k` floats and
    // `panel` `k` lines of `NR` floats (asserted by `micro`, the only caller), which is exactly
    // what the kernel reads for `R = mr` ≤ 6; it writes only `acc`.
    unsafe {
        match mr {
            6 => x86::micro::<6>(x, k, panel, acc),
            5 => x86::micro::<5>(x, k, panel, acc),
            4 => x86::micro::<4>(x, k, panel, acc),
            3 => x86::micro::<3>(x, k, panel, acc),
            2 => x86::micro::<2>(x, k, panel, acc),
            _ => x86::micro::<1>(x, k, panel, acc),
        }
    }
}

/// The safe reference micro-kernel (also the path for CPUs without AVX2/FMA): the same `fma`
/// chain per element as the vector kernels, so results are bit-identical.
fn micro_portable(x: &[f32], k: usize, panels: Panels<'_>, acc: &mut Acc, mr: usize) {
    for (i, row) in acc.iter_mut().take(mr).enumerate() {
        let xr = &x[i * k..(i + 1) * k];
        for (j, a) in row.iter_mut().enumerate() {
            let panel = match (j / NR, panels.second) {
                (0, _) => panels.first,
                (_, Some(second)) => second,
                (_, None) => break,
            };
            for (kk, &v) in xr.iter().enumerate() {
                *a = v.mul_add(panel[kk * NR + j % NR], *a);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
mod blocked;
/// Without x86-64 there is no AVX-512 kernel, so the blocked path never applies.
#[cfg(not(target_arch = "x86_64"))]
mod blocked {
    pub fn applies(_: usize, _: usize) -> bool {
        false
    }
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        _: &mut [f32],
        _: &[f32],
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: Option<&[f32]>,
        _: Option<crate::ir::Activation>,
        _: usize,
    ) {
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Acc, NR};
    use std::arch::x86_64::*;

    /// An AVX-512 micro-tile's bias (null for none) and output: `width` columns of rows `ld`
    /// floats apart.
    #[derive(Clone, Copy)]
    pub struct TileIo {
        pub bias: *const f32,
        pub out: *mut f32,
        pub ld: usize,
        pub width: usize,
    }

    /// Lane masks of a tile's first and second 16 columns for `width` valid columns.
    fn masks(width: usize) -> (__mmask16, __mmask16) {
        let lanes = |w: usize| -> __mmask16 {
            if w >= 16 {
                0xffff
            } else {
                ((1u32 << w) - 1) as __mmask16
            }
        };
        (lanes(width), lanes(width.saturating_sub(16)))
    }

    /// `acc[i][j] = fma(x[i][kk], panel[kk][j], …)` over `kk` in order, for `R` rows × 16
    /// columns, starting from `acc`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `x` must hold `R·k` floats and `panel` `k·NR`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(unsafe_code)]
    pub unsafe fn micro<const R: usize>(x: &[f32], k: usize, panel: &[f32], acc: &mut Acc) {
        debug_assert!(R <= super::MR && x.len() >= R * k && panel.len() >= k * NR);
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

    /// `out[i][j] = fma(x[i][kk], first[kk][j], …)` over `kk` in order, for `R` rows × 16
    /// columns (one panel), starting from the bias (or zero); only `io.width` columns are read
    /// from the bias and written.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `x` must hold `R·k` floats and `first` `k·NR`; `io.bias`
    /// must be null or point to `io.width` ≤ 16 floats, and `io.out` to `R` rows `io.ld` apart
    /// with `io.width` writable floats each.
    #[target_feature(enable = "avx512f")]
    #[allow(unsafe_code)]
    pub unsafe fn avx512_one<const R: usize>(x: &[f32], k: usize, first: &[f32], io: TileIo) {
        debug_assert!(R <= super::MR_512 && x.len() >= R * k && first.len() >= k * NR);
        debug_assert!(io.width <= NR);
        let (m0, _) = masks(io.width);
        // SAFETY (for every pointer operation below): `kk < k` and rows `i < R`; the reads are
        // `x[i·k + kk]` (< R·k), `first[kk·NR .. kk·NR + 16]` (< k·NR) and the bias's first
        // `width` floats (masked), the writes row `i`'s first `width` floats of `out` (masked),
        // all in bounds by the caller's contract; masked lanes are neither read nor written.
        unsafe {
            let start = if io.bias.is_null() {
                _mm512_setzero_ps()
            } else {
                _mm512_maskz_loadu_ps(m0, io.bias)
            };
            let mut c = [start; R];
            let xp = x.as_ptr();
            let mut bp = first.as_ptr();
            for kk in 0..k {
                let b = _mm512_loadu_ps(bp);
                for (i, ci) in c.iter_mut().enumerate() {
                    *ci = _mm512_fmadd_ps(_mm512_set1_ps(*xp.add(i * k + kk)), b, *ci);
                }
                bp = bp.add(NR);
            }
            for (i, ci) in c.iter().enumerate() {
                _mm512_mask_storeu_ps(io.out.add(i * io.ld), m0, *ci);
            }
        }
    }

    /// Lines of a weight panel the blocked kernel prefetches ahead (16 `kk` steps, 1 KiB): the
    /// panels stream from L2, and the hardware prefetcher alone left it ~8% slower.
    const PREFETCH_AHEAD: usize = 16;

    /// One depth block of the blocked path (`super::blocked`): `out[i][j] = fma(xp[kk][i],
    /// panel[kk][j], …)` over `kk` in `0..kc` in order, for `R` rows × 32 columns (16 from
    /// `first`, 16 from `second`), starting from the stored tile when `accumulate`, else from
    /// the bias (or zero). `xp` is a packed micro-panel: element `(kk, i)` at `kk·R + i`. With
    /// `io.width` ≤ 16, `second` is read but its columns are not stored (callers pass `first`
    /// twice at an odd last panel).
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `xp` must hold `R·kc` floats, `first` and `second` `kc·NR`;
    /// `io.bias` must be null or point to `io.width` floats, and `io.out` to `R` rows `io.ld`
    /// apart with `io.width` ≤ 32 readable and writable floats each.
    #[target_feature(enable = "avx512f")]
    #[allow(unsafe_code)]
    pub unsafe fn avx512_packed<const R: usize>(
        xp: &[f32],
        kc: usize,
        first: &[f32],
        second: &[f32],
        io: TileIo,
        accumulate: bool,
    ) {
        debug_assert!(
            R <= super::blocked::MR
                && xp.len() >= R * kc
                && first.len() >= kc * NR
                && second.len() >= kc * NR
                && io.width <= 2 * NR
        );
        let (m0, m1) = masks(io.width);
        let wide = io.width > NR;
        // SAFETY (for every pointer operation below): `kk < kc` and rows `i < R`; the reads are
        // `xp[kk·R + i]` (< R·kc), `first`/`second[kk·NR .. kk·NR + 16]` (< kc·NR), the bias's
        // first `width` floats and row `i`'s first `width` floats of `out` (masked; the second
        // half only when `width` > 16), the writes the same `out` lanes, all in bounds by the
        // caller's contract; masked lanes are neither read nor written. Prefetches past the end
        // of a panel are hints: they never fault and read nothing into the program.
        unsafe {
            let mut c = [[_mm512_setzero_ps(); 2]; R];
            if accumulate {
                for (i, ci) in c.iter_mut().enumerate() {
                    let o = io.out.add(i * io.ld);
                    ci[0] = _mm512_maskz_loadu_ps(m0, o);
                    if wide {
                        ci[1] = _mm512_maskz_loadu_ps(m1, o.add(NR));
                    }
                }
            } else if !io.bias.is_null() {
                let s0 = _mm512_maskz_loadu_ps(m0, io.bias);
                let s1 = if wide {
                    _mm512_maskz_loadu_ps(m1, io.bias.add(NR))
                } else {
                    _mm512_setzero_ps()
                };
                c = [[s0, s1]; R];
            }
            let mut ap = xp.as_ptr();
            let (mut b0p, mut b1p) = (first.as_ptr(), second.as_ptr());
            for _ in 0..kc {
                _mm_prefetch::<_MM_HINT_T0>(b0p.wrapping_add(PREFETCH_AHEAD * NR).cast());
                _mm_prefetch::<_MM_HINT_T0>(b1p.wrapping_add(PREFETCH_AHEAD * NR).cast());
                let b0 = _mm512_loadu_ps(b0p);
                let b1 = _mm512_loadu_ps(b1p);
                for (i, ci) in c.iter_mut().enumerate() {
                    let a = _mm512_set1_ps(*ap.add(i));
                    ci[0] = _mm512_fmadd_ps(a, b0, ci[0]);
                    ci[1] = _mm512_fmadd_ps(a, b1, ci[1]);
                }
                ap = ap.add(R);
                b0p = b0p.add(NR);
                b1p = b1p.add(NR);
            }
            for (i, ci) in c.iter().enumerate() {
                let o = io.out.add(i * io.ld);
                _mm512_mask_storeu_ps(o, m0, ci[0]);
                if wide {
                    _mm512_mask_storeu_ps(o.add(NR), m1, ci[1]);
                }
            }
        }
    }

    /// As [`avx512_one`], over two panels side by side: columns 0..16 from `first`, 16..32 from
    /// `second`.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `x` must hold `R·k` floats, `first` and `second` `k·NR`;
    /// `io.bias` must be null or point to `io.width` ≤ 32 floats, and `io.out` to `R` rows
    /// `io.ld` apart with `io.width` writable floats each.
    #[target_feature(enable = "avx512f")]
    #[allow(unsafe_code)]
    pub unsafe fn avx512_pair<const R: usize>(
        x: &[f32],
        k: usize,
        first: &[f32],
        second: &[f32],
        io: TileIo,
    ) {
        debug_assert!(
            R <= super::MR_512
                && x.len() >= R * k
                && first.len() >= k * NR
                && second.len() >= k * NR
                && io.width <= 2 * NR
        );
        let (m0, m1) = masks(io.width);
        // SAFETY (for every pointer operation below): `kk < k` and rows `i < R`; the reads are
        // `x[i·k + kk]` (< R·k), `first`/`second[kk·NR .. kk·NR + 16]` (< k·NR) and the bias's
        // first `width` floats (masked; its second half only when `width` > 16), the writes row
        // `i`'s first `width` floats of `out` (masked, likewise), all in bounds by the caller's
        // contract; masked lanes are neither read nor written.
        unsafe {
            let wide = io.width > NR;
            let (s0, s1) = if io.bias.is_null() {
                (_mm512_setzero_ps(), _mm512_setzero_ps())
            } else if wide {
                (
                    _mm512_maskz_loadu_ps(m0, io.bias),
                    _mm512_maskz_loadu_ps(m1, io.bias.add(NR)),
                )
            } else {
                (_mm512_maskz_loadu_ps(m0, io.bias), _mm512_setzero_ps())
            };
            let mut c = [[s0, s1]; R];
            let xp = x.as_ptr();
            let (mut b0p, mut b1p) = (first.as_ptr(), second.as_ptr());
            for kk in 0..k {
                let b0 = _mm512_loadu_ps(b0p);
                let b1 = _mm512_loadu_ps(b1p);
                for (i, ci) in c.iter_mut().enumerate() {
                    let a = _mm512_set1_ps(*xp.add(i * k + kk));
                    ci[0] = _mm512_fmadd_ps(a, b0, ci[0]);
                    ci[1] = _mm512_fmadd_ps(a, b1, ci[1]);
                }
                b0p = b0p.add(NR);
                b1p = b1p.add(NR);
            }
            for (i, ci) in c.iter().enumerate() {
                let o = io.out.add(i * io.ld);
                _mm512_mask_storeu_ps(o, m0, ci[0]);
                if wide {
                    _mm512_mask_storeu_ps(o.add(NR), m1, ci[1]);
                }
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
            (13, 20, 48),
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
            for kernel in Kernel::available() {
                for threads in [1, 2, 3] {
                    let mut y = vec![f32::NAN; m * n];
                    let b = Some(&bias[..]);
                    linear_on(kernel, &mut y, &x, &packed, m, k, n, b, None, threads);
                    for (a, b) in y.iter().zip(&want) {
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "{kernel:?} {m}x{k}x{n}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// The blocked path (prefill-sized batches on AVX-512) against the unblocked portable
    /// kernel, bit for bit: several depth blocks with a short last one, an odd last panel, a
    /// last micro-panel of fewer rows, more tasks than threads, bias and activation.
    #[test]
    fn the_blocked_path_gives_the_unblocked_bits() {
        let (k, n) = (800, 70);
        let x = fill(1000 * k, 7);
        let w = fill(n * k, 8);
        let bias = fill(n, 9);
        let packed = pack(&w, n, k);
        for (m, threads, act, with_bias) in [
            (96, 1, None, true),
            (97, 2, Some(Activation::Gelu), true),
            (200, 3, None, false),
            (1000, 2, Some(Activation::GeluTanh), true),
        ] {
            assert!(blocked::applies(m, k));
            let run = |kernel: Kernel| {
                let mut y = vec![f32::NAN; m * n];
                let b = with_bias.then_some(&bias[..]);
                linear_on(
                    kernel,
                    &mut y,
                    &x[..m * k],
                    &packed,
                    m,
                    k,
                    n,
                    b,
                    act,
                    threads,
                );
                y.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
            };
            let want = run(Kernel::Portable);
            for kernel in Kernel::available() {
                assert_eq!(run(kernel), want, "{kernel:?}, m {m}, {threads} threads");
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_in_any_batch_on_any_path_and_kernel() {
        let (k, n) = (96, 40);
        let x = fill(200 * k, 4);
        let w = fill(n * k, 5);
        let bias = fill(n, 6);
        let packed = pack(&w, n, k);
        let run = |kernel: Kernel, m: usize, threads: usize| {
            let mut y = vec![0.0; m * n];
            let act = Some(Activation::Gelu);
            let b = Some(&bias[..]);
            linear_on(
                kernel,
                &mut y,
                &x[..m * k],
                &packed,
                m,
                k,
                n,
                b,
                act,
                threads,
            );
            y
        };
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let alone = run(Kernel::Portable, 1, 1);
        let kernels = Kernel::available();
        assert!(kernels.contains(&Kernel::detect()));
        for kernel in kernels {
            for (m, threads) in [(1, 1), (7, 1), (7, 2), (200, 2), (200, 4)] {
                let batch = run(kernel, m, threads);
                assert_eq!(
                    bits(&batch[..n]),
                    bits(&alone),
                    "{kernel:?}, m {m}, {threads} threads"
                );
            }
            // Every row, not only the first, matches the portable kernel bit for bit.
            assert_eq!(
                bits(&run(kernel, 200, 2)),
                bits(&run(Kernel::Portable, 200, 1))
            );
        }
    }
}
