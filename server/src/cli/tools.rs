//! The small commands: `embed`, `quantize` (int8 calibration) and `health` (the container's
//! health check).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, anyhow};
use clap::Args;
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
        "dimensions": model.info().hidden_size,
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
