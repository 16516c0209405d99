//! The tiled online-softmax loop shared by the flash and memory-efficient kernels.
//!
//! For a block of query rows it walks the keys in tiles of `block_k`: one GEMM gives the tile's
//! scores, the mask is applied, each row's running maximum `m` and sum `l` are updated, the
//! accumulated output is rescaled by `exp(m_old - m_new)` and a second GEMM adds `P · V_tile`.
//! Only one `rows × block_k` tile of scores exists at a time, so extra memory is independent of
//! the sequence length. The kernels differ in what masks they apply and how they size blocks
//! (see `flash.rs` and `mem_efficient.rs`).

use crate::gemm::gemm;
use crate::simd::{self, Isa};
use crate::task::{Block, HeadTask, Shared};

/// Per-thread scratch space, reused across blocks.
#[derive(Default)]
pub(crate) struct Scratch {
    scores: Vec<f32>,
    acc: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

/// How a tiled kernel treats masks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum MaskMode {
    /// Causal limits and key padding only, read from indices; key tiles that every row of the
    /// block would mask are skipped without computing them.
    Structured,
    /// Any mask or additive bias, applied score by score.
    Dense,
}

/// The first key past which every row of the block is masked by the causal limit or by
/// trailing key padding: tiles from there on are skipped.
fn key_end(block: &Block<'_, '_>, shared: &Shared<'_>) -> usize {
    let t = &block.task;
    let last_row = block.row0 + block.rows() - 1;
    let mut end = shared.visible(t, last_row);
    if let crate::params::RowMask::Keys(keep) = shared.row(t, block.row0) {
        // Key padding is the same for every row of a (batch, head): trailing padded keys
        // contribute nothing.
        end = end.min(keep.iter().rposition(|&k| k).map_or(0, |p| p + 1));
    }
    end
}

pub(crate) fn run_block(
    block: &mut Block<'_, '_>,
    shared: &Shared<'_>,
    scratch: &mut Scratch,
    block_k: usize,
    mode: MaskMode,
) {
    let isa = Isa::detect();
    let t: HeadTask<'_> = block.task;
    let d = t.head_dim;
    let rows = block.rows();
    let q = &t.q[block.row0 * d..(block.row0 + rows) * d];
    let Scratch {
        scores,
        acc,
        max,
        sum,
    } = scratch;
    acc.clear();
    acc.resize(rows * d, 0.0);
    max.clear();
    max.resize(rows, f32::NEG_INFINITY);
    sum.clear();
    sum.resize(rows, 0.0);
    let end = match mode {
        MaskMode::Structured => key_end(block, shared),
        MaskMode::Dense => t.kv_len,
    };
    let mut j0 = 0;
    while j0 < end {
        let bk = block_k.min(end - j0);
        scores.resize(rows * bk, 0.0);
        let tile = &mut scores[..rows * bk];
        gemm(
            tile,
            (rows, bk, d),
            q,
            (1, d),
            &t.k_t[j0..],
            (1, t.k_t_stride),
            shared.scale,
            false,
        );
        let mut any = false;
        for (r, row) in tile.chunks_mut(bk).enumerate() {
            let i = block.row0 + r;
            let visible = shared.visible(&t, i).saturating_sub(j0).min(bk);
            row[visible..].fill(f32::NEG_INFINITY);
            shared.row(&t, i).apply(&mut row[..visible], j0);
            let tile_max = simd::row_max(isa, &row[..visible]);
            let m_new = max[r].max(tile_max);
            if m_new == f32::NEG_INFINITY {
                row.fill(0.0); // nothing visible yet in this row: it adds nothing
                continue;
            }
            any = true;
            let tile_sum = simd::exp_shift_sum(isa, row, m_new);
            if max[r] != m_new {
                let alpha = simd::exp_portable(max[r] - m_new);
                sum[r] *= alpha;
                simd::scale(&mut acc[r * d..(r + 1) * d], alpha);
                max[r] = m_new;
            }
            sum[r] += tile_sum;
        }
        if any {
            // acc += P · V_tile
            gemm(
                acc,
                (rows, d, bk),
                tile,
                (1, bk),
                &t.v[j0 * d..],
                (1, d),
                1.0,
                true,
            );
        }
        j0 += bk;
    }
    for (r, out_row) in block.out.chunks_mut(d).enumerate() {
        if sum[r] > 0.0 {
            let inv = 1.0 / sum[r];
            for (o, a) in out_row.iter_mut().zip(&acc[r * d..(r + 1) * d]) {
                *o = a * inv;
            }
        } else {
            out_row.fill(0.0); // every key masked: a zero output row
        }
    }
}
