//! Worker threads that come back after a panic, and readiness that tells the truth meanwhile.
//!
//! Design note. The encoder's backend thread and a causal LM's scheduler thread each own their
//! model's state, so a panic that escapes a request's own engine call (those are caught where
//! they happen and fail that request only) would otherwise end the thread silently: every later
//! request would fail while `/health` still said 200. Each such thread runs its loop under
//! [`run`]: a panic marks the worker down (readiness, `/v2/health/ready` and gRPC health turn
//! NOT_SERVING, `kiln_worker_up` drops to 0), counts `kiln_worker_restarts_total`, and after a
//! back-off (doubling from 100 ms to 5 s while the worker keeps dying within a minute of its
//! start) runs the loop again from fresh state: the loop rebuilds what it owns (a generation
//! scheduler starts from an empty batch and a new KV cache), so a restart never reuses state a
//! panic may have left half-changed. Requests that were in the dead worker's hands fail; the
//! ones that arrive later are served by the new one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// One worker thread: what it does (`encoder-backend`, `generation-scheduler`), for which
/// model, and whether it is up.
#[derive(Clone)]
pub struct Worker {
    pub kind: &'static str,
    pub model: String,
    up: Arc<AtomicBool>,
}

impl Worker {
    fn set_up(&self, up: bool, metrics: &Metrics) {
        self.up.store(up, Ordering::Release);
        metrics
            .worker_up
            .with_label_values(&[self.kind, &self.model])
            .set(i64::from(up));
    }
}

/// Whether each worker of the server is up; readiness needs every one.
#[derive(Clone, Default)]
pub struct Workers {
    all: Arc<std::sync::Mutex<Vec<Worker>>>,
}

impl Workers {
    /// Registers a worker, up until [`run`] says otherwise.
    pub fn register(&self, kind: &'static str, model: &str) -> Worker {
        let worker = Worker {
            kind,
            model: model.to_string(),
            up: Arc::new(AtomicBool::new(true)),
        };
        self.all
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(worker.clone());
        worker
    }

    /// Forgets the workers of an unloaded model (their threads have ended) and their metrics.
    pub fn retire(&self, model: &str, metrics: &Metrics) {
        self.all
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|w| {
                if w.model != model {
                    return true;
                }
                let _ = metrics.worker_up.remove_label_values(&[w.kind, model]);
                let _ = metrics
                    .worker_restarts
                    .remove_label_values(&[w.kind, model]);
                false
            });
    }

    /// The workers that are down now, as `kind (model)`.
    pub fn down(&self) -> Vec<String> {
        self.all
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|w| !w.up.load(Ordering::Acquire))
            .map(|w| format!("{} ({})", w.kind, w.model))
            .collect()
    }
}

/// What one run of a worker's loop ended with.
pub enum Exit {
    /// Its channel closed: the server is shutting down. The worker ends.
    Done,
    /// It could not (re)build its state; it is down and is tried again after the back-off.
    Failed(String),
}

/// Runs `body` on the calling thread until it returns [`Exit::Done`], restarting it after
/// panics and failures (see the module docs). `body` gets a callback to call once its state is
/// built: only then is the worker up again.
pub fn run(worker: &Worker, metrics: &Metrics, mut body: impl FnMut(&dyn Fn()) -> Exit) {
    let mut backoff = Duration::from_millis(100);
    let name = worker.kind;
    worker.set_up(true, metrics);
    loop {
        let started = Instant::now();
        let mark_up = || worker.set_up(true, metrics);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&mark_up)));
        worker.set_up(false, metrics);
        match outcome {
            Ok(Exit::Done) => return,
            Ok(Exit::Failed(why)) => {
                tracing::error!(worker = name, model = %worker.model, error = %why, retry_in = ?backoff, "worker could not start; readiness is false until it does");
            }
            Err(panic) => {
                metrics
                    .worker_restarts
                    .with_label_values(&[name, &worker.model])
                    .inc();
                tracing::error!(worker = name, model = %worker.model, panic = %kiln_models::panic_message(&*panic), restart_in = ?backoff, "worker thread panicked; readiness is false until it restarts");
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_millis(100);
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Fault injection for the fault tests: when `KILN_FAULT_INJECTION` names a folder, a worker
/// panics at the points named by the files in it (`encoder-backend`, `generation-scheduler`)
/// for as long as the file exists. Unset (always, outside those tests) it costs one check of a
/// cached `None`.
pub fn fault(point: &str) -> bool {
    static DIR: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| std::env::var_os("KILN_FAULT_INJECTION").map(Into::into))
        .as_ref()
        .is_some_and(|d| d.join(point).exists())
}

/// Panics when the fault test asks for it at `point` (see [`fault`]).
pub fn maybe_inject(point: &str) {
    if fault(point) {
        panic!("fault injected at {point} (KILN_FAULT_INJECTION)");
    }
}
