//! A model's admission: its `--max-concurrent-requests` slots (429 at once when none is free),
//! taken before any work is done on a request, and when one was last taken. An encoder's
//! [`crate::infer::Infer`] and a causal LM's [`crate::generation::GenerationService`] admit
//! through the same [`Gate`], so "requests in flight" and "last used" (which the registry's
//! eviction and idle timeout read) mean the same for both, and only requests count: reading a
//! model's metadata, its readiness or `/info` does not keep it loaded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::AppError;

/// A slot among `--max-concurrent-requests`; dropping it (answer sent, client gone) frees it.
#[must_use]
pub struct Admission(#[allow(dead_code)] OwnedSemaphorePermit);

/// One model's slots, and its [`LastUse`].
#[derive(Clone)]
pub struct Gate {
    slots: Arc<Semaphore>,
    capacity: usize,
    last_use: LastUse,
}

impl Gate {
    pub fn new(capacity: usize, last_use: LastUse) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            last_use,
        }
    }

    /// A slot for one request (the model counts as used now), or 429 at once when every slot
    /// is taken.
    pub fn admit(&self) -> Result<Admission, AppError> {
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| {
            AppError::overloaded(format!(
                "the server is at its limit of {} concurrent requests; retry later",
                self.capacity
            ))
        })?;
        self.last_use.touch();
        Ok(Admission(permit))
    }

    /// Requests admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.capacity - self.slots.available_permits()
    }
}

/// When a model was last used (a request admitted, or the model loaded), in ms on
/// [`clock_ms`]; 0: never. Shared by the model's registry entry and its [`Gate`].
#[derive(Clone, Default)]
pub struct LastUse(Arc<AtomicU64>);

impl LastUse {
    /// Marks now.
    pub fn touch(&self) {
        self.0.fetch_max(clock_ms().max(1), Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Milliseconds on one process-wide clock, so models' last uses compare.
pub fn clock_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let ms = EPOCH.get_or_init(Instant::now).elapsed().as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// A handle that resolves once the server gives up draining (see
/// [`crate::app::AppState::abort_in_flight`]).
#[derive(Clone)]
pub struct Aborted(tokio::sync::watch::Receiver<bool>);

impl Aborted {
    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        // An error means the state is gone: then nothing is in flight to abort either.
        if rx.wait_for(|aborted| *aborted).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Aborted {
    /// Made by the server state, which holds the sender.
    pub fn new(rx: tokio::sync::watch::Receiver<bool>) -> Self {
        Self(rx)
    }
}
