//! Serving configuration in two stages.
//!
//! 1. [`RawServeConfig`]: every setting optional, as it arrives from one source — command-line
//!    flags (clap fills `KILN_*` environment variables in the same struct) or a TOML config file
//!    (`--config`, same names in snake_case).
//! 2. [`ServeConfig`]: the one resolved and validated config the server runs with. Precedence is
//!    flag > environment variable > config file > default; cross-field rules are checked once,
//!    with messages that name the setting.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use kiln_engine::compile::CompileOptions;
use kiln_engine::{DeviceChoice, LayerFilter, MathMode, QuantOptions, Quantize, SdpaKernelChoice};
use kiln_models::BatchLayout;
use serde::Deserialize;

/// Settings from one source, all optional. Field names are the TOML keys; the CLI flags are the
/// same names in kebab-case.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServeConfig {
    pub model: Option<PathBuf>,
    pub model_id: Option<String>,
    pub device: Option<String>,
    pub sdpa_kernel: Option<String>,
    pub batch_layout: Option<String>,
    /// `none`, `int8-dynamic` or `int8-static`.
    pub quantize: Option<String>,
    /// The calibration file for `int8-static` (default `<model>/kiln-quant.json`).
    pub quantize_scales: Option<PathBuf>,
    /// Layers to quantize (globs on layer names; default all).
    pub quantize_layers: Option<Vec<String>>,
    /// Layers to keep in f32 (globs on layer names).
    pub quantize_skip: Option<Vec<String>>,
    /// `precise` or `bf16-fast`.
    pub math_mode: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub grpc_port: Option<u16>,
    pub grpc_max_message_size: Option<usize>,
    pub max_batch_tokens: Option<usize>,
    pub max_batch_requests: Option<usize>,
    pub max_batch_sequences: Option<usize>,
    pub max_concurrent_requests: Option<usize>,
    /// A duration such as `"2ms"`.
    pub max_queue_delay: Option<String>,
    pub max_client_batch_size: Option<usize>,
    pub max_input_tokens: Option<usize>,
    pub truncate: Option<bool>,
    /// A duration such as `"30s"`.
    pub request_timeout: Option<String>,
    pub shutdown_timeout: Option<String>,
    pub payload_limit: Option<usize>,
    pub api_keys: Option<Vec<String>>,
    pub api_keys_file: Option<PathBuf>,
    /// The plan-cache folder (default: `$KILN_CACHE_DIR`, else the per-user cache folder).
    pub cache_dir: Option<PathBuf>,
    /// `false` compiles at every start and never touches the cache.
    pub plan_cache: Option<bool>,
    /// `true` turns the fusion passes off.
    pub no_fuse: Option<bool>,
    /// Compiler passes to turn off, comma-separated (e.g. `"qkv,bias-act"`).
    pub disable_passes: Option<String>,
    // Generation (causal LMs).
    pub max_batch_total_tokens: Option<usize>,
    pub max_batch_prefill_tokens: Option<usize>,
    pub max_waiting_tokens: Option<usize>,
    pub waiting_served_ratio: Option<f32>,
    pub kv_block_size: Option<usize>,
    pub chat_template: Option<PathBuf>,
}

impl RawServeConfig {
    /// Reads a TOML config file; unknown keys are errors (a typo must not be silently ignored).
    pub fn from_toml_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }

    /// `self` where set, else `fallback` (flags and env over the file).
    pub fn or(self, fallback: RawServeConfig) -> RawServeConfig {
        RawServeConfig {
            model: self.model.or(fallback.model),
            model_id: self.model_id.or(fallback.model_id),
            device: self.device.or(fallback.device),
            sdpa_kernel: self.sdpa_kernel.or(fallback.sdpa_kernel),
            batch_layout: self.batch_layout.or(fallback.batch_layout),
            quantize: self.quantize.or(fallback.quantize),
            quantize_scales: self.quantize_scales.or(fallback.quantize_scales),
            quantize_layers: self.quantize_layers.or(fallback.quantize_layers),
            quantize_skip: self.quantize_skip.or(fallback.quantize_skip),
            math_mode: self.math_mode.or(fallback.math_mode),
            host: self.host.or(fallback.host),
            port: self.port.or(fallback.port),
            grpc_port: self.grpc_port.or(fallback.grpc_port),
            grpc_max_message_size: self
                .grpc_max_message_size
                .or(fallback.grpc_max_message_size),
            max_batch_tokens: self.max_batch_tokens.or(fallback.max_batch_tokens),
            max_batch_requests: self.max_batch_requests.or(fallback.max_batch_requests),
            max_batch_sequences: self.max_batch_sequences.or(fallback.max_batch_sequences),
            max_concurrent_requests: self
                .max_concurrent_requests
                .or(fallback.max_concurrent_requests),
            max_queue_delay: self.max_queue_delay.or(fallback.max_queue_delay),
            max_client_batch_size: self
                .max_client_batch_size
                .or(fallback.max_client_batch_size),
            max_input_tokens: self.max_input_tokens.or(fallback.max_input_tokens),
            truncate: self.truncate.or(fallback.truncate),
            request_timeout: self.request_timeout.or(fallback.request_timeout),
            shutdown_timeout: self.shutdown_timeout.or(fallback.shutdown_timeout),
            payload_limit: self.payload_limit.or(fallback.payload_limit),
            api_keys: self.api_keys.or(fallback.api_keys),
            api_keys_file: self.api_keys_file.or(fallback.api_keys_file),
            cache_dir: self.cache_dir.or(fallback.cache_dir),
            plan_cache: self.plan_cache.or(fallback.plan_cache),
            no_fuse: self.no_fuse.or(fallback.no_fuse),
            disable_passes: self.disable_passes.or(fallback.disable_passes),
            max_batch_total_tokens: self
                .max_batch_total_tokens
                .or(fallback.max_batch_total_tokens),
            max_batch_prefill_tokens: self
                .max_batch_prefill_tokens
                .or(fallback.max_batch_prefill_tokens),
            max_waiting_tokens: self.max_waiting_tokens.or(fallback.max_waiting_tokens),
            waiting_served_ratio: self.waiting_served_ratio.or(fallback.waiting_served_ratio),
            kv_block_size: self.kv_block_size.or(fallback.kv_block_size),
            chat_template: self.chat_template.or(fallback.chat_template),
        }
    }

    /// Applies defaults and validates: the second stage.
    pub fn resolve(self) -> Result<ServeConfig, String> {
        let model_dir = self
            .model
            .ok_or("--model (KILN_MODEL, or `model` in the config file) is required")?;
        let mut config = ServeConfig::for_model(model_dir);
        if let Some(id) = self.model_id {
            config.model_id = id;
        }
        if let Some(d) = self.device {
            config.device = DeviceChoice::from_str(&d).map_err(|e| format!("--device: {e}"))?;
        }
        if let Some(k) = self.sdpa_kernel {
            config.sdpa_kernel = parse_sdpa(&k).map_err(|e| format!("--sdpa-kernel: {e}"))?;
        }
        if let Some(l) = self.batch_layout {
            config.batch_layout =
                BatchLayout::from_str(&l).map_err(|e| format!("--batch-layout: {e}"))?;
        }
        if let Some(q) = self.quantize {
            config.quant.quantize =
                Quantize::from_str(&q).map_err(|e| format!("--quantize: {e}"))?;
        }
        if let Some(m) = self.math_mode {
            config.quant.math_mode =
                MathMode::from_str(&m).map_err(|e| format!("--math-mode: {e}"))?;
        }
        config.quant.layers = LayerFilter {
            allow: self.quantize_layers.unwrap_or_default(),
            deny: self.quantize_skip.unwrap_or_default(),
        };
        config.quantize_scales = self.quantize_scales;
        if let Some(h) = self.host {
            config.host = h;
        }
        if let Some(p) = self.port {
            config.port = p;
        }
        if let Some(p) = self.grpc_port {
            config.grpc_port = p;
        }
        macro_rules! take {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { config.$field = v; } )* };
        }
        take!(
            max_batch_tokens,
            max_batch_requests,
            max_batch_sequences,
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
        config.chat_template = self.chat_template;
        config.max_input_tokens = self.max_input_tokens;
        if let Some(t) = self.truncate {
            config.auto_truncate = t;
        }
        if let Some(d) = self.max_queue_delay {
            config.max_queue_delay =
                parse_duration(&d).map_err(|e| format!("--max-queue-delay: {e}"))?;
        }
        if let Some(d) = self.request_timeout {
            config.request_timeout =
                parse_duration(&d).map_err(|e| format!("--request-timeout: {e}"))?;
        }
        if let Some(d) = self.shutdown_timeout {
            config.shutdown_timeout =
                parse_duration(&d).map_err(|e| format!("--shutdown-timeout: {e}"))?;
        }
        config.api_keys = self.api_keys.unwrap_or_default();
        config.api_keys_file = self.api_keys_file;
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
            _ => self.cache_dir.or_else(kiln_engine::cache::default_dir),
        };
        config.validate()
    }
}

/// The largest gRPC message tritonclient and gRPC implementations accept: 2 GiB - 1.
pub const MAX_GRPC_MESSAGE_SIZE: usize = i32::MAX as usize;

/// The resolved, validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model_dir: PathBuf,
    /// The name clients see in `/v1/models`, `/v2/models/{name}`, responses and `/info`.
    pub model_id: String,
    pub device: DeviceChoice,
    pub sdpa_kernel: SdpaKernelChoice,
    /// Packed (padding-free, varlen attention) or padded engine batches.
    pub batch_layout: BatchLayout,
    /// int8 quantization, its layer filter, and the math mode.
    pub quant: QuantOptions,
    /// The calibration file for `int8-static` (default `<model>/kiln-quant.json`).
    pub quantize_scales: Option<PathBuf>,
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
    /// Most sequences in one engine call.
    pub max_batch_sequences: usize,
    /// Requests admitted at once (tokenizing, queued or running); beyond this, 429 at once.
    pub max_concurrent_requests: usize,
    /// How long the queue waits for more requests before it runs a batch that is not full
    /// while the backend is idle. Zero runs every batch as soon as the backend is free.
    pub max_queue_delay: Duration,
    /// Most inputs one request may carry (413 beyond).
    pub max_client_batch_size: usize,
    /// Longest input in tokens (special tokens included); `None`: the model's own limit.
    pub max_input_tokens: Option<usize>,
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
    /// Which compiler passes run.
    pub compile: CompileOptions,
    /// The plan-cache folder; `None`: compile at every start.
    pub cache_dir: Option<PathBuf>,
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
}

impl ServeConfig {
    /// Checks the cross-field rules that flags alone cannot express.
    pub fn validate(self) -> Result<Self, String> {
        for (name, v) in [
            ("max-batch-tokens", self.max_batch_tokens),
            ("max-batch-requests", self.max_batch_requests),
            ("max-batch-sequences", self.max_batch_sequences),
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
        if let Some(n) = self.max_input_tokens {
            if n < 2 {
                return Err(
                    "--max-input-tokens must be at least 2 (room for [CLS] and [SEP])".into(),
                );
            }
            if n > self.max_batch_tokens {
                return Err(format!(
                    "--max-batch-tokens ({}) must be at least --max-input-tokens ({n}): a batch must hold the longest input",
                    self.max_batch_tokens
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
        if self.model_id.trim().is_empty() || self.model_id.contains('/') {
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
        if self.api_keys.iter().any(|k| k.trim().is_empty()) {
            return Err("--api-key must not be empty".into());
        }
        Ok(self)
    }

    /// A config for tests: the given model folder with every default.
    pub fn for_model(model_dir: PathBuf) -> Self {
        let model_id = model_dir
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
        Self {
            model_dir,
            model_id,
            device: DeviceChoice::Auto,
            sdpa_kernel: SdpaKernelChoice::Auto,
            batch_layout: BatchLayout::Packed,
            quant: QuantOptions::default(),
            quantize_scales: None,
            host: "0.0.0.0".into(),
            port: 8080,
            grpc_port: 8081,
            grpc_max_message_size: 64 * 1024 * 1024,
            max_batch_tokens: 8192,
            max_batch_requests: 64,
            max_batch_sequences: 64,
            max_concurrent_requests: 512,
            max_queue_delay: Duration::from_millis(2),
            max_client_batch_size: 256,
            max_input_tokens: None,
            auto_truncate: true,
            request_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
            payload_limit: 2 * 1024 * 1024,
            api_keys: Vec::new(),
            api_keys_file: None,
            compile: CompileOptions::default(),
            cache_dir: None,
            max_batch_total_tokens: 16384,
            max_batch_prefill_tokens: 4096,
            max_waiting_tokens: 20,
            waiting_served_ratio: 1.2,
            kv_block_size: 16,
            chat_template: None,
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file: RawServeConfig = toml::from_str(
            "model = \"m\"\nmax_batch_tokens = 1000\nmax_queue_delay = \"5ms\"\nport = 9000\n",
        )
        .unwrap();
        let flags = RawServeConfig {
            port: Some(7000),
            ..Default::default()
        };
        let c = flags.or(file).resolve().unwrap();
        assert_eq!(c.port, 7000);
        assert_eq!(c.max_batch_tokens, 1000);
        assert_eq!(c.max_queue_delay, Duration::from_millis(5));
        assert_eq!(c.max_batch_requests, 64);
    }

    #[test]
    fn the_example_config_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/kiln.toml");
        let c = RawServeConfig::from_toml_file(&path)
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(c.model_id, "all-MiniLM-L6-v2");
        assert_eq!(c.max_queue_delay, Duration::from_millis(2));
    }

    #[test]
    fn plan_cache_and_pass_settings_resolve() {
        let file: RawServeConfig = toml::from_str(
            "model = \"m\"\ncache_dir = \"/tmp/kiln-plans\"\ndisable_passes = \"qkv\"\n",
        )
        .unwrap();
        let c = file.clone().resolve().unwrap();
        assert_eq!(c.cache_dir.as_deref(), Some(Path::new("/tmp/kiln-plans")));
        assert!(!c.compile.enabled(kiln_engine::compile::PassId::QkvMerge));
        assert!(c.compile.enabled(kiln_engine::compile::PassId::BiasAct));
        let flags = RawServeConfig {
            plan_cache: Some(false),
            no_fuse: Some(true),
            ..Default::default()
        };
        let c = flags.or(file).resolve().unwrap();
        assert_eq!(c.cache_dir, None, "plan_cache = false turns the cache off");
        assert!(!c.compile.enabled(kiln_engine::compile::PassId::BiasAct));
        let bad = RawServeConfig {
            model: Some("m".into()),
            disable_passes: Some("qkv,nope".into()),
            ..Default::default()
        };
        assert!(bad.resolve().unwrap_err().contains("unknown pass `nope`"));
    }

    #[test]
    fn quantization_settings_from_the_file_and_flags() {
        let file: RawServeConfig = toml::from_str(
            "model = \"m\"\nquantize = \"int8-dynamic\"\nquantize_skip = [\"*.output.dense\"]\nmath_mode = \"bf16-fast\"\n",
        )
        .unwrap();
        let c = RawServeConfig::default()
            .or(file.clone())
            .resolve()
            .unwrap();
        assert_eq!(c.quant.quantize, Quantize::Int8Dynamic);
        assert_eq!(c.quant.math_mode, MathMode::Bf16Fast);
        assert_eq!(c.quant.layers.deny, vec!["*.output.dense".to_string()]);
        let flags = RawServeConfig {
            quantize: Some("int8-static".into()),
            quantize_scales: Some("s.json".into()),
            ..Default::default()
        };
        let c = flags.or(file.clone()).resolve().unwrap();
        assert_eq!(c.quant.quantize, Quantize::Int8Static);
        assert_eq!(c.quantize_scales, Some(PathBuf::from("s.json")));
        let bad = RawServeConfig {
            quantize: Some("int4".into()),
            ..Default::default()
        };
        assert!(
            bad.or(file.clone())
                .resolve()
                .unwrap_err()
                .contains("--quantize")
        );
        let skip_alone = RawServeConfig {
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
        assert!(toml::from_str::<RawServeConfig>("max_batch_tokenz = 3").is_err());
        let raw = RawServeConfig {
            model: Some("m".into()),
            max_input_tokens: Some(512),
            max_batch_tokens: Some(256),
            ..Default::default()
        };
        assert!(raw.resolve().unwrap_err().contains("--max-batch-tokens"));
        let same_ports = RawServeConfig {
            model: Some("m".into()),
            port: Some(9000),
            grpc_port: Some(9000),
            ..Default::default()
        };
        assert!(same_ports.resolve().unwrap_err().contains("--grpc-port"));
        let huge = RawServeConfig {
            model: Some("m".into()),
            grpc_max_message_size: Some(MAX_GRPC_MESSAGE_SIZE + 1),
            ..Default::default()
        };
        assert!(huge.resolve().unwrap_err().contains("2 GiB"));
    }
}
