//! The `kiln` command line. Each subcommand lives in its own module with its flags; the settings
//! `serve` shares with the commands that load a model are declared once, in
//! `kiln_server::config`.

mod bench;
mod model;
mod plans;
mod serve;
mod tools;

use anyhow::Result;
use clap::{Parser, Subcommand};
use kiln_server::LogFormat;

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
    Serve(Box<serve::ServeArgs>),
    /// Embed texts and print the vectors as JSON.
    Embed(tools::EmbedArgs),
    /// Measure forward throughput (tokens/s) at given batch×sequence shapes.
    Bench(bench::BenchArgs),
    /// Compile a model ahead of time into the plan cache, and say what the compiler did.
    Compile(plans::CompileArgs),
    /// Measure load time: cold (empty plan cache) against warm (plan in the cache).
    BenchLoad(plans::BenchLoadArgs),
    /// List or clear the plan cache.
    Cache {
        #[command(subcommand)]
        action: plans::CacheAction,
        #[command(flatten)]
        dir: plans::CacheDirArgs,
    },
    /// Measure generation with a causal LM: time to first token and decode tokens/s at given
    /// batch sizes (random prompt ids, greedy, EOS ignored).
    BenchGenerate(bench::BenchGenerateArgs),
    /// Exit 0 if a `kiln serve` on this machine answers /health with 200 (the container
    /// image's HEALTHCHECK), else print why and exit 1.
    Health(tools::HealthArgs),
    /// Calibrate static int8 quantization on a set of texts and write the scales file that
    /// `--quantize int8-static` reads.
    Quantize(tools::QuantizeArgs),
    /// Ask a running `kiln serve` about its models (`kiln models ls`).
    Models {
        #[command(subcommand)]
        action: tools::ModelsAction,
    },
    /// List the GPU adapters this kiln can use (`--device wgpu:N`), with their limits, and say
    /// what `--device auto` would pick and why.
    Devices,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // `serve` resolves its settings first: the log format is one of them.
    if let Command::Serve(args) = cli.command {
        let config = args.resolve()?;
        init_logs(config.log_format);
        return serve::run(config);
    }
    init_logs(LogFormat::Text);
    match cli.command {
        Command::Serve(_) => unreachable!("handled above"),
        Command::Embed(args) => tools::embed(args),
        Command::Bench(args) => bench::bench(args),
        Command::Compile(args) => plans::compile(args),
        Command::BenchLoad(args) => plans::bench_load(args),
        Command::Cache { action, dir } => plans::cache(action, &dir),
        Command::BenchGenerate(args) => bench::bench_generate(args),
        Command::Health(args) => tools::health(args),
        Command::Quantize(args) => tools::quantize(args),
        Command::Models { action } => tools::models(action),
        Command::Devices => plans::devices(),
    }
}

/// Logs go to stderr, filtered by `KILN_LOG` (default `info`), coloured on a terminal.
fn init_logs(format: LogFormat) {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| "info,tower_http=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
}

/// Milliseconds, for the tables the measuring commands print.
fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
