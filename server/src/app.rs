//! The router and its shared state. [`app`] builds everything but the socket, so handlers are
//! tested with `tower::ServiceExt::oneshot`.

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use kiln_models::{EmbedOptions, EncoderModel, LoadOptions, ModelInfo};
use tower_http::trace::TraceLayer;

use crate::config::ServeConfig;
use crate::error::AppError;
use crate::routes::{native, openai};
use crate::worker::Worker;

/// A model that is loaded, warmed up and has its backend thread running.
pub struct Ready {
    pub info: ModelInfo,
    pub worker: Worker,
}

struct Inner {
    config: ServeConfig,
    ready: OnceLock<Ready>,
}

#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

impl AppState {
    pub fn new(config: ServeConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                ready: OnceLock::new(),
            }),
        }
    }

    pub fn config(&self) -> &ServeConfig {
        &self.inner.config
    }

    /// The model, or 503 while it is still loading.
    pub fn ready(&self) -> Result<&Ready, AppError> {
        self.inner
            .ready
            .get()
            .ok_or_else(|| AppError::unavailable("the model is still loading"))
    }

    pub fn is_ready(&self) -> bool {
        self.inner.ready.get().is_some()
    }

    /// Loads the model, runs one warm-up request, starts the backend thread and marks the
    /// server ready. Blocking: call it from a blocking thread.
    pub fn load(&self) -> Result<(), String> {
        let c = self.config();
        let opts = LoadOptions {
            device: c.device,
            exec: kiln_engine::ExecOptions {
                sdpa_kernel: c.sdpa_kernel,
            },
            max_batch_sequences: c.max_batch_sequences,
            max_seq_length: c.max_seq_length,
            layout: c.batch_layout,
        };
        let model = EncoderModel::load(&c.model_dir, &opts).map_err(|e| e.to_string())?;
        warm_up(&model).map_err(|e| format!("warm-up failed: {e}"))?;
        let mut info = model.info().clone();
        info.id = c.model_id.clone();
        let worker =
            Worker::spawn(Arc::new(model), c.max_queued_requests).map_err(|e| e.to_string())?;
        if self.inner.ready.set(Ready { info, worker }).is_err() {
            return Err("the model was already loaded".into());
        }
        Ok(())
    }
}

fn warm_up(model: &EncoderModel) -> kiln_models::Result<()> {
    let text = vec!["kiln warm-up".to_string()];
    match model.info().kind {
        kiln_models::ModelKind::Embedding { .. } => {
            model.embed(&text, EmbedOptions::default()).map(drop)
        }
        kiln_models::ModelKind::Classifier { .. } => model
            .classify(&[kiln_models::TextInput::Single(text[0].clone())], true)
            .map(drop),
    }
}

/// The HTTP API.
pub fn app(state: AppState) -> Router {
    let limit = state.config().payload_limit;
    Router::new()
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/models", get(openai::models))
        .route("/embed", post(native::embed))
        .route("/predict", post(native::predict))
        .route("/health", get(native::health))
        .route("/info", get(native::info))
        .fallback(|| async { AppError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            AppError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
