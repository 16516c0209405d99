//! From a model's files and its graph builder to a runnable plan: compiled now, or read from the
//! plan cache. Every model kind loads through [`load`], so every kind gets the cache.
//!
//! On a cache hit the builder is never called, so the weights file is never opened: the
//! compiled graph and its packed weights come from the entry (memory-mapped). On a miss (or a
//! rejected entry) the graph is built, compiled, stored, and run from memory. Cache trouble (an
//! unwritable folder, say) is reported in [`PlanInfo::cache`] and the plan loads uncached: the
//! cache may make a start faster, never make it fail.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::DeviceKind;
use crate::cache::{KeyMaterial, Lookup, PlanCache};
use crate::compile::{CompileOptions, CompileReport};
use crate::error::EngineError;
use crate::exec::{ExecOptions, Runnable};
use crate::ir::Graph;

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

    /// Why the cache was not used as it should have been (a rebuilt entry, an unusable
    /// folder), if it was not.
    pub fn trouble(&self) -> Option<&str> {
        match self {
            CacheOutcome::Rebuilt(why) | CacheOutcome::Unavailable(why) => Some(why),
            _ => None,
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

impl PlanInfo {
    /// One warning line when the cache was not used as it should have been: the entry was
    /// rebuilt, or the folder could not be used (and why).
    pub fn warn_on_trouble(&self, model: &str) {
        if let Some(why) = self.cache.trouble() {
            tracing::warn!(model, reason = %why, "plan cache: {}", self.cache.as_str());
        }
    }
}

/// Everything a plan depends on besides the graph builder's code.
#[derive(Debug, Clone)]
pub struct PlanSpec {
    /// The model folder: entries record it, and key paths are relative to it.
    pub dir: PathBuf,
    /// Every file that goes into the plan (config, weights, whatever else shapes the graph).
    pub files: Vec<PathBuf>,
    /// Graph-shaping facts derived from the files and the caller's options (a head, a layout, a
    /// graph mode): each becomes part of the key.
    pub options: BTreeMap<String, String>,
    /// The resolved device (not `auto`).
    pub device: DeviceKind,
    pub compile: CompileOptions,
    pub exec: ExecOptions,
    /// The plan-cache folder; `None` compiles at every load.
    pub cache_dir: Option<PathBuf>,
}

/// Compiles the graph `build` makes, or reads the compiled plan from the cache; then prepares
/// it for the device. `build` runs only when the cache has no usable entry.
pub fn load<E: From<EngineError>>(
    spec: &PlanSpec,
    build: impl FnOnce() -> Result<Graph, E>,
) -> Result<(Box<dyn Runnable>, PlanInfo), E> {
    let Some(dir) = &spec.cache_dir else {
        return uncached(spec, build, CacheOutcome::Disabled);
    };
    let unavailable = CacheOutcome::Unavailable;
    let cache = match PlanCache::open(dir) {
        Ok(c) => c,
        Err(e) => {
            return uncached(spec, build, unavailable(format!("cannot open it: {e}")));
        }
    };
    let hashing = Instant::now();
    let hashes = match cache.file_hashes(&spec.files) {
        Ok((h, _)) => h,
        Err(e) => {
            let why = format!("cannot hash the model files: {e}");
            return uncached(spec, build, unavailable(why));
        }
    };
    let hash_time = hashing.elapsed();
    let material = key_material(&cache, spec, hashes)?;
    let key = material.key();
    let reading = Instant::now();
    let outcome = match cache.load(&material) {
        Lookup::Hit(plan) => {
            let cache_load_time = reading.elapsed();
            let preparing = Instant::now();
            // An entry that passed its checksums and graph check but still cannot be prepared
            // (damaged in a way only the backend notices) is rebuilt, not a failed start.
            match prepare(plan.graph, spec) {
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
    let (graph, mut info) = build_and_compile(spec, build, outcome)?;
    let storing = Instant::now();
    let model = spec.dir.display().to_string();
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
    let runnable = prepare(graph, spec)?;
    info.prepare_time = preparing.elapsed();
    Ok((runnable, info))
}

/// Builds, compiles and prepares without the plan cache; `outcome` says why.
fn uncached<E: From<EngineError>>(
    spec: &PlanSpec,
    build: impl FnOnce() -> Result<Graph, E>,
    outcome: CacheOutcome,
) -> Result<(Box<dyn Runnable>, PlanInfo), E> {
    let (graph, mut info) = build_and_compile(spec, build, outcome)?;
    let preparing = Instant::now();
    let runnable = prepare(graph, spec)?;
    info.prepare_time = preparing.elapsed();
    Ok((runnable, info))
}

/// Builds the graph and compiles it.
fn build_and_compile<E: From<EngineError>>(
    spec: &PlanSpec,
    build: impl FnOnce() -> Result<Graph, E>,
    outcome: CacheOutcome,
) -> Result<(Graph, PlanInfo), E> {
    let building = Instant::now();
    let graph = build()?;
    let build_time = building.elapsed();
    let compiling = Instant::now();
    let compiled = crate::device::compile(graph, spec.device, &spec.compile, spec.exec.clone())?;
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

fn prepare(graph: Graph, spec: &PlanSpec) -> Result<Box<dyn Runnable>, EngineError> {
    crate::device::prepare(graph, spec.device, spec.exec.clone())
}

fn key_material(
    cache: &PlanCache,
    spec: &PlanSpec,
    hashes: Vec<String>,
) -> Result<KeyMaterial, EngineError> {
    let mut options = spec.options.clone();
    options.insert("device".into(), spec.device.to_string());
    options.insert("passes".into(), spec.compile.describe());
    // The resolved quantization options: mode, math mode, the layer filter and the calibrated
    // scales themselves (a new calibration file gives a new key).
    let quant = &spec.exec.quant;
    options.insert("quantize".into(), quant.quantize.to_string());
    options.insert("math_mode".into(), quant.math_mode.to_string());
    options.insert("quantize_layers".into(), format!("{:?}", quant.layers));
    if let Some(scales) = &quant.scales {
        options.insert("quantize_scales".into(), format!("{:?}", scales.layers));
    }
    options.insert("sdpa_kernel".into(), spec.exec.sdpa_kernel.to_string());
    let model_files = spec
        .files
        .iter()
        .zip(hashes)
        .map(|(p, h)| {
            let rel = p.strip_prefix(&spec.dir).unwrap_or(p);
            (rel.display().to_string(), h)
        })
        .collect();
    Ok(KeyMaterial {
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        kiln_build: cache.build_hash(),
        ir_version: crate::cache::IR_VERSION,
        entry_format: crate::cache::entry::FORMAT_VERSION,
        model_files,
        options,
        device: crate::device::device_facts(spec.device)?,
    })
}

/// The files of `names` that exist in `dir`, for [`PlanSpec::files`].
pub fn existing_files(dir: &Path, names: &[&str]) -> Vec<PathBuf> {
    names
        .iter()
        .map(|n| dir.join(n))
        .filter(|p| p.is_file())
        .collect()
}
