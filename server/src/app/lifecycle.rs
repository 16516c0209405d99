//! A served model's life: loading at start, the repository API's loads and unloads, eviction
//! under `--max-loaded-models` and `--memory-budget`, the idle timeout, and poll mode's reading
//! of the repository. Loads and unloads run one at a time (`Inner::loading`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_models::{EncoderModel, LoadOptions, TextInput};

use super::AppState;
use crate::admission::Gate;
use crate::config::ModelControl;
use crate::error::AppError;
use crate::generation::GenerationService;
use crate::infer::Infer;
use crate::registry::{Kind, Loaded, ModelState, Ready, Served};

impl AppState {
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
            if let Err(why) = self.fits_without_eviction(&served) {
                tracing::error!(model = served.id(), error = %why, "model unavailable");
                served.set_state(ModelState::Unavailable(why.clone()));
                failures.push(format!("`{}`: {why}", served.id()));
                continue;
            }
            if let Err(why) = self.load_and_mark(&served) {
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
                let metrics = self.metrics().for_model(served.id());
                metrics.load_seconds.set(started.elapsed().as_secs_f64());
                metrics
                    .memory_bytes
                    .set(i64::try_from(loaded.memory_bytes()).unwrap_or(i64::MAX));
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

    /// The model the repository API names, or 404; in explicit mode a folder added to the
    /// repository since start is found too. 400 unless models may be loaded and unloaded
    /// through the API (`--model-control explicit`).
    fn controllable(&self, name: &str) -> Result<Arc<Served>, AppError> {
        let control = self.config().model_control;
        let served = match self.inner.models.get(name) {
            Some(served) => served,
            None if control == ModelControl::Explicit => self.discover(name)?.ok_or_else(|| {
                self.inner
                    .models
                    .by_name(name)
                    .err()
                    .unwrap_or_else(AppError::internal)
            })?,
            None => self.inner.models.by_name(name)?,
        };
        match control {
            ModelControl::Explicit => Ok(served),
            ModelControl::None => Err(AppError::bad_request(format!(
                "model `{name}` cannot be loaded or unloaded at run time: this server loads its models at start and keeps them (model control mode `none`; start it with --model-control explicit)"
            ))),
            ModelControl::Poll => Err(AppError::bad_request(format!(
                "model `{name}` cannot be loaded or unloaded through the API in model control mode `poll`: add, replace or remove its folder in the repository"
            ))),
        }
    }

    /// A repository folder for model `name` that was not there at start: served from now on,
    /// not loaded. `None` when the repository has no such model.
    fn discover(&self, name: &str) -> Result<Option<Arc<Served>>, AppError> {
        let Some(repo) = &self.config().repository else {
            return Ok(None);
        };
        let folders = repo.folders().map_err(AppError::bad_request)?;
        for folder in folders {
            // Folder names are ids unless a model's kiln.toml says otherwise.
            let config = match repo.model(&folder) {
                Ok(config) if config.id == name => config,
                Ok(_) => continue,
                Err(why) if folder.file_name().is_some_and(|f| f == name) => {
                    return Err(AppError::bad_request(format!("model `{name}`: {why}")));
                }
                Err(_) => continue,
            };
            tracing::info!(model = name, folder = %folder.display(), "a model folder added to the repository since start");
            let Some(served) = self.inner.models.add(config) else {
                return Ok(self.inner.models.get(name));
            };
            if served.kind().is_ok() {
                served.set_state(ModelState::Unloaded);
            }
            return Ok(Some(served));
        }
        Ok(None)
    }

    /// Poll mode: reads the repository again. A new folder is served and loaded (when it fits
    /// the limits, as at start); a folder whose files changed is unloaded and loaded again
    /// (requests for it get 503 meanwhile); a folder that left is unloaded and no longer served.
    /// Models given with `--model` are left alone.
    pub async fn poll_repository(&self) {
        let Some(repo) = self.config().repository.clone() else {
            return;
        };
        let _one_at_a_time = self.inner.loading.lock().await;
        let folders = match repo.folders() {
            Ok(folders) => folders,
            Err(why) => {
                tracing::warn!(error = %why, "cannot read the model repository; the served models stay as they are");
                return;
            }
        };
        let mut present = std::collections::HashSet::new();
        for folder in folders {
            let config = match repo.model(&folder) {
                Ok(config) => config,
                Err(why) => {
                    tracing::warn!(folder = %folder.display(), error = %why, "cannot read a model folder's settings; it is skipped");
                    continue;
                }
            };
            present.insert(config.id.clone());
            if let Some(served) = self.inner.models.get(&config.id) {
                if *served.fingerprint() == crate::registry::Fingerprint::of(&folder) {
                    continue;
                }
                tracing::info!(model = served.id(), "its folder changed: reloading it");
                if let Err(e) = self.unload(&served).await {
                    tracing::warn!(model = served.id(), error = %e.message, "cannot unload the changed model; it stays as it is");
                    continue;
                }
                self.inner.models.remove(served.id());
            } else {
                tracing::info!(model = config.id, folder = %folder.display(), "a new model folder in the repository");
            }
            let Some(served) = self.inner.models.add(config) else {
                continue;
            };
            self.load_found(served).await;
        }
        for served in self.inner.models.all() {
            let in_repository = served.config.dir.parent() == Some(repo.dir.as_path());
            if in_repository && !present.contains(served.id()) {
                tracing::info!(
                    model = served.id(),
                    "its folder left the repository: unloading it"
                );
                match self.unload(&served).await {
                    Ok(()) => self.inner.models.remove(served.id()),
                    Err(e) => {
                        tracing::warn!(model = served.id(), error = %e.message, "cannot unload the removed model")
                    }
                }
            }
        }
    }

    /// Loads a model poll mode found, as at start: when it fits the limits (no eviction).
    async fn load_found(&self, served: Arc<Served>) {
        if let Err(why) = served.kind() {
            tracing::error!(model = served.id(), error = %why, "model unavailable");
            return;
        }
        if let Err(why) = self.fits_without_eviction(&served) {
            tracing::error!(model = served.id(), error = %why, "model unavailable");
            served.set_state(ModelState::Unavailable(why));
            return;
        }
        let state = self.clone();
        let _ = tokio::task::spawn_blocking(move || state.load_and_mark(&served)).await;
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
                if let Err(e) = self.unload(&served).await {
                    tracing::warn!(model = served.id(), error = %e.message, "could not unload the idle model");
                }
            }
        }
    }

    /// The bytes `served` will hold once loaded, estimated from its folder (see
    /// [`kiln_models::memory::estimate_bytes`]), with the KV cache the server's settings give a
    /// causal LM.
    fn estimate(&self, served: &Served) -> Result<u64, String> {
        let limits = crate::generation::limits(self.config());
        let kv_tokens = limits.num_blocks().saturating_mul(limits.block_size);
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

    /// Whether `served` fits `--max-loaded-models` and `--memory-budget` beside the models
    /// loaded now, none unloaded: how models load at start (in order, while they fit) and in
    /// poll mode.
    fn fits_without_eviction(&self, served: &Served) -> Result<(), String> {
        let c = self.config();
        if let Some(max) = c.max_loaded_models {
            let loaded = self
                .inner
                .models
                .all()
                .iter()
                .filter(|m| m.is_ready())
                .count();
            if loaded >= max {
                return Err(format!(
                    "--max-loaded-models {max} models are loaded already"
                ));
            }
        }
        let Some(budget) = c.memory_budget else {
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
            let loaded: Vec<Arc<Served>> = self
                .inner
                .models
                .all()
                .into_iter()
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
            self.unload(&victim).await?;
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
        let info = model.info();
        if let Some(name) = &c.default_prompt_name
            && matches!(info.kind, kiln_models::ModelKind::Embedding { .. })
            && !info.prompts.contains_key(name)
        {
            let known: Vec<&str> = info.prompts.keys().map(String::as_str).collect();
            return Err(format!(
                "--default-prompt-name `{name}` is not one of the model's prompts ({})",
                if known.is_empty() {
                    "it has none".to_string()
                } else {
                    known.join(", ")
                }
            ));
        }
        let metrics = self.metrics().for_model(served.id());
        metrics.set_device(&model.info().placement);
        metrics.record_plan(&model.info().plan);
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

/// `123.4 MiB`.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
