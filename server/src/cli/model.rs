//! The model flags every command that loads a model shares, and loading a folder as whatever
//! model it holds.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, anyhow};
use clap::Args;
use kiln_models::{Encoded, EncoderModel, LoadOptions};
use kiln_server::{ModelConfig, PlanCacheSwitch, RawModelSettings, RawServeConfig};

/// The model settings of `kiln serve`, for the commands that load a model: the same flags, and
/// the same config file (whose server settings they ignore), so `kiln compile --config F`
/// compiles what `kiln serve --config F` will load.
#[derive(Args)]
pub struct ModelArgs {
    /// A `kiln serve` TOML config file: its model settings apply (flags and env vars win).
    #[arg(long, env = "KILN_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: RawModelSettings,
    #[command(flatten)]
    plan_cache: PlanCacheSwitch,
}

impl ModelArgs {
    /// Flags and env over the config file, resolved and validated.
    pub fn resolve(&self) -> Result<ModelConfig> {
        let file = match &self.config {
            Some(path) => RawServeConfig::from_toml_file(path).map_err(|e| anyhow!(e))?,
            None => RawServeConfig::default(),
        };
        let flags = self.plan_cache.apply(self.settings.clone());
        flags.or(file.model).resolve().map_err(|e| anyhow!(e))
    }
}

/// Loads the folder as an encoder (embeddings, classification).
pub fn load_encoder(model: &ModelConfig) -> Result<EncoderModel> {
    EncoderModel::load(&model.dir, &model.load_options()).map_err(|e| anyhow!("{e}"))
}

/// Loads the folder as what it is, a causal LM or an encoder, with `opts` (the model's own, or
/// changed by a benchmark).
pub fn load_any(settings: &ModelConfig, opts: &LoadOptions) -> Result<Loaded> {
    let config = settings.dir.join("config.json");
    if config.is_file() && kiln_models::is_causal_lm(&config).map_err(|e| anyhow!("{e}"))? {
        let model = std::sync::Arc::new(
            kiln_models::CausalLm::load(&settings.dir, opts, None).map_err(|e| anyhow!("{e}"))?,
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
    let model = EncoderModel::load(&settings.dir, opts).map_err(|e| anyhow!("{e}"))?;
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

/// What `compile` and `bench-load` report of a loaded model, of either kind.
pub struct Loaded {
    pub id: String,
    pub device: String,
    pub load_time: Duration,
    /// Reading the tokenizer (measured separately for encoders only).
    pub tokenizer_time: Option<Duration>,
    pub plan: kiln_models::PlanInfo,
    /// One forward pass: a 1×16 batch for an encoder, a 16-token prefill for a decoder.
    pub forward: Box<dyn Fn() -> Result<()>>,
}
