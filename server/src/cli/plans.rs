//! The commands about compiled plans: `compile`, `bench-load`, `cache`, and `devices` (what the
//! plans are compiled for).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, anyhow};
use clap::{Args, Subcommand};

use crate::model::{ModelArgs, load_any};
use crate::ms;

#[derive(Subcommand)]
pub enum CacheAction {
    /// One line per compiled plan: key, size, age, model, options.
    Ls,
    /// Remove every compiled plan (running servers keep the plans they have loaded).
    Clear,
}

#[derive(Args)]
pub struct CacheDirArgs {
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

#[derive(Args)]
pub struct BenchLoadArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Cold and warm loads to time (medians are printed).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

#[derive(Args)]
pub struct CompileArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Print what each pass did: ops before and after, fused groups, chosen kernels with
    /// reasons, memory plan size.
    #[arg(long)]
    explain: bool,
}

pub fn compile(args: CompileArgs) -> Result<()> {
    let model = args.model.resolve()?;
    let info = load_any(&model, &model.load_options())?;
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

/// Loads the model `runs` times each way in this process, into a fresh plan-cache folder of its
/// own: without a cache, cold (the folder emptied first: build, compile, store) and warm (plan
/// read from the cache), each followed by one forward pass (an encoder's 1×16 batch, a decoder's
/// 16-token prefill; a warm plan's weights are mapped lazily, so the first pass pays for reading
/// them). Prints medians, with where the time went.
pub fn bench_load(args: BenchLoadArgs) -> Result<()> {
    let cache = std::env::temp_dir().join(format!("kiln-bench-load-{}", std::process::id()));
    let model = args.model.resolve()?;
    let mut opts = model.load_options();
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
            let loaded_model = load_any(&model, &opts)?;
            let loaded = started.elapsed();
            let forward = Instant::now();
            (loaded_model.forward)()?;
            let forward = forward.elapsed();
            let p = &loaded_model.plan;
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
                loaded_model.tokenizer_time.map_or(f64::NAN, ms),
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
        model.dir.display(),
        model.device,
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

pub fn devices() -> Result<()> {
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

pub fn cache(action: CacheAction, dir: &CacheDirArgs) -> Result<()> {
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
