//! Serving configuration in two stages.
//!
//! 1. Raw settings, every one optional, as they arrive from one source: command-line flags (clap
//!    fills `KILN_*` environment variables into the same structs) or a TOML config file
//!    (`--config`, the same names in snake_case). Each setting is declared once, in
//!    [`RawModelSettings`] (what loading a model needs: every command that loads one shares
//!    them) or [`RawServerSettings`] (what only `kiln serve` needs); its doc comment is its
//!    `--help` text, its field name its TOML key, its `#[arg]` its flag and environment variable.
//! 2. [`ServeConfig`] (with its [`ModelConfig`]): the one resolved and validated config the server
//!    runs with. Precedence is flag > environment variable > config file > default; cross-field
//!    rules are checked once, with messages that name the setting.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use kiln_engine::compile::CompileOptions;
use kiln_engine::{DeviceChoice, LayerFilter, MathMode, QuantOptions, Quantize, SdpaKernelChoice};
use kiln_models::{BatchLayout, LoadOptions};

/// Declares one group of raw settings. Each field is written once: its doc comment (the `--help`
/// text), its `#[arg]` (flag and environment variable) and its name (the TOML key). The macro adds
/// the merge of two sources ([`RawModelSettings::or`]) and the list of keys, so a new setting
/// cannot be forgotten in either.
macro_rules! settings_group {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$field_meta:meta])* pub $field:ident: $ty:ty, )*
        }
    ) => {
        #[derive(Debug, Clone, Default, clap::Args, serde::Deserialize)]
        $(#[$meta])*
        #[serde(default)]
        pub struct $name {
            $( $(#[$field_meta])* pub $field: $ty, )*
        }

        impl $name {
            /// The TOML keys of this group.
            pub const KEYS: &'static [&'static str] = &[$(stringify!($field)),*];

            /// `self` where set, else `fallback` (flags and env over the file).
            pub fn or(self, fallback: Self) -> Self {
                Self { $( $field: self.$field.or(fallback.$field), )* }
            }
        }
    };
}

settings_group! {
    /// What loading a model needs: `kiln serve` and every command that loads a model
    /// (`compile`, `bench-load`, `embed`, `bench`) take these.
    #[command(next_help_heading = "Model")]
    pub struct RawModelSettings {
        /// Model folder in the Hugging Face layout, as `PATH` or `PATH=ID` (the name clients
        /// use). `kiln serve` takes it several times to serve several models (in a config file:
        /// a string or a list of strings).
        #[arg(long, env = "KILN_MODEL", value_name = "PATH[=ID]")]
        #[serde(default, deserialize_with = "one_or_many")]
        pub model: Option<Vec<String>>,
        /// Name clients see, for a single model (default: the model folder's name).
        #[arg(long, env = "KILN_MODEL_ID")]
        pub model_id: Option<String>,
        /// Where to run: `auto` (a GPU that passes a self-test, else the CPU), `cpu` (kiln's
        /// kernels), `wgpu` / `wgpu:N` (a GPU adapter; `kiln devices` lists them) or `burn-flex`
        /// (burn's CPU backend). [default: auto]
        #[arg(long, env = "KILN_DEVICE")]
        pub device: Option<String>,
        /// Attention kernel: `auto` (the selector picks per input), `flash`, `mem_efficient` or
        /// `math`; a forced kernel that cannot run the model fails at load. [default: auto]
        #[arg(long, env = "KILN_SDPA_KERNEL")]
        pub sdpa_kernel: Option<String>,
        /// Engine batches: `packed` (padding-free, varlen attention) or `padded`.
        /// [default: packed]
        #[arg(long, env = "KILN_BATCH_LAYOUT")]
        pub batch_layout: Option<String>,
        /// Most sequences in one engine call; larger batches are split into length-sorted ones.
        /// [default: 64]
        #[arg(long, env = "KILN_MAX_BATCH_SEQUENCES")]
        pub max_batch_sequences: Option<usize>,
        /// The sentence-transformers prompt (a name in the model's
        /// config_sentence_transformers.json `prompts`) prepended to texts of embedding requests
        /// that give no `prompt_name` or `prompt`. [default: the folder's default_prompt_name]
        #[arg(long, env = "KILN_DEFAULT_PROMPT_NAME", value_name = "NAME")]
        pub default_prompt_name: Option<String>,
        /// Longest input in tokens (default: the model's max_seq_length).
        #[arg(long, env = "KILN_MAX_INPUT_TOKENS", alias = "max-seq-length")]
        pub max_input_tokens: Option<usize>,
        /// Linear layers in int8: `none`, `int8-dynamic` (per-token activation scales at run
        /// time) or `int8-static` (per-tensor scales from `kiln quantize`). [default: none]
        #[arg(long, env = "KILN_QUANTIZE")]
        pub quantize: Option<String>,
        /// The calibration file for int8-static. [default: <model>/kiln-quant.json]
        #[arg(long, env = "KILN_QUANTIZE_SCALES")]
        pub quantize_scales: Option<PathBuf>,
        /// Only these layers are quantized (comma-separated globs on layer names, e.g.
        /// `encoder.layer.*`). [default: all]
        #[arg(long, env = "KILN_QUANTIZE_LAYERS", value_delimiter = ',')]
        pub quantize_layers: Option<Vec<String>>,
        /// Layers kept in f32 (comma-separated globs, e.g. `*.output.dense,classifier`).
        #[arg(long, env = "KILN_QUANTIZE_SKIP", value_delimiter = ',')]
        pub quantize_skip: Option<Vec<String>>,
        /// `precise` (f32) or `bf16-fast` (linear weights in bf16, inputs rounded to bf16, f32
        /// accumulation). [default: precise]
        #[arg(long, env = "KILN_MATH_MODE")]
        pub math_mode: Option<String>,
        /// Plan-cache folder [default: $KILN_CACHE_DIR, else the per-user cache folder].
        #[arg(long, env = "KILN_CACHE_DIR")]
        pub cache_dir: Option<PathBuf>,
        /// `false` compiles at every load and never reads or writes the plan cache (the flag is
        /// `--no-plan-cache`).
        #[arg(skip)]
        pub plan_cache: Option<bool>,
        /// Turn the compiler's fusion passes off (sdpa, qkv, bias-act, add-norm), to measure
        /// what they do.
        #[arg(
            long,
            env = "KILN_NO_FUSE",
            num_args = 0..=1,
            require_equals = true,
            default_missing_value = "true",
            value_name = "BOOL",
            value_parser = BoolishValueParser::new()
        )]
        pub no_fuse: Option<bool>,
        /// Compiler passes to turn off, comma-separated: dce, fold, sdpa, qkv, bias-act,
        /// add-norm, kernels, prepack (or `all`, `fuse`).
        #[arg(long = "disable-pass", env = "KILN_DISABLE_PASS", value_name = "PASSES")]
        pub disable_passes: Option<String>,
    }
}

settings_group! {
    /// What only `kiln serve` needs: addresses, batching, limits, keys, generation.
    #[command(next_help_heading = "Serving")]
    pub struct RawServerSettings {
        /// Serve every model folder in DIR (each subfolder with a config.json; its name is the
        /// model's id). A `kiln.toml` inside a model's folder holds that model's own settings
        /// (model settings only: quantization, device, batching, max tokens, `model_id`), which
        /// win over the server-wide ones.
        #[arg(long, env = "KILN_MODEL_REPOSITORY", value_name = "DIR")]
        pub model_repository: Option<PathBuf>,
        /// The model that routes without a `model` field or `X-Model` header use when more than
        /// one served model could answer them.
        #[arg(long, env = "KILN_DEFAULT_MODEL", value_name = "ID")]
        pub default_model: Option<String>,
        /// `none`: every model is loaded at start and kept; `explicit`: only the `--load-model`
        /// ones are, and `POST /v2/repository/models/{m}/load` and `/unload` (or gRPC's
        /// RepositoryModelLoad/Unload) load and unload models at run time (a folder added to the
        /// repository after start included); `poll`: every model is loaded at start, and the
        /// repository is read again every --repository-poll-interval to load new folders,
        /// unload removed ones and reload changed ones. [default: none]
        #[arg(long, env = "KILN_MODEL_CONTROL", value_name = "MODE")]
        pub model_control: Option<String>,
        /// Most models loaded at once. In explicit mode, loading one more unloads the least
        /// recently used model that has no request in flight (or is refused with 503 when every
        /// loaded model is busy). [default: no limit]
        #[arg(long, env = "KILN_MAX_LOADED_MODELS", value_name = "N")]
        pub max_loaded_models: Option<usize>,
        /// With `--model-control poll`: how often the repository is read again, e.g. `15s`.
        /// [default: 15s]
        #[arg(long, env = "KILN_REPOSITORY_POLL_INTERVAL", value_name = "DURATION")]
        pub repository_poll_interval: Option<String>,
        /// Most memory the loaded models may hold together, e.g. `8GiB`, `512MB`: each model's
        /// weights as f32 (less when quantized) and a causal LM's KV cache, estimated from its
        /// folder before it loads (kiln_model_memory_bytes reports what it holds once loaded).
        /// A model that does not fit is unavailable with the reason; in explicit mode loading it
        /// first unloads the least recently used idle models. [default: no limit]
        #[arg(long, env = "KILN_MEMORY_BUDGET", value_name = "SIZE")]
        pub memory_budget: Option<String>,
        /// With `--model-control explicit`: unload a model that has had no request for this long,
        /// e.g. `10m` (as Ollama's keep_alive). [default: never]
        #[arg(long, env = "KILN_MODEL_IDLE_TIMEOUT", value_name = "DURATION")]
        pub model_idle_timeout: Option<String>,
        /// With `--model-control explicit`: a model to load at start (repeatable).
        #[arg(long, env = "KILN_LOAD_MODEL", value_name = "ID", value_delimiter = ',')]
        pub load_model: Option<Vec<String>>,
        /// [default: 0.0.0.0]
        #[arg(long, env = "KILN_HOST")]
        pub host: Option<String>,
        /// HTTP port. [default: 8080]
        #[arg(long, env = "KILN_PORT")]
        pub port: Option<u16>,
        /// gRPC port (KServe v2 `inference.GRPCInferenceService`, grpc.health.v1, reflection),
        /// on the same host address. [default: 8081]
        #[arg(long, env = "KILN_GRPC_PORT")]
        pub grpc_port: Option<u16>,
        /// Largest gRPC message received or sent, in bytes (RESOURCE_EXHAUSTED beyond; at most
        /// 2147483647). [default: 67108864]
        #[arg(long, env = "KILN_GRPC_MAX_MESSAGE_SIZE")]
        pub grpc_max_message_size: Option<usize>,
        /// Token budget of one batch (requests join a batch while their tokens fit).
        /// [default: 8192]
        #[arg(long, env = "KILN_MAX_BATCH_TOKENS")]
        pub max_batch_tokens: Option<usize>,
        /// Most requests in one batch. [default: 64]
        #[arg(long, env = "KILN_MAX_BATCH_REQUESTS")]
        pub max_batch_requests: Option<usize>,
        /// Requests in progress at once; beyond, 429 with Retry-After at once. [default: 512]
        #[arg(long, env = "KILN_MAX_CONCURRENT_REQUESTS")]
        pub max_concurrent_requests: Option<usize>,
        /// Longest wait for more requests before an idle backend runs a batch that is not full,
        /// e.g. `2ms`, `0`. [default: 2ms]
        #[arg(long, env = "KILN_MAX_QUEUE_DELAY")]
        pub max_queue_delay: Option<String>,
        /// Most inputs in one request (413 beyond). [default: 256]
        #[arg(long, env = "KILN_MAX_CLIENT_BATCH_SIZE")]
        pub max_client_batch_size: Option<usize>,
        /// Truncate inputs over --max-input-tokens (`true`) or refuse them with 422 (`false`); a
        /// request's `truncate` wins. [default: true]
        #[arg(long, env = "KILN_TRUNCATE", value_name = "BOOL")]
        pub truncate: Option<bool>,
        /// A request not answered by then gets 504, e.g. `30s`. [default: 60s]
        #[arg(long, env = "KILN_REQUEST_TIMEOUT")]
        pub request_timeout: Option<String>,
        /// After SIGTERM, how long in-flight requests may run before the server exits anyway
        /// (what is left is answered 503 or cut off), e.g. `10s`. [default: 30s]
        #[arg(long, env = "KILN_SHUTDOWN_TIMEOUT")]
        pub shutdown_timeout: Option<String>,
        /// Largest request body in bytes, after gzip decompression (413 beyond).
        /// [default: 2097152]
        #[arg(long, env = "KILN_PAYLOAD_LIMIT")]
        pub payload_limit: Option<usize>,
        /// API key required as `Authorization: Bearer <key>` (repeatable; comma-separated in the
        /// env var). Health and metrics stay open.
        #[arg(
            long = "api-key",
            env = "KILN_API_KEY",
            value_delimiter = ',',
            hide_env_values = true
        )]
        pub api_keys: Option<Vec<String>>,
        /// File with one API key per line (`#` comments), re-read when it changes.
        #[arg(long, env = "KILN_API_KEYS_FILE")]
        pub api_keys_file: Option<PathBuf>,
        /// Causal LMs: tokens the paged KV cache holds across running requests (each reserves
        /// its prompt plus max_tokens when it joins the batch). [default: 16384]
        #[arg(long, env = "KILN_MAX_BATCH_TOTAL_TOKENS")]
        pub max_batch_total_tokens: Option<usize>,
        /// Causal LMs: prompt tokens prefilled per step; longer prompts run in chunks.
        /// [default: 4096]
        #[arg(long, env = "KILN_MAX_BATCH_PREFILL_TOKENS")]
        pub max_batch_prefill_tokens: Option<usize>,
        /// Causal LMs: steps a waiting request may be held back while a batch runs.
        /// [default: 20]
        #[arg(long, env = "KILN_MAX_WAITING_TOKENS")]
        pub max_waiting_tokens: Option<usize>,
        /// Causal LMs: waiting requests join at once when they reach this many times the
        /// running ones. [default: 1.2]
        #[arg(long, env = "KILN_WAITING_SERVED_RATIO")]
        pub waiting_served_ratio: Option<f32>,
        /// Causal LMs: tokens per KV cache block. [default: 16]
        #[arg(long, env = "KILN_KV_BLOCK_SIZE")]
        pub kv_block_size: Option<usize>,
        /// Causal LMs: a Jinja chat template file (overrides the model folder's).
        #[arg(long, env = "KILN_CHAT_TEMPLATE")]
        pub chat_template: Option<PathBuf>,
        /// Log format: `text` or `json` (one object per line). [default: text]
        #[arg(long, env = "KILN_LOG_FORMAT")]
        pub log_format: Option<String>,
    }
}

/// Flags that are shorthands for a setting's negative value (kept because users type them).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PlanCacheSwitch {
    /// Compile at every load; never read or write the plan cache (`plan_cache = false`).
    #[arg(long, env = "KILN_NO_PLAN_CACHE", help_heading = "Model")]
    pub no_plan_cache: bool,
}

impl PlanCacheSwitch {
    /// `settings` with the switch applied.
    pub fn apply(&self, mut settings: RawModelSettings) -> RawModelSettings {
        if self.no_plan_cache {
            settings.plan_cache = Some(false);
        }
        settings
    }
}

/// Every setting from one source: one TOML file, or the flags and environment.
#[derive(Debug, Clone, Default)]
pub struct RawServeConfig {
    pub model: RawModelSettings,
    pub server: RawServerSettings,
}

impl RawServeConfig {
    /// Every key a config file may hold.
    pub fn keys() -> impl Iterator<Item = &'static str> {
        RawModelSettings::KEYS
            .iter()
            .chain(RawServerSettings::KEYS)
            .copied()
    }

    /// Reads a TOML config file; unknown keys are errors (a typo must not be silently ignored).
    pub fn from_toml_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        Self::from_toml_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }

    /// Parses TOML text: both groups read the same top-level table (each ignoring the other's
    /// keys), and a key neither knows is refused, with the nearest known key as a hint.
    pub fn from_toml_str(text: &str) -> Result<Self, String> {
        let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        if let Some(unknown) = table
            .keys()
            .find(|k| !Self::keys().any(|known| known == *k))
        {
            let hint = Self::keys()
                .map(|known| (edit_distance(known, unknown), known))
                .min()
                .filter(|(d, _)| *d <= 3)
                .map_or(String::new(), |(_, k)| format!(" (did you mean `{k}`?)"));
            return Err(format!("unknown key `{unknown}`{hint}"));
        }
        Ok(Self {
            model: toml::from_str(text).map_err(|e| e.to_string())?,
            server: toml::from_str(text).map_err(|e| e.to_string())?,
        })
    }

    /// `self` where set, else `fallback` (flags and env over the file).
    pub fn or(self, fallback: RawServeConfig) -> RawServeConfig {
        RawServeConfig {
            model: self.model.or(fallback.model),
            server: self.server.or(fallback.server),
        }
    }

    /// Applies defaults and validates: the second stage.
    pub fn resolve(self) -> Result<ServeConfig, String> {
        let s = self.server;
        let mut models = self.model.resolve_all()?;
        let repository = s.model_repository.clone().map(|dir| Repository {
            dir,
            // The server-wide model settings are every repository model's defaults.
            shared: RawModelSettings {
                model: None,
                model_id: None,
                ..self.model
            },
        });
        if let Some(repository) = &repository {
            let repo = &repository.dir;
            for dir in repository_folders(repo)? {
                models.push(repository.model(&dir)?);
            }
            if models.is_empty() {
                return Err(format!(
                    "--model-repository {}: no model folders (subfolders with a config.json)",
                    repo.display()
                ));
            }
        }
        if models.is_empty() {
            return Err(MODEL_REQUIRED.into());
        }
        let mut config = ServeConfig::with_models(models);
        config.repository = repository;
        config.default_model = s.default_model;
        if let Some(i) = s.repository_poll_interval {
            config.repository_poll_interval =
                parse_duration(&i).map_err(|e| format!("--repository-poll-interval: {e}"))?;
        }
        if let Some(mode) = s.model_control {
            config.model_control =
                ModelControl::from_str(&mode).map_err(|e| format!("--model-control: {e}"))?;
        }
        config.load_models = s.load_model.unwrap_or_default();
        config.max_loaded_models = s.max_loaded_models;
        if let Some(b) = s.memory_budget {
            config.memory_budget =
                Some(parse_bytes(&b).map_err(|e| format!("--memory-budget: {e}"))?);
        }
        if let Some(d) = s.model_idle_timeout {
            config.model_idle_timeout =
                Some(parse_duration(&d).map_err(|e| format!("--model-idle-timeout: {e}"))?);
        }
        if let Some(h) = s.host {
            config.host = h;
        }
        macro_rules! take {
            ($($field:ident),*) => { $( if let Some(v) = s.$field { config.$field = v; } )* };
        }
        take!(
            port,
            grpc_port,
            max_batch_tokens,
            max_batch_requests,
            max_concurrent_requests,
            max_client_batch_size,
            payload_limit,
            max_batch_total_tokens,
            max_batch_prefill_tokens,
            max_waiting_tokens,
            waiting_served_ratio,
            kv_block_size,
            grpc_max_message_size
        );
        config.chat_template = s.chat_template;
        if let Some(t) = s.truncate {
            config.auto_truncate = t;
        }
        if let Some(d) = s.max_queue_delay {
            config.max_queue_delay =
                parse_duration(&d).map_err(|e| format!("--max-queue-delay: {e}"))?;
        }
        if let Some(d) = s.request_timeout {
            config.request_timeout =
                parse_duration(&d).map_err(|e| format!("--request-timeout: {e}"))?;
        }
        if let Some(d) = s.shutdown_timeout {
            config.shutdown_timeout =
                parse_duration(&d).map_err(|e| format!("--shutdown-timeout: {e}"))?;
        }
        config.api_keys = s.api_keys.unwrap_or_default();
        config.api_keys_file = s.api_keys_file;
        if let Some(f) = s.log_format {
            config.log_format =
                LogFormat::from_str(&f).map_err(|e| format!("--log-format: {e}"))?;
        }
        config.validate()
    }
}

impl RawModelSettings {
    /// The one model a command loads (`compile`, `bench-load`, `embed`, `bench`).
    pub fn resolve(self) -> Result<ModelConfig, String> {
        let mut models = self.resolve_all()?;
        match models.len() {
            1 => Ok(models.remove(0)),
            0 => Err(MODEL_REQUIRED.into()),
            n => Err(format!(
                "this command loads one model; --model was given {n} times"
            )),
        }
    }

    /// Every `--model` given, each with these settings.
    fn resolve_all(&self) -> Result<Vec<ModelConfig>, String> {
        let specs = self.model.as_deref().unwrap_or_default();
        if specs.len() > 1 && self.model_id.is_some() {
            return Err(
                "--model-id names a single model; with several, name each as --model PATH=ID"
                    .into(),
            );
        }
        specs
            .iter()
            .map(|spec| {
                let (dir, id) = parse_model_spec(spec);
                self.resolve_for(dir, id.or(self.model_id.clone()))
            })
            .collect()
    }

    /// These settings for the model folder `dir`, named `id` (default: the folder's name).
    fn resolve_for(&self, dir: PathBuf, id: Option<String>) -> Result<ModelConfig, String> {
        let mut config = ModelConfig::for_dir(dir);
        if let Some(id) = id {
            config.id = id;
        }
        if let Some(d) = &self.device {
            config.device = DeviceChoice::from_str(d).map_err(|e| format!("--device: {e}"))?;
        }
        if let Some(k) = &self.sdpa_kernel {
            config.sdpa_kernel = parse_sdpa(k).map_err(|e| format!("--sdpa-kernel: {e}"))?;
        }
        if let Some(l) = &self.batch_layout {
            config.batch_layout =
                BatchLayout::from_str(l).map_err(|e| format!("--batch-layout: {e}"))?;
        }
        if let Some(n) = self.max_batch_sequences {
            config.max_batch_sequences = n;
        }
        config.max_input_tokens = self.max_input_tokens;
        config.default_prompt_name = self.default_prompt_name.clone();
        if let Some(q) = &self.quantize {
            config.quant.quantize =
                Quantize::from_str(q).map_err(|e| format!("--quantize: {e}"))?;
        }
        if let Some(m) = &self.math_mode {
            config.quant.math_mode =
                MathMode::from_str(m).map_err(|e| format!("--math-mode: {e}"))?;
        }
        config.quant.layers = LayerFilter {
            allow: self.quantize_layers.clone().unwrap_or_default(),
            deny: self.quantize_skip.clone().unwrap_or_default(),
        };
        config.quantize_scales = self.quantize_scales.clone();
        if self.no_fuse == Some(true) {
            config.compile = CompileOptions::no_fuse();
        }
        if let Some(list) = &self.disable_passes {
            config
                .compile
                .disable(list)
                .map_err(|e| format!("--disable-pass: {e}"))?;
        }
        config.cache_dir = match self.plan_cache {
            Some(false) => None,
            _ => self
                .cache_dir
                .clone()
                .or_else(kiln_engine::cache::default_dir),
        };
        config
            .validate()
            .map_err(|e| format!("model `{}`: {e}", config.id))?;
        Ok(config)
    }

    /// A model folder's own `kiln.toml`: model settings only (the folder is the model, so no
    /// `model` key either).
    pub fn from_model_folder(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let table: toml::Table =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        for key in table.keys() {
            if key == "model" || !Self::KEYS.contains(&key.as_str()) {
                let why = if RawServerSettings::KEYS.contains(&key.as_str()) {
                    "is a server setting; it belongs in the server's config file".to_string()
                } else if key == "model" {
                    "cannot be set here: the folder is the model".to_string()
                } else {
                    "is not a model setting".to_string()
                };
                return Err(format!("{}: `{key}` {why}", path.display()));
            }
        }
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

const MODEL_REQUIRED: &str =
    "--model (KILN_MODEL, or `model` in the config file) or --model-repository is required";

/// `PATH=ID` → (PATH, ID); a plain path (or one whose `=` is followed by something that is no
/// id, such as a path) → (PATH, None).
fn parse_model_spec(spec: &str) -> (PathBuf, Option<String>) {
    match spec.rsplit_once('=') {
        Some((path, id)) if !path.is_empty() && !id.is_empty() && !id.contains('/') => {
            (PathBuf::from(path), Some(id.to_string()))
        }
        _ => (PathBuf::from(spec), None),
    }
}

/// A config-file value that may be one string or a list of them.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(Some(
        match <OneOrMany as serde::Deserialize>::deserialize(d)? {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        },
    ))
}

/// The model folders of a repository: every subfolder holding a `config.json`, sorted by name.
pub fn repository_folders(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("--model-repository {}: {e}", dir.display()))?;
    let mut folders: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("config.json").is_file())
        .collect();
    folders.sort();
    Ok(folders)
}

/// A model repository folder, and the server-wide model settings its models start from (a
/// model folder's own `kiln.toml` wins over them), kept so folders can be read again at run
/// time.
#[derive(Debug, Clone)]
pub struct Repository {
    pub dir: PathBuf,
    shared: RawModelSettings,
}

impl Repository {
    /// The settings of the model in `folder` (one of [`repository_folders`]).
    pub fn model(&self, folder: &Path) -> Result<ModelConfig, String> {
        let own = folder.join("kiln.toml");
        let own = if own.is_file() {
            RawModelSettings::from_model_folder(&own)?
        } else {
            RawModelSettings::default()
        };
        let id = own.model_id.clone();
        own.or(self.shared.clone())
            .resolve_for(folder.to_path_buf(), id)
    }

    /// The repository's model folders now.
    pub fn folders(&self) -> Result<Vec<PathBuf>, String> {
        repository_folders(&self.dir)
    }
}

/// Levenshtein distance, for "did you mean" hints on config keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// Triton's model control modes, as far as kiln has them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ModelControl {
    /// Every model loaded at start and kept.
    #[default]
    None,
    /// Models loaded and unloaded on request (`--load-model` ones at start).
    Explicit,
    /// The repository is read again every `--repository-poll-interval`: new folders are
    /// loaded, removed ones unloaded, changed ones reloaded.
    Poll,
}

impl FromStr for ModelControl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "explicit" => Ok(Self::Explicit),
            "poll" => Ok(Self::Poll),
            other => Err(format!("`{other}` is not `none`, `explicit` or `poll`")),
        }
    }
}

/// How the server logs: human-readable lines, or one JSON object per line (for log shippers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("`{other}` is not `text` or `json`")),
        }
    }
}

/// One model's resolved settings: where it is, what it is called, and how it is loaded.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub dir: PathBuf,
    /// The name clients see in `/v1/models`, `/v2/models/{name}`, responses and `/info`.
    pub id: String,
    pub device: DeviceChoice,
    pub sdpa_kernel: SdpaKernelChoice,
    /// Packed (padding-free, varlen attention) or padded engine batches.
    pub batch_layout: BatchLayout,
    /// Most sequences in one engine call.
    pub max_batch_sequences: usize,
    /// Longest input in tokens (special tokens included); `None`: the model's own limit.
    pub max_input_tokens: Option<usize>,
    /// The prompt embedding requests get when they name none (`--default-prompt-name`).
    pub default_prompt_name: Option<String>,
    /// int8 quantization, its layer filter, and the math mode.
    pub quant: QuantOptions,
    /// The calibration file for `int8-static` (default `<model>/kiln-quant.json`).
    pub quantize_scales: Option<PathBuf>,
    /// Which compiler passes run.
    pub compile: CompileOptions,
    /// The plan-cache folder; `None`: compile at every load.
    pub cache_dir: Option<PathBuf>,
}

impl ModelConfig {
    /// The given model folder with every default (the plan cache off).
    pub fn for_dir(dir: PathBuf) -> Self {
        let id = dir
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
        Self {
            dir,
            id,
            device: DeviceChoice::Auto,
            sdpa_kernel: SdpaKernelChoice::Auto,
            batch_layout: BatchLayout::Packed,
            max_batch_sequences: 64,
            max_input_tokens: None,
            default_prompt_name: None,
            quant: QuantOptions::default(),
            quantize_scales: None,
            compile: CompileOptions::default(),
            cache_dir: None,
        }
    }

    /// What the loader takes.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            device: self.device,
            exec: kiln_engine::ExecOptions {
                sdpa_kernel: self.sdpa_kernel,
                quant: self.quant.clone(),
            },
            max_batch_sequences: self.max_batch_sequences,
            max_seq_length: self.max_input_tokens,
            layout: self.batch_layout,
            compile: self.compile.clone(),
            cache_dir: self.cache_dir.clone(),
            quantize_scales: self.quantize_scales.clone(),
        }
    }

    /// The rules between the model's own settings.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_batch_sequences == 0 {
            return Err("--max-batch-sequences must be at least 1".into());
        }
        if let Some(n) = self.max_input_tokens
            && n < 2
        {
            return Err("--max-input-tokens must be at least 2 (room for [CLS] and [SEP])".into());
        }
        if self.id.trim().is_empty() || self.id.contains('/') {
            return Err("--model-id must be non-empty and contain no `/`".into());
        }
        if self.quant.is_f32()
            && !(self.quant.layers.allow.is_empty() && self.quant.layers.deny.is_empty())
        {
            return Err(
                "--quantize-layers / --quantize-skip need --quantize or --math-mode bf16-fast"
                    .into(),
            );
        }
        if self.quantize_scales.is_some() && self.quant.quantize != Quantize::Int8Static {
            return Err("--quantize-scales needs --quantize int8-static".into());
        }
        Ok(())
    }
}

/// The largest gRPC message tritonclient and gRPC implementations accept: 2 GiB - 1.
pub const MAX_GRPC_MESSAGE_SIZE: usize = i32::MAX as usize;

/// The resolved, validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The served models and how each is loaded (at least one; ids unique).
    pub models: Vec<ModelConfig>,
    /// What routes without a model name use when several models could answer them.
    pub default_model: Option<String>,
    /// Whether models can be loaded and unloaded at run time.
    pub model_control: ModelControl,
    /// In explicit mode, the models loaded at start.
    pub load_models: Vec<String>,
    /// Most models loaded at once (explicit mode evicts the least recently used idle one).
    pub max_loaded_models: Option<usize>,
    /// Most bytes the loaded models may hold together (see `--memory-budget`).
    pub memory_budget: Option<u64>,
    /// The `--model-repository`, when models come from one.
    pub repository: Option<Repository>,
    /// Poll mode: how often the repository is read again.
    pub repository_poll_interval: Duration,
    /// Explicit mode: unload a model after this long without a request.
    pub model_idle_timeout: Option<Duration>,
    pub host: String,
    /// The HTTP port.
    pub port: u16,
    /// The gRPC port (on the same host address). 0 picks a free port, as for `port`.
    pub grpc_port: u16,
    /// Largest gRPC message, received or sent, in bytes (RESOURCE_EXHAUSTED beyond).
    pub grpc_max_message_size: usize,
    /// Token budget of one batch: requests are added to a batch while their tokens fit, and an
    /// engine call never runs more (padded) tokens than this, except a single over-long input.
    pub max_batch_tokens: usize,
    /// Most requests gathered into one batch.
    pub max_batch_requests: usize,
    /// Requests admitted at once (tokenizing, queued or running); beyond this, 429 at once.
    pub max_concurrent_requests: usize,
    /// How long the queue waits for more requests before it runs a batch that is not full
    /// while the backend is idle. Zero runs every batch as soon as the backend is free.
    pub max_queue_delay: Duration,
    /// Most inputs one request may carry (413 beyond).
    pub max_client_batch_size: usize,
    /// Cut inputs longer than `max_input_tokens` (sentence-transformers' behaviour) unless a
    /// request says `truncate: false`; when false, such inputs are refused with 422.
    pub auto_truncate: bool,
    /// A request that has not been answered by then gets 504 and its queued work is dropped.
    pub request_timeout: Duration,
    /// After a shutdown signal, how long draining may take before the process exits anyway.
    pub shutdown_timeout: Duration,
    /// Largest request body in bytes, after gzip decompression (413 beyond).
    pub payload_limit: usize,
    /// Bearer keys accepted on every route but health and metrics; none and no file: open.
    pub api_keys: Vec<String>,
    /// A file with one key per line, re-read when it changes.
    pub api_keys_file: Option<PathBuf>,
    /// Causal LMs: tokens the paged KV cache holds across every running request (prompt plus
    /// `max_tokens` of each is reserved when it joins the batch).
    pub max_batch_total_tokens: usize,
    /// Causal LMs: prompt tokens prefilled in one step (longer prompts run in chunks).
    pub max_batch_prefill_tokens: usize,
    /// Causal LMs: steps a waiting request may be held back while a batch runs.
    pub max_waiting_tokens: usize,
    /// Causal LMs: waiting requests join early once they are this many times the running ones.
    pub waiting_served_ratio: f32,
    /// Causal LMs: tokens per KV cache block.
    pub kv_block_size: usize,
    /// Causal LMs: a Jinja chat template file overriding the model folder's.
    pub chat_template: Option<PathBuf>,
    pub log_format: LogFormat,
}

impl ServeConfig {
    /// Checks the cross-field rules that flags alone cannot express.
    pub fn validate(self) -> Result<Self, String> {
        if self.models.is_empty() {
            return Err(MODEL_REQUIRED.into());
        }
        for (i, m) in self.models.iter().enumerate() {
            m.validate().map_err(|e| format!("model `{}`: {e}", m.id))?;
            if self.models[..i].iter().any(|other| other.id == m.id) {
                return Err(format!(
                    "two models are named `{}`; give each its own id (--model PATH=ID, or `model_id` in the folder's kiln.toml)",
                    m.id
                ));
            }
        }
        if let Some(d) = &self.default_model
            && !self.models.iter().any(|m| &m.id == d)
        {
            return Err(format!(
                "--default-model `{d}` is not one of the served models"
            ));
        }
        if !self.load_models.is_empty() && self.model_control != ModelControl::Explicit {
            return Err("--load-model needs --model-control explicit".into());
        }
        if let Some(unknown) = self
            .load_models
            .iter()
            .find(|id| !self.models.iter().any(|m| &m.id == *id))
        {
            return Err(format!(
                "--load-model `{unknown}` is not one of the served models"
            ));
        }
        if let Some(idle) = self.model_idle_timeout {
            if self.model_control != ModelControl::Explicit {
                return Err("--model-idle-timeout needs --model-control explicit".into());
            }
            if idle.is_zero() {
                return Err("--model-idle-timeout must be more than 0".into());
            }
        }
        if self.model_control == ModelControl::Poll {
            if self.repository.is_none() {
                return Err(
                    "--model-control poll needs --model-repository (the folder it reads again)"
                        .into(),
                );
            }
            if self.repository_poll_interval.is_zero() {
                return Err("--repository-poll-interval must be more than 0".into());
            }
        }
        if let Some(max) = self.max_loaded_models {
            let at_start = match self.model_control {
                ModelControl::None | ModelControl::Poll => self.models.len(),
                ModelControl::Explicit => self.load_models.len(),
            };
            if max == 0 || max < at_start {
                return Err(format!(
                    "--max-loaded-models {max} is less than the {at_start} models loaded at start"
                ));
            }
        }
        for (name, v) in [
            ("max-batch-tokens", self.max_batch_tokens),
            ("max-batch-requests", self.max_batch_requests),
            ("max-concurrent-requests", self.max_concurrent_requests),
            ("max-client-batch-size", self.max_client_batch_size),
            ("payload-limit", self.payload_limit),
            ("max-batch-total-tokens", self.max_batch_total_tokens),
            ("max-batch-prefill-tokens", self.max_batch_prefill_tokens),
            ("kv-block-size", self.kv_block_size),
            ("grpc-max-message-size", self.grpc_max_message_size),
        ] {
            if v == 0 {
                return Err(format!("--{name} must be at least 1"));
            }
        }
        for m in &self.models {
            if let Some(n) = m.max_input_tokens
                && n > self.max_batch_tokens
            {
                return Err(format!(
                    "--max-batch-tokens ({}) must be at least --max-input-tokens ({n}) of model `{}`: a batch must hold the longest input",
                    self.max_batch_tokens, m.id
                ));
            }
        }
        if !(self.waiting_served_ratio >= 0.0 && self.waiting_served_ratio.is_finite()) {
            return Err("--waiting-served-ratio must be a number >= 0".into());
        }
        if self.kv_block_size > self.max_batch_total_tokens {
            return Err("--kv-block-size must not exceed --max-batch-total-tokens".into());
        }
        if self.grpc_max_message_size > MAX_GRPC_MESSAGE_SIZE {
            return Err(format!(
                "--grpc-max-message-size must be at most {MAX_GRPC_MESSAGE_SIZE} (2 GiB - 1, gRPC's limit)"
            ));
        }
        if self.port != 0 && self.port == self.grpc_port {
            return Err(format!(
                "--port and --grpc-port are both {}; HTTP and gRPC need their own ports",
                self.port
            ));
        }
        if self.request_timeout.is_zero() {
            return Err("--request-timeout must be more than 0".into());
        }
        if self.max_queue_delay >= self.request_timeout {
            return Err("--max-queue-delay must be shorter than --request-timeout".into());
        }
        if self.api_keys.iter().any(|k| k.trim().is_empty()) {
            return Err("--api-key must not be empty".into());
        }
        Ok(self)
    }

    /// A config for tests: the given model folder with every default (the plan cache off).
    pub fn for_model(model_dir: PathBuf) -> Self {
        Self::with_models(vec![ModelConfig::for_dir(model_dir)])
    }

    /// The server's defaults around resolved models.
    pub fn with_models(models: Vec<ModelConfig>) -> Self {
        Self {
            models,
            default_model: None,
            model_control: ModelControl::None,
            load_models: Vec::new(),
            max_loaded_models: None,
            memory_budget: None,
            repository: None,
            repository_poll_interval: Duration::from_secs(15),
            model_idle_timeout: None,
            host: "0.0.0.0".into(),
            port: 8080,
            grpc_port: 8081,
            grpc_max_message_size: 64 * 1024 * 1024,
            max_batch_tokens: 8192,
            max_batch_requests: 64,
            max_concurrent_requests: 512,
            max_queue_delay: Duration::from_millis(2),
            max_client_batch_size: 256,
            auto_truncate: true,
            request_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
            payload_limit: 2 * 1024 * 1024,
            api_keys: Vec::new(),
            api_keys_file: None,
            max_batch_total_tokens: 16384,
            max_batch_prefill_tokens: 4096,
            max_waiting_tokens: 20,
            waiting_served_ratio: 1.2,
            kv_block_size: 16,
            chat_template: None,
            log_format: LogFormat::Text,
        }
    }
}

/// `auto`, `flash`, `mem_efficient` or `math` (the attention crate's spelling).
pub fn parse_sdpa(s: &str) -> Result<SdpaKernelChoice, String> {
    SdpaKernelChoice::from_str(s)
}

/// `"0"`, `"500us"`, `"2ms"`, `"1.5s"`, `"1m"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("`{s}` needs a unit: us, ms, s or m (e.g. `2ms`)"))?;
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as `2ms`"))?;
    let seconds = match unit.trim() {
        "us" | "µs" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        other => return Err(format!("unknown unit `{other}` in `{s}` (us, ms, s or m)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("`{s}`: {e}"))
}

/// A size in bytes: a number with an optional unit, `B`, `KB`/`MB`/`GB`/`TB` (powers of 1000)
/// or `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024), e.g. `512MB`, `1.5GiB`, `4096`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as `8GiB` or `512MB`"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" | "t" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{s}` (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{s}` must be at least 1 byte and at most 2^64"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("512MB").unwrap(), 512_000_000);
        assert_eq!(parse_bytes("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_bytes(" 2 gib ").unwrap(), 2 << 30);
        for bad in [
            "",
            "GB",
            "1.2.3GB",
            "5 parsecs",
            "0",
            "0.1",
            "-1GB",
            "1e30TB",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("2ms").unwrap(), Duration::from_millis(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("ms").is_err());
    }

    fn model(dir: &str) -> RawModelSettings {
        RawModelSettings {
            model: Some(vec![dir.into()]),
            ..Default::default()
        }
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file = RawServeConfig::from_toml_str(
            "model = \"m\"\nmax_batch_tokens = 1000\nmax_queue_delay = \"5ms\"\nport = 9000\nmax_batch_sequences = 8\n",
        )
        .unwrap();
        let flags = RawServeConfig {
            server: RawServerSettings {
                port: Some(7000),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = flags.or(file).resolve().unwrap();
        assert_eq!(c.port, 7000);
        assert_eq!(c.max_batch_tokens, 1000);
        assert_eq!(c.max_queue_delay, Duration::from_millis(5));
        assert_eq!(c.max_batch_requests, 64);
        assert_eq!(c.models[0].max_batch_sequences, 8);
        assert_eq!(c.models[0].dir, Path::new("m"));
        assert_eq!(c.models[0].id, "m");
    }

    #[test]
    fn the_example_config_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/kiln.toml");
        let c = RawServeConfig::from_toml_file(&path)
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(c.models[0].id, "all-MiniLM-L6-v2");
        assert_eq!(c.max_queue_delay, Duration::from_millis(2));
    }

    /// `configs/kiln.toml` is where users look up the keys: each one is there, set or commented
    /// out, so a new setting cannot be added without showing it.
    #[test]
    fn the_example_config_file_shows_every_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/kiln.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let shown: Vec<&str> = text
            .lines()
            .filter_map(|line| {
                let line = line.trim_start().trim_start_matches('#').trim_start();
                let (key, _) = line.split_once('=')?;
                Some(key.trim())
            })
            .collect();
        let missing: Vec<&str> = RawServeConfig::keys()
            .filter(|k| !shown.contains(k))
            .collect();
        assert!(missing.is_empty(), "configs/kiln.toml lacks {missing:?}");
    }

    #[test]
    fn plan_cache_and_pass_settings_resolve() {
        let file = RawServeConfig::from_toml_str(
            "model = \"m\"\ncache_dir = \"/tmp/kiln-plans\"\ndisable_passes = \"qkv\"\n",
        )
        .unwrap();
        let c = file.clone().resolve().unwrap();
        assert_eq!(
            c.models[0].cache_dir.as_deref(),
            Some(Path::new("/tmp/kiln-plans"))
        );
        assert!(
            !c.models[0]
                .compile
                .enabled(kiln_engine::compile::PassId::QkvMerge)
        );
        assert!(
            c.models[0]
                .compile
                .enabled(kiln_engine::compile::PassId::BiasAct)
        );
        let flags = RawServeConfig {
            model: RawModelSettings {
                plan_cache: Some(false),
                no_fuse: Some(true),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = flags.or(file).resolve().unwrap();
        assert_eq!(
            c.models[0].cache_dir, None,
            "plan_cache = false turns the cache off"
        );
        assert!(
            !c.models[0]
                .compile
                .enabled(kiln_engine::compile::PassId::BiasAct)
        );
        let bad = RawModelSettings {
            disable_passes: Some("qkv,nope".into()),
            ..model("m")
        };
        assert!(bad.resolve().unwrap_err().contains("unknown pass `nope`"));
    }

    #[test]
    fn quantization_settings_from_the_file_and_flags() {
        let file = RawServeConfig::from_toml_str(
            "model = \"m\"\nquantize = \"int8-dynamic\"\nquantize_skip = [\"*.output.dense\"]\nmath_mode = \"bf16-fast\"\n",
        )
        .unwrap()
        .model;
        let c = RawModelSettings::default()
            .or(file.clone())
            .resolve()
            .unwrap();
        assert_eq!(c.quant.quantize, Quantize::Int8Dynamic);
        assert_eq!(c.quant.math_mode, MathMode::Bf16Fast);
        assert_eq!(c.quant.layers.deny, vec!["*.output.dense".to_string()]);
        let flags = RawModelSettings {
            quantize: Some("int8-static".into()),
            quantize_scales: Some("s.json".into()),
            ..Default::default()
        };
        let c = flags.or(file.clone()).resolve().unwrap();
        assert_eq!(c.quant.quantize, Quantize::Int8Static);
        assert_eq!(c.quantize_scales, Some(PathBuf::from("s.json")));
        let bad = RawModelSettings {
            quantize: Some("int4".into()),
            ..Default::default()
        };
        assert!(
            bad.or(file.clone())
                .resolve()
                .unwrap_err()
                .contains("--quantize")
        );
        let skip_alone = RawModelSettings {
            quantize: Some("none".into()),
            math_mode: Some("precise".into()),
            ..Default::default()
        };
        assert!(
            skip_alone
                .or(file)
                .resolve()
                .unwrap_err()
                .contains("need --quantize")
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let typo = RawServeConfig::from_toml_str("max_batch_tokenz = 3").unwrap_err();
        assert!(
            typo.contains("unknown key `max_batch_tokenz` (did you mean `max_batch_tokens`?)"),
            "{typo}"
        );
        let far = RawServeConfig::from_toml_str("colour = \"blue\"").unwrap_err();
        assert_eq!(far, "unknown key `colour`");
        let wrong_type = RawServeConfig::from_toml_str("port = \"eighty\"").unwrap_err();
        assert!(wrong_type.contains("port"), "{wrong_type}");
        let server = |s: RawServerSettings| RawServeConfig {
            model: model("m"),
            server: s,
        };
        let raw = RawServeConfig {
            model: RawModelSettings {
                max_input_tokens: Some(512),
                ..model("m")
            },
            server: RawServerSettings {
                max_batch_tokens: Some(256),
                ..Default::default()
            },
        };
        assert!(raw.resolve().unwrap_err().contains("--max-batch-tokens"));
        let same_ports = server(RawServerSettings {
            port: Some(9000),
            grpc_port: Some(9000),
            ..Default::default()
        });
        assert!(same_ports.resolve().unwrap_err().contains("--grpc-port"));
        let huge = server(RawServerSettings {
            grpc_max_message_size: Some(MAX_GRPC_MESSAGE_SIZE + 1),
            ..Default::default()
        });
        assert!(huge.resolve().unwrap_err().contains("2 GiB"));
        let log = server(RawServerSettings {
            log_format: Some("xml".into()),
            ..Default::default()
        });
        assert!(log.resolve().unwrap_err().contains("--log-format"));
        let idle = server(RawServerSettings {
            model_idle_timeout: Some("1s".into()),
            ..Default::default()
        });
        assert!(
            idle.resolve()
                .unwrap_err()
                .contains("--model-idle-timeout needs")
        );
        let budget = server(RawServerSettings {
            memory_budget: Some("lots".into()),
            ..Default::default()
        });
        assert!(budget.resolve().unwrap_err().contains("--memory-budget"));
        let poll = server(RawServerSettings {
            model_control: Some("poll".into()),
            ..Default::default()
        });
        assert!(
            poll.resolve()
                .unwrap_err()
                .contains("needs --model-repository")
        );
        let no_model = RawServeConfig::default().resolve().unwrap_err();
        assert!(no_model.contains("--model"), "{no_model}");
    }

    #[test]
    fn several_models_by_flag_each_with_its_id() {
        let raw = RawServeConfig {
            model: RawModelSettings {
                model: Some(vec!["a/minilm=embedder".into(), "b/gpt2".into()]),
                quantize: Some("int8-dynamic".into()),
                ..Default::default()
            },
            server: RawServerSettings {
                default_model: Some("gpt2".into()),
                ..Default::default()
            },
        };
        let c = raw.resolve().unwrap();
        let ids: Vec<&str> = c.models.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["embedder", "gpt2"]);
        assert_eq!(c.models[0].dir, Path::new("a/minilm"));
        assert!(
            c.models
                .iter()
                .all(|m| m.quant.quantize == Quantize::Int8Dynamic)
        );
        assert_eq!(c.default_model.as_deref(), Some("gpt2"));
        // A path whose `=` is followed by a path is a plain path.
        assert_eq!(
            parse_model_spec("dir=with/slash"),
            (PathBuf::from("dir=with/slash"), None)
        );
    }

    #[test]
    fn several_models_need_unique_ids_and_a_real_default() {
        let two = |specs: [&str; 2], default: Option<&str>, id: Option<&str>| RawServeConfig {
            model: RawModelSettings {
                model: Some(specs.map(String::from).to_vec()),
                model_id: id.map(String::from),
                ..Default::default()
            },
            server: RawServerSettings {
                default_model: default.map(String::from),
                ..Default::default()
            },
        };
        let same = two(["x/m", "y/m"], None, None).resolve().unwrap_err();
        assert!(same.contains("two models are named `m`"), "{same}");
        let default = two(["x/a", "y/b"], Some("c"), None).resolve().unwrap_err();
        assert!(default.contains("--default-model `c`"), "{default}");
        let mut max = two(["x/a", "y/b"], None, None);
        max.server.max_loaded_models = Some(1);
        let max = max.resolve().unwrap_err();
        assert!(
            max.contains("--max-loaded-models 1 is less than the 2"),
            "{max}"
        );
        let mut load = two(["x/a", "y/b"], None, None);
        load.server.load_model = Some(vec!["a".into()]);
        let none_mode = load.clone().resolve().unwrap_err();
        assert!(none_mode.contains("--load-model needs"), "{none_mode}");
        load.server.model_control = Some("explicit".into());
        load.server.max_loaded_models = Some(1);
        assert_eq!(load.clone().resolve().unwrap().load_models, ["a"]);
        load.server.load_model = Some(vec!["c".into()]);
        assert!(load.resolve().unwrap_err().contains("--load-model `c`"));
        let id = two(["x/a", "y/b"], None, Some("z")).resolve().unwrap_err();
        assert!(id.contains("--model-id names a single model"), "{id}");
        let one = RawModelSettings {
            model: Some(vec!["x/a".into(), "y/b".into()]),
            ..Default::default()
        };
        assert!(one.resolve().unwrap_err().contains("loads one model"));
    }

    #[test]
    fn a_repository_folder_with_per_model_settings() {
        let repo = std::env::temp_dir().join(format!("kiln-repo-config-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&repo);
        for name in ["embedder", "lm", "not-a-model"] {
            std::fs::create_dir_all(repo.join(name)).unwrap();
        }
        std::fs::write(repo.join("embedder/config.json"), "{}").unwrap();
        std::fs::write(repo.join("lm/config.json"), "{}").unwrap();
        std::fs::write(
            repo.join("lm/kiln.toml"),
            "model_id = \"small-lm\"\nquantize = \"none\"\nmax_batch_sequences = 4\n",
        )
        .unwrap();
        let file = RawServeConfig::from_toml_str(&format!(
            "model_repository = {:?}\nquantize = \"int8-dynamic\"\n",
            repo.display().to_string()
        ))
        .unwrap();
        let c = file.resolve().unwrap();
        let ids: Vec<&str> = c.models.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(
            ids,
            ["embedder", "small-lm"],
            "folders without config.json are skipped"
        );
        assert_eq!(
            c.models[0].quant.quantize,
            Quantize::Int8Dynamic,
            "server-wide default"
        );
        assert_eq!(
            c.models[1].quant.quantize,
            Quantize::None,
            "the folder's own wins"
        );
        assert_eq!(c.models[1].max_batch_sequences, 4);
        std::fs::write(repo.join("lm/kiln.toml"), "port = 9000\n").unwrap();
        let server_key = RawServeConfig {
            server: RawServerSettings {
                model_repository: Some(repo.clone()),
                ..Default::default()
            },
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            server_key.contains("`port` is a server setting"),
            "{server_key}"
        );
        std::fs::remove_dir_all(&repo).unwrap();
    }

    #[test]
    fn keys_are_unique_across_groups() {
        let mut keys: Vec<&str> = RawServeConfig::keys().collect();
        let n = keys.len();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), n, "a key in both groups would be read twice");
    }
}
