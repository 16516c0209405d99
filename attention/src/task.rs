//! Cutting an attention call into independent blocks of work.
//!
//! Every kernel runs on [`Block`]s: a run of query rows of one (sequence, query head) pair, with
//! that head's keys and values and the disjoint slice of the output it writes. Padded
//! (`[batch, heads, seq, head_dim]`) and varlen (`[heads, tokens, head_dim]` + `cu_seqlens`)
//! calls produce the same blocks, so the kernels do not know which layout they run on, and the
//! driver parallelises over `batch × heads × query blocks` with rayon.

use rayon::prelude::*;

use crate::params::{Mask, RowMask, SdpaParams, VarlenParams};
use crate::{Kernel, flash, math, mem_efficient, tiled};

/// One (sequence, query head) problem. `q`, `k` and `v` are dense `[len, head_dim]` rows.
#[derive(Clone, Copy)]
pub(crate) struct HeadTask<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    /// `Kᵀ` of this task's keys, `[head_dim, kv_len]` with row stride `k_t_stride`, when the
    /// kernel asked for it (see [`transpose_keys`]); empty otherwise.
    pub k_t: &'a [f32],
    pub k_t_stride: usize,
    pub v: &'a [f32],
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
    /// Batch index (the sequence index for varlen) and query head, for mask lookups.
    pub b: usize,
    pub h: usize,
}

/// Query rows `row0..row0 + rows` of one task, the kernel that runs them, and the output rows
/// they produce.
pub(crate) struct Block<'a, 'o> {
    pub kernel: Kernel,
    pub task: HeadTask<'a>,
    pub row0: usize,
    pub out: &'o mut [f32],
}

impl Block<'_, '_> {
    pub fn rows(&self) -> usize {
        self.out.len() / self.task.head_dim
    }
}

/// The mask and scale shared by every block of a call.
#[derive(Clone, Copy)]
pub(crate) struct Shared<'a> {
    pub mask: Mask<'a>,
    pub scale: f32,
}

impl<'a> Shared<'a> {
    /// Number of keys query `i` of `task` may see from the start (its causal limit).
    #[inline]
    pub fn visible(&self, task: &HeadTask<'_>, i: usize) -> usize {
        self.mask.visible_keys(i, task.q_len, task.kv_len)
    }

    #[inline]
    pub fn row(&self, task: &HeadTask<'_>, i: usize) -> RowMask<'a> {
        self.mask.row(task.b, task.h, i, task.kv_len)
    }
}

/// How many query rows a block of `kernel` holds for a task of `q_len` rows.
fn block_rows(kernel: Kernel, q_len: usize) -> usize {
    match kernel {
        Kernel::Math => math::block_rows(q_len),
        Kernel::Flash => flash::block_rows(q_len),
        Kernel::MemEfficient => mem_efficient::block_rows(q_len),
    }
}

fn push_task<'a, 'o>(
    blocks: &mut Vec<Block<'a, 'o>>,
    task: HeadTask<'a>,
    out: &'o mut [f32],
    kernel: Kernel,
) {
    let rows = block_rows(kernel, task.q_len).max(1);
    for (n, chunk) in out.chunks_mut(rows * task.head_dim).enumerate() {
        blocks.push(Block {
            kernel,
            task,
            row0: n * rows,
            out: chunk,
        });
    }
}

/// `[heads, len, d]` → `[heads, d, len]`: keys transposed once per call so that the tiled
/// kernels' `Q·Kᵀ` GEMMs read a row-major right-hand side. Measured at S = 512: reading `K` with
/// swapped strides instead (the gemm crate then repacks it for every query block) made flash
/// ~2× slower. Costs one copy of K: O(S) memory.
pub(crate) fn transpose_keys(k: &[f32], len: usize, d: usize) -> Vec<f32> {
    const TILE: usize = 16;
    let mut out = vec![0.0f32; k.len()];
    if len == 0 || d == 0 {
        return out;
    }
    out.par_chunks_mut(len * d)
        .zip(k.par_chunks(len * d))
        .for_each(|(dst, src)| {
            for j0 in (0..len).step_by(TILE) {
                for c0 in (0..d).step_by(TILE) {
                    for j in j0..(j0 + TILE).min(len) {
                        for c in c0..(c0 + TILE).min(d) {
                            dst[c * len + j] = src[j * d + c];
                        }
                    }
                }
            }
        });
    out
}

/// Blocks of a padded call (lengths validated). `k_t` is [`transpose_keys`] of `k` or empty.
#[allow(clippy::too_many_arguments)]
pub(crate) fn padded<'a, 'o>(
    q: &'a [f32],
    k: &'a [f32],
    k_t: &'a [f32],
    v: &'a [f32],
    out: &'o mut [f32],
    params: &SdpaParams<'_>,
    kernel: Kernel,
) -> Vec<Block<'a, 'o>> {
    let s = params.shape;
    let d = s.head_dim;
    let group = s.q_heads / s.kv_heads;
    let (q_head, kv_head) = (s.q_len * d, s.kv_len * d);
    let mut blocks = Vec::new();
    if q_head == 0 {
        return blocks;
    }
    for (bh, out_head) in out.chunks_mut(q_head).enumerate() {
        let (b, h) = (bh / s.q_heads, bh % s.q_heads);
        let kv_off = (b * s.kv_heads + h / group) * kv_head;
        let task = HeadTask {
            q: &q[bh * q_head..(bh + 1) * q_head],
            k: &k[kv_off..kv_off + kv_head],
            k_t: k_t.get(kv_off..kv_off + kv_head).unwrap_or(&[]),
            k_t_stride: s.kv_len,
            v: &v[kv_off..kv_off + kv_head],
            q_len: s.q_len,
            kv_len: s.kv_len,
            head_dim: d,
            b,
            h,
        };
        push_task(&mut blocks, task, out_head, kernel);
    }
    blocks
}

/// Blocks of a varlen call (offsets and lengths validated). `k_t` is [`transpose_keys`] of `k`
/// (`[kv_heads, head_dim, total_kv]`) or empty; `kernel_of(q_len, kv_len)` picks each
/// sequence's kernel.
#[allow(clippy::too_many_arguments)]
pub(crate) fn varlen<'a, 'o>(
    q: &'a [f32],
    k: &'a [f32],
    k_t: &'a [f32],
    v: &'a [f32],
    out: &'o mut [f32],
    params: &VarlenParams<'_>,
    kernel_of: impl Fn(usize, usize) -> Kernel,
) -> Vec<Block<'a, 'o>> {
    let d = params.head_dim;
    let group = params.q_heads / params.kv_heads;
    let (tq, tk) = (params.total_q(), params.total_kv());
    let mut blocks = Vec::new();
    if tq == 0 {
        return blocks;
    }
    for (h, mut rest) in out.chunks_mut(tq * d).enumerate() {
        let kvh = h / group;
        for (s, (wq, wk)) in params
            .cu_seqlens_q
            .windows(2)
            .zip(params.cu_seqlens_k.windows(2))
            .enumerate()
        {
            let (q_len, kv_len) = (wq[1] - wq[0], wk[1] - wk[0]);
            let (out_seq, tail) = rest.split_at_mut(q_len * d);
            rest = tail;
            if q_len == 0 {
                continue;
            }
            let q0 = (h * tq + wq[0]) * d;
            let k0 = (kvh * tk + wk[0]) * d;
            let task = HeadTask {
                q: &q[q0..q0 + q_len * d],
                k: &k[k0..k0 + kv_len * d],
                // Column wk[0] of head kvh's [d, total_kv] block; rows are total_kv apart.
                k_t: k_t.get(kvh * tk * d + wk[0]..).unwrap_or(&[]),
                k_t_stride: tk,
                v: &v[k0..k0 + kv_len * d],
                q_len,
                kv_len,
                head_dim: d,
                b: s,
                h,
            };
            push_task(&mut blocks, task, out_seq, kernel_of(q_len, kv_len));
        }
    }
    blocks
}

/// Per-thread scratch space of every kernel, reused across blocks.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    tiled: tiled::Scratch,
}

/// Runs every block with its kernel, in parallel.
pub(crate) fn run(blocks: Vec<Block<'_, '_>>, shared: Shared<'_>) {
    blocks
        .into_par_iter()
        .for_each_init(Scratch::default, |scratch, mut block| match block.kernel {
            Kernel::Math => math::run_block(&mut block, &shared, &mut scratch.scores),
            Kernel::Flash => flash::run_block(&mut block, &shared, &mut scratch.tiled),
            Kernel::MemEfficient => {
                mem_efficient::run_block(&mut block, &shared, &mut scratch.tiled)
            }
        });
}
