//! The math kernel: materialises each head's `q_len × kv_len` scores with one GEMM, applies the
//! mask and a max-subtracted softmax row by row, and multiplies by V with a second GEMM — what
//! PyTorch's math path does with `bmm`. Memory is `O(q_len · kv_len)` per worker thread, which
//! is what the flash and memory-efficient kernels exist to avoid at long sequence lengths; at
//! short ones it is the fastest, because it makes exactly two GEMM calls per head.

use crate::gemm::gemm;
use crate::simd::{self, Isa};
use crate::task::{Block, Shared};

/// Query rows per block: the whole head (the scores of one head are materialised at once).
pub(crate) fn block_rows(q_len: usize) -> usize {
    q_len
}

/// Runs one block. A fully masked query row produces zeros, as in [`crate::reference`].
pub(crate) fn run_block(block: &mut Block<'_, '_>, shared: &Shared<'_>, scores: &mut Vec<f32>) {
    let isa = Isa::detect();
    let t = block.task;
    let (d, sk) = (t.head_dim, t.kv_len);
    let rows = block.rows();
    if sk == 0 {
        block.out.fill(0.0);
        return;
    }
    let q = &t.q[block.row0 * d..(block.row0 + rows) * d];
    scores.resize(rows * sk, 0.0);
    // scores = scale · Q Kᵀ: Kᵀ is K read with swapped strides.
    gemm(
        scores,
        (rows, sk, d),
        q,
        (1, d),
        t.k,
        (d, 1),
        shared.scale,
        false,
    );
    for (r, row) in scores.chunks_mut(sk).enumerate() {
        let i = block.row0 + r;
        let visible = shared.visible(&t, i);
        row[visible..].fill(f32::NEG_INFINITY);
        shared.row(&t, i).apply(&mut row[..visible], 0);
        let max = simd::row_max(isa, row);
        if max == f32::NEG_INFINITY {
            row.fill(0.0); // every key masked: a zero output row
            continue;
        }
        let sum = simd::exp_shift_sum(isa, row, max);
        simd::scale(row, 1.0 / sum);
    }
    // out = P · V
    gemm(
        block.out,
        (rows, d, sk),
        scores,
        (1, sk),
        t.v,
        (1, d),
        1.0,
        false,
    );
}
