//! kiln's server: the HTTP and gRPC APIs over a loaded model.
//!
//! Design note. Handlers are thin: they validate and translate a request (every rejection an
//! [`error::AppError`] with a precise message and a 4xx status), take a slot among
//! `--max-concurrent-requests` ([`infer::Infer::admit`]), tokenize on the blocking pool and send
//! token ids to the batch queue ([`batcher`]): one task owns the queue and forms batches by token
//! budget, one thread owns the model and runs them. No inference ever blocks the async runtime.
//! The port opens before the model has loaded: `/health` answers 503 until the model is loaded
//! and warmed up, which is what load balancers and Kubernetes probes expect. [`router::app`] builds
//! the whole router without a socket, so it is tested in-process. The gRPC API ([`grpc`]) runs
//! on its own port over the same state, batcher, limits, keys and metrics.

pub mod admission;
pub mod app;
pub mod auth;
pub mod batcher;
pub mod config;
pub mod error;
pub mod fuzzing;
pub mod generation;
pub mod grpc;
pub mod healthcheck;
pub mod infer;
pub mod json;
pub mod metrics;
pub mod pool;
pub mod registry;
pub mod request_id;
pub mod router;
pub mod routes;
pub mod supervise;

pub use app::AppState;
pub use config::{
    LogFormat, ModelConfig, ModelControl, PlanCacheSwitch, RawModelSettings, RawServeConfig,
    RawServerSettings, ServeConfig,
};
pub use router::app;
