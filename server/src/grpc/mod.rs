//! gRPC beside HTTP: the Open Inference Protocol's `inference.GRPCInferenceService` (KServe v2,
//! what `tritonclient.grpc` and KServe clients call), `grpc.health.v1.Health` and server
//! reflection (v1 and v1alpha), served by tonic on their own port (`--grpc-port`, 8081 by
//! default) from the same `kiln serve` process.
//!
//! Design note. gRPC is a second wire format, not a second server: requests go through the same
//! [`AppState`] as HTTP — the same batcher (gRPC and HTTP requests share batches), the same
//! `--max-concurrent-requests` slots and other limits, the same API keys (metadata
//! `authorization: Bearer <key>`) and the same metrics (`api="grpc"`). Tensors are decoded here
//! (typed `contents` or `raw_input_contents`) into the REST side's `Input`s, and from there
//! [`crate::routes::kserve::execute`] does exactly what it does for a REST request; its
//! [`AppError`]s become gRPC status codes by their HTTP status ([`status_of`]). Messages may be
//! up to `--grpc-max-message-size` (64 MiB by default, tonic's own default is 4 MiB; up to
//! 2 GiB - 1 like tritonclient), and a `ModelInfer` message's sizes are checked on its wire
//! bytes before it is decoded (`wire.rs`). The health service reports NOT_SERVING until the model is
//! ready and again once shutdown begins; on SIGTERM the listener closes and in-flight calls
//! finish, as on the HTTP port.

use std::future::Future;

use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::app::AppState;
use crate::error::AppError;

mod service;
mod tensors;
mod wire;

pub use service::InferenceService;
pub(crate) use tensors::decode_inputs;
pub(crate) use wire::check_infer_request;

/// The generated protocol types, server and client (`proto/open_inference_grpc.proto`).
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("inference");

    /// The encoded descriptors of `open_inference_grpc.proto`, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/inference_descriptor.bin"));
}

/// The inference service's full name, as health checks and reflection list it.
pub const SERVICE_NAME: &str = "inference.GRPCInferenceService";

/// The gRPC health status of the server ("") and of the inference service.
#[derive(Clone)]
pub struct Health(HealthReporter);

impl Health {
    pub async fn set(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in ["", SERVICE_NAME] {
            self.0.set_service_status(name, status).await;
        }
    }
}

/// The gRPC services of one server, with their health handle (NOT_SERVING until [`Health::set`]).
pub async fn routes(state: AppState) -> Result<(Routes, Health), String> {
    let inference = wire::Inference::new(state);
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health(reporter);
    health.set(false).await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = reflection().build_v1().map_err(|e| e.to_string())?;
    let v1alpha = reflection().build_v1alpha().map_err(|e| e.to_string())?;
    let routes = Routes::new(inference)
        .add_service(health_service)
        .add_service(v1)
        .add_service(v1alpha);
    Ok((routes, health))
}

/// Serves `routes` on `listener` until `shutdown` completes, then stops accepting and waits for
/// in-flight calls to finish.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .trace_fn(|req| tracing::info_span!("grpc", path = %req.uri().path()))
        // A panic in a call answers that call INTERNAL; the connection and the rest carry on.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_status,
        ))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// The answer to a call whose handler panicked: status INTERNAL in gRPC's trailers-only form.
fn panic_status(
    panic: Box<dyn std::any::Any + Send + 'static>,
) -> axum::http::Response<tonic::body::Body> {
    tracing::error!(panic = %kiln_models::panic_message(&*panic), "a gRPC handler panicked; that call gets INTERNAL, serving goes on");
    Status::internal("internal error; see the server log").into_http()
}

/// The gRPC status of an error, by its HTTP status (the canonical mapping between the two).
pub fn status_of(e: &AppError) -> Status {
    let code = match e.status.as_u16() {
        400 | 405 | 415 | 422 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        // The model is loading or unloading: try again.
        409 => Code::FailedPrecondition,
        // A request over a size limit, or the server at its concurrency limit.
        413 | 429 => Code::ResourceExhausted,
        501 => Code::Unimplemented,
        503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        _ => Code::Internal,
    };
    let mut status = Status::new(code, e.message.clone());
    if let Some(secs) = e.retry_after
        && let Ok(v) = secs.to_string().parse()
    {
        status.metadata_mut().insert("retry-after", v);
    }
    status
}
