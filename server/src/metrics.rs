//! Prometheus metrics: one registry per server, rendered in the text format at `GET /metrics`.
//!
//! Names follow Prometheus conventions (`kiln_` prefix, counters end in `_total`, durations are
//! `_seconds`), so `promtool check metrics` is clean on a live scrape. Per-request counters and
//! the total-duration histogram are recorded by one middleware ([`track`]); queue, tokenization
//! and inference timings and batch shapes by the batcher.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder, exponential_buckets,
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
    /// Requests, outcomes and durations by API family (or failure reason) and model (`""` for a
    /// request that failed before a model was chosen for it). A request is counted once, when
    /// it is answered (or its client leaves): by then its model is known.
    pub requests: IntCounterVec,
    pub successes: IntCounterVec,
    pub failures: IntCounterVec,
    pub request_duration: HistogramVec,
    // Per model (the `model` label); a model's series are handed to its batcher or scheduler
    // as a [`ModelMetrics`].
    queue_duration: HistogramVec,
    tokenization_duration: HistogramVec,
    inference_duration: HistogramVec,
    input_tokens: HistogramVec,
    batch_size: HistogramVec,
    batch_tokens: HistogramVec,
    queue_size: IntGaugeVec,
    model_load_seconds: GaugeVec,
    /// Bytes a loaded model holds: its weights as the plan stores them, and a causal LM's KV
    /// cache; 0 once unloaded.
    model_memory: IntGaugeVec,
    /// 1 for each model's current state (`READY`, `LOADING`, `UNLOADING`, `UNAVAILABLE`), 0 for the others;
    /// refreshed from the registry at each scrape.
    pub model_state: prometheus::IntGaugeVec,
    /// Loads at start and through the repository API, by model and outcome (`ok`, `failed`).
    pub model_loads: IntCounterVec,
    /// Unloads through the repository API (eviction included), by model.
    pub model_unloads: IntCounterVec,
    plan_compile_seconds: GaugeVec,
    plan_cache_load_seconds: GaugeVec,
    plan_cache_hits: IntCounterVec,
    plan_cache_misses: IntCounterVec,
    sdpa_calls: IntCounterVec,
    inferences: IntCounterVec,
    // Generation (causal LMs): time to first token, time between tokens, tokens generated,
    // and the KV cache's blocks and batch.
    time_to_first_token: HistogramVec,
    inter_token_latency: HistogramVec,
    generated_tokens: IntCounterVec,
    kv_cache_blocks_used: IntGaugeVec,
    kv_cache_blocks_total: IntGaugeVec,
    kv_cache_usage: GaugeVec,
    /// Always 1 while a model is loaded; the labels say where it runs (the GPU adapter's facts
    /// when it is one).
    device_info: IntGaugeVec,
    generation_running: IntGaugeVec,
    generation_waiting: IntGaugeVec,
    /// Worker threads (the encoder backend, the generation scheduler): restarts after a panic,
    /// and whether each is running now.
    pub worker_restarts: IntCounterVec,
    pub worker_up: prometheus::IntGaugeVec,
    /// Each model's series, made once per model name.
    models: Mutex<HashMap<String, ModelMetrics>>,
}

/// A histogram by model.
fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["model"])
        .expect("valid histogram")
}

/// A gauge by model.
fn gauge(name: &str, help: &str) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), &["model"]).expect("valid gauge")
}

/// An integer gauge by model.
fn int_gauge(name: &str, help: &str) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), &["model"]).expect("valid gauge")
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
                "Inference requests, counted when answered, by API family (openai, kserve, native: HTTP; grpc) and model.",
                &["api", "model"],
            ),
            successes: counter_vec(
                "kiln_request_success_total",
                "Inference requests answered successfully, by API family and model.",
                &["api", "model"],
            ),
            failures: counter_vec(
                "kiln_request_failure_total",
                "Inference requests that failed, by reason (validation, tokenization, overloaded, timeout, inference, cancelled, unavailable) and model (empty when the request failed before a model was chosen).",
                &["reason", "model"],
            ),
            request_duration: HistogramVec::new(
                HistogramOpts::new(
                    "kiln_request_duration_seconds",
                    "Time from receiving an inference request to answering it, by API family and model.",
                )
                .buckets(duration_buckets()),
                &["api", "model"],
            )
            .expect("valid histogram"),
            queue_duration: histogram(
                "kiln_queue_duration_seconds",
                "Time a request waited in its model's batch queue before its batch started.",
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
            queue_size: int_gauge("kiln_queue_size", "Requests waiting in the model's batch queue."),
            model_load_seconds: gauge(
                "kiln_model_load_duration_seconds",
                "Time taken to load the model and warm it up.",
            ),
            model_memory: int_gauge(
                "kiln_model_memory_bytes",
                "Bytes a loaded model holds: its weights as the compiled plan stores them, plus a causal LM's KV cache (activations not included); 0 when not loaded.",
            ),
            plan_compile_seconds: gauge(
                "kiln_plan_compile_duration_seconds",
                "Time the graph compiler took at the model's last load (0 when the plan came from the plan cache).",
            ),
            plan_cache_load_seconds: gauge(
                "kiln_plan_cache_load_duration_seconds",
                "Time taken to read and verify the compiled plan from the plan cache at the model's last load (0 on a miss).",
            ),
            plan_cache_hits: counter_vec(
                "kiln_plan_cache_hits_total",
                "Model loads whose compiled plan came from the plan cache.",
                &["model"],
            ),
            plan_cache_misses: counter_vec(
                "kiln_plan_cache_misses_total",
                "Model loads that compiled their plan (no usable entry in an enabled plan cache).",
                &["model"],
            ),
            sdpa_calls: counter_vec(
                "kiln_sdpa_kernel_calls_total",
                "Attention (SDPA) calls by model and the kernel that ran them.",
                &["model", "kernel"],
            ),
            inferences: counter_vec(
                "kiln_batch_total",
                "Engine calls (batches) run.",
                &["model"],
            ),
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
            generated_tokens: counter_vec(
                "kiln_generated_tokens_total",
                "Tokens generated by causal LMs.",
                &["model"],
            ),
            kv_cache_blocks_used: int_gauge(
                "kiln_kv_cache_blocks_used",
                "KV cache blocks held by running generation requests.",
            ),
            kv_cache_blocks_total: int_gauge(
                "kiln_kv_cache_blocks_capacity",
                "KV cache blocks in the pool.",
            ),
            kv_cache_usage: gauge(
                "kiln_kv_cache_usage_ratio",
                "Share of the KV cache's blocks in use (0 to 1).",
            ),
            device_info: IntGaugeVec::new(
                Opts::new(
                    "kiln_device_info",
                    "Always 1 while the model is loaded; the labels say where it runs: the device, \
                     why (auto or configured), and the GPU adapter (name, graphics API, driver, \
                     f16 support; empty on the CPU).",
                ),
                &["model", "device", "choice", "adapter", "api", "driver", "shader_f16"],
            )
            .expect("valid gauge"),
            generation_running: int_gauge(
                "kiln_generation_running_requests",
                "Generation requests in the running batch.",
            ),
            generation_waiting: int_gauge(
                "kiln_generation_waiting_requests",
                "Generation requests waiting to join the batch.",
            ),
            model_state: IntGaugeVec::new(
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
            worker_up: IntGaugeVec::new(
                Opts::new(
                    "kiln_worker_up",
                    "1 while the worker thread runs, 0 while it is dead or restarting (readiness is false then), by worker and model.",
                ),
                &["worker", "model"],
            )
            .expect("valid gauge"),
            registry,
            models: Mutex::new(HashMap::new()),
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
            Box::new(inner.model_memory.clone()),
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
        let metrics = Self {
            inner: Arc::new(inner),
        };
        metrics.touch_outcomes("");
        metrics
    }

    /// Makes the outcome series of requests for `model` exist (at zero).
    fn touch_outcomes(&self, model: &str) {
        for reason in FAILURE_REASONS {
            self.failures.with_label_values(&[reason, model]);
        }
        for api in API_FAMILIES {
            self.requests.with_label_values(&[api, model]);
            self.successes.with_label_values(&[api, model]);
        }
    }

    /// `model`'s statistics (what each finished request adds to), without cloning its series.
    fn stats_of(&self, model: &str) -> Arc<ModelStats> {
        let known = self
            .models
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .map(|m| m.stats.clone());
        known.unwrap_or_else(|| self.for_model(model).stats)
    }

    /// `model`'s series (made, at zero, on first use): what its batcher or scheduler records
    /// into, and what Triton's statistics extension reads.
    pub fn for_model(&self, model: &str) -> ModelMetrics {
        let mut models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = models.get(model) {
            return m.clone();
        }
        self.touch_outcomes(model);
        let l = &[model];
        let m = ModelMetrics {
            shared: self.clone(),
            model: model.into(),
            queue_duration: self.queue_duration.with_label_values(l),
            tokenization_duration: self.tokenization_duration.with_label_values(l),
            inference_duration: self.inference_duration.with_label_values(l),
            input_tokens: self.input_tokens.with_label_values(l),
            batch_size: self.batch_size.with_label_values(l),
            batch_tokens: self.batch_tokens.with_label_values(l),
            queue_size: self.queue_size.with_label_values(l),
            load_seconds: self.model_load_seconds.with_label_values(l),
            memory_bytes: self.model_memory.with_label_values(l),
            plan_compile_seconds: self.plan_compile_seconds.with_label_values(l),
            plan_cache_load_seconds: self.plan_cache_load_seconds.with_label_values(l),
            plan_cache_hits: self.plan_cache_hits.with_label_values(l),
            plan_cache_misses: self.plan_cache_misses.with_label_values(l),
            inferences: self.inferences.with_label_values(l),
            time_to_first_token: self.time_to_first_token.with_label_values(l),
            inter_token_latency: self.inter_token_latency.with_label_values(l),
            generated_tokens: self.generated_tokens.with_label_values(l),
            kv_cache_blocks_used: self.kv_cache_blocks_used.with_label_values(l),
            kv_cache_blocks_total: self.kv_cache_blocks_total.with_label_values(l),
            kv_cache_usage: self.kv_cache_usage.with_label_values(l),
            generation_running: self.generation_running.with_label_values(l),
            generation_waiting: self.generation_waiting.with_label_values(l),
            stats: Arc::default(),
            device: Arc::default(),
        };
        models.insert(model.to_string(), m.clone());
        m
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.inner.registry.gather(), &mut buf)
            .expect("text encoding to a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

/// One model's series, with its `model` label applied once; handed to its batcher or
/// scheduler when it loads.
#[derive(Clone)]
pub struct ModelMetrics {
    /// The server's metrics (worker health is recorded there).
    pub shared: Metrics,
    pub model: Arc<str>,
    pub queue_duration: Histogram,
    pub tokenization_duration: Histogram,
    pub inference_duration: Histogram,
    pub input_tokens: Histogram,
    pub batch_size: Histogram,
    pub batch_tokens: Histogram,
    pub queue_size: IntGauge,
    pub load_seconds: Gauge,
    pub memory_bytes: IntGauge,
    plan_compile_seconds: Gauge,
    plan_cache_load_seconds: Gauge,
    plan_cache_hits: IntCounter,
    plan_cache_misses: IntCounter,
    pub inferences: IntCounter,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub generated_tokens: IntCounter,
    pub kv_cache_blocks_used: IntGauge,
    pub kv_cache_blocks_total: IntGauge,
    pub kv_cache_usage: Gauge,
    pub generation_running: IntGauge,
    pub generation_waiting: IntGauge,
    /// What Triton's statistics extension reports beyond the Prometheus series.
    pub stats: Arc<ModelStats>,
    /// The `kiln_device_info` labels set for the model, to remove them when it goes.
    device: Arc<Mutex<Option<Vec<String>>>>,
}

impl ModelMetrics {
    /// Records how the model's plan came to be: compile and cache-read times, a cache hit or
    /// miss.
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

    /// Records where the model runs (`kiln_device_info`), replacing what an earlier load of it
    /// recorded.
    pub fn set_device(&self, placement: &kiln_models::DevicePlacement) {
        self.clear_device();
        let a = placement.adapter.as_ref();
        let choice = match placement.requested {
            kiln_engine::DeviceChoice::Auto => "auto",
            kiln_engine::DeviceChoice::Fixed(_) => "configured",
        };
        let values: Vec<String> = vec![
            self.model.to_string(),
            placement.device.to_string(),
            choice.into(),
            a.map_or("", |a| a.name.as_str()).into(),
            a.map_or("", |a| a.api.as_str()).into(),
            a.map(|a| format!("{} {}", a.driver, a.driver_info))
                .unwrap_or_default()
                .trim()
                .into(),
            a.map_or("", |a| if a.shader_f16 { "true" } else { "false" })
                .into(),
        ];
        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
        self.shared.device_info.with_label_values(&refs).set(1);
        *self.device.lock().unwrap_or_else(|p| p.into_inner()) = Some(values);
    }

    fn clear_device(&self) {
        let mut labels = self.device.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(values) = labels.take() {
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            let _ = self.shared.device_info.remove_label_values(&values);
        }
    }

    /// The model was unloaded: its gauges go to zero and its device series away; counters and
    /// histograms keep their totals.
    pub fn unloaded(&self) {
        self.clear_device();
        self.memory_bytes.set(0);
        self.queue_size.set(0);
        self.kv_cache_blocks_used.set(0);
        self.kv_cache_blocks_total.set(0);
        self.kv_cache_usage.set(0.0);
        self.generation_running.set(0);
        self.generation_waiting.set(0);
    }

    /// Adds the attention calls made since `before` (cumulative counts from the engine).
    pub fn add_sdpa_calls(&self, before: &[(&'static str, u64)], after: &[(&'static str, u64)]) {
        for (kernel, now) in after {
            let prev = before
                .iter()
                .find(|(k, _)| k == kernel)
                .map_or(0, |(_, n)| *n);
            if *now > prev {
                self.shared
                    .sdpa_calls
                    .with_label_values(&[&*self.model, kernel])
                    .inc_by(now - prev);
            }
        }
    }
}

/// A count and the nanoseconds spent, as Triton's statistics report them.
#[derive(Default)]
pub struct Stat {
    count: AtomicU64,
    ns: AtomicU64,
}

impl Stat {
    pub fn add(&self, count: u64, d: Duration) {
        self.count.fetch_add(count, Ordering::Relaxed);
        self.ns.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// `(count, ns)`.
    pub fn get(&self) -> (u64, u64) {
        (
            self.count.load(Ordering::Relaxed),
            self.ns.load(Ordering::Relaxed),
        )
    }
}

/// One batch size's engine calls: assembling the inputs, the call, and taking the outputs
/// apart.
#[derive(Default, Clone, Copy)]
pub struct BatchStat {
    pub count: u64,
    pub input_ns: u64,
    pub infer_ns: u64,
    pub output_ns: u64,
}

/// A model's totals for Triton's statistics extension.
#[derive(Default)]
pub struct ModelStats {
    pub success: Stat,
    pub fail: Stat,
    /// Taking outputs apart into each request's answer.
    pub compute_output: Stat,
    /// When a request for the model last finished, ms since the Unix epoch (0: never).
    last_inference_ms: AtomicU64,
    batches: Mutex<BTreeMap<usize, BatchStat>>,
}

impl ModelStats {
    pub fn last_inference_ms(&self) -> u64 {
        self.last_inference_ms.load(Ordering::Relaxed)
    }

    /// Records one engine call of `size` sequences.
    pub fn record_batch(&self, size: usize, input: Duration, infer: Duration, output: Duration) {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let mut batches = self.batches.lock().unwrap_or_else(|p| p.into_inner());
        let b = batches.entry(size).or_default();
        b.count += 1;
        b.input_ns = b.input_ns.saturating_add(ns(input));
        b.infer_ns = b.infer_ns.saturating_add(ns(infer));
        b.output_ns = b.output_ns.saturating_add(ns(output));
    }

    /// Engine calls by batch size, smallest first.
    pub fn batches(&self) -> Vec<(usize, BatchStat)> {
        let batches = self.batches.lock().unwrap_or_else(|p| p.into_inner());
        batches.iter().map(|(k, v)| (*k, *v)).collect()
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

/// One inference request being counted: when [`finish`](Self::finish)ed, `kiln_request_total`,
/// success or failure by reason, and `kiln_request_duration_seconds`, by API family and the
/// model the request was routed to (see [`crate::request_id::note_model`]); a request dropped
/// before it finished (its client went away) counts as `cancelled`. The HTTP middleware [`track`] and the gRPC service both count through
/// it, inside the request's [`crate::request_id::Context`].
pub struct RequestTracker {
    metrics: Metrics,
    api: &'static str,
    context: Option<Arc<crate::request_id::Context>>,
    started: Instant,
    done: bool,
}

impl Metrics {
    pub fn start_request(&self, api: &'static str) -> RequestTracker {
        RequestTracker {
            metrics: self.clone(),
            api,
            context: crate::request_id::current(),
            started: Instant::now(),
            done: false,
        }
    }
}

impl RequestTracker {
    /// The model's name, or `""` (no model was chosen, or it is not served: only served names
    /// become label values).
    fn model(&self) -> &str {
        self.context.as_ref().and_then(|c| c.model()).unwrap_or("")
    }

    /// `failure`: `None` for a success, else the error's kind (see [`FAILURE_REASONS`]).
    pub fn finish(mut self, failure: Option<&str>) {
        self.done = true;
        let m = &self.metrics;
        let model = self.model();
        let elapsed = self.started.elapsed();
        m.requests.with_label_values(&[self.api, model]).inc();
        let stats = (!model.is_empty()).then(|| m.stats_of(model));
        if let Some(stats) = &stats {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            stats.last_inference_ms.store(now_ms, Ordering::Relaxed);
        }
        match failure {
            None => {
                m.successes.with_label_values(&[self.api, model]).inc();
                if let Some(stats) = &stats {
                    stats.success.add(1, elapsed);
                }
            }
            Some(kind) => {
                m.failures
                    .with_label_values(&[reason_of(kind), model])
                    .inc();
                if let Some(stats) = &stats {
                    stats.fail.add(1, elapsed);
                }
            }
        }
        m.request_duration
            .with_label_values(&[self.api, model])
            .observe(elapsed.as_secs_f64());
    }
}

impl Drop for RequestTracker {
    fn drop(&mut self) {
        if !self.done {
            let model = self.model();
            self.metrics
                .requests
                .with_label_values(&[self.api, model])
                .inc();
            self.metrics
                .failures
                .with_label_values(&["cancelled", model])
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
