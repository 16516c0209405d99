//! The AVX-512 panel GEMM blocked for the caches, for prefill-sized batches (hundreds of rows).
//!
//! The unblocked path runs each 12-row micro-tile over the whole depth `k`: a pair of panels is
//! then `32·k` floats (96 KiB at `k` = 768), more than L1, and twelve input rows `k` floats
//! apart share L1 sets (at `k` = 3072 the stride is three 4 KiB pages, so all twelve rows fall in
//! the same set). This path follows GotoBLAS/BLIS instead:
//!
//! - the depth is cut into blocks of [`KC`]; each task's rows are packed, one depth block at a
//!   time, into micro-panels of [`MR`] rows interleaved (`[kk][row]`, one contiguous run per
//!   `kk`), which is what the micro-kernel broadcasts from;
//! - the weight's panels for that depth block are walked in blocks of [`NC`] columns (kept in
//!   L2), each swept by every micro-panel of the task's rows before the next is read, the
//!   kernel prefetching the panel lines it is about to read;
//! - each micro-tile starts from the bias (first depth block) or from the partial sums the
//!   previous block stored, so every output is still the same `fma` chain in `k` order as in the
//!   unblocked kernels, and the results are bit-identical to them (the tests compare).
//!
//! Micro-tiles are 14 rows × 32 columns: 28 accumulators, the two panel vectors and a broadcast
//! fill the 32 registers. Measured at GPT-2's prefill shapes (`cargo bench -p kiln-engine
//! --bench gemm_f32`), this path is ~10% faster than the unblocked one; tiles of fewer rows and
//! more panels (6 × 64, 8 × 48, 4 × 96), deeper or shallower blocks and the weight-resident loop
//! order were all slower here (docs/BENCHMARKS.md).
//!
//! Threads take contiguous row ranges (at most [`MC`] rows each, so a task's packed rows stay
//! in L2 beside the weight block); each packs its own rows, so no task waits on another.

use std::cell::RefCell;

use rayon::prelude::*;

use super::NR;
use super::x86::{self, TileIo};
use crate::ir::Activation;
use crate::kernels::rowwise;

/// Rows per micro-tile.
pub const MR: usize = 14;
/// Depth of a block: a packed micro-panel is `14 · KC` floats (21 KiB), a pair of weight panels
/// `32 · KC` (48 KiB).
const KC: usize = 384;
/// Output columns per weight block: `KC · NC` floats (384 KiB) stay in L2.
const NC: usize = 256;
/// Most rows per task (a multiple of [`MR`]): their packed block, `MC · KC` floats (714 KiB),
/// stays in L2 beside the weight block.
const MC: usize = 34 * MR;
/// Fewer rows than this run unblocked (packing and partial sums do not pay for themselves).
const MIN_ROWS: usize = 96;
/// Shallower products run unblocked (there is nothing to block).
const MIN_DEPTH: usize = 128;

/// Whether an `m × k` input takes this path (on a CPU with AVX-512).
pub fn applies(m: usize, k: usize) -> bool {
    m >= MIN_ROWS && k >= MIN_DEPTH
}

thread_local! {
    /// Each worker's packing buffer, kept between calls (a fresh one per call would page-fault
    /// on every call).
    static PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `y[m×n] = act(x[m×k] · W + bias)` on the AVX-512 kernel, blocked. Same contract as
/// [`super::linear`]; the caller has checked the lengths.
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
    assert!(std::arch::is_x86_feature_detected!("avx512f"));
    assert!(
        k > 0
            && y.len() >= m * n
            && x.len() >= m * k
            && panels.len() >= super::packed_len(n, k)
            && bias.is_none_or(|b| b.len() >= n),
        "blocked panel linear: buffers too short"
    );
    // Rows per task: as few tasks as keep each within MC rows, a multiple of the thread count
    // (so every thread gets the same share), in whole micro-panels.
    let threads = threads.max(1);
    let tasks = m.div_ceil(MC).div_ceil(threads) * threads;
    let rows = m.div_ceil(tasks).div_ceil(MR) * MR;
    let run = |(yb, xb): (&mut [f32], &[f32])| {
        PACKED.with(|buf| task(yb, xb, &mut buf.borrow_mut(), panels, k, n, bias, act))
    };
    let (y, x) = (&mut y[..m * n], &x[..m * k]);
    if threads <= 1 {
        y.chunks_mut(rows * n).zip(x.chunks(rows * k)).for_each(run);
    } else {
        y.par_chunks_mut(rows * n)
            .zip(x.par_chunks(rows * k))
            .for_each(run);
    }
}

/// All columns of one row range: depth blocks, then weight blocks, then micro-panels, then
/// panel pairs.
#[allow(clippy::too_many_arguments)]
fn task(
    y: &mut [f32],
    x: &[f32],
    packed: &mut Vec<f32>,
    panels: &[f32],
    k: usize,
    n: usize,
    bias: Option<&[f32]>,
    act: Option<Activation>,
) {
    let rows = x.len() / k;
    let n_panels = n.div_ceil(NR);
    packed.resize(rows * KC.min(k), 0.0);
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        let last = k0 + kc == k;
        pack_rows(packed, x, rows, k, k0, kc);
        for block in (0..n_panels).step_by(NC / NR) {
            let block_end = (block + NC / NR).min(n_panels);
            for r in (0..rows).step_by(MR) {
                let mr = MR.min(rows - r);
                let xp = &packed[r * kc..(r + mr) * kc];
                for p in (block..block_end).step_by(2) {
                    let c = p * NR;
                    let width = (2 * NR).min(n - c);
                    let panel = |q: usize| &panels[q * k * NR + k0 * NR..][..kc * NR];
                    let first = panel(p);
                    // An odd last panel: its pair is itself, computed but not stored.
                    let second = if p + 1 < block_end {
                        panel(p + 1)
                    } else {
                        first
                    };
                    let tile = &mut y[r * n + c..(r + mr - 1) * n + c + width];
                    let bias = bias.filter(|_| k0 == 0).map(|b| &b[c..c + width]);
                    micro(xp, kc, mr, (first, second), tile, n, width, bias, k0 > 0);
                    if last && let Some(act) = act {
                        for row in tile.chunks_mut(n) {
                            rowwise::activation_serial(&mut row[..width], act);
                        }
                    }
                }
            }
        }
    }
}

/// Packs depth `k0..k0+kc` of `rows` rows of `x` (`k` floats each) into micro-panels of up to
/// [`MR`] rows: the panel of rows `r..r+mr` at `r·kc`, its element `(kk, i)` at `kk·mr + i`.
fn pack_rows(packed: &mut [f32], x: &[f32], rows: usize, k: usize, k0: usize, kc: usize) {
    for r in (0..rows).step_by(MR) {
        let mr = MR.min(rows - r);
        let dst = &mut packed[r * kc..(r + mr) * kc];
        // Written in order, read from `mr` row streams (each line of a row serves 16 `kk`).
        let mut src = [&x[..0]; MR];
        for (i, s) in src.iter_mut().enumerate().take(mr) {
            *s = &x[(r + i) * k + k0..][..kc];
        }
        for (kk, d) in dst.chunks_exact_mut(mr).enumerate() {
            for (o, s) in d.iter_mut().zip(&src) {
                *o = s[kk];
            }
        }
    }
}

/// One micro-tile of `mr` rows over one depth block: `tile` holds rows `ld` apart of `width`
/// columns; the sums start from `tile` when `accumulate`, else from the bias (or zero).
#[allow(clippy::too_many_arguments)]
fn micro(
    xp: &[f32],
    kc: usize,
    mr: usize,
    (first, second): (&[f32], &[f32]),
    tile: &mut [f32],
    ld: usize,
    width: usize,
    bias: Option<&[f32]>,
    accumulate: bool,
) {
    assert!(
        (1..=MR).contains(&mr)
            && xp.len() >= mr * kc
            && first.len() >= kc * NR
            && second.len() >= kc * NR
            && width <= 2 * NR
            && tile.len() >= (mr - 1) * ld + width
            && bias.is_none_or(|b| b.len() >= width),
        "blocked micro-tile: inputs too short"
    );
    let io = TileIo {
        bias: bias.map_or(std::ptr::null(), <[f32]>::as_ptr),
        out: tile.as_mut_ptr(),
        ld,
        width,
    };
    macro_rules! rows {
        ($($r:literal)*) => {
            match mr {
                $($r => x86::avx512_packed::<$r>(xp, kc, first, second, io, accumulate),)*
                _ => x86::avx512_packed::<1>(xp, kc, first, second, io, accumulate),
            }
        };
    }
    #[allow(unsafe_code)]
    // SAFETY: the CPU has AVX-512F (asserted by `linear`, the only way here); `xp` holds
    // `mr · kc` floats, both panels `kc · NR`, the bias (when not null) `width` floats and
    // `tile` `mr` rows `ld` apart of `width` ≤ 32 floats (all asserted above): exactly what the
    // kernel reads and writes for `R = mr` ≤ 14.
    unsafe {
        rows!(14 13 12 11 10 9 8 7 6 5 4 3 2)
    }
}
