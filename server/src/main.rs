//! The `kiln` command line: `serve`, `embed`, `bench`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use clap::{Args, Parser, Subcommand};
use kiln_engine::{DeviceKind, SdpaKernelChoice};
use kiln_models::{BatchLayout, EmbedOptions, Encoded, EncoderModel, LoadOptions, TextInput};
use kiln_server::{AppState, ServeConfig, app};

/// kiln: a transformer inference server.
///
/// Loads a Hugging Face model folder (config.json, model.safetensors, tokenizer.json and the
/// sentence-transformers files) and serves it over HTTP.
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
    /// Serve a model over HTTP (OpenAI /v1/embeddings, /embed, /predict, /health, /info).
    Serve(ServeArgs),
    /// Embed texts and print the vectors as JSON.
    Embed(EmbedArgs),
    /// Measure forward throughput (tokens/s) at given batch×sequence shapes.
    Bench(BenchArgs),
}

#[derive(Args)]
struct ModelArgs {
    /// Model folder in the Hugging Face layout.
    #[arg(long, env = "KILN_MODEL")]
    model: PathBuf,
    /// Where to run: `cpu` (kiln's kernels) or `burn-flex` (burn's CPU backend).
    #[arg(long, env = "KILN_DEVICE", default_value = "cpu")]
    device: DeviceKind,
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
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Name clients see (default: the model folder's name).
    #[arg(long, env = "KILN_MODEL_ID")]
    model_id: Option<String>,
    #[arg(long, env = "KILN_HOST", default_value = "0.0.0.0")]
    host: String,
    #[arg(long, env = "KILN_PORT", default_value_t = 8080)]
    port: u16,
    /// Most inputs in one request (413 beyond).
    #[arg(long, env = "KILN_MAX_CLIENT_BATCH_SIZE", default_value_t = 256)]
    max_client_batch_size: usize,
    /// Requests waiting for the model beyond this get 503 at once.
    #[arg(long, env = "KILN_MAX_QUEUED_REQUESTS", default_value_t = 512)]
    max_queued_requests: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "KILN_PAYLOAD_LIMIT", default_value_t = 2 * 1024 * 1024)]
    payload_limit: usize,
    /// Refuse over-long inputs (422) instead of truncating them; a request's `truncate` wins.
    #[arg(long, env = "KILN_NO_AUTO_TRUNCATE")]
    no_auto_truncate: bool,
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
    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            device: self.device,
            exec: kiln_engine::ExecOptions {
                sdpa_kernel: self.sdpa_kernel,
            },
            max_batch_sequences: self.max_batch_sequences,
            max_seq_length: self.max_seq_length,
            layout: self.batch_layout,
        }
    }

    fn load(&self) -> Result<EncoderModel> {
        EncoderModel::load(&self.model, &self.load_options()).map_err(|e| anyhow!("{e}"))
    }
}

impl ServeArgs {
    fn resolve(self) -> Result<(ServeConfig, SocketAddr)> {
        let addr: SocketAddr = format!("{}:{}", self.host, self.port)
            .parse()
            .or_else(|_| format!("[{}]:{}", self.host, self.port).parse())
            .with_context(|| format!("invalid --host {}", self.host))?;
        let m = self.model;
        let mut config = ServeConfig::for_model(m.model.clone());
        if let Some(id) = self.model_id {
            config.model_id = id;
        }
        config.device = m.device;
        config.sdpa_kernel = m.sdpa_kernel;
        config.batch_layout = m.batch_layout;
        config.max_batch_sequences = m.max_batch_sequences;
        config.max_seq_length = m.max_seq_length;
        config.max_client_batch_size = self.max_client_batch_size;
        config.max_queued_requests = self.max_queued_requests;
        config.payload_limit = self.payload_limit;
        config.auto_truncate = !self.no_auto_truncate;
        Ok((config.validate().map_err(|e| anyhow!(e))?, addr))
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| "info,tower_http=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::Embed(args) => embed(args),
        Command::Bench(args) => bench(args),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let (config, addr) = args.resolve()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let state = AppState::new(config);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!(address = %listener.local_addr()?, "listening; /health answers 503 until the model is ready");
        let loader = state.clone();
        let load = tokio::task::spawn_blocking(move || loader.load());
        let server = axum::serve(listener, app(state)).with_graceful_shutdown(shutdown_signal());
        let server = tokio::spawn(async move { server.await });
        match load.await? {
            Ok(()) => tracing::info!("model ready"),
            Err(e) => {
                tracing::error!(error = %e, "cannot load the model");
                return Err(anyhow!("cannot load the model: {e}"));
            }
        }
        server.await??;
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
    println!(
        "model {} on {} ({cpu}), {:?} batches, sdpa_kernel {}",
        model.info().id,
        model.info().device,
        args.model.batch_layout,
        args.model.sdpa_kernel
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
