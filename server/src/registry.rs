//! The served models: one registry for every route and both protocols.
//!
//! Each model has its resolved settings, its kind (read from its `config.json` before it loads,
//! so routes can be chosen while it is still loading) and a state: loading, ready (an encoder
//! with its batcher, or a causal LM with its scheduler: each model has its own worker thread and
//! its own admission limit, so a flood on one does not queue behind another) or unavailable with
//! the reason. Routes find their model by name, or by [`Registry::pick`]'s rules when the
//! request names none.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use kiln_models::{ModelInfo, ModelKind};

use crate::admission::LastUse;
use crate::config::ModelConfig;
use crate::error::AppError;
use crate::generation::GenerationService;
use crate::infer::Infer;

/// A model that is loaded, warmed up and has its batcher running.
pub struct Ready {
    pub info: ModelInfo,
    pub infer: Infer,
}

/// What a model is, as far as routing is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// BERT-style: embeddings or classification (which one is known once it has loaded).
    Encoder,
    /// GPT-2, Llama: text generation.
    CausalLm,
}

/// A loaded model, ready to serve.
#[derive(Clone)]
pub enum Loaded {
    Encoder(Arc<Ready>),
    CausalLm(GenerationService),
}

/// Where a model is in its life.
#[derive(Clone)]
pub enum ModelState {
    Loading,
    Ready(Loaded),
    /// It could not be loaded (or its folder read): the reason, for clients and the index.
    Unavailable(String),
    /// Being unloaded: refused to new requests while those in flight finish and its memory
    /// is let go of.
    Unloading,
    /// Not loaded on purpose: unloaded, or not yet loaded in explicit control mode.
    Unloaded,
}

impl ModelState {
    /// The KServe/Triton repository state name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Loading => "LOADING",
            Self::Ready(_) => "READY",
            Self::Unloading => "UNLOADING",
            Self::Unavailable(_) | Self::Unloaded => "UNAVAILABLE",
        }
    }

    /// Why a model that is not ready is not.
    pub fn reason(&self) -> Option<String> {
        match self {
            Self::Unavailable(why) => Some(why.clone()),
            Self::Unloaded => Some("unloaded".into()),
            Self::Unloading => Some("unloading".into()),
            Self::Loading | Self::Ready(_) => None,
        }
    }
}

impl Loaded {
    /// Requests admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        match self {
            Self::Encoder(ready) => ready.infer.in_flight(),
            Self::CausalLm(g) => g.in_flight(),
        }
    }

    /// Bytes the model holds (what `kiln_model_memory_bytes` reports).
    pub fn memory_bytes(&self) -> u64 {
        match self {
            Self::Encoder(ready) => ready.infer.model_arc().weight_bytes() as u64,
            Self::CausalLm(g) => g.memory_bytes(),
        }
    }

    /// A handle that lives as long as the model's memory: until the last request holding the
    /// model and the model's worker thread have let go of it.
    pub fn memory(&self) -> ModelMemory {
        match self {
            Self::Encoder(ready) => ModelMemory::Encoder(Arc::downgrade(ready.infer.model_arc())),
            Self::CausalLm(g) => ModelMemory::CausalLm(Arc::downgrade(g.model())),
        }
    }
}

/// See [`Loaded::memory`].
pub enum ModelMemory {
    Encoder(std::sync::Weak<kiln_models::EncoderModel>),
    CausalLm(std::sync::Weak<kiln_models::CausalLm>),
}

impl ModelMemory {
    /// Whether the model is still held (by a request or its worker).
    pub fn held(&self) -> bool {
        match self {
            Self::Encoder(w) => w.strong_count() > 0,
            Self::CausalLm(w) => w.strong_count() > 0,
        }
    }
}

/// What a route needs of its model (for choosing one when the request names none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Embeddings,
    Classification,
    /// Any encoder (tokenizing, KServe inference).
    Encoder,
    Generation,
}

impl Want {
    fn describe(self) -> &'static str {
        match self {
            Self::Embeddings => "embeddings",
            Self::Classification => "classification",
            Self::Encoder => "an encoder model",
            Self::Generation => "text generation",
        }
    }
}

/// One served model.
pub struct Served {
    pub config: Arc<ModelConfig>,
    /// `Err` when the folder's `config.json` could not be read (the model is then unavailable).
    kind: Result<Kind, String>,
    state: RwLock<ModelState>,
    /// When a request was last admitted to this model, for eviction and the idle timeout;
    /// its admission gate marks it.
    last_use: LastUse,
    /// Its folder's files when it was read (poll mode reloads a model whose folder changed).
    fingerprint: Fingerprint,
}

/// The name, size and modification time of each file in a model folder and its subfolders
/// (links followed), sorted: what changes when a model is replaced on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(Vec<(PathBuf, u64, Option<SystemTime>)>);

impl Fingerprint {
    pub fn of(dir: &Path) -> Self {
        fn walk(
            root: &Path,
            dir: &Path,
            depth: usize,
            out: &mut Vec<(PathBuf, u64, Option<SystemTime>)>,
        ) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for e in entries.filter_map(Result::ok) {
                let path = e.path();
                let Ok(meta) = std::fs::metadata(&path) else {
                    continue;
                };
                if meta.is_dir() {
                    if depth < 2 {
                        walk(root, &path, depth + 1, out);
                    }
                } else {
                    let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                    out.push((rel, meta.len(), meta.modified().ok()));
                }
            }
        }
        let mut files = Vec::new();
        walk(dir, dir, 0, &mut files);
        files.sort();
        Self(files)
    }
}

impl Served {
    fn new(config: ModelConfig) -> Self {
        let config_json = config.dir.join("config.json");
        let kind = if !config_json.is_file() {
            Err(format!(
                "{} is not a model folder (no config.json)",
                config.dir.display()
            ))
        } else {
            match kiln_models::is_causal_lm(&config_json) {
                Ok(true) => Ok(Kind::CausalLm),
                Ok(false) => Ok(Kind::Encoder),
                Err(e) => Err(e.to_string()),
            }
        };
        let state = match &kind {
            Ok(_) => ModelState::Loading,
            Err(why) => ModelState::Unavailable(why.clone()),
        };
        Self {
            fingerprint: Fingerprint::of(&config.dir),
            config: Arc::new(config),
            kind,
            state: RwLock::new(state),
            last_use: LastUse::default(),
        }
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    pub fn kind(&self) -> Result<Kind, &str> {
        self.kind.as_ref().copied().map_err(String::as_str)
    }

    pub fn state(&self) -> ModelState {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn set_state(&self, state: ModelState) {
        *self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = state;
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.state(), ModelState::Ready(_))
    }

    /// Requests in flight on this model (0 unless it is loaded).
    pub fn in_flight(&self) -> usize {
        match self.state() {
            ModelState::Ready(loaded) => loaded.in_flight(),
            _ => 0,
        }
    }

    /// Bytes the model holds now (0 unless it is loaded).
    pub fn memory_bytes(&self) -> u64 {
        match self.state() {
            ModelState::Ready(loaded) => loaded.memory_bytes(),
            _ => 0,
        }
    }

    /// Its folder's files when it was read.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// When a request was last admitted to this model (see [`LastUse`]).
    pub fn last_use(&self) -> &LastUse {
        &self.last_use
    }

    /// Marks the model loading. `Ok(false)`: it is loaded already; 409 while it is loading.
    pub fn begin_load(&self) -> Result<bool, AppError> {
        let mut state = self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*state {
            ModelState::Ready(_) => Ok(false),
            ModelState::Loading => Err(self.busy("loading")),
            ModelState::Unloading => Err(self.busy("unloading")),
            ModelState::Unavailable(_) | ModelState::Unloaded => {
                if let Err(why) = &self.kind {
                    return Err(AppError::bad_request(format!(
                        "model `{}` cannot be loaded: {why}",
                        self.id()
                    )));
                }
                *state = ModelState::Loading;
                Ok(true)
            }
        }
    }

    /// Marks the model unloading (new requests for it are refused from now on) and hands back
    /// what was loaded, to be let go of; the caller marks it unloaded once its memory is freed.
    /// `None`: nothing was loaded; 409 while it is loading or unloading.
    pub fn begin_unload(&self) -> Result<Option<Loaded>, AppError> {
        let mut state = self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match std::mem::replace(&mut *state, ModelState::Unloading) {
            ModelState::Ready(loaded) => Ok(Some(loaded)),
            busy @ (ModelState::Loading | ModelState::Unloading) => {
                let doing = if matches!(busy, ModelState::Loading) {
                    "loading"
                } else {
                    "unloading"
                };
                *state = busy;
                Err(self.busy(doing))
            }
            other => {
                *state = other;
                Ok(None)
            }
        }
    }

    fn busy(&self, doing: &str) -> AppError {
        AppError::new(
            axum::http::StatusCode::CONFLICT,
            "validation",
            format!(
                "model `{}` is {doing}; try again when it is done",
                self.id()
            ),
        )
    }

    /// `embedding`, `classifier`, `encoder` (still loading), `causal_lm` or `unknown`.
    pub fn kind_name(&self) -> &'static str {
        match (self.kind(), self.state()) {
            (Ok(Kind::CausalLm), _) => "causal_lm",
            (Ok(Kind::Encoder), ModelState::Ready(Loaded::Encoder(r))) => match r.info.kind {
                ModelKind::Embedding { .. } => "embedding",
                ModelKind::Classifier { .. } => "classifier",
            },
            (Ok(Kind::Encoder), _) => "encoder",
            (Err(_), _) => "unknown",
        }
    }

    /// Whether this model can answer a route that needs `want` (an encoder still loading may).
    fn fits(&self, want: Want) -> bool {
        match (want, self.kind_name()) {
            (Want::Generation, kind) => kind == "causal_lm",
            (Want::Encoder, kind) => matches!(kind, "embedding" | "classifier" | "encoder"),
            (Want::Embeddings, kind) => matches!(kind, "embedding" | "encoder"),
            (Want::Classification, kind) => matches!(kind, "classifier" | "encoder"),
        }
    }

    /// What is loaded, or 503 while loading or unavailable (with the reason), 400 when unloaded.
    pub(crate) fn loaded(&self) -> Result<Loaded, AppError> {
        match self.state() {
            ModelState::Ready(loaded) => Ok(loaded),
            ModelState::Loading => Err(AppError::unavailable(format!(
                "model `{}` is still loading",
                self.id()
            ))),
            ModelState::Unavailable(why) => Err(AppError::unavailable(format!(
                "model `{}` is unavailable: {why}",
                self.id()
            ))),
            ModelState::Unloading => Err(AppError::unavailable(format!(
                "model `{}` is being unloaded",
                self.id()
            ))),
            ModelState::Unloaded => Err(AppError::bad_request(format!(
                "model `{id}` is not loaded; load it with POST /v2/repository/models/{id}/load",
                id = self.id()
            ))),
        }
    }

    /// The encoder, or 503 while it loads, or 422 when this model is a causal LM.
    pub fn encoder(&self) -> Result<Arc<Ready>, AppError> {
        if self.kind() == Ok(Kind::CausalLm) {
            return Err(AppError::validation(format!(
                "model `{}` is a causal language model: it generates text (/v1/completions, /v1/chat/completions, /generate, /generate_stream); this route needs an embedding or classification model",
                self.id()
            )));
        }
        match self.loaded()? {
            Loaded::Encoder(ready) => Ok(ready),
            Loaded::CausalLm(_) => unreachable!("the kind was checked above"),
        }
    }

    /// The causal LM, or 503 while it loads, or 422 when this model is an encoder.
    pub fn causal_lm(&self) -> Result<GenerationService, AppError> {
        if self.kind() == Ok(Kind::Encoder) {
            return Err(AppError::validation(format!(
                "model `{}` is an encoder (embeddings or classification); text generation needs a causal language model such as GPT-2 or Llama",
                self.id()
            )));
        }
        match self.loaded()? {
            Loaded::CausalLm(g) => Ok(g),
            Loaded::Encoder(_) => unreachable!("the kind was checked above"),
        }
    }
}

/// Every served model, in the order they were given (a repository's in name order; folders
/// found later, with `--model-control poll` or an explicit load, come after).
pub struct Registry {
    models: RwLock<Vec<Arc<Served>>>,
    default: Option<String>,
    /// Whether a lone model answers to any name (servers of `--model` folders; a repository's
    /// models come and go by name, so there a name must match).
    lone_answers_any_name: bool,
}

impl Registry {
    pub fn new(configs: &[ModelConfig], default: Option<String>, repository: bool) -> Self {
        Self {
            lone_answers_any_name: !repository,
            models: RwLock::new(
                configs
                    .iter()
                    .cloned()
                    .map(|c| Arc::new(Served::new(c)))
                    .collect(),
            ),
            default,
        }
    }

    /// A snapshot of the served models.
    pub fn all(&self) -> Vec<Arc<Served>> {
        self.models
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Served>> {
        self.models
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|m| m.id() == name)
            .cloned()
    }

    /// Serves one more model (a repository folder found after start), in state `LOADING` (or
    /// unavailable when its folder cannot be read); `None` when the name is taken.
    pub fn add(&self, config: ModelConfig) -> Option<Arc<Served>> {
        let mut models = self
            .models
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if models.iter().any(|m| m.id() == config.id) {
            return None;
        }
        let served = Arc::new(Served::new(config));
        models.push(served.clone());
        Some(served)
    }

    /// Stops serving `name` (its folder left the repository): requests name it in vain from now
    /// on; the caller has unloaded it.
    pub fn remove(&self, name: &str) {
        self.models
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|m| m.id() != name);
    }

    /// The model named `name`, or 404 listing the served ones.
    pub fn by_name(&self, name: &str) -> Result<Arc<Served>, AppError> {
        self.get(name).ok_or_else(|| {
            AppError::not_found(format!(
                "model `{name}` is not served here (served: {})",
                self.listing()
            ))
        })
    }

    /// The model a request is for. A name picks that model (a server of one `--model` answers
    /// to any name, as single-model servers do for clients that keep their old model name). No
    /// name picks `--default-model` when it can answer the route, else the only model that can;
    /// several candidates are an error that lists them.
    pub fn pick(&self, name: Option<&str>, want: Want) -> Result<Arc<Served>, AppError> {
        let models = self.all();
        if let [only] = models.as_slice()
            && (self.lone_answers_any_name || name.is_none())
        {
            return Ok(only.clone());
        }
        if let Some(name) = name {
            return self.by_name(name);
        }
        if let Some(default) = self.default.as_deref().and_then(|d| self.get(d))
            && default.fits(want)
        {
            return Ok(default);
        }
        let candidates: Vec<&Arc<Served>> = models.iter().filter(|m| m.fits(want)).collect();
        match candidates.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(AppError::validation(format!(
                "no served model does {} (served: {})",
                want.describe(),
                self.listing()
            ))),
            several => Err(AppError::validation(format!(
                "several served models can do {}: name one with the request's `model` field or an `X-Model` header ({})",
                want.describe(),
                several
                    .iter()
                    .map(|m| format!("`{}`", m.id()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// `a (embedding), b (causal_lm)`, for error messages.
    pub fn listing(&self) -> String {
        self.all()
            .iter()
            .map(|m| format!("`{}` ({})", m.id(), m.kind_name()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
