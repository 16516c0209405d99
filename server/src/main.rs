//! The `kiln` command line: `serve`, `embed`, `bench`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use clap::{Args, Parser, Subcommand};
use kiln_engine::compile::CompileOptions;
use kiln_engine::{DeviceChoice, SdpaKernelChoice};
use kiln_models::{BatchLayout, EmbedOptions, Encoded, EncoderModel, LoadOptions, TextInput};
use kiln_server::{AppState, RawServeConfig, ServeConfig, app, grpc};

/// kiln: a transformer inference server.
///
/// Loads a Hugging Face model folder (config.json, model.safetensors, tokenizer.json and the
/// sentence-transformers files) and serves it over HTTP and gRPC.
///
/// Get the default model with `scripts/fetch-model.sh`, then:
///   kiln serve --model models/local/all-MiniLM-L6-v2
///   curl localhost:8080/v1/embeddings -H 'content-type: application/json' -d '{"input": "hello"}'
#[derive(Parser)]
#[command(name = "kiln", version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model over HTTP (OpenAI, KServe v2 and TEI-style routes, /metrics, /health) and
    /// gRPC (KServe v2, grpc.health.v1, reflection).
    Serve(Box<ServeArgs>),
    /// Embed texts and print the vectors as JSON.
    Embed(EmbedArgs),
    /// Measure forward throughput (tokens/s) at given batch×sequence shapes.
    Bench(BenchArgs),
    /// Compile a model ahead of time into the plan cache, and say what the compiler did.
    Compile(CompileArgs),
    /// Measure load time: cold (empty plan cache) against warm (plan in the cache).
    BenchLoad(BenchLoadArgs),
    /// List or clear the plan cache.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
        #[command(flatten)]
        dir: CacheDirArgs,
    },
    /// Measure generation with a causal LM: time to first token and decode tokens/s at given
    /// batch sizes (random prompt ids, greedy, EOS ignored).
    BenchGenerate(BenchGenerateArgs),
    /// Exit 0 if a `kiln serve` on this machine answers /health with 200 (the container
    /// image's HEALTHCHECK), else print why and exit 1.
    Health(HealthArgs),
    /// Calibrate static int8 quantization on a set of texts and write the scales file that
    /// `--quantize int8-static` reads.
    Quantize(QuantizeArgs),
    /// List the GPU adapters this kiln can use (`--device wgpu:N`), with their limits, and say
    /// what `--device auto` would pick and why.
    Devices,
}

#[derive(Subcommand)]
enum CacheAction {
    /// One line per compiled plan: key, size, age, model, options.
    Ls,
    /// Remove every compiled plan (running servers keep the plans they have loaded).
    Clear,
}

#[derive(Args)]
struct CacheDirArgs {
    /// Plan-cache folder [default: $KILN_CACHE_DIR, else the per-user cache folder].
    #[arg(long, env = "KILN_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

impl CacheDirArgs {
    fn resolve(&self) -> Result<PathBuf> {
        self.cache_dir
            .clone()
            .or_else(kiln_engine::cache::default_dir)
            .ok_or_else(|| anyhow!("no cache folder: set --cache-dir or KILN_CACHE_DIR"))
    }
}

/// Compiler switches shared by every command that loads a model.
#[derive(Args)]
struct PassArgs {
    /// Turn the fusion passes off (sdpa, qkv, bias-act, add-norm), to measure what they do.
    #[arg(long, env = "KILN_NO_FUSE")]
    no_fuse: bool,
    /// Compiler passes to turn off, comma-separated: dce, fold, sdpa, qkv, bias-act, add-norm,
    /// kernels, prepack (or `all`, `fuse`).
    #[arg(long, env = "KILN_DISABLE_PASS", value_name = "PASSES")]
    disable_pass: Option<String>,
}

impl PassArgs {
    fn options(&self) -> Result<CompileOptions> {
        let mut o = if self.no_fuse {
            CompileOptions::no_fuse()
        } else {
            CompileOptions::default()
        };
        if let Some(list) = &self.disable_pass {
            o.disable(list)
                .map_err(|e| anyhow!("--disable-pass: {e}"))?;
        }
        Ok(o)
    }
}

#[derive(Args)]
struct BenchLoadArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Cold and warm loads to time (medians are printed).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

#[derive(Args)]
struct CompileArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Print what each pass did: ops before and after, fused groups, chosen kernels with
    /// reasons, memory plan size.
    #[arg(long)]
    explain: bool,
}

#[derive(Args)]
struct BenchGenerateArgs {
    /// Causal LM folder in the Hugging Face layout.
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated batch sizes (requests submitted together).
    #[arg(long, default_value = "1,8")]
    batch: String,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Timed repetitions per batch size (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Attention kernel: auto, flash, mem_efficient or math.
    #[arg(long, default_value = "auto")]
    sdpa_kernel: SdpaKernelChoice,
}

#[derive(Args)]
struct HealthArgs {
    /// Address to ask (the server's --host may be 0.0.0.0, which is not one to connect to).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The server's HTTP port.
    #[arg(long, env = "KILN_PORT", default_value_t = 8080)]
    port: u16,
    /// Give up after this long, e.g. `3s`.
    #[arg(long, default_value = "5s")]
    timeout: String,
}

#[derive(Args)]
struct ModelArgs {
    /// Model folder in the Hugging Face layout.
    #[arg(long, env = "KILN_MODEL")]
    model: PathBuf,
    /// Where to run: `auto` (a GPU that passes a self-test, else the CPU), `cpu` (kiln's
    /// kernels), `wgpu` / `wgpu:N` (a GPU adapter; `kiln devices` lists them) or `burn-flex`
    /// (burn's CPU backend).
    #[arg(long, env = "KILN_DEVICE", default_value = "auto")]
    device: DeviceChoice,
    /// Attention kernel: `auto` (the selector picks per input), `flash`, `mem_efficient` or
    /// `math`. A forced kernel that cannot run the model fails at load, naming the constraint.
    #[arg(long, env = "KILN_SDPA_KERNEL", default_value = "auto")]
    sdpa_kernel: SdpaKernelChoice,
    /// Batch layout: `packed` (padding-free, varlen attention) or `padded`.
    #[arg(long, env = "KILN_BATCH_LAYOUT", default_value = "packed")]
    batch_layout: BatchLayout,
    /// Truncate inputs at this many tokens instead of the model's max_seq_length.
    #[arg(long, env = "KILN_MAX_SEQ_LENGTH")]
    max_seq_length: Option<usize>,
    /// Most sequences per engine call; larger requests are split into length-sorted batches.
    #[arg(long, env = "KILN_MAX_BATCH_SEQUENCES", default_value_t = 32)]
    max_batch_sequences: usize,
    #[command(flatten)]
    passes: PassArgs,
    #[command(flatten)]
    cache: CacheDirArgs,
    /// Compile at every load; never read or write the plan cache.
    #[arg(long, env = "KILN_NO_PLAN_CACHE")]
    no_plan_cache: bool,
    #[command(flatten)]
    quant: QuantArgs,
}

/// Quantization and math-mode flags (shared by every command that loads a model).
#[derive(Args)]
struct QuantArgs {
    /// Linear layers in int8: `none`, `int8-dynamic` (per-token activation scales at run time)
    /// or `int8-static` (per-tensor scales from `kiln quantize`). [default: none]
    #[arg(long, env = "KILN_QUANTIZE")]
    quantize: Option<String>,
    /// The calibration file for int8-static. [default: <model>/kiln-quant.json]
    #[arg(long, env = "KILN_QUANTIZE_SCALES")]
    quantize_scales: Option<PathBuf>,
    /// Only these layers are quantized (comma-separated globs on layer names, e.g.
    /// `encoder.layer.*`). [default: all]
    #[arg(long, env = "KILN_QUANTIZE_LAYERS", value_delimiter = ',')]
    quantize_layers: Vec<String>,
    /// Layers kept in f32 (comma-separated globs, e.g. `*.output.dense,classifier`).
    #[arg(long, env = "KILN_QUANTIZE_SKIP", value_delimiter = ',')]
    quantize_skip: Vec<String>,
    /// `precise` (f32) or `bf16-fast` (linear weights in bf16, inputs rounded to bf16, f32
    /// accumulation). [default: precise]
    #[arg(long, env = "KILN_MATH_MODE")]
    math_mode: Option<String>,
}

impl QuantArgs {
    /// The flags as a stage-one config (validated by `RawServeConfig::resolve`).
    fn raw(&self) -> RawServeConfig {
        RawServeConfig {
            quantize: self.quantize.clone(),
            quantize_scales: self.quantize_scales.clone(),
            quantize_layers: (!self.quantize_layers.is_empty())
                .then(|| self.quantize_layers.clone()),
            quantize_skip: (!self.quantize_skip.is_empty()).then(|| self.quantize_skip.clone()),
            math_mode: self.math_mode.clone(),
            ..RawServeConfig::default()
        }
    }
}

/// `kiln serve` flags. Every one is optional here: unset flags fall back to the `KILN_*`
/// environment variable (clap), then to the `--config` file, then to the default.
#[derive(Args)]
struct ServeArgs {
    /// TOML config file with the same settings in snake_case (flags and env vars win over it).
    #[arg(long, env = "KILN_CONFIG")]
    config: Option<PathBuf>,
    /// Model folder in the Hugging Face layout.
    #[arg(long, env = "KILN_MODEL")]
    model: Option<PathBuf>,
    /// Where to run: `auto` (a GPU that passes a self-test, else the CPU), `cpu` (kiln's
    /// kernels), `wgpu` / `wgpu:N` (a GPU adapter; `kiln devices` lists them) or `burn-flex`
    /// (burn's CPU backend). [default: auto]
    #[arg(long, env = "KILN_DEVICE")]
    device: Option<String>,
    /// Attention kernel: `auto` (the selector picks per input), `flash`, `mem_efficient` or
    /// `math`; a forced kernel that cannot run the model fails at load. [default: auto]
    #[arg(long, env = "KILN_SDPA_KERNEL")]
    sdpa_kernel: Option<String>,
    /// Engine batches: `packed` (padding-free, varlen attention) or `padded`. [default: packed]
    #[arg(long, env = "KILN_BATCH_LAYOUT")]
    batch_layout: Option<String>,
    #[command(flatten)]
    quant: QuantArgs,
    /// Name clients see (default: the model folder's name).
    #[arg(long, env = "KILN_MODEL_ID")]
    model_id: Option<String>,
    /// [default: 0.0.0.0]
    #[arg(long, env = "KILN_HOST")]
    host: Option<String>,
    /// HTTP port. [default: 8080]
    #[arg(long, env = "KILN_PORT")]
    port: Option<u16>,
    /// gRPC port (KServe v2 `inference.GRPCInferenceService`, grpc.health.v1, reflection), on
    /// the same host address. [default: 8081]
    #[arg(long, env = "KILN_GRPC_PORT")]
    grpc_port: Option<u16>,
    /// Largest gRPC message received or sent, in bytes (RESOURCE_EXHAUSTED beyond; at most
    /// 2147483647). [default: 67108864]
    #[arg(long, env = "KILN_GRPC_MAX_MESSAGE_SIZE")]
    grpc_max_message_size: Option<usize>,
    /// Token budget of one batch (requests join a batch while their tokens fit). [default: 8192]
    #[arg(long, env = "KILN_MAX_BATCH_TOKENS")]
    max_batch_tokens: Option<usize>,
    /// Most requests in one batch. [default: 64]
    #[arg(long, env = "KILN_MAX_BATCH_REQUESTS")]
    max_batch_requests: Option<usize>,
    /// Most sequences in one engine call. [default: 64]
    #[arg(long, env = "KILN_MAX_BATCH_SEQUENCES")]
    max_batch_sequences: Option<usize>,
    /// Requests in progress at once; beyond, 429 with Retry-After at once. [default: 512]
    #[arg(long, env = "KILN_MAX_CONCURRENT_REQUESTS")]
    max_concurrent_requests: Option<usize>,
    /// Longest wait for more requests before an idle backend runs a batch that is not full,
    /// e.g. `2ms`, `0`. [default: 2ms]
    #[arg(long, env = "KILN_MAX_QUEUE_DELAY")]
    max_queue_delay: Option<String>,
    /// Most inputs in one request (413 beyond). [default: 256]
    #[arg(long, env = "KILN_MAX_CLIENT_BATCH_SIZE")]
    max_client_batch_size: Option<usize>,
    /// Longest input in tokens (default: the model's max_seq_length).
    #[arg(long, env = "KILN_MAX_INPUT_TOKENS", alias = "max-seq-length")]
    max_input_tokens: Option<usize>,
    /// Truncate inputs over --max-input-tokens (`true`) or refuse them with 422 (`false`); a
    /// request's `truncate` wins. [default: true]
    #[arg(long, env = "KILN_TRUNCATE")]
    truncate: Option<bool>,
    /// Same as `--truncate false`.
    #[arg(long, env = "KILN_NO_AUTO_TRUNCATE", conflicts_with = "truncate")]
    no_auto_truncate: bool,
    /// A request not answered by then gets 504, e.g. `30s`. [default: 60s]
    #[arg(long, env = "KILN_REQUEST_TIMEOUT")]
    request_timeout: Option<String>,
    /// After SIGTERM, how long in-flight requests may run before the server exits anyway
    /// (what is left is answered 503 or cut off), e.g. `10s`. [default: 30s]
    #[arg(long, env = "KILN_SHUTDOWN_TIMEOUT")]
    shutdown_timeout: Option<String>,
    /// Largest request body in bytes, after gzip decompression (413 beyond). [default: 2097152]
    #[arg(long, env = "KILN_PAYLOAD_LIMIT")]
    payload_limit: Option<usize>,
    /// API key required as `Authorization: Bearer <key>` (repeatable; comma-separated in the
    /// env var). Health and metrics stay open.
    #[arg(
        long = "api-key",
        env = "KILN_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// File with one API key per line (`#` comments), re-read when it changes.
    #[arg(long, env = "KILN_API_KEYS_FILE")]
    api_keys_file: Option<PathBuf>,
    /// Causal LMs: tokens the paged KV cache holds across running requests (each reserves its
    /// prompt plus max_tokens when it joins the batch). [default: 16384]
    #[arg(long, env = "KILN_MAX_BATCH_TOTAL_TOKENS")]
    max_batch_total_tokens: Option<usize>,
    /// Causal LMs: prompt tokens prefilled per step; longer prompts run in chunks.
    /// [default: 4096]
    #[arg(long, env = "KILN_MAX_BATCH_PREFILL_TOKENS")]
    max_batch_prefill_tokens: Option<usize>,
    /// Causal LMs: steps a waiting request may be held back while a batch runs. [default: 20]
    #[arg(long, env = "KILN_MAX_WAITING_TOKENS")]
    max_waiting_tokens: Option<usize>,
    /// Causal LMs: waiting requests join at once when they reach this many times the running
    /// ones. [default: 1.2]
    #[arg(long, env = "KILN_WAITING_SERVED_RATIO")]
    waiting_served_ratio: Option<f32>,
    /// Causal LMs: tokens per KV cache block. [default: 16]
    #[arg(long, env = "KILN_KV_BLOCK_SIZE")]
    kv_block_size: Option<usize>,
    /// Causal LMs: a Jinja chat template file (overrides the model folder's).
    #[arg(long, env = "KILN_CHAT_TEMPLATE")]
    chat_template: Option<PathBuf>,
    /// Log format: `text` or `json`. [default: text]
    #[arg(long, env = "KILN_LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// Plan-cache folder [default: $KILN_CACHE_DIR, else the per-user cache folder].
    #[arg(long, env = "KILN_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Compile at every start; never read or write the plan cache.
    #[arg(long, env = "KILN_NO_PLAN_CACHE")]
    no_plan_cache: bool,
    /// Turn the compiler's fusion passes off (sdpa, qkv, bias-act, add-norm).
    #[arg(long, env = "KILN_NO_FUSE")]
    no_fuse: bool,
    /// Compiler passes to turn off, comma-separated (see `kiln compile --help`).
    #[arg(long, env = "KILN_DISABLE_PASS", value_name = "PASSES")]
    disable_pass: Option<String>,
}

#[derive(Args)]
struct QuantizeArgs {
    /// Model folder in the Hugging Face layout.
    #[arg(long, env = "KILN_MODEL")]
    model: PathBuf,
    /// Calibration texts, one per line: a JSON string or an object with a `text` field.
    #[arg(long)]
    calibrate: PathBuf,
    /// Observer: `minmax` (the default: BERT's outlier channels need their full range) or
    /// `percentile` (99.99%) / `percentile:P`.
    #[arg(long, default_value = "minmax")]
    observer: String,
    /// Where to write the scales. [default: <model>/kiln-quant.json]
    #[arg(long)]
    out: Option<PathBuf>,
    /// Most sequences per calibration batch.
    #[arg(long, default_value_t = 32)]
    max_batch_sequences: usize,
}

#[derive(Args)]
struct EmbedArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Texts to embed.
    #[arg(required = true)]
    texts: Vec<String>,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated batch×seq shapes, every position a real token. `BxLO-HI` is a
    /// mixed-length batch: B sequences with lengths spread evenly from LO to HI (where padded
    /// and packed layouts differ).
    #[arg(long, default_value = "1x16,8x16,32x128")]
    shapes: String,
    /// Timed repetitions per shape (after one warm-up run).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Stop a shape early after this many seconds of timed runs.
    #[arg(long, default_value_t = 20.0)]
    max_seconds: f64,
}

impl ModelArgs {
    fn load_options(&self) -> Result<LoadOptions> {
        let raw = RawServeConfig {
            model: Some(self.model.clone()),
            ..self.quant.raw()
        };
        let resolved = raw.resolve().map_err(|e| anyhow!(e))?;
        Ok(LoadOptions {
            device: self.device,
            exec: kiln_engine::ExecOptions {
                sdpa_kernel: self.sdpa_kernel,
                quant: resolved.quant,
            },
            max_batch_sequences: self.max_batch_sequences,
            max_seq_length: self.max_seq_length,
            layout: self.batch_layout,
            compile: self.passes.options()?,
            cache_dir: if self.no_plan_cache {
                None
            } else {
                self.cache
                    .cache_dir
                    .clone()
                    .or_else(kiln_engine::cache::default_dir)
            },
            quantize_scales: resolved.quantize_scales,
        })
    }

    fn load(&self) -> Result<EncoderModel> {
        EncoderModel::load(&self.model, &self.load_options()?).map_err(|e| anyhow!("{e}"))
    }
}

impl ServeArgs {
    /// Stage one (flags and env over the config file) into stage two (the validated config).
    fn resolve(self) -> Result<(ServeConfig, SocketAddr, SocketAddr)> {
        let file = match &self.config {
            Some(path) => RawServeConfig::from_toml_file(path).map_err(|e| anyhow!(e))?,
            None => RawServeConfig::default(),
        };
        let quant = self.quant.raw();
        let flags = RawServeConfig {
            model: self.model,
            model_id: self.model_id,
            device: self.device,
            sdpa_kernel: self.sdpa_kernel,
            batch_layout: self.batch_layout,
            host: self.host,
            port: self.port,
            grpc_port: self.grpc_port,
            grpc_max_message_size: self.grpc_max_message_size,
            max_batch_tokens: self.max_batch_tokens,
            max_batch_requests: self.max_batch_requests,
            max_batch_sequences: self.max_batch_sequences,
            max_concurrent_requests: self.max_concurrent_requests,
            max_queue_delay: self.max_queue_delay,
            max_client_batch_size: self.max_client_batch_size,
            max_input_tokens: self.max_input_tokens,
            truncate: if self.no_auto_truncate {
                Some(false)
            } else {
                self.truncate
            },
            request_timeout: self.request_timeout,
            shutdown_timeout: self.shutdown_timeout,
            payload_limit: self.payload_limit,
            api_keys: (!self.api_keys.is_empty()).then_some(self.api_keys),
            api_keys_file: self.api_keys_file,
            cache_dir: self.cache_dir,
            plan_cache: self.no_plan_cache.then_some(false),
            no_fuse: self.no_fuse.then_some(true),
            disable_passes: self.disable_pass,
            max_batch_total_tokens: self.max_batch_total_tokens,
            max_batch_prefill_tokens: self.max_batch_prefill_tokens,
            max_waiting_tokens: self.max_waiting_tokens,
            waiting_served_ratio: self.waiting_served_ratio,
            kv_block_size: self.kv_block_size,
            chat_template: self.chat_template,
            ..quant
        };
        let config = flags.or(file).resolve().map_err(|e| anyhow!(e))?;
        let addr = |port: u16| -> Result<SocketAddr> {
            format!("{}:{port}", config.host)
                .parse()
                .or_else(|_| format!("[{}]:{port}", config.host).parse())
                .with_context(|| format!("invalid --host {}", config.host))
        };
        let (http, grpc) = (addr(config.port)?, addr(config.grpc_port)?);
        Ok((config, http, grpc))
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let json_logs = matches!(&cli.command, Command::Serve(a) if a.log_format == "json");
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| "info,tower_http=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json_logs {
        logs.json().init();
    } else {
        logs.init();
    }
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Embed(args) => embed(args),
        Command::Bench(args) => bench(args),
        Command::Compile(args) => compile(args),
        Command::BenchLoad(args) => bench_load(args),
        Command::Cache { action, dir } => cache(action, &dir),
        Command::BenchGenerate(args) => bench_generate(args),
        Command::Health(args) => health(args),
        Command::Quantize(args) => quantize(args),
        Command::Devices => devices(),
    }
}

/// What `compile` and `bench-load` report of a loaded model, of either kind.
struct Loaded {
    id: String,
    device: String,
    load_time: Duration,
    /// Reading the tokenizer (measured separately for encoders only).
    tokenizer_time: Option<Duration>,
    plan: kiln_models::PlanInfo,
    /// One forward pass: a 1×16 batch for an encoder, a 16-token prefill for a decoder.
    forward: Box<dyn Fn() -> Result<()>>,
}

impl ModelArgs {
    /// Loads the folder as what it is: a causal LM, or an encoder.
    fn load_any(&self, opts: &LoadOptions) -> Result<Loaded> {
        let config = self.model.join("config.json");
        if config.is_file() && kiln_models::is_causal_lm(&config).map_err(|e| anyhow!("{e}"))? {
            let model = std::sync::Arc::new(
                kiln_models::CausalLm::load(&self.model, opts, None).map_err(|e| anyhow!("{e}"))?,
            );
            let i = model.info().clone();
            return Ok(Loaded {
                id: i.id,
                device: i.device,
                load_time: i.load_time,
                tokenizer_time: None,
                plan: i.plan,
                forward: Box::new(move || prefill_once(&model)),
            });
        }
        let model = EncoderModel::load(&self.model, opts).map_err(|e| anyhow!("{e}"))?;
        let i = model.info().clone();
        let probe = [Encoded {
            ids: vec![101; 16],
            type_ids: vec![0; 16],
            untruncated_len: 16,
        }];
        Ok(Loaded {
            id: i.id,
            device: i.device,
            load_time: i.load_time,
            tokenizer_time: Some(i.tokenizer_time),
            plan: i.plan,
            forward: Box::new(move || {
                model.run_batch(&probe).map_err(|e| anyhow!("{e}"))?;
                Ok(())
            }),
        })
    }
}

/// A 16-token prompt through a fresh generator, one token out.
fn prefill_once(model: &std::sync::Arc<kiln_models::CausalLm>) -> Result<()> {
    use kiln_models::{Event, GenerationLimits, GenerationRequest, Generator, SamplingParams};
    let mut g =
        Generator::new(model.clone(), GenerationLimits::default()).map_err(|e| anyhow!("{e}"))?;
    g.submit(GenerationRequest {
        prompt: (0..16).collect(),
        max_new_tokens: 1,
        sampling: SamplingParams::default(),
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        ignore_eos: true,
    })
    .map_err(|e| anyhow!("{e}"))?;
    for e in g.step() {
        if let Event::Failed { message, .. } = e {
            return Err(anyhow!("the prefill failed: {message}"));
        }
    }
    Ok(())
}

fn compile(args: CompileArgs) -> Result<()> {
    let info = args.model.load_any(&args.model.load_options()?)?;
    let plan = &info.plan;
    let cache = match (&plan.cache, &plan.key) {
        (kiln_models::CacheOutcome::Hit, Some(key)) => {
            format!(
                "already in the plan cache ({key}), read in {:.1} ms",
                ms(plan.cache_load_time)
            )
        }
        (kiln_models::CacheOutcome::Disabled, _) => "not stored (plan cache off)".into(),
        (outcome, key) => format!(
            "compiled in {:.1} ms; plan cache: {} {}",
            ms(plan.compile_time),
            outcome.as_str(),
            key.as_deref().unwrap_or("")
        ),
    };
    println!(
        "{} on {}: {cache}; loaded in {:.1} ms",
        info.id,
        info.device,
        ms(info.load_time)
    );
    if let Some(why) = plan.cache.trouble() {
        println!("  ({why})");
    }
    if args.explain {
        println!("\n{}", plan.report.explain());
    }
    Ok(())
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Loads the model `runs` times each way in this process, into a fresh plan-cache folder of its
/// own: without a cache, cold (the folder emptied first: build, compile, store) and warm (plan
/// read from the cache), each followed by one forward pass (an encoder's 1×16 batch, a decoder's
/// 16-token prefill; a warm plan's weights are mapped lazily, so the first pass pays for reading
/// them). Prints medians, with where the time went.
fn bench_load(args: BenchLoadArgs) -> Result<()> {
    let cache = std::env::temp_dir().join(format!("kiln-bench-load-{}", std::process::id()));
    let mut opts = args.model.load_options()?;
    let mut rows: Vec<(&str, Vec<[f64; 10]>)> =
        vec![("no cache", vec![]), ("cold", vec![]), ("warm", vec![])];
    for run in 0..args.runs.max(1) {
        for (mode, samples) in rows.iter_mut() {
            opts.cache_dir = match *mode {
                "no cache" => None,
                _ => Some(cache.clone()),
            };
            if *mode == "cold" {
                let _ = std::fs::remove_dir_all(&cache);
            }
            let started = Instant::now();
            let model = args.model.load_any(&opts)?;
            let loaded = started.elapsed();
            let forward = Instant::now();
            (model.forward)()?;
            let forward = forward.elapsed();
            let p = &model.plan;
            let expected = match *mode {
                "no cache" => "disabled",
                "cold" => "miss",
                _ => "hit",
            };
            if p.cache.as_str() != expected {
                return Err(anyhow!(
                    "run {run}, {mode}: plan cache said {}",
                    p.cache.as_str()
                ));
            }
            samples.push([
                ms(loaded),
                ms(loaded + forward),
                model.tokenizer_time.map_or(f64::NAN, ms),
                ms(p.hash_time),
                ms(p.build_time),
                ms(p.compile_time),
                ms(p.store_time),
                ms(p.cache_load_time),
                ms(p.prepare_time),
                ms(forward),
            ]);
        }
    }
    let _ = std::fs::remove_dir_all(&cache);
    let median = |samples: &[[f64; 10]], k: usize| {
        let mut v: Vec<f64> = samples.iter().map(|s| s[k]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "model {} on {} ({}), {} runs each, medians in ms",
        args.model.model.display(),
        args.model.device,
        kiln_engine::CpuCaps::detect(),
        args.runs.max(1)
    );
    println!(
        "| load | load | load + 1st forward | tokenizer | key (stat/hash) | read weights + build graph | compile | store entry | read + verify entry | prepare | 1st forward (16 tokens) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (mode, samples) in &rows {
        let cells: Vec<String> = (0..10)
            .map(|k| match median(samples, k) {
                // A time the loader does not report separately (a decoder's tokenizer).
                v if v.is_nan() => "–".to_string(),
                v => format!("{v:.1}"),
            })
            .collect();
        println!("| {mode} | {} |", cells.join(" | "));
    }
    Ok(())
}

fn devices() -> Result<()> {
    println!("cpu: {}", kiln_engine::CpuCaps::detect());
    if !kiln_engine::gpu::compiled() {
        println!("wgpu: not compiled in (build with `--features wgpu`)");
    }
    for a in kiln_engine::gpu::adapters() {
        let l = &a.limits;
        println!(
            "wgpu:{}: {}\n  shader_f16 {}, max buffer {} MiB, max storage binding {} MiB, \
             workgroup storage {} KiB, {} invocations per workgroup",
            a.index,
            a.describe(),
            a.shader_f16,
            l.max_buffer_bytes >> 20,
            l.max_storage_buffer_binding_bytes >> 20,
            l.max_workgroup_storage_bytes >> 10,
            l.max_invocations_per_workgroup
        );
    }
    let (device, reason) = kiln_engine::DeviceChoice::Auto
        .resolve(true)
        .map_err(|e| anyhow!("{e}"))?;
    println!("auto -> {device}: {reason}");
    Ok(())
}

fn cache(action: CacheAction, dir: &CacheDirArgs) -> Result<()> {
    let dir = dir.resolve()?;
    let cache = kiln_engine::cache::PlanCache::open(&dir).map_err(|e| anyhow!("{e}"))?;
    match action {
        CacheAction::Ls => {
            let entries = cache.list().map_err(|e| anyhow!("{e}"))?;
            println!("plan cache {} ({} entries)", dir.display(), entries.len());
            let now = kiln_engine::cache::entry::now_unix();
            for e in entries {
                let mib = e.bytes as f64 / (1024.0 * 1024.0);
                match e.summary {
                    Ok(s) => {
                        let opts = &s.material.options;
                        let get = |k: &str| opts.get(k).map_or("?", String::as_str);
                        println!(
                            "{}  {mib:>8.1} MiB  {:>6} ago  {}  [{} {} {}; kiln {}]",
                            s.key,
                            age(now.saturating_sub(s.created_unix)),
                            s.model,
                            get("device"),
                            get("layout"),
                            get("passes"),
                            s.material.kiln_version
                        );
                    }
                    Err(why) => println!("{}  {mib:>8.1} MiB  unreadable: {why}", e.path.display()),
                }
            }
        }
        CacheAction::Clear => {
            let n = cache.clear().map_err(|e| anyhow!("{e}"))?;
            println!("removed {n} compiled plans from {}", dir.display());
        }
    }
    Ok(())
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    if !matches!(args.log_format.as_str(), "text" | "json") {
        return Err(anyhow!("--log-format must be `text` or `json`"));
    }
    let (config, addr, grpc_addr) = args.resolve()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // A file-size limit (RLIMIT_FSIZE) reached while a plan-cache entry is written must fail
        // that write (EFBIG; the plan is then served uncached), not kill the server: SIGXFSZ's
        // default action ends the process. A handled signal makes the write return the error.
        #[cfg(target_os = "linux")]
        let _file_size_limit = tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::from_raw(25), // SIGXFSZ on Linux
        );
        let state = AppState::new(config).map_err(|e| anyhow!(e))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let grpc_listener = tokio::net::TcpListener::bind(grpc_addr)
            .await
            .with_context(|| format!("cannot listen on {grpc_addr} (gRPC)"))?;
        tracing::info!(address = %listener.local_addr()?, grpc = %grpc_listener.local_addr()?, "listening (HTTP at address, gRPC at grpc); /health answers 503 until the model is ready");
        let (routes, grpc_health) = grpc::routes(state.clone()).await.map_err(|e| anyhow!(e))?;

        // One signal stops both servers: each stops accepting and drains its in-flight requests.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stop_rx_for_health = stop_rx.clone();
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }
        };
        let health = grpc_health.clone();
        let draining = state.clone();
        let drain_for = draining.config().shutdown_timeout;
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
            health.set(false).await;
            // Draining has a deadline: then what is still in flight is answered 503, and a
            // moment later the process exits whatever is left (a client that stops reading).
            tokio::time::sleep(drain_for).await;
            tracing::warn!(shutdown_timeout = ?drain_for, "requests still in flight at the shutdown timeout are answered 503");
            draining.abort_in_flight();
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            tracing::warn!("connections still open 2 s after the shutdown timeout; exiting");
            std::process::exit(0);
        });
        // gRPC health follows readiness: NOT_SERVING while a worker thread is down.
        let watched = state.clone();
        let health = grpc_health.clone();
        let mut stopping = stop_rx_for_health;
        // Loading wakes it at once, so gRPC health turns SERVING together with /health.
        let loaded = std::sync::Arc::new(tokio::sync::Notify::new());
        let wake = loaded.clone();
        tokio::spawn(async move {
            let mut last = None;
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = wake.notified() => {}
                }
                if *stopping.borrow_and_update() {
                    return;
                }
                let ready = watched.is_ready();
                if last != Some(ready) {
                    if last.is_some() {
                        tracing::info!(ready, down = ?watched.workers_down(), "readiness changed");
                    }
                    health.set(ready).await;
                    last = Some(ready);
                }
            }
        });
        let http = axum::serve(listener, app(state.clone())).with_graceful_shutdown(stopped());
        let http = tokio::spawn(async move { http.await });
        let grpc = tokio::spawn(grpc::serve(grpc_listener, routes, stopped()));

        let loader = state.clone();
        match tokio::task::spawn_blocking(move || loader.load()).await? {
            Ok(()) => {
                loaded.notify_one();
                tracing::info!("model ready");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot load the model");
                return Err(anyhow!("cannot load the model: {e}"));
            }
        }
        let (http, grpc) = tokio::join!(http, grpc);
        http?.context("HTTP server")?;
        grpc?.context("gRPC server")?;
        tracing::info!("shut down cleanly");
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested; draining in-flight requests");
}

fn health(args: HealthArgs) -> Result<()> {
    let timeout = kiln_server::config::parse_duration(&args.timeout)
        .map_err(|e| anyhow!("--timeout: {e}"))?;
    kiln_server::healthcheck::check(&args.host, args.port, timeout).map_err(|e| anyhow!(e))?;
    println!("healthy");
    Ok(())
}

fn quantize(args: QuantizeArgs) -> Result<()> {
    let observer: kiln_quant::observer::ObserverKind = args
        .observer
        .parse()
        .map_err(|e: String| anyhow!("--observer: {e}"))?;
    let texts = kiln_models::quantize::read_texts(&args.calibrate).map_err(|e| anyhow!("{e}"))?;
    let opts = LoadOptions {
        max_batch_sequences: args.max_batch_sequences.max(1),
        ..LoadOptions::default()
    };
    let started = Instant::now();
    let scales = kiln_models::quantize::calibrate(&args.model, &opts, &texts, observer)
        .map_err(|e| anyhow!("{e}"))?;
    let out = args
        .out
        .unwrap_or_else(|| args.model.join(kiln_models::quantize::SCALES_FILE));
    kiln_models::quantize::write_scales(&out, &scales).map_err(|e| anyhow!("{e}"))?;
    println!(
        "calibrated {} layers on {} texts ({} tokens) with the {observer} observer in {:.1} s; wrote {}",
        scales.layers.len(),
        texts.len(),
        scales.source.get("tokens").map_or("?", String::as_str),
        started.elapsed().as_secs_f64(),
        out.display()
    );
    println!(
        "serve it with: kiln serve --model {} --quantize int8-static{}",
        args.model.display(),
        if out == args.model.join(kiln_models::quantize::SCALES_FILE) {
            String::new()
        } else {
            format!(" --quantize-scales {}", out.display())
        }
    );
    Ok(())
}

fn embed(args: EmbedArgs) -> Result<()> {
    let model = args.model.load()?;
    let out = model
        .embed(
            &args.texts,
            EmbedOptions {
                truncate: true,
                normalize: None,
            },
        )
        .map_err(|e| anyhow!("{e}"))?;
    let json = serde_json::json!({
        "model": model.info().id,
        "dimensions": model.info().hidden_size,
        "tokens": out.tokens,
        "embeddings": out.vectors,
    });
    println!("{}", serde_json::to_string(&json)?);
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    let model = args.model.load()?;
    // Each shape is a label and the length of every sequence in the batch.
    let shapes: Vec<(String, Vec<usize>)> = args
        .shapes
        .split(',')
        .map(|s| {
            let s = s.trim();
            let (b, q) = s
                .split_once('x')
                .ok_or_else(|| anyhow!("shape `{s}` is not BxS or BxLO-HI"))?;
            let b: usize = b.parse()?;
            if b == 0 {
                return Err(anyhow!("shape `{s}`: batch must be at least 1"));
            }
            let lengths = match q.split_once('-') {
                None => vec![q.parse::<usize>()?; b],
                Some((lo, hi)) => {
                    let (lo, hi): (usize, usize) = (lo.parse()?, hi.parse()?);
                    if hi < lo {
                        return Err(anyhow!("shape `{s}`: {hi} < {lo}"));
                    }
                    (0..b)
                        .map(|i| lo + (hi - lo) * i / (b - 1).max(1))
                        .collect()
                }
            };
            Ok((s.replace('x', "×"), lengths))
        })
        .collect::<Result<_>>()?;
    // A long text, truncated to the model's limit, gives real ids for any length up to it.
    let long = "the quick brown fox jumps over the lazy dog ".repeat(200);
    let full = model
        .tokenize(&[TextInput::Single(long)], true)
        .map_err(|e| anyhow!("{e}"))?
        .remove(0);
    let cpu = kiln_engine::CpuCaps::detect();
    let opts = args.model.load_options()?;
    println!(
        "model {} on {} ({cpu}), {:?} batches, sdpa_kernel {}, quantize {}, math_mode {} \
         (int8 kernel {}, bf16 kernel {}), {} (plan: {})",
        model.info().id,
        model.info().device,
        args.model.batch_layout,
        args.model.sdpa_kernel,
        opts.exec.quant.quantize,
        opts.exec.quant.math_mode,
        kiln_quant::Int8Kernel::detect(),
        kiln_quant::bf16::Bf16Kernel::detect(),
        model.info().plan.report.options.describe(),
        model.info().plan.cache.as_str(),
    );
    println!("| batch×seq | median ms | min ms | tokens/s | runs |");
    println!("|---|---|---|---|---|");
    for (label, lengths) in shapes {
        let mut batch = Vec::with_capacity(lengths.len());
        for &s in &lengths {
            if s < 2 || s > full.len() {
                return Err(anyhow!("seq {s} must be between 2 and {}", full.len()));
            }
            let mut ids = full.ids[..s - 1].to_vec();
            ids.push(*full.ids.last().expect("non-empty"));
            batch.push(Encoded {
                type_ids: vec![0; s],
                untruncated_len: s,
                ids,
            });
        }
        let tokens: usize = lengths.iter().sum();
        model.run_batch(&batch).map_err(|e| anyhow!("{e}"))?; // warm-up
        let mut times = Vec::new();
        let started = Instant::now();
        while times.len() < args.iters
            && (times.len() < 3 || started.elapsed().as_secs_f64() < args.max_seconds)
        {
            let t = Instant::now();
            model.run_batch(&batch).map_err(|e| anyhow!("{e}"))?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "| {label} | {median:.2} | {:.2} | {:.0} | {} |",
            times[0],
            tokens as f64 / (median / 1e3),
            times.len()
        );
    }
    Ok(())
}

/// One batch of `batch` requests through `g` until all are done: (time to first token of the
/// whole batch, decode tokens/s after it, total seconds).
fn generate_once(
    g: &mut kiln_models::Generator,
    batch: usize,
    prompt_tokens: usize,
    new_tokens: usize,
    seed: u64,
) -> Result<(f64, f64, f64)> {
    use kiln_models::{Event, GenerationRequest, SamplingParams};
    let vocab = g.model().info().vocab_size as u64;
    let mut s = seed | 1;
    for _ in 0..batch {
        let prompt = (0..prompt_tokens)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % vocab) as u32
            })
            .collect();
        g.submit(GenerationRequest {
            prompt,
            max_new_tokens: new_tokens,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: true,
        })
        .map_err(|e| anyhow!("{e}"))?;
    }
    let started = Instant::now();
    let mut first: Option<f64> = None;
    let mut tokens = 0usize;
    while !g.is_idle() {
        for e in g.step() {
            match e {
                Event::Token { .. } => tokens += 1,
                Event::Failed { message, .. } => return Err(anyhow!(message)),
            }
        }
        if first.is_none() && tokens >= batch {
            first = Some(started.elapsed().as_secs_f64());
        }
    }
    let total = started.elapsed().as_secs_f64();
    let ttft = first.unwrap_or(total);
    let decode = (tokens - batch) as f64 / (total - ttft).max(1e-9);
    Ok((ttft, decode, total))
}

fn bench_generate(args: BenchGenerateArgs) -> Result<()> {
    let opts = LoadOptions {
        exec: kiln_engine::ExecOptions {
            sdpa_kernel: args.sdpa_kernel,
            ..Default::default()
        },
        ..LoadOptions::default()
    };
    let model = std::sync::Arc::new(
        kiln_models::CausalLm::load(&args.model, &opts, None).map_err(|e| anyhow!("{e}"))?,
    );
    let cpu = kiln_engine::CpuCaps::detect();
    println!(
        "model {} ({}, {} layers, hidden {}, vocab {}) on {} ({cpu}), prompt {} tokens, {} new, greedy",
        model.info().id,
        model.info().architecture,
        model.info().num_layers,
        model.info().hidden_size,
        model.info().vocab_size,
        model.info().device,
        args.prompt_tokens,
        args.new_tokens
    );
    println!("| batch | time to first token ms | decode tokens/s | total s | runs |");
    println!("|---|---|---|---|---|");
    for b in args.batch.split(',') {
        let b: usize = b.trim().parse()?;
        // One generator per batch size, kept across runs as the server keeps its own: the
        // warm-up run (same shape) commits the KV pool's pages, as a running server's are.
        let limits = kiln_models::GenerationLimits {
            max_batch_total_tokens: b * (args.prompt_tokens + args.new_tokens + 16),
            max_batch_prefill_tokens: b * args.prompt_tokens,
            max_running: b,
            ..kiln_models::GenerationLimits::default()
        };
        let mut g =
            kiln_models::Generator::new(model.clone(), limits).map_err(|e| anyhow!("{e}"))?;
        generate_once(&mut g, b, args.prompt_tokens, args.new_tokens, 1)?; // warm-up
        let mut runs = Vec::new();
        for i in 0..args.iters.max(1) {
            runs.push(generate_once(
                &mut g,
                b,
                args.prompt_tokens,
                args.new_tokens,
                7 + i as u64,
            )?);
        }
        let median = |f: fn(&(f64, f64, f64)) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "| {b} | {:.1} | {:.1} | {:.2} | {} |",
            median(|r| r.0) * 1e3,
            median(|r| r.1),
            median(|r| r.2),
            runs.len()
        );
    }
    Ok(())
}
