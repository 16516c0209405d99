//! From a model folder to a runnable plan: compiled now, or read from the plan cache.
//!
//! On a cache hit the weights file is never opened: the compiled graph and its packed weights
//! come from the entry (memory-mapped), and only the small JSON files and the tokenizer are read.
//! On a miss (or a rejected entry) the graph is built from the weights, compiled, stored, and
//! run from memory. Cache trouble (an unwritable folder, say) is logged and the model loads
//! uncached: the cache may make a start faster, never make it fail.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_engine::Runnable;
use kiln_engine::cache::{KeyMaterial, Lookup, PlanCache};
use kiln_engine::compile::CompileReport;
use kiln_engine::ir::Graph;

use crate::LoadOptions;
use crate::error::Result;

/// What happened with the plan cache at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// No cache folder configured.
    Disabled,
    /// The plan was read from the cache.
    Hit,
    /// No entry: compiled and stored.
    Miss,
    /// An entry was unusable (why): compiled and stored again.
    Rebuilt(String),
    /// The cache could not be used (why): compiled, not stored.
    Unavailable(String),
}

impl CacheOutcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            CacheOutcome::Disabled => "disabled",
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Rebuilt(_) => "rebuilt",
            CacheOutcome::Unavailable(_) => "unavailable",
        }
    }
}

/// How the plan came to be, for logs, `/info` and metrics.
#[derive(Debug, Clone)]
pub struct PlanInfo {
    pub cache: CacheOutcome,
    /// The cache key (when a cache was used).
    pub key: Option<String>,
    /// Time spent compiling (zero on a hit).
    pub compile_time: Duration,
    /// Time spent reading and verifying the cache entry (zero on a miss).
    pub cache_load_time: Duration,
    /// Time spent on the key: stat-ing model files and hashing those the memo did not know.
    pub hash_time: Duration,
    /// Time spent reading the weights and building the graph (zero on a hit).
    pub build_time: Duration,
    /// Time spent writing the cache entry (zero on a hit).
    pub store_time: Duration,
    /// Time spent preparing the plan on the device (uploading weights; in place on the CPU).
    pub prepare_time: Duration,
    /// What the compiler did (read back from the entry on a hit).
    pub report: CompileReport,
}

/// What the plan depends on besides the model files.
pub(crate) struct PlanInputs<'a> {
    pub dir: &'a Path,
    /// Every file that goes into the plan (config, weights, tokenizer, pipeline files).
    pub files: Vec<PathBuf>,
    /// Graph-shaping facts derived from the files and options (head, layout).
    pub options: BTreeMap<String, String>,
    pub load: &'a LoadOptions,
}

/// Compiles the graph `build` makes, or reads the compiled plan from the cache.
pub(crate) fn load_plan(
    inputs: PlanInputs<'_>,
    build: impl FnOnce() -> Result<Graph>,
) -> Result<(Box<dyn Runnable>, PlanInfo)> {
    let opts = inputs.load;
    let Some(dir) = &opts.cache_dir else {
        return uncached(build, opts, CacheOutcome::Disabled);
    };
    // Not logged here: the loader logs the outcome and its reason in one warning line.
    let unavailable = CacheOutcome::Unavailable;
    let cache = match PlanCache::open(dir) {
        Ok(c) => c,
        Err(e) => {
            return uncached(build, opts, unavailable(format!("cannot open it: {e}")));
        }
    };
    let hashing = Instant::now();
    let hashes = match cache.file_hashes(&inputs.files) {
        Ok((h, _)) => h,
        Err(e) => {
            let why = format!("cannot hash the model files: {e}");
            return uncached(build, opts, unavailable(why));
        }
    };
    let hash_time = hashing.elapsed();
    let material = key_material(&cache, &inputs, hashes)?;
    let key = material.key();
    let reading = Instant::now();
    let outcome = match cache.load(&material) {
        Lookup::Hit(plan) => {
            let cache_load_time = reading.elapsed();
            let preparing = Instant::now();
            // An entry that passed its checksums and graph check but still cannot be prepared
            // (damaged in a way only the backend notices) is rebuilt, not a failed start.
            match prepare(plan.graph, opts) {
                Ok(runnable) => {
                    let info = PlanInfo {
                        cache: CacheOutcome::Hit,
                        key: Some(key),
                        compile_time: Duration::ZERO,
                        cache_load_time,
                        hash_time,
                        build_time: Duration::ZERO,
                        store_time: Duration::ZERO,
                        prepare_time: preparing.elapsed(),
                        report: plan.summary.report,
                    };
                    return Ok((runnable, info));
                }
                Err(e) => {
                    let why = format!("the cached plan cannot be prepared: {e}");
                    cache.evict(&material);
                    CacheOutcome::Rebuilt(why)
                }
            }
        }
        Lookup::Miss => CacheOutcome::Miss,
        Lookup::Rejected(why) => CacheOutcome::Rebuilt(why),
    };
    let (graph, mut info) = build_and_compile(build, opts, outcome)?;
    let storing = Instant::now();
    let model = inputs.dir.display().to_string();
    match cache.store(&material, &model, &graph, &info.report) {
        Ok(bytes) => {
            tracing::info!(key, bytes, dir = %cache.dir().display(), "compiled plan stored");
        }
        Err(e) => info.cache = unavailable(format!("cannot store the plan: {e}")),
    }
    info.store_time = storing.elapsed();
    info.key = Some(key);
    info.hash_time = hash_time;
    let preparing = Instant::now();
    let runnable = prepare(graph, opts)?;
    info.prepare_time = preparing.elapsed();
    Ok((runnable, info))
}

/// Builds, compiles and prepares without the plan cache; `outcome` says why.
pub(crate) fn uncached(
    build: impl FnOnce() -> Result<Graph>,
    opts: &LoadOptions,
    outcome: CacheOutcome,
) -> Result<(Box<dyn Runnable>, PlanInfo)> {
    let (graph, mut info) = build_and_compile(build, opts, outcome)?;
    let preparing = Instant::now();
    let runnable = prepare(graph, opts)?;
    info.prepare_time = preparing.elapsed();
    Ok((runnable, info))
}

/// Builds the graph from the weights and compiles it.
fn build_and_compile(
    build: impl FnOnce() -> Result<Graph>,
    opts: &LoadOptions,
    outcome: CacheOutcome,
) -> Result<(Graph, PlanInfo)> {
    let building = Instant::now();
    let graph = build()?;
    let build_time = building.elapsed();
    let compiling = Instant::now();
    let compiled =
        kiln_engine::device::compile(graph, opts.device_kind(), &opts.compile, opts.exec.clone())?;
    let info = PlanInfo {
        cache: outcome,
        key: None,
        compile_time: compiling.elapsed(),
        cache_load_time: Duration::ZERO,
        hash_time: Duration::ZERO,
        build_time,
        store_time: Duration::ZERO,
        prepare_time: Duration::ZERO,
        report: compiled.report,
    };
    Ok((compiled.graph, info))
}

fn prepare(graph: Graph, opts: &LoadOptions) -> Result<Box<dyn Runnable>> {
    Ok(kiln_engine::prepare(
        graph,
        opts.device_kind(),
        opts.exec.clone(),
    )?)
}

fn key_material(
    cache: &PlanCache,
    inputs: &PlanInputs<'_>,
    hashes: Vec<String>,
) -> Result<KeyMaterial> {
    let opts = inputs.load;
    let mut options = inputs.options.clone();
    options.insert("device".into(), opts.device_kind().to_string());
    options.insert("passes".into(), opts.compile.describe());
    // The resolved quantization options: mode, math mode, the layer filter and the calibrated
    // scales themselves (a new calibration file gives a new key).
    let quant = &opts.exec.quant;
    options.insert("quantize".into(), quant.quantize.to_string());
    options.insert("math_mode".into(), quant.math_mode.to_string());
    options.insert("quantize_layers".into(), format!("{:?}", quant.layers));
    if let Some(scales) = &quant.scales {
        options.insert("quantize_scales".into(), format!("{:?}", scales.layers));
    }
    options.insert("sdpa_kernel".into(), opts.exec.sdpa_kernel.to_string());
    let model_files = inputs
        .files
        .iter()
        .zip(hashes)
        .map(|(p, h)| {
            let rel = p.strip_prefix(inputs.dir).unwrap_or(p);
            (rel.display().to_string(), h)
        })
        .collect();
    Ok(KeyMaterial {
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        kiln_build: cache.build_hash(),
        ir_version: kiln_engine::cache::IR_VERSION,
        entry_format: kiln_engine::cache::entry::FORMAT_VERSION,
        model_files,
        options,
        device: kiln_engine::device::device_facts(opts.device_kind())?,
    })
}

/// The model files a plan depends on: the ones that exist of the folder's config, weights,
/// tokenizer and sentence-transformers files (`pipeline_files` as the pipeline read them).
pub(crate) fn plan_files(dir: &Path, pipeline_files: &[PathBuf]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = ["config.json", "model.safetensors", "tokenizer.json"]
        .iter()
        .map(|n| dir.join(n))
        .collect();
    files.extend(pipeline_files.iter().cloned());
    files.retain(|p| p.is_file());
    files
}
