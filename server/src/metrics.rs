//! Prometheus metrics: one registry per server, rendered in the text format at `GET /metrics`.
//!
//! Names follow Prometheus conventions (`kiln_` prefix, counters end in `_total`, durations are
//! `_seconds`), so `promtool check metrics` is clean on a live scrape. Per-request counters and
//! the total-duration histogram are recorded by one middleware ([`track`]); queue, tokenization
//! and inference timings and batch shapes by the batcher.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder, exponential_buckets,
};

use crate::error::ErrorKind;

/// Failure reasons, the values of `kiln_request_failure_total{reason}`.
pub const FAILURE_REASONS: [&str; 7] = [
    "validation",
    "tokenization",
    "overloaded",
    "timeout",
    "inference",
    "cancelled",
    "unavailable",
];

/// API families, the values of the `api` label: the HTTP route families and gRPC.
pub const API_FAMILIES: [&str; 4] = ["openai", "kserve", "native", "grpc"];

#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

pub struct Inner {
    registry: Registry,
    pub requests: IntCounterVec,
    pub successes: IntCounterVec,
    pub failures: IntCounterVec,
    pub request_duration: HistogramVec,
    pub queue_duration: prometheus::Histogram,
    pub tokenization_duration: prometheus::Histogram,
    pub inference_duration: prometheus::Histogram,
    pub input_tokens: prometheus::Histogram,
    pub batch_size: prometheus::Histogram,
    pub batch_tokens: prometheus::Histogram,
    pub queue_size: IntGauge,
    pub model_load_seconds: Gauge,
    /// 1 for each model's current state (`READY`, `LOADING`, `UNLOADING`, `UNAVAILABLE`), 0 for the others;
    /// refreshed from the registry at each scrape.
    pub model_state: prometheus::IntGaugeVec,
    /// Loads at start and through the repository API, by model and outcome (`ok`, `failed`).
    pub model_loads: IntCounterVec,
    /// Unloads through the repository API (eviction included), by model.
    pub model_unloads: IntCounterVec,
    pub plan_compile_seconds: Gauge,
    pub plan_cache_load_seconds: Gauge,
    pub plan_cache_hits: IntCounter,
    pub plan_cache_misses: IntCounter,
    pub sdpa_calls: IntCounterVec,
    pub inferences: IntCounter,
    /// Generation (causal LMs): time to first token, time between tokens, tokens generated,
    /// and the KV cache's blocks and batch.
    pub time_to_first_token: prometheus::Histogram,
    pub inter_token_latency: prometheus::Histogram,
    pub generated_tokens: IntCounter,
    pub kv_cache_blocks_used: IntGauge,
    pub kv_cache_blocks_total: IntGauge,
    pub kv_cache_usage: Gauge,
    /// Always 1 once a model is loaded; the labels say where it runs (the GPU adapter's facts
    /// when it is one).
    pub device_info: prometheus::IntGaugeVec,
    pub generation_running: IntGauge,
    pub generation_waiting: IntGauge,
    /// Worker threads (the encoder backend, the generation scheduler): restarts after a panic,
    /// and whether each is running now.
    pub worker_restarts: IntCounterVec,
    pub worker_up: prometheus::IntGaugeVec,
    /// Totals for the KServe statistics extension (not exported to Prometheus, which has the
    /// histograms).
    success_ns: AtomicU64,
    failure_ns: AtomicU64,
    last_inference_ms: AtomicU64,
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> prometheus::Histogram {
    prometheus::Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid histogram")
}

/// 0.5 ms to ~65 s.
fn duration_buckets() -> Vec<f64> {
    exponential_buckets(0.0005, 2.0, 18).expect("valid buckets")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter")
        };
        let inner = Inner {
            requests: counter_vec(
                "kiln_request_total",
                "Inference requests received, by API family (openai, kserve, native: HTTP; grpc).",
                &["api"],
            ),
            successes: counter_vec(
                "kiln_request_success_total",
                "Inference requests answered successfully, by API family.",
                &["api"],
            ),
            failures: counter_vec(
                "kiln_request_failure_total",
                "Inference requests that failed, by reason (validation, tokenization, overloaded, timeout, inference, cancelled, unavailable).",
                &["reason"],
            ),
            request_duration: HistogramVec::new(
                HistogramOpts::new(
                    "kiln_request_duration_seconds",
                    "Time from receiving an inference request to answering it, by API family.",
                )
                .buckets(duration_buckets()),
                &["api"],
            )
            .expect("valid histogram"),
            queue_duration: histogram(
                "kiln_queue_duration_seconds",
                "Time a request waited in the batch queue before its batch started.",
                duration_buckets(),
            ),
            tokenization_duration: histogram(
                "kiln_tokenization_duration_seconds",
                "Time spent tokenizing one request.",
                duration_buckets(),
            ),
            inference_duration: histogram(
                "kiln_inference_duration_seconds",
                "Time of one engine call (a forward pass over one batch).",
                duration_buckets(),
            ),
            input_tokens: histogram(
                "kiln_request_input_tokens",
                "Tokens per input sequence after truncation, special tokens included.",
                exponential_buckets(2.0, 2.0, 12).expect("valid buckets"),
            ),
            batch_size: histogram(
                "kiln_batch_size",
                "Sequences per engine call.",
                exponential_buckets(1.0, 2.0, 10).expect("valid buckets"),
            ),
            batch_tokens: histogram(
                "kiln_batch_tokens",
                "Real (unpadded) tokens per engine call.",
                exponential_buckets(8.0, 2.0, 14).expect("valid buckets"),
            ),
            queue_size: IntGauge::new("kiln_queue_size", "Requests waiting in the batch queue.")
                .expect("valid gauge"),
            model_load_seconds: Gauge::new(
                "kiln_model_load_duration_seconds",
                "Time taken to load the model and warm it up.",
            )
            .expect("valid gauge"),
            plan_compile_seconds: Gauge::new(
                "kiln_plan_compile_duration_seconds",
                "Time the graph compiler took at load (0 when the plan came from the plan cache).",
            )
            .expect("valid gauge"),
            plan_cache_load_seconds: Gauge::new(
                "kiln_plan_cache_load_duration_seconds",
                "Time taken to read and verify the compiled plan from the plan cache (0 on a miss).",
            )
            .expect("valid gauge"),
            plan_cache_hits: IntCounter::new(
                "kiln_plan_cache_hits_total",
                "Model loads whose compiled plan came from the plan cache.",
            )
            .expect("valid counter"),
            plan_cache_misses: IntCounter::new(
                "kiln_plan_cache_misses_total",
                "Model loads that compiled their plan (no usable entry in an enabled plan cache).",
            )
            .expect("valid counter"),
            sdpa_calls: counter_vec(
                "kiln_sdpa_kernel_calls_total",
                "Attention (SDPA) calls by the kernel that ran them.",
                &["kernel"],
            ),
            inferences: IntCounter::new("kiln_batch_total", "Engine calls (batches) run.")
                .expect("valid counter"),
            time_to_first_token: histogram(
                "kiln_time_to_first_token_seconds",
                "Time from a generation request reaching the scheduler to its first token.",
                duration_buckets(),
            ),
            inter_token_latency: histogram(
                "kiln_inter_token_latency_seconds",
                "Time between consecutive tokens of one generation request.",
                exponential_buckets(0.0001, 2.0, 18).expect("valid buckets"),
            ),
            generated_tokens: IntCounter::new(
                "kiln_generated_tokens_total",
                "Tokens generated by causal LMs.",
            )
            .expect("valid counter"),
            kv_cache_blocks_used: IntGauge::new(
                "kiln_kv_cache_blocks_used",
                "KV cache blocks held by running generation requests.",
            )
            .expect("valid gauge"),
            kv_cache_blocks_total: IntGauge::new(
                "kiln_kv_cache_blocks_capacity",
                "KV cache blocks in the pool.",
            )
            .expect("valid gauge"),
            kv_cache_usage: Gauge::new(
                "kiln_kv_cache_usage_ratio",
                "Share of the KV cache's blocks in use (0 to 1).",
            )
            .expect("valid gauge"),
            device_info: prometheus::IntGaugeVec::new(
                Opts::new(
                    "kiln_device_info",
                    "Always 1 once the model is loaded; the labels say where it runs: the device, \
                     why (auto or configured), and the GPU adapter (name, graphics API, driver, \
                     f16 support; empty on the CPU).",
                ),
                &["device", "choice", "adapter", "api", "driver", "shader_f16"],
            )
            .expect("valid gauge"),
            generation_running: IntGauge::new(
                "kiln_generation_running_requests",
                "Generation requests in the running batch.",
            )
            .expect("valid gauge"),
            generation_waiting: IntGauge::new(
                "kiln_generation_waiting_requests",
                "Generation requests waiting to join the batch.",
            )
            .expect("valid gauge"),
            model_state: prometheus::IntGaugeVec::new(
                Opts::new(
                    "kiln_model_state",
                    "1 for each served model's current state (READY, LOADING, UNLOADING, UNAVAILABLE), 0 for the others.",
                ),
                &["model", "state"],
            )
            .expect("valid gauge"),
            model_loads: counter_vec(
                "kiln_model_loads_total",
                "Model loads (at start and through the repository API), by model and outcome.",
                &["model", "outcome"],
            ),
            model_unloads: counter_vec(
                "kiln_model_unloads_total",
                "Model unloads through the repository API (evictions included), by model.",
                &["model"],
            ),
            worker_restarts: counter_vec(
                "kiln_worker_restarts_total",
                "Times a worker thread died (a panic outside any one request's engine call) and was restarted, by worker and model.",
                &["worker", "model"],
            ),
            worker_up: prometheus::IntGaugeVec::new(
                Opts::new(
                    "kiln_worker_up",
                    "1 while the worker thread runs, 0 while it is dead or restarting (readiness is false then), by worker and model.",
                ),
                &["worker", "model"],
            )
            .expect("valid gauge"),
            registry,
            success_ns: AtomicU64::new(0),
            failure_ns: AtomicU64::new(0),
            last_inference_ms: AtomicU64::new(0),
        };
        let build_info = prometheus::IntGaugeVec::new(
            Opts::new(
                "kiln_build_info",
                "Always 1; the labels say which kiln build is running.",
            ),
            &["version", "target_arch", "target_os"],
        )
        .expect("valid gauge");
        build_info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                std::env::consts::ARCH,
                std::env::consts::OS,
            ])
            .set(1);
        let r = &inner.registry;
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(inner.requests.clone()),
            Box::new(inner.successes.clone()),
            Box::new(inner.failures.clone()),
            Box::new(inner.request_duration.clone()),
            Box::new(inner.queue_duration.clone()),
            Box::new(inner.tokenization_duration.clone()),
            Box::new(inner.inference_duration.clone()),
            Box::new(inner.input_tokens.clone()),
            Box::new(inner.batch_size.clone()),
            Box::new(inner.batch_tokens.clone()),
            Box::new(inner.queue_size.clone()),
            Box::new(inner.model_load_seconds.clone()),
            Box::new(inner.plan_compile_seconds.clone()),
            Box::new(inner.plan_cache_load_seconds.clone()),
            Box::new(inner.plan_cache_hits.clone()),
            Box::new(inner.plan_cache_misses.clone()),
            Box::new(inner.sdpa_calls.clone()),
            Box::new(inner.inferences.clone()),
            Box::new(inner.time_to_first_token.clone()),
            Box::new(inner.inter_token_latency.clone()),
            Box::new(inner.generated_tokens.clone()),
            Box::new(inner.kv_cache_blocks_used.clone()),
            Box::new(inner.kv_cache_blocks_total.clone()),
            Box::new(inner.kv_cache_usage.clone()),
            Box::new(inner.device_info.clone()),
            Box::new(inner.generation_running.clone()),
            Box::new(inner.generation_waiting.clone()),
            Box::new(inner.model_state.clone()),
            Box::new(inner.model_loads.clone()),
            Box::new(inner.model_unloads.clone()),
            Box::new(inner.worker_restarts.clone()),
            Box::new(inner.worker_up.clone()),
            Box::new(build_info),
        ];
        for c in collectors {
            r.register(c).expect("metric names are unique");
        }
        // Every series exists from the start (at zero), so dashboards and `rate()` see them
        // before the first failure of each kind.
        for reason in FAILURE_REASONS {
            inner.failures.with_label_values(&[reason]);
        }
        for api in API_FAMILIES {
            inner.requests.with_label_values(&[api]);
            inner.successes.with_label_values(&[api]);
        }
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Records how a model's plan came to be: compile and cache-read times, a cache hit or miss.
    pub fn record_plan(&self, plan: &kiln_models::PlanInfo) {
        self.plan_compile_seconds
            .set(plan.compile_time.as_secs_f64());
        self.plan_cache_load_seconds
            .set(plan.cache_load_time.as_secs_f64());
        match plan.cache {
            kiln_models::CacheOutcome::Hit => self.plan_cache_hits.inc(),
            kiln_models::CacheOutcome::Disabled => {}
            _ => self.plan_cache_misses.inc(),
        }
    }

    /// Records where the model runs (`kiln_device_info`).
    pub fn set_device(&self, placement: &kiln_models::DevicePlacement) {
        let a = placement.adapter.as_ref();
        let choice = match placement.requested {
            kiln_engine::DeviceChoice::Auto => "auto",
            kiln_engine::DeviceChoice::Fixed(_) => "configured",
        };
        self.inner
            .device_info
            .with_label_values(&[
                placement.device.to_string().as_str(),
                choice,
                a.map_or("", |a| a.name.as_str()),
                a.map_or("", |a| a.api.as_str()),
                a.map(|a| format!("{} {}", a.driver, a.driver_info))
                    .unwrap_or_default()
                    .trim(),
                a.map_or("", |a| if a.shader_f16 { "true" } else { "false" }),
            ])
            .set(1);
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.inner.registry.gather(), &mut buf)
            .expect("text encoding to a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }

    /// Seconds spent on successful and on failed inference requests.
    pub fn outcome_seconds(&self) -> (f64, f64) {
        (
            self.success_ns.load(Ordering::Relaxed) as f64 / 1e9,
            self.failure_ns.load(Ordering::Relaxed) as f64 / 1e9,
        )
    }

    /// When the last inference request finished, in ms since the Unix epoch (0: never).
    pub fn last_inference_ms(&self) -> u64 {
        self.last_inference_ms.load(Ordering::Relaxed)
    }

    /// Adds the attention calls made since `before` (cumulative counts from the engine).
    pub fn add_sdpa_calls(&self, before: &[(&'static str, u64)], after: &[(&'static str, u64)]) {
        for (kernel, now) in after {
            let prev = before
                .iter()
                .find(|(k, _)| k == kernel)
                .map_or(0, |(_, n)| *n);
            if *now > prev {
                self.sdpa_calls
                    .with_label_values(&[kernel])
                    .inc_by(now - prev);
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::ops::Deref for Metrics {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

/// `GET /metrics`.
pub async fn scrape(State(state): State<crate::app::AppState>) -> Response {
    let metrics = state.metrics();
    for m in state.models().all() {
        let current = m.state().name();
        for name in ["READY", "LOADING", "UNLOADING", "UNAVAILABLE"] {
            metrics
                .model_state
                .with_label_values(&[m.id(), name])
                .set(i64::from(name == current));
        }
    }
    let mut response = metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// The API family a route belongs to, the `api` label.
fn api_of(path: &str) -> &'static str {
    if path.starts_with("/v1/") {
        "openai"
    } else if path.starts_with("/v2/") {
        "kserve"
    } else {
        "native"
    }
}

/// One inference request being counted: `kiln_request_total{api}` when it starts; success or
/// failure by reason and `kiln_request_duration_seconds{api}` when [`finish`](Self::finish)ed;
/// a request dropped before it finished (its client went away) counts as `cancelled`. The HTTP
/// middleware [`track`] and the gRPC service both count through it.
pub struct RequestTracker {
    metrics: Metrics,
    api: &'static str,
    started: Instant,
    done: bool,
}

impl Metrics {
    pub fn start_request(&self, api: &'static str) -> RequestTracker {
        self.requests.with_label_values(&[api]).inc();
        RequestTracker {
            metrics: self.clone(),
            api,
            started: Instant::now(),
            done: false,
        }
    }
}

impl RequestTracker {
    /// `failure`: `None` for a success, else the error's kind (see [`FAILURE_REASONS`]).
    pub fn finish(mut self, failure: Option<&str>) {
        self.done = true;
        let m = &self.metrics;
        let elapsed = self.started.elapsed();
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        m.last_inference_ms.store(now_ms, Ordering::Relaxed);
        match failure {
            None => {
                m.successes.with_label_values(&[self.api]).inc();
                m.success_ns.fetch_add(ns, Ordering::Relaxed);
            }
            Some(kind) => {
                m.failure_ns.fetch_add(ns, Ordering::Relaxed);
                m.failures.with_label_values(&[reason_of(kind)]).inc();
            }
        }
        m.request_duration
            .with_label_values(&[self.api])
            .observe(elapsed.as_secs_f64());
    }
}

impl Drop for RequestTracker {
    fn drop(&mut self) {
        if !self.done {
            self.metrics
                .failures
                .with_label_values(&["cancelled"])
                .inc();
        }
    }
}

/// Middleware on the inference routes: request count, outcome by reason, total duration.
pub async fn track(State(metrics): State<Metrics>, req: Request, next: Next) -> Response<Body> {
    let api = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("native", |p| api_of(p.as_str()));
    let tracker = metrics.start_request(api);
    crate::supervise::maybe_inject("request-handler");
    let response = next.run(req).await;
    let failure = if response.status().is_success() {
        None
    } else {
        Some(response.extensions().get::<ErrorKind>().map_or(
            if response.status().is_server_error() {
                "inference"
            } else {
                "validation"
            },
            |k| k.0,
        ))
    };
    tracker.finish(failure);
    response
}

/// Error kinds map onto the fixed set of failure reasons.
fn reason_of(kind: &str) -> &'static str {
    FAILURE_REASONS
        .iter()
        .find(|r| **r == kind)
        .copied()
        .unwrap_or(match kind {
            "internal" => "inference",
            _ => "validation",
        })
}
