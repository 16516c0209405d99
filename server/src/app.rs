//! The server's shared state: its settings, metrics, API keys, the registry of served models
//! and their workers, and the drain signal. Every route and both protocols read it; the model
//! lifecycle (loading, unloading, eviction, polling) is in [`lifecycle`], the router in
//! [`crate::router`].

mod lifecycle;

use std::sync::Arc;

use axum::extract::FromRef;

use crate::admission::Aborted;
use crate::auth::ApiKeys;
use crate::config::{ModelControl, ServeConfig};
use crate::error::AppError;
use crate::generation::GenerationService;
use crate::metrics::Metrics;
use crate::registry::{ModelState, Ready, Registry, Want};
use crate::request_id;
use crate::supervise::Workers;

struct Inner {
    config: Arc<ServeConfig>,
    metrics: Metrics,
    keys: Arc<ApiKeys>,
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
                keys: Arc::new(keys),
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

    pub fn keys(&self) -> &Arc<ApiKeys> {
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
        Aborted::new(self.inner.abort.subscribe())
    }
}
