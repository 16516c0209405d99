//! The memory-efficient kernel: chunked over keys with a running max and sum (Rabe & Staats,
//! "Self-attention does not need O(n²) memory"; xformers' kernel on GPUs), taking any mask or
//! additive bias.
//!
//! It holds at most one `32 × 128` chunk of scores per query block, whatever the sequence length,
//! and applies the mask or bias score by score, so it runs every input the API accepts —
//! including the dense boolean masks and biases (ALiBi, relative positions) that the flash kernel
//! refuses. Small chunks keep its memory lowest of the three kernels; the price is more GEMM
//! calls per head than flash, which is why the selector prefers flash where flash applies.

use crate::task::{Block, Shared};
use crate::tiled::{self, MaskMode, Scratch};

/// Keys per chunk.
pub(crate) const BLOCK_K: usize = 128;

/// Query rows per block.
pub(crate) fn block_rows(_q_len: usize) -> usize {
    32
}

pub(crate) fn run_block(block: &mut Block<'_, '_>, shared: &Shared<'_>, scratch: &mut Scratch) {
    tiled::run_block(block, shared, scratch, BLOCK_K, MaskMode::Dense);
}
