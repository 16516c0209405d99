//! The small commands: `embed`, `quantize` (int8 calibration), `health` (the container's
//! health check) and `models ls` (what a running server serves).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, anyhow};
use clap::{Args, Subcommand};
use kiln_models::{EmbedOptions, LoadOptions};

use crate::model::{ModelArgs, load_encoder};

#[derive(Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Texts to embed.
    #[arg(required = true)]
    texts: Vec<String>,
}

#[derive(Args)]
pub struct QuantizeArgs {
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
pub struct HealthArgs {
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

pub fn embed(args: EmbedArgs) -> Result<()> {
    let model = load_encoder(&args.model.resolve()?)?;
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
        "dimensions": model.info().embedding_size,
        "tokens": out.tokens,
        "embeddings": out.vectors,
    });
    println!("{}", serde_json::to_string(&json)?);
    Ok(())
}

pub fn quantize(args: QuantizeArgs) -> Result<()> {
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

pub fn health(args: HealthArgs) -> Result<()> {
    let timeout = kiln_server::config::parse_duration(&args.timeout)
        .map_err(|e| anyhow!("--timeout: {e}"))?;
    kiln_server::healthcheck::check(&args.host, args.port, timeout).map_err(|e| anyhow!(e))?;
    println!("healthy");
    Ok(())
}

#[derive(Subcommand)]
pub enum ModelsAction {
    /// One line per model of a running `kiln serve`: name, kind, state, and why a model that is
    /// not ready is not.
    Ls(ModelsLsArgs),
}

#[derive(Args)]
pub struct ModelsLsArgs {
    /// Address of the server.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The server's HTTP port.
    #[arg(long, env = "KILN_PORT", default_value_t = 8080)]
    port: u16,
    /// An API key, when the server requires one (the first of a comma-separated list).
    #[arg(
        long = "api-key",
        env = "KILN_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// Give up after this long, e.g. `3s`.
    #[arg(long, default_value = "5s")]
    timeout: String,
}

pub fn models(action: ModelsAction) -> Result<()> {
    let ModelsAction::Ls(args) = action;
    let timeout = kiln_server::config::parse_duration(&args.timeout)
        .map_err(|e| anyhow!("--timeout: {e}"))?;
    let auth: Vec<String> = args
        .api_keys
        .first()
        .map(|k| format!("Authorization: Bearer {k}"))
        .into_iter()
        .collect();
    let ask = |request: &str| -> Result<serde_json::Value> {
        let (status, line, body) =
            kiln_server::healthcheck::request(&args.host, args.port, request, &auth, timeout)
                .map_err(|e| anyhow!(e))?;
        if status != 200 {
            return Err(anyhow!(
                "{request} answered {line}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        serde_json::from_slice(&body).map_err(|e| anyhow!("{request}: not JSON: {e}"))
    };
    let listed = ask("GET /v1/models")?;
    let index = ask("POST /v2/repository/index")?;
    let reason = |id: &str| {
        index
            .as_array()
            .and_then(|models| models.iter().find(|m| m["name"] == id))
            .and_then(|m| m["reason"].as_str())
            .unwrap_or("")
            .to_string()
    };
    let rows: Vec<[String; 4]> = listed["data"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|m| {
            let field = |k: &str| m[k].as_str().unwrap_or("?").to_string();
            let id = field("id");
            let why = reason(&id);
            [id, field("kind"), field("state"), why]
        })
        .collect();
    print_table(&["MODEL", "KIND", "STATE", "REASON"], &rows);
    Ok(())
}

/// Columns padded to their widest cell; the last column is not padded.
pub fn print_table(header: &[&str; 4], rows: &[[String; 4]]) {
    let header = header.map(String::from);
    let width = |k: usize| {
        rows.iter()
            .chain([&header])
            .map(|r| r[k].chars().count())
            .max()
            .unwrap_or(0)
    };
    let (w0, w1, w2) = (width(0), width(1), width(2));
    for r in std::iter::once(&header).chain(rows) {
        println!("{:w0$}  {:w1$}  {:w2$}  {}", r[0], r[1], r[2], r[3]);
    }
}
