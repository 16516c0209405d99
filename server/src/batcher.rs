//! Dynamic batching: one task owns the request queue, one thread owns the model.
//!
//! Design note. Handlers never touch the queue: they send an [`Entry`] (token ids already
//! computed, a oneshot to answer on) to the **queue owner**, an async task. The owner forms
//! batches by token budget (`max_batch_tokens`, `max_batch_requests`) and hands them to the
//! **backend thread** over a channel with room for one batch, so a full batch is assembled while
//! the current one runs and the backend never waits for the queue. A batch that is not full is
//! held back while the backend is busy (more requests may join it); while it is idle, for at
//! most `max_queue_delay`, and only while more requests are likely to join: admitted ones still
//! on their way to the queue, or fewer outstanding than a moment ago (closed-loop clients come
//! back together). A lone client never waits.
//!
//! On the backend thread a batch's sequences are sorted by length and cut into engine calls
//! within the token budget. With the engine's packed layout (the default) a call mixes lengths
//! freely: sequences run back to back through the varlen attention kernels, no padding is
//! computed, and each sequence's output is bit-identical whatever it is packed with (each gets
//! the attention kernel for its own length; tested end to end). With `--batch-layout padded` a
//! call holds sequences of **equal length** only, because padding changes a result's last bits.
//! Every sequence keeps its own length, and each request gets its rows back in its own order.
//!
//! Memory is bounded: admission (`max_concurrent_requests`) caps the entries that can exist.
//! A request whose client has gone (its oneshot receiver dropped: disconnect or timeout) is
//! removed from the queue at the owner's next wake-up and skipped if it already reached the
//! backend; work already running finishes and its result is discarded.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_models::{BatchLayout, Encoded, EncoderModel};
use tokio::sync::{mpsc, oneshot};

use crate::error::AppError;
use crate::metrics::ModelMetrics;
use crate::supervise::{self, Exit, Workers};

/// The backend thread's name in logs, metrics and fault injection.
const WORKER: &str = "encoder-backend";

/// The limits the queue owner and the backend batch by.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_batch_tokens: usize,
    pub max_batch_requests: usize,
    pub max_batch_sequences: usize,
    pub max_queue_delay: Duration,
}

/// What a request gets back: for each requested output, one row per sequence.
#[derive(Debug)]
pub struct BatchOutput {
    pub rows: Vec<Vec<Vec<f32>>>,
}

type Reply = oneshot::Sender<Result<BatchOutput, AppError>>;

/// One request's work in the queue.
struct Entry {
    seqs: Vec<Encoded>,
    /// Graph outputs wanted, each `[batch, width]`.
    outputs: Vec<&'static str>,
    tokens: usize,
    enqueued: Instant,
    reply: Reply,
}

enum Msg {
    Append(Entry),
    /// The backend finished a batch of this many requests.
    BatchDone(usize),
}

/// How many requests are admitted right now (tokenizing, queued or running): the queue owner
/// waits for a fuller batch only while some of them have not reached the queue yet.
pub type AdmittedCount = Box<dyn Fn() -> usize + Send + Sync>;

/// The handle handlers use to submit work.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<Msg>,
}

impl Batcher {
    /// Starts the queue owner (on the current tokio runtime) and the backend thread.
    pub fn spawn(
        model: Arc<EncoderModel>,
        limits: BatchLimits,
        metrics: ModelMetrics,
        admitted: AdmittedCount,
        workers: &Workers,
        model_id: &str,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        // Room for one batch: the next one waits here while the backend runs the current one.
        let (batch_tx, mut batch_rx) = mpsc::channel::<Vec<Entry>>(1);
        // Weak: the backend must not keep the queue owner alive. When the last handle to this
        // batcher goes (the model is unloaded), the queue owner ends, which ends the backend.
        let done = tx.downgrade();
        let backend_metrics = metrics.clone();
        let worker = workers.register(WORKER, model_id);
        let pool = crate::pool::for_model(model_id)?;
        std::thread::Builder::new()
            .name("kiln-backend".into())
            .spawn(move || {
                supervise::run(&worker, &backend_metrics.shared, |started| {
                    supervise::maybe_inject(WORKER);
                    started();
                    let run = Run {
                        model: &model,
                        pool: &pool,
                        limits: &limits,
                        metrics: &backend_metrics,
                    };
                    backend_loop(&run, &mut batch_rx, &done);
                    Exit::Done
                });
            })?;
        tokio::spawn(queue_owner(rx, batch_tx, limits, metrics, admitted));
        Ok(Self { tx })
    }

    /// Queues `seqs` and waits for their rows of `outputs`. Dropping the returned future (client
    /// gone, timeout) withdraws the request.
    pub async fn run(
        &self,
        seqs: Vec<Encoded>,
        outputs: Vec<&'static str>,
    ) -> Result<BatchOutput, AppError> {
        let (reply, answer) = oneshot::channel();
        let tokens = seqs.iter().map(Encoded::len).sum();
        let entry = Entry {
            seqs,
            outputs,
            tokens,
            enqueued: Instant::now(),
            reply,
        };
        self.tx
            .send(Msg::Append(entry))
            .map_err(|_| AppError::unavailable("the server is shutting down"))?;
        answer.await.map_err(|_| {
            tracing::error!("the backend dropped a request without answering");
            AppError::internal()
        })?
    }
}

/// The queue owner: collects entries, decides when a batch is ready, hands it to the backend.
async fn queue_owner(
    mut rx: mpsc::UnboundedReceiver<Msg>,
    batch_tx: mpsc::Sender<Vec<Entry>>,
    limits: BatchLimits,
    metrics: ModelMetrics,
    admitted: AdmittedCount,
) {
    let mut queue: VecDeque<Entry> = VecDeque::new();
    // Batches handed to the backend and not finished: at most one running and one waiting.
    let mut in_flight = 0usize;
    // Requests in those batches.
    let mut requests_in_flight = 0usize;
    // The most requests outstanding (queued or running) at once lately: clients that wait for
    // an answer before sending again (closed-loop load) come back to about this level.
    let mut peak = Peak::default();
    // When the backend last became idle: the delay counts from then for requests that queued
    // while it was busy.
    let mut idle_since = Instant::now();
    loop {
        queue.retain(|e| !e.reply.is_closed());
        metrics.queue_size.set(queue.len() as i64);
        let outstanding = queue.len() + requests_in_flight;
        let recent_peak = peak.observe(outstanding);
        let mut wake_at = None;
        if let Some(oldest) = queue.front()
            && in_flight < 2
        {
            let ready_at = oldest.enqueued.max(idle_since) + limits.max_queue_delay;
            let idle = in_flight == 0;
            // Waiting only pays when more requests are likely to join: some are admitted and
            // still being read or tokenized, or more were outstanding a moment ago.
            // A lone client therefore never waits for the delay.
            let more_expected = outstanding < recent_peak || admitted() > outstanding;
            if is_full(&queue, &limits) || (idle && (!more_expected || Instant::now() >= ready_at))
            {
                let batch = take_batch(&mut queue, &limits);
                in_flight += 1;
                requests_in_flight += batch.len();
                metrics.queue_size.set(queue.len() as i64);
                if batch_tx.send(batch).await.is_err() {
                    tracing::error!("the backend thread has stopped");
                    return;
                }
                continue;
            }
            if idle {
                wake_at = Some(ready_at);
            }
        }
        let sleep = async {
            match wake_at {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Msg::Append(entry)) => queue.push_back(entry),
                Some(Msg::BatchDone(n)) => {
                    in_flight = in_flight.saturating_sub(1);
                    requests_in_flight = requests_in_flight.saturating_sub(n);
                    if in_flight == 0 {
                        idle_since = Instant::now();
                    }
                }
                // Every handle is gone (the state was dropped): stop, which stops the backend.
                None => return,
            },
            () = sleep => {}
        }
    }
}

/// The highest value seen within the last second (then it starts again from the current one).
#[derive(Default)]
struct Peak {
    value: usize,
    since: Option<Instant>,
}

impl Peak {
    const WINDOW: Duration = Duration::from_secs(1);

    fn observe(&mut self, now_value: usize) -> usize {
        let now = Instant::now();
        if self
            .since
            .is_none_or(|t| now.duration_since(t) > Self::WINDOW)
            || now_value >= self.value
        {
            self.value = now_value;
            self.since = Some(now);
        }
        self.value
    }
}

/// A batch is full when the queue holds more than one batch's worth.
fn is_full(queue: &VecDeque<Entry>, limits: &BatchLimits) -> bool {
    let tokens: usize = queue.iter().map(|e| e.tokens).sum();
    queue.len() >= limits.max_batch_requests || tokens >= limits.max_batch_tokens
}

/// Takes requests from the front while they fit the budget (always at least one, which may be
/// larger than the budget alone: the backend splits it into engine calls).
fn take_batch(queue: &mut VecDeque<Entry>, limits: &BatchLimits) -> Vec<Entry> {
    let mut batch = Vec::new();
    let mut tokens = 0;
    while let Some(front) = queue.front() {
        if !batch.is_empty()
            && (batch.len() >= limits.max_batch_requests
                || tokens + front.tokens > limits.max_batch_tokens)
        {
            break;
        }
        tokens += front.tokens;
        batch.extend(queue.pop_front());
    }
    batch
}

/// Runs batches until the queue owner is gone. A panic here (outside an engine call, which
/// `run_batch` catches per call) drops the batch in hand, whose requests fail, and the
/// supervisor restarts the loop (see [`supervise`]).
fn backend_loop(
    run: &Run<'_>,
    batches: &mut mpsc::Receiver<Vec<Entry>>,
    done: &mpsc::WeakUnboundedSender<Msg>,
) {
    while let Some(batch) = batches.blocking_recv() {
        let requests = batch.len();
        // The queue owner counts this batch done even if it dies with the loop.
        let _done = BatchDone { done, requests };
        supervise::maybe_inject(WORKER);
        run_batch(run, batch);
    }
}

/// What the backend thread runs batches with: the model, its own kernel threads
/// ([`crate::pool`]), the limits and its metrics.
struct Run<'a> {
    model: &'a EncoderModel,
    pool: &'a rayon::ThreadPool,
    limits: &'a BatchLimits,
    metrics: &'a ModelMetrics,
}

/// Tells the queue owner a batch is over when dropped, also while unwinding from a panic.
struct BatchDone<'a> {
    done: &'a mpsc::WeakUnboundedSender<Msg>,
    requests: usize,
}

impl Drop for BatchDone<'_> {
    fn drop(&mut self) {
        if let Some(done) = self.done.upgrade() {
            let _ = done.send(Msg::BatchDone(self.requests));
        }
    }
}

/// One sequence of the batch, where its answer goes.
struct Slot {
    entry: usize,
    index: usize,
}

fn run_batch(run: &Run<'_>, mut batch: Vec<Entry>) {
    let (model, limits, metrics) = (run.model, run.limits, run.metrics);
    let started = Instant::now();
    // Requests withdrawn while the batch waited for the backend are not run.
    batch.retain(|e| !e.reply.is_closed());
    if batch.is_empty() {
        return;
    }
    for e in &batch {
        metrics
            .queue_duration
            .observe(started.duration_since(e.enqueued).as_secs_f64());
    }
    let mut seqs: Vec<(Slot, Encoded)> = Vec::new();
    let mut rows: Vec<Vec<Vec<Vec<f32>>>> = Vec::with_capacity(batch.len());
    let mut failed: Vec<Option<AppError>> = vec![None; batch.len()];
    for (entry, e) in batch.iter_mut().enumerate() {
        rows.push(vec![vec![Vec::new(); e.seqs.len()]; e.outputs.len()]);
        for (index, s) in std::mem::take(&mut e.seqs).into_iter().enumerate() {
            seqs.push((Slot { entry, index }, s));
        }
    }
    // Longest first (a stable sort keeps each request's sequences together within a length).
    // Packed engine calls (the default) mix lengths freely: no padding is computed and each
    // sequence's result is bit-identical whatever it is packed with. Padded calls hold one
    // length only, for the same guarantee (padding would change the last bits).
    seqs.sort_by_key(|(_, s)| std::cmp::Reverse(s.len()));
    let packed = model.layout() == BatchLayout::Packed;
    let mut start = 0;
    while start < seqs.len() {
        let len = seqs[start].1.len();
        let mut tokens = len;
        let mut end = start + 1;
        while end < seqs.len()
            && (packed || seqs[end].1.len() == len)
            && end - start < limits.max_batch_sequences
            && tokens + seqs[end].1.len() <= limits.max_batch_tokens
        {
            tokens += seqs[end].1.len();
            end += 1;
        }
        let chunk = &seqs[start..end];
        start = end;
        // Skip a call whose requests have all failed or been withdrawn (timeout, client gone)
        // since the batch started: a long request stops between engine calls.
        if chunk
            .iter()
            .all(|(slot, _)| failed[slot.entry].is_some() || batch[slot.entry].reply.is_closed())
        {
            continue;
        }
        let input_started = Instant::now();
        let encoded: Vec<Encoded> = chunk.iter().map(|(_, s)| s.clone()).collect();
        let counts_before = model.sdpa_kernel_counts();
        let call_started = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run.pool.install(|| model.run_batch_rows(&encoded))
        }));
        let call_time = call_started.elapsed();
        let input_time = call_started.duration_since(input_started);
        metrics.inference_duration.observe(call_time.as_secs_f64());
        metrics.add_sdpa_calls(&counts_before, &model.sdpa_kernel_counts());
        metrics.inferences.inc();
        metrics.batch_size.observe(encoded.len() as f64);
        metrics
            .batch_tokens
            .observe(encoded.iter().map(Encoded::len).sum::<usize>() as f64);
        let outputs = match result {
            Ok(Ok(outputs)) => outputs,
            Ok(Err(e)) => {
                let err = AppError::from(e);
                for (slot, _) in chunk {
                    failed[slot.entry] = Some(err.clone());
                }
                continue;
            }
            Err(_) => {
                tracing::error!("an engine call panicked; its requests failed, serving goes on");
                for (slot, _) in chunk {
                    failed[slot.entry] = Some(AppError::internal());
                }
                continue;
            }
        };
        let output_started = Instant::now();
        for (r, (slot, _)) in chunk.iter().enumerate() {
            if failed[slot.entry].is_some() {
                continue;
            }
            for (k, name) in batch[slot.entry].outputs.iter().enumerate() {
                match row_of(&outputs, name, r) {
                    Some(row) => rows[slot.entry][k][slot.index] = row,
                    None => {
                        tracing::error!(
                            output = name,
                            "the model has no such [batch, width] output"
                        );
                        failed[slot.entry] = Some(AppError::internal());
                    }
                }
            }
        }
        let output_time = output_started.elapsed();
        metrics
            .stats
            .compute_output
            .add(chunk.len() as u64, output_time);
        metrics
            .stats
            .record_batch(chunk.len(), input_time, call_time, output_time);
    }
    for ((entry, rows), failure) in batch.into_iter().zip(rows).zip(failed) {
        let answer = match failure {
            Some(e) => Err(e),
            None => Ok(BatchOutput { rows }),
        };
        // A client that left while its work ran gets nothing; the result is dropped here.
        let _ = entry.reply.send(answer);
    }
}

/// Row `r` of a `[batch, width]` output.
fn row_of(outputs: &[(String, kiln_engine::HostTensor)], name: &str, r: usize) -> Option<Vec<f32>> {
    let (_, t) = outputs.iter().find(|(n, _)| n == name)?;
    if t.shape.len() != 2 {
        return None;
    }
    let width = t.shape[1];
    let data = t.as_f32()?;
    data.get(r * width..(r + 1) * width).map(<[f32]>::to_vec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tokens: usize) -> Entry {
        let (reply, _answer) = oneshot::channel();
        Entry {
            seqs: vec![Encoded {
                ids: vec![1; tokens],
                type_ids: vec![0; tokens],
                untruncated_len: tokens,
            }],
            outputs: vec![],
            tokens,
            enqueued: Instant::now(),
            reply,
        }
    }

    const LIMITS: BatchLimits = BatchLimits {
        max_batch_tokens: 100,
        max_batch_requests: 3,
        max_batch_sequences: 64,
        max_queue_delay: Duration::ZERO,
    };

    #[test]
    fn batches_take_requests_while_the_token_budget_and_request_limit_allow() {
        let mut q: VecDeque<Entry> = [40, 40, 30, 10].into_iter().map(entry).collect();
        assert!(is_full(&q, &LIMITS));
        let b = take_batch(&mut q, &LIMITS);
        assert_eq!(b.iter().map(|e| e.tokens).collect::<Vec<_>>(), [40, 40]);
        let b = take_batch(&mut q, &LIMITS);
        assert_eq!(b.iter().map(|e| e.tokens).collect::<Vec<_>>(), [30, 10]);
        assert!(q.is_empty());
        // One request over the budget still runs, alone.
        let mut q: VecDeque<Entry> = [500, 1].into_iter().map(entry).collect();
        assert_eq!(take_batch(&mut q, &LIMITS).len(), 1);
        // The request limit.
        let mut q: VecDeque<Entry> = [1, 1, 1, 1].into_iter().map(entry).collect();
        assert_eq!(take_batch(&mut q, &LIMITS).len(), 3);
        assert!(!is_full(&q, &LIMITS));
    }

    #[test]
    fn the_peak_holds_for_a_window_then_follows_the_current_value() {
        let mut p = Peak::default();
        assert_eq!(p.observe(3), 3);
        assert_eq!(p.observe(8), 8);
        assert_eq!(p.observe(2), 8);
        p.since = Some(Instant::now() - Peak::WINDOW - Duration::from_millis(1));
        assert_eq!(p.observe(2), 2);
    }
}
