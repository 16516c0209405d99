//! `kiln serve`: its flags, and the process around the server (listeners, signals, draining,
//! readiness for gRPC health, loading).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use kiln_server::{
    AppState, PlanCacheSwitch, RawModelSettings, RawServeConfig, RawServerSettings, ServeConfig,
    app, grpc,
};

/// `kiln serve` flags. Every one is optional here: unset flags fall back to the `KILN_*`
/// environment variable (clap), then to the `--config` file, then to the default.
#[derive(Args)]
pub struct ServeArgs {
    /// TOML config file with the same settings in snake_case (flags and env vars win over it;
    /// `configs/kiln.toml` shows every key).
    #[arg(long, env = "KILN_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    model: RawModelSettings,
    #[command(flatten)]
    plan_cache: PlanCacheSwitch,
    #[command(flatten)]
    server: RawServerSettings,
    /// Same as `--truncate false`.
    #[arg(
        long,
        env = "KILN_NO_AUTO_TRUNCATE",
        conflicts_with = "truncate",
        help_heading = "Serving"
    )]
    no_auto_truncate: bool,
}

impl ServeArgs {
    /// Stage one (flags and env over the config file) into stage two (the validated config).
    pub fn resolve(self) -> Result<ServeConfig> {
        let file = match &self.config {
            Some(path) => RawServeConfig::from_toml_file(path).map_err(|e| anyhow!(e))?,
            None => RawServeConfig::default(),
        };
        let mut server = self.server;
        if self.no_auto_truncate {
            server.truncate = Some(false);
        }
        let flags = RawServeConfig {
            model: self.plan_cache.apply(self.model),
            server,
        };
        flags.or(file).resolve().map_err(|e| anyhow!(e))
    }
}

/// `host:port`, or `[host]:port` for an IPv6 address.
fn socket_addr(host: &str, port: u16) -> Result<SocketAddr> {
    format!("{host}:{port}")
        .parse()
        .or_else(|_| format!("[{host}]:{port}").parse())
        .with_context(|| format!("invalid --host {host}"))
}

pub fn run(config: ServeConfig) -> Result<()> {
    let addr = socket_addr(&config.host, config.port)?;
    let grpc_addr = socket_addr(&config.host, config.grpc_port)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // A file-size limit (RLIMIT_FSIZE) reached while a plan-cache entry is written must fail
        // that write (EFBIG; the plan is then served uncached), not kill the server: SIGXFSZ's
        // default action ends the process. A handled signal makes the write return the error.
        #[cfg(target_os = "linux")]
        let _file_size_limit = tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::from_raw(25), // SIGXFSZ on Linux
        );
        let state = AppState::new(config).map_err(|e| anyhow!(e))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let grpc_listener = tokio::net::TcpListener::bind(grpc_addr)
            .await
            .with_context(|| format!("cannot listen on {grpc_addr} (gRPC)"))?;
        tracing::info!(address = %listener.local_addr()?, grpc = %grpc_listener.local_addr()?, "listening (HTTP at address, gRPC at grpc); /health answers 503 until every model is ready");
        let (routes, grpc_health) = grpc::routes(state.clone()).await.map_err(|e| anyhow!(e))?;

        // One signal stops both servers: each stops accepting and drains its in-flight requests.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stop_rx_for_health = stop_rx.clone();
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }
        };
        let health = grpc_health.clone();
        let draining = state.clone();
        let drain_for = draining.config().shutdown_timeout;
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
            health.set(false).await;
            // Draining has a deadline: then what is still in flight is answered 503, and a
            // moment later the process exits whatever is left (a client that stops reading).
            tokio::time::sleep(drain_for).await;
            tracing::warn!(shutdown_timeout = ?drain_for, "requests still in flight at the shutdown timeout are answered 503");
            draining.abort_in_flight();
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            tracing::warn!("connections still open 2 s after the shutdown timeout; exiting");
            std::process::exit(0);
        });
        // gRPC health follows readiness: NOT_SERVING while a worker thread is down.
        let watched = state.clone();
        let health = grpc_health.clone();
        let mut stopping = stop_rx_for_health;
        // Loading wakes it at once, so gRPC health turns SERVING together with /health.
        let loaded = std::sync::Arc::new(tokio::sync::Notify::new());
        let wake = loaded.clone();
        tokio::spawn(async move {
            let mut last = None;
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = wake.notified() => {}
                }
                if *stopping.borrow_and_update() {
                    return;
                }
                let ready = watched.is_ready();
                if last != Some(ready) {
                    if last.is_some() {
                        tracing::info!(ready, down = ?watched.workers_down(), "readiness changed");
                    }
                    health.set(ready).await;
                    last = Some(ready);
                }
            }
        });
        let http = axum::serve(listener, app(state.clone())).with_graceful_shutdown(stopped());
        let http = tokio::spawn(async move { http.await });
        let grpc = tokio::spawn(grpc::serve(grpc_listener, routes, stopped()));

        let loader = state.clone();
        let loaded_all = tokio::task::spawn_blocking(move || loader.load()).await?;
        loaded.notify_one();
        print_models(&state);
        if let Err(e) = loaded_all {
            tracing::error!(error = %e, "cannot load any model");
            return Err(anyhow!("cannot load any model: {e}"));
        }
        if let Some(idle) = state.config().model_idle_timeout {
            let watched = state.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval((idle / 4).clamp(
                    std::time::Duration::from_millis(100),
                    std::time::Duration::from_secs(10),
                ));
                loop {
                    tick.tick().await;
                    watched.unload_idle(idle).await;
                }
            });
        }
        if state.config().model_control == kiln_server::config::ModelControl::Poll {
            let watched = state.clone();
            let every = state.config().repository_poll_interval;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    watched.poll_repository().await;
                }
            });
        }
        let (http, grpc) = tokio::join!(http, grpc);
        http?.context("HTTP server")?;
        grpc?.context("gRPC server")?;
        tracing::info!("shut down cleanly");
        Ok(())
    })
}

/// What the server loaded, as a table on stdout (the logs have the same per model).
fn print_models(state: &AppState) {
    let rows: Vec<[String; 4]> = state
        .models()
        .all()
        .iter()
        .map(|m| {
            let st = m.state();
            let detail = st
                .reason()
                .unwrap_or_else(|| m.config.dir.display().to_string());
            [
                m.id().to_string(),
                m.kind_name().to_string(),
                st.name().to_string(),
                detail,
            ]
        })
        .collect();
    crate::tools::print_table(&["MODEL", "KIND", "STATE", "FOLDER / REASON"], &rows);
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<ServeConfig> {
        let cli = Cli::try_parse_from(std::iter::once("kiln").chain(args.iter().copied()))?;
        cli.serve.resolve()
    }

    #[test]
    fn flags_fill_both_groups() {
        let c = parse(&[
            "--model",
            "m",
            "--port",
            "9000",
            "--no-fuse",
            "--disable-pass",
            "qkv",
            "--api-key",
            "a",
            "--api-key",
            "b,c",
            "--quantize",
            "int8-dynamic",
            "--quantize-skip",
            "x.*,y",
            "--max-seq-length",
            "128",
            "--no-plan-cache",
            "--no-auto-truncate",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(c.port, 9000);
        assert_eq!(c.api_keys, ["a", "b", "c"]);
        assert_eq!(c.models[0].quant.layers.deny, ["x.*", "y"]);
        assert_eq!(c.models[0].max_input_tokens, Some(128));
        assert_eq!(c.models[0].cache_dir, None);
        assert!(!c.auto_truncate);
        assert_eq!(c.log_format, kiln_server::LogFormat::Json);
        let passes = &c.models[0].compile;
        assert!(!passes.enabled(kiln_engine::compile::PassId::BiasAct));
        assert!(!passes.enabled(kiln_engine::compile::PassId::QkvMerge));
    }

    #[test]
    fn no_fuse_takes_an_optional_value() {
        let on = parse(&["--model", "m", "--no-fuse=true"]).unwrap();
        assert!(
            !on.models[0]
                .compile
                .enabled(kiln_engine::compile::PassId::BiasAct)
        );
        let off = parse(&["--model", "m", "--no-fuse=false"]).unwrap();
        assert!(
            off.models[0]
                .compile
                .enabled(kiln_engine::compile::PassId::BiasAct)
        );
        assert!(parse(&["--model", "m", "--no-fuse=maybe"]).is_err());
    }

    #[test]
    fn flags_win_over_the_config_file() {
        let dir = std::env::temp_dir().join(format!("kiln-serve-args-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kiln.toml");
        std::fs::write(
            &file,
            "model = \"from-file\"\nport = 7000\nmax_batch_tokens = 1000\ntruncate = true\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let c = parse(&["--config", path, "--port", "7100", "--truncate", "false"]).unwrap();
        assert_eq!(c.models[0].id, "from-file");
        assert_eq!(c.port, 7100);
        assert_eq!(c.max_batch_tokens, 1000);
        assert!(!c.auto_truncate);
        std::fs::write(&file, "modle = \"x\"\n").unwrap();
        let err = parse(&["--config", path]).unwrap_err().to_string();
        assert!(err.contains("did you mean `model`"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn truncate_and_its_shorthand_conflict() {
        assert!(parse(&["--model", "m", "--truncate", "true", "--no-auto-truncate"]).is_err());
    }
}
