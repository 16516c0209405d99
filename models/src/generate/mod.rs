//! Text generation with continuous batching over a paged KV cache.
//!
//! Design note. A [`Generator`] owns one model's KV cache and the requests using it. It is
//! synchronous and deterministic: the server's scheduler thread calls [`Generator::submit`],
//! [`Generator::cancel`] and [`Generator::step`]; tests call the same methods directly.
//!
//! - **Paged KV cache.** The cache is `max_batch_total_tokens` tokens cut into blocks of
//!   `block_size`. A request reserves the blocks for its prompt plus `max_new_tokens` when it
//!   joins the batch (TGI's rule), so a running sequence can never run out of memory; a request
//!   that does not fit waits in the queue (bounded by the server's admission limit, which answers
//!   429 beyond it), and one that could never fit is refused at once. Finishing or cancelling
//!   returns every block to the pool immediately.
//! - **Continuous batching.** Each step is one engine call over a packed batch: one token for
//!   every decoding sequence plus prompt tokens of joining sequences, up to
//!   `max_batch_prefill_tokens` per step (longer prompts are prefilled in chunks). Requests join
//!   at token boundaries and leave as soon as they finish. As in TGI, while a batch is running a
//!   waiting request is let in when `max_waiting_tokens` steps have passed since the last join,
//!   or when the waiting requests reach `waiting_served_ratio` × the running ones.
//! - **Sampling and stopping** per request ([`sampler`], [`text`]): greedy or seeded sampling,
//!   EOS and stop tokens, stop strings, `max_new_tokens`.

pub mod sampler;
pub mod text;

use std::collections::VecDeque;
use std::sync::Arc;

use kiln_engine::KvCache;

use crate::decoder::{CausalLm, StepSequence};
use crate::error::{ModelError, Result};
pub use sampler::{Sampler, SamplingParams};
use text::{Decode, Detokenizer, StopStrings};

/// The batching and memory limits of a [`Generator`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationLimits {
    /// Tokens per KV cache block.
    pub block_size: usize,
    /// Tokens the KV cache holds across every running sequence (prompt + generated).
    pub max_batch_total_tokens: usize,
    /// Prompt tokens run in one step (a longer prompt is prefilled over several steps).
    pub max_batch_prefill_tokens: usize,
    /// Steps a waiting request may be held back while a batch runs.
    pub max_waiting_tokens: usize,
    /// Let waiting requests in once they are this many times the running ones.
    pub waiting_served_ratio: f32,
    /// Most sequences in the running batch.
    pub max_running: usize,
}

impl Default for GenerationLimits {
    fn default() -> Self {
        Self {
            block_size: 16,
            max_batch_total_tokens: 16384,
            max_batch_prefill_tokens: 4096,
            max_waiting_tokens: 20,
            waiting_served_ratio: 1.2,
            max_running: 64,
        }
    }
}

impl GenerationLimits {
    pub fn num_blocks(&self) -> usize {
        self.max_batch_total_tokens.div_ceil(self.block_size)
    }
}

/// One generation request, tokenized.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Text that ends generation; it and what follows are not returned.
    pub stop: Vec<String>,
    /// Tokens that end generation besides the model's EOS (not returned).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past EOS (benchmarks, the fixture references).
    pub ignore_eos: bool,
}

/// Why a sequence stopped (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` or the model's context.
    Length,
    /// EOS, a stop token or a stop string.
    Stop,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        }
    }
}

/// A request's id within one generator.
pub type RequestId = u64;

/// What a step produced for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new token and the text it completes (possibly empty: a character still being spelled
    /// out, or text held back because it may start a stop string).
    Token {
        id: RequestId,
        token: u32,
        text: String,
        /// Set on the request's last event.
        finish: Option<FinishReason>,
        prompt_tokens: usize,
        generated_tokens: usize,
    },
    /// The request failed (its engine call returned an error); its blocks are free.
    Failed { id: RequestId, message: String },
}

/// The free list of KV cache blocks.
#[derive(Debug)]
struct BlockPool {
    free: Vec<u32>,
    total: usize,
}

impl BlockPool {
    fn new(total: usize) -> Self {
        Self {
            free: (0..total as u32).rev().collect(),
            total,
        }
    }

    fn alloc(&mut self, n: usize) -> Option<Vec<u32>> {
        (n <= self.free.len()).then(|| self.free.split_off(self.free.len() - n))
    }

    fn release(&mut self, blocks: Vec<u32>) {
        self.free.extend(blocks);
    }
}

impl Decode for CausalLm {
    fn decode_ids(&self, ids: &[u32]) -> String {
        self.decode(ids).unwrap_or_default()
    }
}

struct Sequence {
    id: RequestId,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    reserve: usize,
    max_new_tokens: usize,
    sampler: Sampler,
    detok: Detokenizer,
    stops: StopStrings,
    stop_tokens: Vec<u32>,
}

impl Sequence {
    fn len(&self) -> usize {
        self.prompt.len() + self.generated.len()
    }

    fn token(&self, i: usize) -> u32 {
        if i < self.prompt.len() {
            self.prompt[i]
        } else {
            self.generated[i - self.prompt.len()]
        }
    }
}

/// Continuous batching over one model and its KV cache (see the module docs).
pub struct Generator {
    model: Arc<CausalLm>,
    cache: KvCache,
    pool: BlockPool,
    limits: GenerationLimits,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    next_id: RequestId,
    steps_since_join: usize,
    eos: Vec<u32>,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("running", &self.running.len())
            .field("waiting", &self.waiting.len())
            .field("free_blocks", &self.pool.free.len())
            .finish()
    }
}

impl Generator {
    /// Allocates the KV cache for `limits`.
    pub fn new(model: Arc<CausalLm>, limits: GenerationLimits) -> Result<Self> {
        if limits.block_size == 0
            || limits.max_batch_total_tokens == 0
            || limits.max_batch_prefill_tokens == 0
            || limits.max_running == 0
        {
            return Err(ModelError::Input(format!(
                "generation limits must be positive: {limits:?}"
            )));
        }
        let blocks = limits.num_blocks();
        let cache = model.new_kv_cache(blocks, limits.block_size)?;
        let eos = model.eos_token_ids();
        Ok(Self {
            model,
            cache,
            pool: BlockPool::new(blocks),
            limits,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            steps_since_join: 0,
            eos,
        })
    }

    pub fn model(&self) -> &Arc<CausalLm> {
        &self.model
    }

    /// Numbers new requests from `first` on: a generator that replaces another must not reuse
    /// the ids its predecessor gave out (a late cancel for one of those would hit a new request).
    pub fn start_ids_at(&mut self, first: RequestId) {
        self.next_id = self.next_id.max(first);
    }

    pub fn limits(&self) -> &GenerationLimits {
        &self.limits
    }

    /// KV cache blocks in use and in total.
    pub fn blocks_used(&self) -> (usize, usize) {
        (self.pool.total - self.pool.free.len(), self.pool.total)
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Queues a request. Errors (as [`ModelError::Input`]) for one that can never run: empty,
    /// longer than the context, or needing more KV cache than exists.
    pub fn submit(&mut self, req: GenerationRequest) -> Result<RequestId> {
        if req.prompt.is_empty() {
            return Err(ModelError::Input("the prompt has no tokens".into()));
        }
        if req.max_new_tokens == 0 {
            return Err(ModelError::Input("max_tokens must be at least 1".into()));
        }
        req.sampling.validate().map_err(ModelError::Input)?;
        let vocab = self.model.info().vocab_size;
        if let Some(t) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Input(format!(
                "token id {t} is outside the vocabulary of {vocab}"
            )));
        }
        let context = self.model.info().max_context;
        // Both counts come from the client: a sum that overflows is just "too long".
        let Some(total) = req.prompt.len().checked_add(req.max_new_tokens) else {
            return Err(ModelError::Input(format!(
                "max_tokens is {}: more than the model's context of {context} tokens",
                req.max_new_tokens
            )));
        };
        if total > context {
            return Err(ModelError::Input(format!(
                "the prompt has {} tokens and max_tokens is {}: {total} is more than the model's \
                 context of {context} tokens",
                req.prompt.len(),
                req.max_new_tokens
            )));
        }
        let reserve = total.div_ceil(self.limits.block_size);
        if reserve > self.pool.total {
            return Err(ModelError::Input(format!(
                "the prompt and max_tokens need {total} tokens of KV cache; the server holds {} \
                 (max_batch_total_tokens)",
                self.limits.max_batch_total_tokens
            )));
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let mut stop_tokens = req.stop_token_ids;
        if !req.ignore_eos {
            stop_tokens.extend(&self.eos);
        }
        self.waiting.push_back(Sequence {
            id,
            prompt: req.prompt,
            generated: Vec::new(),
            computed: 0,
            blocks: Vec::new(),
            reserve,
            max_new_tokens: req.max_new_tokens,
            sampler: Sampler::new(req.sampling),
            detok: Detokenizer::default(),
            stops: StopStrings::new(req.stop),
            stop_tokens,
        });
        Ok(id)
    }

    /// Drops a request wherever it is; its KV blocks return to the pool at once. False if it
    /// was not there (already finished).
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i);
            return true;
        }
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let seq = self.running.remove(i);
            self.pool.release(seq.blocks);
            return true;
        }
        false
    }

    /// Moves waiting requests into the running batch while their reservations fit.
    fn admit(&mut self) {
        let ratio_reached = self.waiting.len() as f32
            >= self.limits.waiting_served_ratio * self.running.len() as f32;
        let may_join = self.running.is_empty()
            || self.steps_since_join >= self.limits.max_waiting_tokens
            || ratio_reached;
        if !may_join {
            return;
        }
        let mut joined = false;
        while let Some(front) = self.waiting.front() {
            if self.running.len() >= self.limits.max_running {
                break;
            }
            let Some(blocks) = self.pool.alloc(front.reserve) else {
                break; // the oldest waits for memory; later ones do not overtake it
            };
            let mut seq = self.waiting.pop_front().expect("front exists");
            seq.blocks = blocks;
            self.running.push(seq);
            joined = true;
        }
        if joined {
            self.steps_since_join = 0;
        }
    }

    /// Runs one engine step and returns what it produced. Does nothing without work.
    pub fn step(&mut self) -> Vec<Event> {
        self.admit();
        if self.running.is_empty() {
            return Vec::new();
        }
        self.steps_since_join += 1;
        // Decoding sequences bring their last token; prefilling ones a chunk of their prompt
        // within the step's prefill budget.
        let mut budget = self.limits.max_batch_prefill_tokens;
        let mut part: Vec<(usize, usize)> = Vec::new(); // (index in running, tokens)
        for (i, s) in self.running.iter().enumerate() {
            let pending = s.len() - s.computed;
            let decoding = s.computed >= s.prompt.len();
            let q = if decoding {
                pending
            } else {
                let q = pending.min(budget);
                budget -= q;
                q
            };
            if q > 0 {
                part.push((i, q));
            }
        }
        if part.is_empty() {
            return Vec::new();
        }
        // A sequence whose blocks cannot hold this step's tokens would make the whole engine
        // call fail; it fails alone, before the call.
        let mut events = Vec::new();
        let mut failed: Vec<usize> = Vec::new();
        part.retain(|&(i, q)| {
            let s = &self.running[i];
            let capacity = s.blocks.len().saturating_mul(self.limits.block_size);
            let fits = s.computed.checked_add(q).is_some_and(|end| end <= capacity);
            if !fits {
                tracing::error!(
                    request = s.id,
                    blocks = s.blocks.len(),
                    tokens = s.computed.saturating_add(q),
                    "a sequence's KV blocks cannot hold its tokens; it fails alone"
                );
                failed.push(i);
            }
            fits
        });
        let (logits, culprits) = self.run_isolated(&part);
        failed.extend(culprits.iter().map(|&k| part[k].0));
        let mut finished = Vec::new();
        let model = self.model.clone();
        let context = model.info().max_context;
        for (&(i, q), row) in part.iter().zip(logits) {
            let Some(mut row) = row else {
                continue; // failed: answered below
            };
            let s = &mut self.running[i];
            s.computed += q;
            if s.computed < s.len() {
                continue; // mid-prompt: no token yet
            }
            let token = s.sampler.sample(&mut row, &s.prompt, &s.generated);
            s.generated.push(token);
            let mut finish = None;
            let mut text = String::new();
            if s.stop_tokens.contains(&token) {
                finish = Some(FinishReason::Stop);
            } else {
                let piece = s.detok.push(token, model.as_ref());
                let (out, hit) = s.stops.push(&piece);
                text = out;
                if hit {
                    finish = Some(FinishReason::Stop);
                }
            }
            if finish.is_none() && (s.generated.len() >= s.max_new_tokens || s.len() >= context) {
                finish = Some(FinishReason::Length);
            }
            if finish.is_some() && !matches!(finish, Some(FinishReason::Stop) if s.stops_hit()) {
                // Release what the detokenizer and the stop-string guard still hold.
                let rest = s.detok.finish(model.as_ref());
                let (out, hit) = s.stops.push(&rest);
                text.push_str(&out);
                if !hit {
                    text.push_str(&s.stops.flush());
                } else {
                    finish = Some(FinishReason::Stop);
                }
            }
            events.push(Event::Token {
                id: s.id,
                token,
                text,
                finish,
                prompt_tokens: s.prompt.len(),
                generated_tokens: s.generated.len(),
            });
            if finish.is_some() {
                finished.push(i);
            }
        }
        for &i in &failed {
            events.push(Event::Failed {
                id: self.running[i].id,
                message: "the engine could not run this sequence; see the server log".into(),
            });
        }
        finished.extend(failed);
        finished.sort_unstable_by(|a, b| b.cmp(a));
        finished.dedup();
        for i in finished {
            let seq = self.running.remove(i);
            self.pool.release(seq.blocks);
        }
        events
    }

    /// One engine call over `part` (indices into `running` and token counts). When the call
    /// fails (an error or a panic), each sequence is run alone, so that only the ones that fail
    /// by themselves fail: the others' logits come back as if nothing had happened (rerunning a
    /// sequence rewrites the same cache positions with the same values). Returns a row of
    /// logits per entry of `part` (`None` for a culprit) and the culprits' positions in `part`.
    fn run_isolated(&mut self, part: &[(usize, usize)]) -> (Vec<Option<Vec<f32>>>, Vec<usize>) {
        if part.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let step: Vec<StepSequence> = part
            .iter()
            .map(|&(i, q)| {
                let s = &self.running[i];
                StepSequence {
                    tokens: (s.computed..s.computed + q).map(|t| s.token(t)).collect(),
                    start: s.computed,
                    block_table: s.blocks.clone(),
                }
            })
            .collect();
        let error = match guarded_step(&self.model, &mut self.cache, &step) {
            Ok(rows) => return (rows.into_iter().map(Some).collect(), Vec::new()),
            Err(e) => e,
        };
        if step.len() == 1 {
            tracing::error!(error = %error, request = self.running[part[0].0].id, "a generation step failed; its request fails");
            return (vec![None], vec![0]);
        }
        tracing::error!(error = %error, sequences = step.len(), "a generation step failed; running its sequences one by one to find the culprit");
        let mut rows = Vec::with_capacity(step.len());
        let mut culprits = Vec::new();
        for (k, one) in step.into_iter().enumerate() {
            match guarded_step(&self.model, &mut self.cache, std::slice::from_ref(&one)) {
                Ok(mut r) if r.len() == 1 => rows.push(r.pop()),
                Ok(_) | Err(_) => {
                    tracing::error!(
                        request = self.running[part[k].0].id,
                        "this sequence fails alone; only its request fails"
                    );
                    rows.push(None);
                    culprits.push(k);
                }
            }
        }
        (rows, culprits)
    }
}

/// One engine step with a panic turned into an error, so that a bug reached by one request's
/// data fails a step, never the scheduler thread.
fn guarded_step(
    model: &CausalLm,
    cache: &mut KvCache,
    step: &[StepSequence],
) -> std::result::Result<Vec<Vec<f32>>, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.step(cache, step))) {
        Ok(Ok(rows)) if rows.len() == step.len() => Ok(rows),
        Ok(Ok(rows)) => Err(format!(
            "the engine returned {} rows of logits for {} sequences",
            rows.len(),
            step.len()
        )),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(format!("the engine panicked: {}", panic_message(&*panic))),
    }
}

/// The text of a panic's payload, when it has one.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

impl Sequence {
    fn stops_hit(&self) -> bool {
        self.stops.is_hit()
    }
}
