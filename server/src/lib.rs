//! kiln's server: the HTTP API over a loaded model.
//!
//! Design note. Handlers are thin: they validate and translate a request (every rejection an
//! [`error::AppError`] with a precise message and a 4xx status), then hand the model work to the
//! backend thread ([`worker::Worker`]) by message and await its reply, so no inference ever blocks
//! the async runtime. The port opens before the model has loaded: `/health` answers 503 until the
//! model is loaded and warmed up, which is what load balancers and Kubernetes probes expect.
//! [`app::app`] builds the whole router without a socket, so it is tested in-process.

pub mod app;
pub mod config;
pub mod error;
pub mod json;
pub mod routes;
pub mod worker;

pub use app::{AppState, app};
pub use config::ServeConfig;
