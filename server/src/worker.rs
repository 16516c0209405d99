//! The backend thread: it owns the model and runs one job at a time; HTTP handlers talk to it
//! by message and await a oneshot reply. A bounded queue turns overload into an immediate 503
//! instead of unbounded memory, and a job whose client has gone away is skipped.

use std::sync::Arc;

use axum::http::StatusCode;
use kiln_models::EncoderModel;
use tokio::sync::{mpsc, oneshot};

use crate::error::AppError;

type Job = Box<dyn FnOnce(&EncoderModel) + Send>;

#[derive(Clone)]
pub struct Worker {
    tx: mpsc::Sender<Job>,
}

impl Worker {
    /// Starts the backend thread with a queue of `capacity` waiting jobs.
    pub fn spawn(model: Arc<EncoderModel>, capacity: usize) -> std::io::Result<Self> {
        let (tx, mut rx) = mpsc::channel::<Job>(capacity.max(1));
        std::thread::Builder::new()
            .name("kiln-backend".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    // A panic in a kernel is a bug, but it must cost one request, not the
                    // server: the job's reply is dropped (its handler answers 500) and the
                    // thread goes on.
                    let run = std::panic::AssertUnwindSafe(|| job(&model));
                    if std::panic::catch_unwind(run).is_err() {
                        tracing::error!(
                            "a backend job panicked; that request failed, serving goes on"
                        );
                    }
                }
            })?;
        Ok(Self { tx })
    }

    /// Runs `f` on the backend thread and returns its result.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&EncoderModel) -> R + Send + 'static,
    ) -> Result<R, AppError> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |model| {
            if reply.is_closed() {
                return; // the client disconnected while queued: skip the work
            }
            let _ = reply.send(f(model));
        });
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => AppError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "the server is at capacity; retry later",
            ),
            mpsc::error::TrySendError::Closed(_) => {
                AppError::unavailable("the backend has stopped")
            }
        })?;
        answer.await.map_err(|_| {
            tracing::error!("backend thread dropped a job without answering");
            AppError::internal()
        })
    }
}
