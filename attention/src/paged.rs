//! Attention over a paged KV cache: what prefill and decode of a decoder run.
//!
//! The cache holds keys and values in fixed-size blocks, `[num_blocks, kv_heads, block_size,
//! head_dim]`, so that sequences of any length share one pool without fragmentation (vLLM's
//! PagedAttention). A sequence owns a list of blocks (its block table); its key `p` lives in
//! block `table[p / block_size]` at offset `p % block_size`.
//!
//! Queries arrive packed like a varlen call (`[q_heads, total_q, head_dim]`, `cu_seqlens_q`):
//! each sequence brings the tokens it adds in this step (a whole prompt, a chunk of one, or one
//! decode token), and attends to its whole context with a **bottom-right** causal mask (its new
//! tokens are the last `q_len` of `context_len`). The kernel is the selector's, chosen per
//! sequence exactly as in [`crate::scaled_dot_product_attention_varlen`]: each (sequence, KV
//! head) task copies its keys and values out of the blocks into a contiguous scratch buffer on
//! its worker thread (one read of the cache, which any kernel needs, into memory that stays in
//! cache) and runs the chosen kernel's blocks for every query head of the group. So a paged call
//! gives the same result as the varlen call on the same keys laid out contiguously (tested).

use rayon::prelude::*;

use crate::params::{CausalAlign, Mask, MaskKind, ProblemSummary, SdpaShape};
use crate::task::{Block, HeadTask, Shared};
use crate::{Kernel, KernelChoice, SdpaError, auto_kernel, flash, math, mem_efficient, select};

/// One paged attention call.
#[derive(Debug, Clone, Copy)]
pub struct PagedParams<'a> {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Keys per cache block.
    pub block_size: usize,
    /// Blocks in the cache (the length of `k_cache` is `num_blocks · kv_heads · block_size ·
    /// head_dim`).
    pub num_blocks: usize,
    /// `n + 1` offsets of each sequence's new tokens in the packed queries.
    pub cu_seqlens_q: &'a [usize],
    /// Keys each sequence attends to (cached + new); at least its query count.
    pub context_lens: &'a [usize],
    /// Each sequence's blocks, enough to hold `context_lens[s]` keys.
    pub block_tables: &'a [Vec<u32>],
    pub scale: Option<f32>,
}

impl PagedParams<'_> {
    pub fn sequences(&self) -> usize {
        self.cu_seqlens_q.len().saturating_sub(1)
    }

    pub fn total_q(&self) -> usize {
        self.cu_seqlens_q.last().copied().unwrap_or(0)
    }

    pub fn scale(&self) -> f32 {
        self.scale.unwrap_or(1.0 / (self.head_dim as f32).sqrt())
    }

    /// Elements of one of the two caches.
    pub fn cache_elems(&self) -> usize {
        self.num_blocks * self.kv_heads * self.block_size * self.head_dim
    }

    /// What the selector sees: the longest query and context, bottom-right causal, varlen.
    pub fn summary(&self) -> ProblemSummary {
        let q_len = self
            .cu_seqlens_q
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0);
        ProblemSummary {
            shape: SdpaShape {
                batch: self.sequences(),
                q_heads: self.q_heads,
                kv_heads: self.kv_heads,
                q_len,
                kv_len: self.context_lens.iter().copied().max().unwrap_or(0),
                head_dim: self.head_dim,
            },
            mask: MaskKind::CausalBottomRight,
            varlen: true,
        }
    }

    /// Checks every offset, length and block index before any work.
    pub fn validate(&self, q: usize, k: usize, v: usize, out: usize) -> Result<(), SdpaError> {
        let shape = |m: String| Err(SdpaError::Shape(m));
        if self.head_dim == 0 || self.q_heads == 0 || self.kv_heads == 0 || self.block_size == 0 {
            return shape(format!(
                "heads, head_dim and block_size must be positive (q_heads {}, kv_heads {}, \
                 head_dim {}, block_size {})",
                self.q_heads, self.kv_heads, self.head_dim, self.block_size
            ));
        }
        if !self.q_heads.is_multiple_of(self.kv_heads) {
            return shape(format!(
                "q_heads {} is not a multiple of kv_heads {}",
                self.q_heads, self.kv_heads
            ));
        }
        let cu = self.cu_seqlens_q;
        if cu.first() != Some(&0) || cu.windows(2).any(|w| w[1] < w[0]) {
            return shape(format!(
                "cu_seqlens_q must start at 0 and be non-decreasing, got {cu:?}"
            ));
        }
        let n = self.sequences();
        if self.context_lens.len() != n || self.block_tables.len() != n {
            return shape(format!(
                "{n} sequences but {} context lengths and {} block tables",
                self.context_lens.len(),
                self.block_tables.len()
            ));
        }
        for s in 0..n {
            let (q_len, ctx) = (cu[s + 1] - cu[s], self.context_lens[s]);
            if q_len > ctx {
                return shape(format!(
                    "bottom-right causal mask needs q_len <= context, sequence {s} has {q_len} > {ctx}"
                ));
            }
            let table = &self.block_tables[s];
            if table.len() * self.block_size < ctx {
                return shape(format!(
                    "sequence {s}: {} blocks of {} cannot hold {ctx} keys",
                    table.len(),
                    self.block_size
                ));
            }
            if let Some(b) = table.iter().find(|&&b| b as usize >= self.num_blocks) {
                return shape(format!(
                    "sequence {s}: block {b} is outside the cache of {} blocks",
                    self.num_blocks
                ));
            }
        }
        let q_elems = self.q_heads * self.total_q() * self.head_dim;
        let desc = format!(
            "paged q [{}, {}, {}], cache [{}, {}, {}, {}]",
            self.q_heads,
            self.total_q(),
            self.head_dim,
            self.num_blocks,
            self.kv_heads,
            self.block_size,
            self.head_dim
        );
        for (what, actual, expected) in [
            ("q", q, q_elems),
            ("k cache", k, self.cache_elems()),
            ("v cache", v, self.cache_elems()),
            ("out", out, q_elems),
        ] {
            if actual != expected {
                return Err(SdpaError::Length {
                    what,
                    actual,
                    expected,
                    shape: desc.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Keys and values of one (sequence, KV head), copied out of the blocks.
#[derive(Default)]
struct Gathered {
    k: Vec<f32>,
    k_t: Vec<f32>,
    v: Vec<f32>,
    scores: Vec<f32>,
    tiled: crate::tiled::Scratch,
}

/// The rows of the output one (sequence, KV head) task writes: one slice per query head of
/// the group.
struct Task<'o> {
    seq: usize,
    kv_head: usize,
    kernel: Kernel,
    outs: Vec<&'o mut [f32]>,
}

/// Attention of packed new tokens over a paged cache (see the module docs). `k_cache` and
/// `v_cache` are `[num_blocks, kv_heads, block_size, head_dim]`; `q` and `out` are `[q_heads,
/// total_q, head_dim]`. Returns the kernel of the longest sequence.
pub fn scaled_dot_product_attention_paged(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    out: &mut [f32],
    params: &PagedParams<'_>,
    choice: KernelChoice,
) -> Result<Kernel, SdpaError> {
    params.validate(q.len(), k_cache.len(), v_cache.len(), out.len())?;
    let summary = params.summary();
    let kernel = select(&summary, crate::Isa::detect(), choice)?.kernel;
    let kernel_of = |q_len: usize, kv_len: usize| match choice {
        KernelChoice::Force(forced) => forced,
        KernelChoice::Auto => {
            let mut one = summary;
            (one.shape.q_len, one.shape.kv_len) = (q_len, kv_len);
            auto_kernel(&one)
        }
    };
    let (d, tq, n) = (params.head_dim, params.total_q(), params.sequences());
    let group = params.q_heads / params.kv_heads;
    let cu = params.cu_seqlens_q;
    if tq == 0 {
        return Ok(kernel);
    }
    // Cut the output into one slice per (sequence, query head), grouped by sequence.
    let mut slices: Vec<Vec<&mut [f32]>> =
        (0..n).map(|_| Vec::with_capacity(params.q_heads)).collect();
    for head_out in out.chunks_mut(tq * d) {
        let mut rest = head_out;
        for (s, seq_slices) in slices.iter_mut().enumerate() {
            let (mine, tail) = rest.split_at_mut((cu[s + 1] - cu[s]) * d);
            seq_slices.push(mine);
            rest = tail;
        }
    }
    let mut tasks: Vec<Task<'_>> = Vec::with_capacity(n * params.kv_heads);
    for (s, heads) in slices.into_iter().enumerate() {
        let q_len = cu[s + 1] - cu[s];
        if q_len == 0 {
            continue;
        }
        let kernel = kernel_of(q_len, params.context_lens[s]);
        let mut heads = heads.into_iter();
        for kv_head in 0..params.kv_heads {
            tasks.push(Task {
                seq: s,
                kv_head,
                kernel,
                outs: heads.by_ref().take(group).collect(),
            });
        }
    }
    let shared = Shared {
        mask: Mask::Causal(CausalAlign::BottomRight),
        scale: params.scale(),
    };
    tasks
        .into_par_iter()
        .for_each_init(Gathered::default, |scratch, task| {
            run_task(task, q, k_cache, v_cache, params, &shared, scratch);
        });
    Ok(kernel)
}

fn run_task(
    task: Task<'_>,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    params: &PagedParams<'_>,
    shared: &Shared<'_>,
    scratch: &mut Gathered,
) {
    let (d, bs, kvh) = (params.head_dim, params.block_size, params.kv_heads);
    let s = task.seq;
    let kv_len = params.context_lens[s];
    let (q0, q1) = (params.cu_seqlens_q[s], params.cu_seqlens_q[s + 1]);
    let q_len = q1 - q0;
    let tq = params.total_q();
    let group = params.q_heads / kvh;
    // Copy this head's keys and values out of the blocks, in order.
    scratch.k.clear();
    scratch.v.clear();
    let table = &params.block_tables[s];
    let mut left = kv_len;
    for &b in table {
        if left == 0 {
            break;
        }
        let take = left.min(bs);
        let off = (b as usize * kvh + task.kv_head) * bs * d;
        scratch.k.extend_from_slice(&k_cache[off..off + take * d]);
        scratch.v.extend_from_slice(&v_cache[off..off + take * d]);
        left -= take;
    }
    let tiled = matches!(task.kernel, Kernel::Flash | Kernel::MemEfficient);
    if tiled {
        scratch.k_t.resize(kv_len * d, 0.0);
        for j in 0..kv_len {
            for c in 0..d {
                scratch.k_t[c * kv_len + j] = scratch.k[j * d + c];
            }
        }
    }
    let Gathered {
        k,
        k_t,
        v,
        scores,
        tiled: tiled_scratch,
    } = scratch;
    for (g, out) in task.outs.into_iter().enumerate() {
        let h = task.kv_head * group + g;
        let qh = &q[(h * tq + q0) * d..(h * tq + q1) * d];
        let head = HeadTask {
            q: qh,
            k: &k[..],
            k_t: if tiled { &k_t[..] } else { &[] },
            k_t_stride: kv_len,
            v: &v[..],
            q_len,
            kv_len,
            head_dim: d,
            b: s,
            h,
        };
        let rows = match task.kernel {
            Kernel::Math => math::block_rows(q_len),
            Kernel::Flash => flash::block_rows(q_len),
            Kernel::MemEfficient => mem_efficient::block_rows(q_len),
        }
        .max(1);
        for (n, chunk) in out.chunks_mut(rows * d).enumerate() {
            let mut block = Block {
                kernel: task.kernel,
                task: head,
                row0: n * rows,
                out: chunk,
            };
            match task.kernel {
                Kernel::Math => math::run_block(&mut block, shared, scores),
                Kernel::Flash => flash::run_block(&mut block, shared, tiled_scratch),
                Kernel::MemEfficient => mem_efficient::run_block(&mut block, shared, tiled_scratch),
            }
        }
    }
}
