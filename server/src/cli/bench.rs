//! The throughput benchmarks: `bench` (encoder forward passes at given shapes) and
//! `bench-generate` (a causal LM's time to first token and decode rate).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, anyhow};
use clap::Args;
use kiln_engine::SdpaKernelChoice;
use kiln_models::{Encoded, LoadOptions, TextInput};

use crate::model::{ModelArgs, load_encoder};

#[derive(Args)]
pub struct BenchArgs {
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

#[derive(Args)]
pub struct BenchGenerateArgs {
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

pub fn bench(args: BenchArgs) -> Result<()> {
    let config = args.model.resolve()?;
    let model = load_encoder(&config)?;
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
    let opts = config.load_options();
    println!(
        "model {} on {} ({cpu}), {:?} batches, sdpa_kernel {}, quantize {}, math_mode {} \
         (int8 kernel {}, bf16 kernel {}), {} (plan: {})",
        model.info().id,
        model.info().device,
        config.batch_layout,
        config.sdpa_kernel,
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

pub fn bench_generate(args: BenchGenerateArgs) -> Result<()> {
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
