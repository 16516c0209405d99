//! The flash kernel: tiled over query and key blocks with an online softmax, O(S) extra memory.
//!
//! Like FlashAttention-2, it takes only masks that can be computed from indices — none, causal
//! (either alignment), key padding, and varlen sequence boundaries — and it uses them to skip
//! whole key tiles (everything past a block's causal limit or past the last real key). A dense
//! boolean mask or an additive bias would need an `O(q_len · kv_len)` tensor read score by score;
//! those go to the memory-efficient kernel. Query blocks grow with the sequence length (fewer
//! passes over K and V) and key tiles are sized so a tile of scores plus the K/V tile stay in L2;
//! `docs/BENCHMARKS.md` has the measurements behind the numbers. The row operations use AVX-512
//! or AVX2+FMA when the CPU has them (see `simd.rs`); the GEMMs use the `gemm` crate's own
//! run-time dispatch.

use crate::task::{Block, Shared};
use crate::tiled::{self, MaskMode, Scratch};

/// Keys per tile.
pub(crate) const BLOCK_K: usize = 512;

/// Largest head_dim the kernel takes: the accumulator of a 256-row query block at head_dim 256
/// is 256 KiB, the most that still sits in L2 beside a score tile.
pub(crate) const MAX_HEAD_DIM: usize = 256;

/// Query rows per block, by sequence length (PyTorch's CPU flash kernel uses the same steps).
pub(crate) fn block_rows(q_len: usize) -> usize {
    if q_len >= 768 {
        256
    } else if q_len >= 192 {
        64
    } else {
        32
    }
}

pub(crate) fn run_block(block: &mut Block<'_, '_>, shared: &Shared<'_>, scratch: &mut Scratch) {
    tiled::run_block(block, shared, scratch, BLOCK_K, MaskMode::Structured);
}
