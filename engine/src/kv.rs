//! The paged KV cache a decoder graph reads and writes through its `PagedSdpa` nodes.
//!
//! Design note. The engine owns the cache's *memory* (a backend allocates it in its own layout,
//! once, for every layer), while the caller owns its *bookkeeping*: which blocks are free and
//! which sequence holds which blocks (the generation scheduler's block allocator). Each run
//! passes a [`PagedBatch`] saying, for every sequence in the packed step, how many new tokens it
//! brings, how long its context is after them, and its block table. The executor checks the
//! batch against the cache and the inputs before any backend call, so a bad table is an error,
//! never an out-of-bounds write.

use std::any::Any;

use crate::error::{EngineError, Result};

/// The size and layout of a paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheSpec {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Tokens per block.
    pub block_size: usize,
    pub num_blocks: usize,
}

impl KvCacheSpec {
    /// Bytes of f32 keys and values one token takes across every layer.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * std::mem::size_of::<f32>()
    }

    pub fn total_bytes(&self) -> usize {
        self.bytes_per_token() * self.block_size * self.num_blocks
    }

    fn validate(&self) -> Result<()> {
        let s = self;
        if s.layers == 0
            || s.kv_heads == 0
            || s.head_dim == 0
            || s.block_size == 0
            || s.num_blocks == 0
        {
            return Err(EngineError::Graph(format!(
                "KV cache sizes must be positive: {s:?}"
            )));
        }
        Ok(())
    }
}

/// The layout of one packed step over the cache: sequence `s` brings `q_lens[s]` new tokens
/// (back to back in the step's token order), after which its context holds `context_lens[s]`
/// tokens, stored in the blocks `block_tables[s]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PagedBatch {
    pub q_lens: Vec<usize>,
    pub context_lens: Vec<usize>,
    pub block_tables: Vec<Vec<u32>>,
}

impl PagedBatch {
    pub fn sequences(&self) -> usize {
        self.q_lens.len()
    }

    pub fn tokens(&self) -> usize {
        self.q_lens.iter().sum()
    }

    /// `[0, q0, q0 + q1, ...]`.
    pub fn cu_seqlens_q(&self) -> Vec<usize> {
        let mut cu = Vec::with_capacity(self.q_lens.len() + 1);
        cu.push(0);
        for &q in &self.q_lens {
            cu.push(cu.last().copied().unwrap_or(0) + q);
        }
        cu
    }

    /// Cache slot (`block · block_size + offset`) of every new token, in step order.
    pub fn slots(&self, block_size: usize) -> Vec<usize> {
        let mut slots = Vec::with_capacity(self.tokens());
        for s in 0..self.sequences() {
            let start = self.context_lens[s] - self.q_lens[s];
            for p in start..self.context_lens[s] {
                let block = self.block_tables[s][p / block_size] as usize;
                slots.push(block * block_size + p % block_size);
            }
        }
        slots
    }

    /// Checks the batch against the cache and the step's token count.
    pub fn validate(&self, spec: &KvCacheSpec, tokens: usize) -> Result<()> {
        let bad = |m: String| Err(EngineError::Graph(format!("paged batch: {m}")));
        let n = self.q_lens.len();
        if self.context_lens.len() != n || self.block_tables.len() != n {
            return bad(format!(
                "{n} query lengths, {} context lengths, {} block tables",
                self.context_lens.len(),
                self.block_tables.len()
            ));
        }
        if n == 0 {
            return bad("no sequences".into());
        }
        if self.tokens() != tokens {
            return bad(format!(
                "query lengths sum to {} but the step has {tokens} tokens",
                self.tokens()
            ));
        }
        for s in 0..n {
            let (q, c) = (self.q_lens[s], self.context_lens[s]);
            if q == 0 || q > c {
                return bad(format!(
                    "sequence {s} brings {q} tokens to a context of {c} (need 1..=context)"
                ));
            }
            let table = &self.block_tables[s];
            if table.len() * spec.block_size < c {
                return bad(format!(
                    "sequence {s}: {} blocks of {} tokens cannot hold {c}",
                    table.len(),
                    spec.block_size
                ));
            }
            if let Some(b) = table.iter().find(|&&b| b as usize >= spec.num_blocks) {
                return bad(format!(
                    "sequence {s}: block {b} is outside the cache of {} blocks",
                    spec.num_blocks
                ));
            }
        }
        Ok(())
    }
}

/// A KV cache allocated by one backend. Create it with [`crate::Runnable::new_kv_cache`] on
/// the plan that will use it.
pub struct KvCache {
    spec: KvCacheSpec,
    backend: String,
    pub(crate) store: Box<dyn Any + Send>,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("spec", &self.spec)
            .field("backend", &self.backend)
            .finish()
    }
}

impl KvCache {
    pub(crate) fn new(
        spec: KvCacheSpec,
        backend: String,
        store: Box<dyn Any + Send>,
    ) -> Result<Self> {
        spec.validate()?;
        Ok(Self {
            spec,
            backend,
            store,
        })
    }

    pub(crate) fn check_spec(spec: &KvCacheSpec) -> Result<()> {
        spec.validate()
    }

    pub fn spec(&self) -> &KvCacheSpec {
        &self.spec
    }

    pub fn backend(&self) -> &str {
        &self.backend
    }
}
