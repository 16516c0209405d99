//! kiln's model definitions: Hugging Face folders in, engine graphs out.
//!
//! Design note. A model here is a *description*: it reads a folder's configuration, weights (by
//! Hugging Face parameter names) and tokenizer, and builds an engine graph of ops. It never picks
//! a kernel or a device (it emits an `Sdpa` node and the engine's selector decides), and it never
//! compiles or caches: it hands its files and its graph builder to the engine's loader
//! (`kiln_engine::load`), which reads the plan from the cache or builds, compiles and stores it.
//!
//! The map of the crate:
//! - [`encoder`]: [`EncoderModel`], BERT-family encoders behind embeddings and classifiers, with
//!   [`bert`] (the graph), [`config`], [`st`] (the sentence-transformers pipeline files),
//!   [`text`] (tokenization and truncation) and [`quantize`] (calibration for `int8-static`);
//! - [`decoder`]: [`CausalLm`], GPT-2 and Llama (config, graph, RoPE, sharded weights, chat
//!   templates), and [`generate`]: the continuous-batching [`Generator`] over a paged KV cache;
//! - [`weights`]: the safetensors reader both use; [`memory`]: what a model will hold once
//!   loaded, estimated from its folder;
//! - here: what every load shares, [`LoadOptions`] and the device it resolves to.
//!
//! Every failure names the file and, for weights, the tensor; a caller's bad input is a
//! [`ModelError::Input`], distinct from a broken model folder.

pub mod bert;
pub mod config;
pub mod decoder;
pub mod encoder;
mod error;
pub mod generate;
pub mod memory;
pub mod quantize;
pub mod st;
pub mod text;
pub mod weights;

use std::path::{Path, PathBuf};

use kiln_engine::compile::CompileOptions;
use kiln_engine::{DeviceChoice, DeviceKind, ExecOptions, Quantize};

/// What kiln runs, for error messages: `kiln runs BertModel, ... (embeddings), ... `.
pub fn supported_architectures() -> String {
    format!(
        "kiln runs {} (embeddings), {} (classification) and {} (text generation)",
        config::ENCODERS.join(", "),
        config::CLASSIFIERS.join(", "),
        decoder::config::DECODER_ARCHITECTURES.join(", ")
    )
}

pub use config::{Architecture, BertConfig};
pub use error::{ModelError, Result};
pub use text::{Encoded, TextInput, TextTokenizer};

pub use bert::BatchLayout;
pub use decoder::{CausalLm, DecoderInfo, is_causal_lm};
pub use encoder::{Classification, EmbedOptions, Embeddings, EncoderModel, ModelInfo, ModelKind};
pub use generate::{
    Event, FinishReason, GenerationLimits, GenerationRequest, Generator, RequestId, SamplingParams,
    panic_message,
};
pub use kiln_engine::{CacheOutcome, PlanInfo};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `auto` (the default), or a fixed device; resolved once per load ([`DevicePlacement`]).
    pub device: DeviceChoice,
    pub exec: ExecOptions,
    /// Most sequences run through the engine at once; larger requests are split (sorted by
    /// length first, so each sub-batch pads little).
    pub max_batch_sequences: usize,
    /// Overrides the folder's `max_seq_length` (never beyond the position table).
    pub max_seq_length: Option<usize>,
    /// Packed (padding-free, the default) or padded batches.
    pub layout: BatchLayout,
    /// Which compiler passes run (all by default).
    pub compile: CompileOptions,
    /// The plan-cache folder; `None` compiles at every load. (The CLI and server resolve it from
    /// `--cache-dir`, `$KILN_CACHE_DIR` or the config file, else the per-user cache folder.)
    pub cache_dir: Option<PathBuf>,
    /// The calibration file for `int8-static` (written by `kiln quantize`); default
    /// `<model>/kiln-quant.json`.
    pub quantize_scales: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: DeviceChoice::default(),
            exec: ExecOptions::default(),
            max_batch_sequences: 32,
            max_seq_length: None,
            layout: BatchLayout::default(),
            compile: CompileOptions::default(),
            cache_dir: None,
            quantize_scales: None,
        }
    }
}

impl LoadOptions {
    /// What the engine's loader needs for a plan of the model in `dir`: the `files` and graph
    /// `options` that shape it, with these options' device, passes, execution options and cache.
    pub(crate) fn plan_spec(
        &self,
        dir: &Path,
        files: Vec<PathBuf>,
        options: impl IntoIterator<Item = (String, String)>,
    ) -> kiln_engine::PlanSpec {
        kiln_engine::PlanSpec {
            dir: dir.to_path_buf(),
            files,
            options: options.into_iter().collect(),
            device: self.device_kind(),
            compile: self.compile.clone(),
            exec: self.exec.clone(),
            cache_dir: self.cache_dir.clone(),
        }
    }

    /// The device the plan is built for. The loaders resolve `auto` first
    /// ([`resolve_device`]), so `Auto` here only reaches a caller that skipped them: the CPU.
    pub(crate) fn device_kind(&self) -> DeviceKind {
        match self.device {
            DeviceChoice::Fixed(d) => d,
            DeviceChoice::Auto => DeviceKind::Cpu,
        }
    }
}

/// Where a model runs and why: the resolved `--device`, for logs and `/info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePlacement {
    /// What was asked for (`auto` or a fixed device).
    pub requested: DeviceChoice,
    pub device: DeviceKind,
    /// `configured`, or what `auto` saw (e.g. "auto: CPU, because … is a cpu adapter, not a GPU").
    pub reason: String,
    /// The GPU adapter, when `device` is one.
    pub adapter: Option<kiln_engine::gpu::Adapter>,
}

/// Resolves `opts.device` (see [`DeviceChoice::resolve`]) and logs the answer; the returned
/// options name the device. GPU autotune results go to the plan cache's folder, so they are
/// kept and reused like compiled plans.
pub(crate) fn resolve_device(opts: &LoadOptions) -> Result<(LoadOptions, DevicePlacement)> {
    if let Some(dir) = &opts.cache_dir {
        kiln_engine::gpu::set_tuning_cache_dir(&dir.join("wgpu-tuning"));
    }
    let quant = &opts.exec.quant;
    let gpu_capable =
        quant.quantize == Quantize::None && quant.math_mode == kiln_engine::MathMode::Precise;
    let (device, reason) = opts.device.resolve(gpu_capable)?;
    let placement = DevicePlacement {
        requested: opts.device,
        device,
        adapter: kiln_engine::device::adapter_of(device).cloned(),
        reason,
    };
    tracing::info!(requested = %opts.device, device = %device, reason = %placement.reason, "device");
    let resolved = LoadOptions {
        device: device.into(),
        ..opts.clone()
    };
    Ok((resolved, placement))
}

pub(crate) fn require(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(ModelError::io(
            &p,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "required model file is missing",
            ),
        ))
    }
}
