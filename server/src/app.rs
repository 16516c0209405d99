//! The router and its shared state. [`app`] builds everything but the socket, so handlers are
//! tested with `tower::ServiceExt::oneshot`.

mod lifecycle;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRef};
use axum::http::{Request, StatusCode};
use axum::middleware;
use axum::routing::{get, post};
use kiln_models::ModelInfo;
use tower::ServiceBuilder;
use tower::util::MapRequestLayer;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::decompression::{DecompressionBody, RequestDecompressionLayer};
use tower_http::trace::TraceLayer;

use crate::auth::ApiKeys;
use crate::config::{ModelControl, ServeConfig};
use crate::error::AppError;
use crate::generation::GenerationService;
use crate::infer::Infer;
use crate::metrics::Metrics;
use crate::registry::{ModelState, Registry, Want};
use crate::request_id;
use crate::routes::{completions, generate, kserve, native, openai, openapi};
use crate::supervise::Workers;

/// A model that is loaded, warmed up and has its batcher running.
pub struct Ready {
    pub info: ModelInfo,
    pub infer: Infer,
}

struct Inner {
    config: Arc<ServeConfig>,
    metrics: Metrics,
    keys: ApiKeys,
    models: Registry,
    /// Held by a run-time load (see [`AppState::load_model`]).
    loading: tokio::sync::Mutex<()>,
    /// The worker threads, for readiness.
    workers: Workers,
    /// Set when a draining server's `--shutdown-timeout` has passed: requests still in flight
    /// are answered 503 at once.
    abort: tokio::sync::watch::Sender<bool>,
}

#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

impl FromRef<AppState> for Metrics {
    fn from_ref(state: &AppState) -> Metrics {
        state.inner.metrics.clone()
    }
}

impl AppState {
    /// Fails only when a configured API keys file cannot be read.
    pub fn new(config: ServeConfig) -> Result<Self, String> {
        let keys = ApiKeys::new(config.api_keys.clone(), config.api_keys_file.clone())?;
        let models = Registry::new(
            &config.models,
            config.default_model.clone(),
            config.repository.is_some(),
        );
        // Explicit control: only the models asked for are loaded at start.
        if config.model_control == ModelControl::Explicit {
            for m in models.all() {
                if !config.load_models.iter().any(|id| id == m.id()) && m.kind().is_ok() {
                    m.set_state(ModelState::Unloaded);
                }
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                config: Arc::new(config),
                metrics: Metrics::new(),
                keys,
                models,
                loading: tokio::sync::Mutex::new(()),
                workers: Workers::default(),
                abort: tokio::sync::watch::Sender::new(false),
            }),
        })
    }

    pub fn config(&self) -> &ServeConfig {
        &self.inner.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn keys(&self) -> &ApiKeys {
        &self.inner.keys
    }

    /// Every served model.
    pub fn models(&self) -> &Registry {
        &self.inner.models
    }

    /// The encoder a request is for ([`Registry::pick`]), or 404 (unknown name), 503 (still
    /// loading, unavailable) or 422 (a causal LM).
    /// The request's metrics are labelled with the model from here on.
    pub fn encoder(&self, name: Option<&str>, want: Want) -> Result<Arc<Ready>, AppError> {
        let served = self.inner.models.pick(name, want)?;
        request_id::note_model(served.id());
        served.encoder()
    }

    /// The causal LM a request is for, or 404, 503, or 422 (an encoder).
    pub fn causal_lm(&self, name: Option<&str>) -> Result<GenerationService, AppError> {
        let served = self.inner.models.pick(name, Want::Generation)?;
        request_id::note_model(served.id());
        served.causal_lm()
    }

    /// Every model that should be loaded is loaded and warmed up, and every worker thread runs.
    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// Why the server is not ready, or `Ok`: each model that should be loaded and is not (the
    /// ones unloaded on purpose do not count), with what a request for it would be told, and
    /// each worker thread that is down.
    pub fn readiness(&self) -> Result<(), String> {
        let mut why: Vec<String> = self
            .inner
            .models
            .all()
            .iter()
            .filter_map(|m| match m.state() {
                ModelState::Unloaded | ModelState::Unloading => None,
                _ => m.loaded().err().map(|e| e.message),
            })
            .collect();
        let down = self.inner.workers.down();
        if !down.is_empty() {
            why.push(format!("worker threads down: {}", down.join(", ")));
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why.join("; "))
        }
    }

    /// The worker threads that are down now (dead or restarting).
    pub fn workers_down(&self) -> Vec<String> {
        self.inner.workers.down()
    }

    /// Answers every request still in flight with 503 (the drain deadline has passed).
    pub fn abort_in_flight(&self) {
        self.inner.abort.send_replace(true);
    }

    /// Resolves once [`AppState::abort_in_flight`] has been called.
    pub fn aborted(&self) -> Aborted {
        Aborted(self.inner.abort.subscribe())
    }
}

/// A handle that resolves once the server gives up draining (see
/// [`AppState::abort_in_flight`]).
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

/// The HTTP API.
pub fn app(state: AppState) -> Router {
    let limit = state.config().payload_limit;
    let metrics = state.metrics().clone();
    // Requests that run the model: counted, timed and failures classified by reason.
    let inference = Router::new()
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/generate", post(generate::generate))
        .route("/generate_stream", post(generate::generate_stream))
        .route("/embed", post(native::embed))
        .route("/predict", post(native::predict))
        .route("/rerank", post(native::rerank))
        .route("/v2/models/{model}/infer", post(kserve::infer))
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(kserve::infer),
        )
        .route_layer(middleware::from_fn_with_state(
            metrics,
            crate::metrics::track,
        ));
    let protected = Router::new()
        .merge(inference)
        .route("/v1/models", get(openai::models))
        .route("/tokenize", post(native::tokenize))
        .route("/info", get(native::info))
        .route("/openapi.json", get(openapi::spec))
        .route("/v2", get(kserve::server_metadata))
        .route("/v2/models/{model}", get(kserve::model_metadata))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(kserve::model_metadata),
        )
        .route("/v2/models/{model}/ready", get(kserve::model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(kserve::model_ready),
        )
        .route("/v2/models/{model}/config", get(kserve::model_config))
        .route(
            "/v2/models/{model}/versions/{version}/config",
            get(kserve::model_config),
        )
        .route("/v2/repository/index", post(kserve::repository_index))
        .route(
            "/v2/repository/models/{model}/load",
            post(kserve::repository_load),
        )
        .route(
            "/v2/repository/models/{model}/unload",
            post(kserve::repository_unload),
        )
        .route("/v2/models/stats", get(kserve::all_stats))
        .route("/v2/models/{model}/stats", get(kserve::model_stats))
        .route(
            "/v2/models/{model}/versions/{version}/stats",
            get(kserve::model_stats),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            crate::auth::require_key,
        ));
    // Probes and scrapes work without a key, as load balancers and Prometheus expect.
    let open = Router::new()
        .route("/health", get(native::health))
        .route("/v2/health/live", get(kserve::live))
        .route("/v2/health/ready", get(kserve::ready))
        .route("/metrics", get(crate::metrics::scrape));
    // gzip request bodies (tritonclient's `request_compression_algorithm`) are inflated before
    // the handlers read them; the payload limit applies to the inflated size.
    let decompress = ServiceBuilder::new()
        .layer(RequestDecompressionLayer::new())
        .layer(MapRequestLayer::new(
            |req: Request<DecompressionBody<Body>>| req.map(Body::new),
        ));
    Router::new()
        .merge(protected)
        .merge(open)
        .fallback(|| async { AppError::new(StatusCode::NOT_FOUND, "validation", "no such route") })
        .method_not_allowed_fallback(|| async {
            AppError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "validation",
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(
            limit,
            refuse_declared_oversize,
        ))
        .layer(decompress)
        // A panic anywhere in a handler answers that request 500 (JSON) and nothing else: the
        // connection, the other requests and the process carry on.
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http().make_span_with(request_id::span))
        .layer(middleware::from_fn(request_id::assign))
        .with_state(state)
}

/// The answer to a request whose handler panicked.
fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> axum::response::Response {
    tracing::error!(panic = %kiln_models::panic_message(&*panic), "a request handler panicked; that request gets 500, serving goes on");
    axum::response::IntoResponse::into_response(AppError::internal())
}

/// 413 at once for a body whose declared `Content-Length` is over the payload limit, before any
/// of it is read. (Bodies without a length, or gzip bodies that inflate past the limit, are cut
/// off by `DefaultBodyLimit` while they are read.)
async fn refuse_declared_oversize(
    axum::extract::State(limit): axum::extract::State<usize>,
    req: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        let err = AppError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "validation",
            format!("request body is larger than the payload limit ({limit} bytes)"),
        )
        .styled_for(req.uri().path());
        return axum::response::IntoResponse::into_response(err);
    }
    next.run(req).await
}
