//! The router and its shared state. [`app`] builds everything but the socket, so handlers are
//! tested with `tower::ServiceExt::oneshot`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRef};
use axum::http::{Request, StatusCode};
use axum::middleware;
use axum::routing::{get, post};
use kiln_models::{EncoderModel, LoadOptions, ModelInfo, TextInput};
use tower::ServiceBuilder;
use tower::util::MapRequestLayer;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::decompression::{DecompressionBody, RequestDecompressionLayer};
use tower_http::trace::TraceLayer;

use crate::admission::Gate;
use crate::auth::ApiKeys;
use crate::config::{ModelControl, ServeConfig};
use crate::error::AppError;
use crate::generation::GenerationService;
use crate::infer::Infer;
use crate::metrics::Metrics;
use crate::registry::{Kind, Loaded, ModelState, Registry, Served, Want};
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
        let models = Registry::new(&config.models, config.default_model.clone());
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

    /// Loads every model in turn (each warmed up, with its batcher or scheduler started, and
    /// ready as soon as it is). A model that fails is unavailable, with the reason, while the
    /// others serve; `Err` only when none could be loaded. Blocking: call it from a blocking
    /// thread of the tokio runtime.
    pub fn load(&self) -> Result<(), String> {
        let mut failures = Vec::new();
        let mut attempted = 0;
        for served in self.inner.models.all() {
            match served.state() {
                ModelState::Unloaded => continue,
                ModelState::Unavailable(why) => {
                    tracing::error!(model = served.id(), error = %why, "model unavailable");
                    failures.push(format!("`{}`: {why}", served.id()));
                    attempted += 1;
                    continue;
                }
                _ => {}
            }
            attempted += 1;
            if let Err(why) = self.fits_at_start(served) {
                tracing::error!(model = served.id(), error = %why, "model unavailable");
                served.set_state(ModelState::Unavailable(why.clone()));
                failures.push(format!("`{}`: {why}", served.id()));
                continue;
            }
            if let Err(why) = self.load_and_mark(served) {
                failures.push(format!("`{}`: {why}", served.id()));
            }
        }
        if attempted > 0 && failures.len() == attempted {
            return Err(failures.join("; "));
        }
        Ok(())
    }

    /// Loads one model and sets its state: ready, or unavailable with the reason.
    fn load_and_mark(&self, served: &Served) -> Result<(), String> {
        let started = Instant::now();
        match self.load_one(served) {
            Ok(loaded) => {
                self.metrics()
                    .for_model(served.id())
                    .load_seconds
                    .set(started.elapsed().as_secs_f64());
                served.set_state(ModelState::Ready(loaded));
                // A model just loaded counts as just used (for eviction and the idle timeout).
                served.last_use().touch();
                self.metrics()
                    .model_loads
                    .with_label_values(&[served.id(), "ok"])
                    .inc();
                tracing::info!(
                    model = served.id(),
                    kind = served.kind_name(),
                    load_ms = started.elapsed().as_millis() as u64,
                    "model ready"
                );
                Ok(())
            }
            Err(why) => {
                tracing::error!(model = served.id(), error = %why, "cannot load the model; it is unavailable, the others serve");
                served.set_state(ModelState::Unavailable(why.clone()));
                self.metrics()
                    .model_loads
                    .with_label_values(&[served.id(), "failed"])
                    .inc();
                Err(why)
            }
        }
    }

    /// 400 unless models may be loaded and unloaded at run time (`--model-control explicit`);
    /// an unknown model is 404 first.
    fn controllable(&self, name: &str) -> Result<Arc<Served>, AppError> {
        let served = self.inner.models.by_name(name)?.clone();
        if self.config().model_control != ModelControl::Explicit {
            return Err(AppError::bad_request(format!(
                "model `{name}` cannot be loaded or unloaded at run time: this server loads its models at start and keeps them (model control mode `none`; start it with --model-control explicit)"
            )));
        }
        Ok(served)
    }

    /// Loads a model at run time (the repository API's load). A model that is loaded already
    /// stays as it is; one that fails is unavailable with the reason, which the caller gets.
    pub async fn load_model(&self, name: &str) -> Result<(), AppError> {
        let served = self.controllable(name)?;
        // One load at a time, so two cannot both take the last place under the limit.
        let _one_at_a_time = self.inner.loading.lock().await;
        if served.is_ready() {
            return Ok(());
        }
        self.make_room(&served).await?;
        if !served.begin_load()? {
            return Ok(());
        }
        tracing::info!(model = name, "loading the model (repository API)");
        let state = self.clone();
        let loading = served.clone();
        tokio::task::spawn_blocking(move || state.load_and_mark(&loading))
            .await
            .map_err(|_| AppError::internal())?
            .map_err(|why| {
                AppError::bad_request(format!("model `{name}` could not be loaded: {why}"))
            })
    }

    /// Unloads a model at run time (the repository API's unload): new requests for it are
    /// refused at once; the ones in flight finish; then its worker thread ends and its memory
    /// (weights, plan, KV cache) is freed, before this returns.
    pub async fn unload_model(&self, name: &str) -> Result<(), AppError> {
        let served = self.controllable(name)?;
        self.unload(&served).await
    }

    /// Unloads every loaded model that has had no request in flight and none picked for
    /// `timeout` (`--model-idle-timeout`); run periodically.
    pub async fn unload_idle(&self, timeout: Duration) {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        // One at a time with the repository API's loads and unloads.
        let _one_at_a_time = self.inner.loading.lock().await;
        let now = crate::admission::clock_ms();
        for served in self.inner.models.all() {
            if served.is_ready()
                && served.in_flight() == 0
                && now.saturating_sub(served.last_use().get()) >= timeout_ms
            {
                tracing::info!(model = served.id(), idle_timeout = ?timeout, "unloading a model idle for longer than --model-idle-timeout");
                if let Err(e) = self.unload(served).await {
                    tracing::warn!(model = served.id(), error = %e.message, "could not unload the idle model");
                }
            }
        }
    }

    /// The bytes `served` will hold once loaded, estimated from its folder (see
    /// [`kiln_models::memory::estimate_bytes`]), with the KV cache the server's settings give a
    /// causal LM.
    fn estimate(&self, served: &Served) -> Result<u64, String> {
        let c = self.config();
        let kv_tokens = c
            .max_batch_total_tokens
            .div_ceil(c.kv_block_size.max(1))
            .saturating_mul(c.kv_block_size);
        kiln_models::memory::estimate_bytes(&served.config.dir, kv_tokens)
            .map_err(|e| format!("cannot estimate its memory: {e}"))
    }

    /// Bytes the loaded models other than `except` hold.
    fn memory_in_use(&self, except: &str) -> u64 {
        self.inner
            .models
            .all()
            .iter()
            .filter(|m| m.id() != except)
            .map(|m| m.memory_bytes())
            .sum()
    }

    /// At start, models load in order while they fit `--memory-budget`.
    fn fits_at_start(&self, served: &Served) -> Result<(), String> {
        let Some(budget) = self.config().memory_budget else {
            return Ok(());
        };
        let need = self.estimate(served)?;
        let used = self.memory_in_use(served.id());
        if used.saturating_add(need) > budget {
            return Err(format!(
                "it does not fit in --memory-budget {}: it needs about {}, and the models loaded before it hold {}",
                mib(budget),
                mib(need),
                mib(used)
            ));
        }
        Ok(())
    }

    /// Unloads the least recently used models with no request in flight until `target` fits
    /// under `--max-loaded-models` and `--memory-budget`; 503 when the loaded models that stand
    /// in the way are all busy, 400 when `target` alone is larger than the budget.
    async fn make_room(&self, target: &Served) -> Result<(), AppError> {
        let c = self.config();
        let (max, budget) = (c.max_loaded_models, c.memory_budget);
        if max.is_none() && budget.is_none() {
            return Ok(());
        }
        let need = match budget {
            Some(_) => self
                .estimate(target)
                .map_err(|why| AppError::bad_request(format!("model `{}`: {why}", target.id())))?,
            None => 0,
        };
        if let Some(budget) = budget
            && need > budget
        {
            return Err(AppError::bad_request(format!(
                "model `{}` needs about {}, more than the whole --memory-budget {}",
                target.id(),
                mib(need),
                mib(budget)
            )));
        }
        loop {
            let loaded: Vec<&Arc<Served>> = self
                .inner
                .models
                .all()
                .iter()
                .filter(|m| m.id() != target.id() && m.is_ready())
                .collect();
            let used = self.memory_in_use(target.id());
            let over_count = max.is_some_and(|max| loaded.len() >= max);
            let over_budget = budget.is_some_and(|b| used.saturating_add(need) > b);
            if !over_count && !over_budget {
                return Ok(());
            }
            let why = if over_count {
                format!(
                    "--max-loaded-models {}",
                    max.expect("over the count only with a limit")
                )
            } else {
                format!(
                    "--memory-budget {} (it needs about {}; loaded models hold {})",
                    mib(budget.expect("over the budget only with one")),
                    mib(need),
                    mib(used)
                )
            };
            let Some(victim) = loaded
                .into_iter()
                .filter(|m| m.in_flight() == 0)
                .min_by_key(|m| m.last_use().get())
            else {
                return Err(AppError::unavailable(format!(
                    "cannot load model `{}` within {why}: the loaded models have requests in flight; try again",
                    target.id()
                )));
            };
            tracing::info!(
                model = victim.id(),
                to_load = target.id(),
                limit = %why,
                "unloading the least recently used idle model to make room"
            );
            self.unload(victim).await?;
        }
    }

    async fn unload(&self, served: &Served) -> Result<(), AppError> {
        let name = served.id();
        let Some(loaded) = served.begin_unload()? else {
            return Ok(());
        };
        let memory = loaded.memory();
        drop(loaded);
        // Requests in flight hold the model; none outlives the request timeout by much.
        let deadline = Instant::now() + self.config().request_timeout + Duration::from_secs(5);
        while memory.held() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if memory.held() {
            tracing::warn!(
                model = name,
                "unloaded, but requests still hold the model after the request timeout; its memory is freed when they end"
            );
        }
        self.inner.workers.retire(name, self.metrics());
        self.metrics().for_model(name).unloaded();
        self.metrics()
            .model_unloads
            .with_label_values(&[name])
            .inc();
        served.set_state(ModelState::Unloaded);
        tracing::info!(model = name, "model unloaded");
        Ok(())
    }

    /// A newly loaded model's admission: its own `--max-concurrent-requests` slots, marking
    /// its registry entry's last use.
    fn gate(&self, served: &Served) -> Gate {
        Gate::new(
            self.config().max_concurrent_requests,
            served.last_use().clone(),
        )
    }

    fn load_one(&self, served: &Served) -> Result<Loaded, String> {
        let c = &served.config;
        let opts = c.load_options();
        if served.kind() == Ok(Kind::CausalLm) {
            return self.load_causal_lm(served, &opts);
        }
        let model = EncoderModel::load(&c.dir, &opts).map_err(|e| e.to_string())?;
        let metrics = self.metrics().for_model(served.id());
        metrics.set_device(&model.info().placement);
        metrics.record_plan(&model.info().plan);
        metrics
            .memory_bytes
            .set(i64::try_from(model.weight_bytes()).unwrap_or(i64::MAX));
        warm_up(&model).map_err(|e| format!("warm-up failed: {e}"))?;
        let mut info = model.info().clone();
        info.id = c.id.clone();
        let infer = Infer::start(
            Arc::new(model),
            c.clone(),
            self.gate(served),
            self.inner.config.clone(),
            metrics,
            &self.inner.workers,
            self.aborted(),
        )
        .map_err(|e| e.to_string())?;
        Ok(Loaded::Encoder(Arc::new(Ready { info, infer })))
    }

    /// Loads a causal LM, generates one token as a warm-up and starts its scheduler.
    fn load_causal_lm(&self, served: &Served, opts: &LoadOptions) -> Result<Loaded, String> {
        let c = self.config();
        let template = match &c.chat_template {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read --chat-template {}: {e}", path.display()))?,
            ),
            None => None,
        };
        let model = Arc::new(
            kiln_models::CausalLm::load(&served.config.dir, opts, template)
                .map_err(|e| e.to_string())?,
        );
        let metrics = self.metrics().for_model(served.id());
        metrics.set_device(&model.info().placement);
        metrics.record_plan(&model.info().plan);
        warm_up_causal(&model).map_err(|e| format!("warm-up failed: {e}"))?;
        let service = GenerationService::start(
            model,
            served.config.clone(),
            self.gate(served),
            self.inner.config.clone(),
            metrics,
            &self.inner.workers,
            self.aborted(),
        )?;
        Ok(Loaded::CausalLm(service))
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

/// One token through a small KV cache before `/health` turns 200.
fn warm_up_causal(model: &Arc<kiln_models::CausalLm>) -> kiln_models::Result<()> {
    let mut g = kiln_models::Generator::new(
        model.clone(),
        kiln_models::GenerationLimits {
            max_batch_total_tokens: 64,
            ..Default::default()
        },
    )?;
    let prompt = model.encode("kiln warm-up", true)?;
    let prompt = if prompt.is_empty() { vec![0] } else { prompt };
    let n = prompt.len().min(32);
    g.submit(kiln_models::GenerationRequest {
        prompt: prompt[..n].to_vec(),
        max_new_tokens: 1,
        sampling: kiln_models::SamplingParams::default(),
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        ignore_eos: true,
    })?;
    for e in g.step() {
        if let kiln_models::Event::Failed { message, .. } = e {
            return Err(kiln_models::ModelError::Input(message));
        }
    }
    Ok(())
}

/// One forward pass before `/health` turns 200, so the first client does not pay for lazy
/// initialisation (page faults in the weights, thread pools).
fn warm_up(model: &EncoderModel) -> kiln_models::Result<()> {
    let seqs = model.tokenize(&[TextInput::Single("kiln warm-up".into())], true)?;
    model.run_batch(&seqs).map(drop)
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

/// `123.4 MiB`.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
