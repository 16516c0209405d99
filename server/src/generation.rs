//! Serving a causal LM: the scheduler thread that owns the running batch, and the handle
//! handlers use to start and stream generations.
//!
//! Design note. Like the encoder batcher's backend thread, one thread owns the model's
//! [`Generator`] (its KV cache and batch); handlers talk to it only by messages. Each request
//! gets an unbounded channel of [`Piece`]s; the scheduler steps the batch whenever it has work
//! and sends every new token to its request. A request's [`Generation`] handle cancels it when
//! dropped (the client disconnected, or a non-streaming handler was cancelled), and the
//! scheduler also cancels any request whose channel has closed before each step, so a
//! disconnect returns its KV blocks to the pool at the next token boundary at the latest.
//! Admission is the same kind of gate as an encoder's ([`crate::admission::Gate`]: the model's
//! own `max_concurrent_requests` slots, 429 beyond), taken before the prompt is tokenized; inside it, a request that does not fit the KV cache
//! waits for memory, never an OOM, and no longer than `--request-timeout` (the handlers' deadline
//! covers the whole request: queue, KV wait and generation; when it passes, dropping the
//! [`Generation`] cancels it and frees its blocks).
//!
//! The scheduler runs under [`supervise::run`]: a panic outside one step's engine call (those
//! fail only the sequences that cause them, see [`Generator::step`]) fails the requests it held,
//! marks the server not ready and restarts the scheduler with a new KV cache.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_models::{
    CausalLm, Event, FinishReason, GenerationLimits, GenerationRequest, Generator, RequestId,
};
use tokio::sync::{mpsc, oneshot};

use crate::admission::Aborted;
use crate::admission::{Admission, Gate};
use crate::config::{ModelConfig, ServeConfig};
use crate::error::AppError;
use crate::metrics::ModelMetrics;
use crate::supervise::{self, Exit, Workers};

/// The scheduler's name in logs, metrics and fault injection.
const WORKER: &str = "generation-scheduler";

/// What a generation sends back, token by token.
#[derive(Debug, Clone)]
pub enum Piece {
    Token {
        id: u32,
        text: String,
        finish: Option<FinishReason>,
        prompt_tokens: usize,
        generated_tokens: usize,
    },
    Failed(String),
    /// `--request-timeout` passed (made by the handler, never sent by the scheduler).
    TimedOut(String),
    /// The server stopped draining at `--shutdown-timeout` (made by the handler).
    ShuttingDown,
}

enum Command {
    Submit {
        req: GenerationRequest,
        pieces: mpsc::UnboundedSender<Piece>,
        accepted: oneshot::Sender<Result<RequestId, AppError>>,
    },
    Cancel(RequestId),
}

/// A loaded causal LM with its scheduler running.
#[derive(Clone)]
pub struct GenerationService {
    model: Arc<CausalLm>,
    /// Its weights and KV cache, in bytes.
    memory_bytes: u64,
    commands: mpsc::UnboundedSender<Command>,
    gate: Gate,
    model_config: Arc<ModelConfig>,
    config: Arc<ServeConfig>,
    aborted: Aborted,
}

/// A running generation: its pieces, and cancellation when dropped before the end.
pub struct Generation {
    pub pieces: mpsc::UnboundedReceiver<Piece>,
    pub prompt_tokens: usize,
    id: RequestId,
    commands: mpsc::UnboundedSender<Command>,
    done: bool,
    _slot: Admission,
}

impl Generation {
    /// The next piece; `None` after the last one. Marks the generation done on its final piece
    /// so that dropping it afterwards cancels nothing.
    pub async fn next(&mut self) -> Option<Piece> {
        if self.done {
            return None;
        }
        let p = self.pieces.recv().await;
        match &p {
            Some(Piece::Token {
                finish: Some(_), ..
            })
            | Some(Piece::Failed(_) | Piece::TimedOut(_) | Piece::ShuttingDown)
            | None => self.done = true,
            _ => {}
        }
        p
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.commands.send(Command::Cancel(self.id));
        }
    }
}

/// The scheduler's limits from the server's settings: the KV cache's size among them, which
/// the memory budget's estimate uses too.
pub fn limits(config: &ServeConfig) -> GenerationLimits {
    GenerationLimits {
        block_size: config.kv_block_size,
        max_batch_total_tokens: config.max_batch_total_tokens,
        max_batch_prefill_tokens: config.max_batch_prefill_tokens,
        max_waiting_tokens: config.max_waiting_tokens,
        waiting_served_ratio: config.waiting_served_ratio,
        max_running: config.max_batch_requests,
    }
}

impl GenerationService {
    /// Starts the scheduler thread (supervised: see the module docs). Must run inside the tokio
    /// runtime (for nothing but the channel types; the thread is a plain OS thread).
    pub fn start(
        model: Arc<CausalLm>,
        model_config: Arc<ModelConfig>,
        gate: Gate,
        config: Arc<ServeConfig>,
        metrics: ModelMetrics,
        workers: &Workers,
        aborted: Aborted,
    ) -> Result<Self, String> {
        let limits = limits(&config);
        // The first generator is built here so that a configuration that cannot work fails the
        // load; restarts build their own.
        let first = Generator::new(model.clone(), limits).map_err(|e| e.to_string())?;
        let (used, total) = first.blocks_used();
        let kv_bytes = model
            .kv_spec(limits.num_blocks(), limits.block_size)
            .total_bytes();
        let memory_bytes = model.weight_bytes().saturating_add(kv_bytes) as u64;
        metrics.kv_cache_blocks_total.set(total as i64);
        metrics.kv_cache_blocks_used.set(used as i64);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let worker = workers.register(WORKER, &model_config.id);
        let pool = crate::pool::for_model(&model_config.id).map_err(|e| e.to_string())?;
        let scheduler_model = model.clone();
        std::thread::Builder::new()
            .name("kiln-generation".into())
            .spawn(move || {
                let mut first = Some(first);
                // Ids given out so far, so that a restarted scheduler never reuses one.
                let mut issued: RequestId = 0;
                supervise::run(&worker, &metrics.shared, |started| {
                    let mut generator = match first.take() {
                        Some(g) => g,
                        None => match Generator::new(scheduler_model.clone(), limits) {
                            Ok(g) => g,
                            Err(e) => return Exit::Failed(e.to_string()),
                        },
                    };
                    generator.start_ids_at(issued);
                    supervise::maybe_inject(WORKER);
                    started();
                    scheduler(generator, &mut rx, &metrics, &pool, &mut issued);
                    Exit::Done
                });
            })
            .map_err(|e| e.to_string())?;
        Ok(Self {
            model,
            memory_bytes,
            commands: tx,
            gate,
            model_config,
            config,
            aborted,
        })
    }

    pub fn model(&self) -> &Arc<CausalLm> {
        &self.model
    }

    /// Bytes the model holds: its weights and its KV cache.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    /// Requests admitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.gate.in_flight()
    }

    /// The name clients use for this model.
    pub fn id(&self) -> &str {
        &self.model_config.id
    }

    /// Tokenizes on the blocking pool.
    pub async fn encode(
        &self,
        text: String,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, AppError> {
        let model = self.model.clone();
        tokio::task::spawn_blocking(move || model.encode(&text, add_special_tokens))
            .await
            .map_err(|_| AppError::internal())?
            .map_err(AppError::from)
    }

    /// `max_tokens` when a request gives none: what is left of the context (capped by
    /// generation_config.json's `max_new_tokens` when it has one).
    pub fn default_max_tokens(&self, prompt_tokens: usize) -> usize {
        let left = self.model.info().max_context.saturating_sub(prompt_tokens);
        let left = left.min(
            self.config
                .max_batch_total_tokens
                .saturating_sub(prompt_tokens),
        );
        match self.model.generation_defaults().max_new_tokens {
            Some(n) => left.min(n),
            None => left,
        }
        .max(1)
    }

    /// A slot among `--max-concurrent-requests`, or 429 at once: taken before any work on the
    /// request (tokenization included), held until its generation ends.
    pub fn admit(&self) -> Result<Admission, AppError> {
        self.gate.admit()
    }

    /// Resolves when the server stops draining and answers what is left with 503.
    pub fn aborted(&self) -> &Aborted {
        &self.aborted
    }

    /// How long a request may take from arrival to its last token (`--request-timeout`).
    pub fn request_timeout(&self) -> Duration {
        self.config.request_timeout
    }

    /// Hands an admitted request to the scheduler; a request that can never run is a 422.
    pub async fn start_generation(
        &self,
        req: GenerationRequest,
        slot: Admission,
    ) -> Result<Generation, AppError> {
        let prompt_tokens = req.prompt.len();
        let (pieces_tx, pieces) = mpsc::unbounded_channel();
        let (accepted, answer) = oneshot::channel();
        self.commands
            .send(Command::Submit {
                req,
                pieces: pieces_tx,
                accepted,
            })
            .map_err(|_| AppError::unavailable("the generation scheduler has stopped"))?;
        let id = answer.await.map_err(|_| {
            AppError::unavailable(
                "the generation scheduler restarted before taking the request; retry",
            )
        })??;
        Ok(Generation {
            pieces,
            prompt_tokens,
            id,
            commands: self.commands.clone(),
            done: false,
            _slot: slot,
        })
    }
}

/// Per-request bookkeeping on the scheduler thread.
struct Route {
    pieces: mpsc::UnboundedSender<Piece>,
    started: Instant,
    last_token: Option<Instant>,
}

fn scheduler(
    mut generator: Generator,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    metrics: &ModelMetrics,
    pool: &rayon::ThreadPool,
    issued: &mut RequestId,
) {
    let mut routes: HashMap<RequestId, Route> = HashMap::new();
    loop {
        // Sleep while there is nothing to run; otherwise take whatever has arrived.
        if generator.is_idle() {
            match commands.blocking_recv() {
                Some(c) => handle(c, &mut generator, &mut routes, issued),
                None => return,
            }
        }
        loop {
            match commands.try_recv() {
                Ok(c) => handle(c, &mut generator, &mut routes, issued),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    if generator.is_idle() {
                        return;
                    }
                    break;
                }
            }
        }
        supervise::maybe_inject(WORKER);
        while supervise::fault("generation-stall") {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Clients that went away free their blocks before the step.
        let gone: Vec<RequestId> = routes
            .iter()
            .filter(|(_, r)| r.pieces.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            generator.cancel(id);
            routes.remove(&id);
        }
        // Engine failures and panics inside a step fail only the sequences that cause them
        // (Generator::step isolates them); anything else that panics here is the supervisor's.
        // On the model's own kernel threads (see `crate::pool`).
        let events = pool.install(|| generator.step());
        let now = Instant::now();
        for e in events {
            match e {
                Event::Token {
                    id,
                    token,
                    text,
                    finish,
                    prompt_tokens,
                    generated_tokens,
                } => {
                    metrics.generated_tokens.inc();
                    let Some(route) = routes.get_mut(&id) else {
                        continue;
                    };
                    match route.last_token {
                        None => metrics
                            .time_to_first_token
                            .observe(now.duration_since(route.started).as_secs_f64()),
                        Some(t) => metrics
                            .inter_token_latency
                            .observe(now.duration_since(t).as_secs_f64()),
                    }
                    route.last_token = Some(now);
                    let sent = route.pieces.send(Piece::Token {
                        id: token,
                        text,
                        finish,
                        prompt_tokens,
                        generated_tokens,
                    });
                    if finish.is_some() {
                        routes.remove(&id);
                    } else if sent.is_err() {
                        generator.cancel(id);
                        routes.remove(&id);
                    }
                }
                Event::Failed { id, message } => {
                    if let Some(r) = routes.remove(&id) {
                        let _ = r.pieces.send(Piece::Failed(message));
                    }
                }
            }
        }
        let (used, total) = generator.blocks_used();
        metrics.kv_cache_blocks_used.set(used as i64);
        metrics.kv_cache_blocks_total.set(total as i64);
        metrics
            .kv_cache_usage
            .set(used as f64 / total.max(1) as f64);
        metrics.generation_running.set(generator.running() as i64);
        metrics.generation_waiting.set(generator.waiting() as i64);
    }
}

fn handle(
    c: Command,
    generator: &mut Generator,
    routes: &mut HashMap<RequestId, Route>,
    issued: &mut RequestId,
) {
    match c {
        Command::Submit {
            req,
            pieces,
            accepted,
        } => match generator.submit(req) {
            Ok(id) => {
                *issued = (*issued).max(id.wrapping_add(1));
                if accepted.send(Ok(id)).is_err() {
                    generator.cancel(id); // the handler is gone already
                } else {
                    routes.insert(
                        id,
                        Route {
                            pieces,
                            started: Instant::now(),
                            last_token: None,
                        },
                    );
                }
            }
            Err(e) => {
                let _ = accepted.send(Err(AppError::from(e)));
            }
        },
        Command::Cancel(id) => {
            generator.cancel(id);
            routes.remove(&id);
        }
    }
}
