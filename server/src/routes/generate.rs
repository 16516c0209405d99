//! Text generation routes in TGI's shape, `POST /generate` and `POST /generate_stream`, and
//! what every generation route shares: sampling parameters from a request (with the model's
//! `generation_config.json` as defaults), collecting a whole answer, and Server-Sent Events.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use kiln_models::decoder::GenerationDefaults;
use kiln_models::{FinishReason, GenerationRequest, SamplingParams};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::AppState;
use crate::error::AppError;
use crate::generation::{Generation, GenerationService, Piece};
use crate::json::ApiJson;
use crate::routes::ModelHeader;

/// Sampling and stopping settings common to every generation API (each spells them its own
/// way and fills this).
#[derive(Debug, Default, Clone)]
pub struct GenParams {
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub do_sample: Option<bool>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
}

/// Most stop strings one request may give (OpenAI allows 4).
const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes. Matching costs nothing per byte of a stop string, but each is
/// held for the life of the request and text up to its length is held back from streams.
pub const MAX_STOP_BYTES: usize = 1024;

/// When a request must be answered by: its arrival plus `--request-timeout`. Covers everything
/// (admission, tokenization, the queue, waiting for KV cache memory, generation).
#[derive(Clone)]
pub struct Deadline {
    at: tokio::time::Instant,
    timeout: std::time::Duration,
    aborted: crate::admission::Aborted,
}

impl Deadline {
    pub fn starting_now(service: &GenerationService) -> Self {
        let timeout = service.request_timeout();
        Self {
            at: tokio::time::Instant::now() + timeout,
            timeout,
            aborted: service.aborted().clone(),
        }
    }

    /// The next piece of `generation`; [`Piece::TimedOut`] once the deadline has passed,
    /// [`Piece::ShuttingDown`] once a draining server gives up.
    pub async fn next(&self, generation: &mut Generation, generated: usize) -> Option<Piece> {
        tokio::select! {
            p = tokio::time::timeout_at(self.at, generation.next()) => match p {
                Ok(p) => p,
                Err(_) => Some(Piece::TimedOut(self.message(generated))),
            },
            () = self.aborted.wait() => Some(Piece::ShuttingDown),
        }
    }

    fn message(&self, generated: usize) -> String {
        if generated == 0 {
            format!(
                "the request was not answered within the request timeout ({:?}): it was still \
                 waiting for a place in the running batch or for KV cache memory; it was \
                 cancelled and its reservation freed",
                self.timeout
            )
        } else {
            format!(
                "the request was not answered within the request timeout ({:?}): {generated} \
                 tokens were generated; it was cancelled and its KV cache blocks freed",
                self.timeout
            )
        }
    }
}

/// 504 for a timed-out generation.
pub fn timed_out(message: String) -> AppError {
    AppError::new(axum::http::StatusCode::GATEWAY_TIMEOUT, "timeout", message)
}

impl GenParams {
    /// The request for `prompt`. Sampling settings a request leaves out come from the model's
    /// `generation_config.json`; without `do_sample` there, generation is greedy unless the
    /// request sets a temperature.
    pub fn into_request(
        self,
        service: &GenerationService,
        prompt: Vec<u32>,
    ) -> Result<GenerationRequest, AppError> {
        let model = service.model();
        let default_max = service.default_max_tokens(prompt.len());
        self.resolve(
            model.generation_defaults(),
            model.info().max_context,
            default_max,
            prompt,
        )
    }

    /// [`GenParams::into_request`] without the model: its generation defaults, its context and
    /// the default `max_tokens` for this prompt are given.
    pub(crate) fn resolve(
        self,
        defaults: &GenerationDefaults,
        context: usize,
        default_max_tokens: usize,
        prompt: Vec<u32>,
    ) -> Result<GenerationRequest, AppError> {
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(AppError::validation(format!(
                "at most {MAX_STOP_STRINGS} stop strings, got {}",
                self.stop.len()
            )));
        }
        if let Some((i, s)) = self
            .stop
            .iter()
            .enumerate()
            .find(|(_, s)| s.len() > MAX_STOP_BYTES)
        {
            return Err(AppError::validation(format!(
                "stop string {i} is {} bytes; the limit is {MAX_STOP_BYTES}",
                s.len()
            )));
        }
        if let Some(t) = self.temperature
            && !(t >= 0.0 && t.is_finite())
        {
            return Err(AppError::validation(format!(
                "temperature must be >= 0, got {t}"
            )));
        }
        let sample = match self.do_sample {
            Some(s) => s,
            None => self
                .temperature
                .map_or(defaults.do_sample == Some(true), |t| t > 0.0),
        };
        let sampling = SamplingParams {
            temperature: if sample {
                self.temperature.or(defaults.temperature).unwrap_or(1.0)
            } else {
                0.0
            },
            top_k: self.top_k.or(defaults.top_k).unwrap_or(0),
            top_p: self.top_p.or(defaults.top_p).unwrap_or(1.0),
            repetition_penalty: self
                .repetition_penalty
                .or(defaults.repetition_penalty)
                .unwrap_or(1.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            seed: self.seed,
        };
        if sample && sampling.temperature == 0.0 && self.do_sample == Some(true) {
            return Err(AppError::validation(
                "do_sample needs a temperature above 0",
            ));
        }
        sampling.validate().map_err(AppError::validation)?;
        let max_new_tokens = match self.max_tokens {
            Some(0) => return Err(AppError::validation("max_tokens must be at least 1")),
            Some(n) if n > context => {
                return Err(AppError::validation(format!(
                    "max_tokens is {n}; the model's context is {context} tokens (prompt and \
                     generated tokens together)"
                )));
            }
            Some(n) => n,
            None => default_max_tokens,
        };
        Ok(GenerationRequest {
            prompt,
            max_new_tokens,
            sampling,
            stop: self.stop,
            stop_token_ids: self.stop_token_ids,
            ignore_eos: self.ignore_eos,
        })
    }
}

/// `stop` as OpenAI and TGI send it: a string or a list of strings.
pub fn stop_strings(v: &Value) -> Result<Vec<String>, AppError> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_string).ok_or_else(|| {
                    AppError::validation("`stop` must be a string or a list of strings")
                })
            })
            .collect(),
        _ => Err(AppError::validation(
            "`stop` must be a string or a list of strings",
        )),
    }
}

/// A whole generation, gathered.
pub struct Completed {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
}

/// Reads a generation to its end, or 504 at the deadline (dropping the generation cancels it).
pub async fn collect(
    mut generation: Generation,
    deadline: Deadline,
) -> Result<Completed, AppError> {
    let mut out = Completed {
        text: String::new(),
        tokens: Vec::new(),
        finish: FinishReason::Length,
        prompt_tokens: generation.prompt_tokens,
    };
    while let Some(piece) = deadline.next(&mut generation, out.tokens.len()).await {
        match piece {
            Piece::Token {
                id, text, finish, ..
            } => {
                out.tokens.push(id);
                out.text.push_str(&text);
                if let Some(f) = finish {
                    out.finish = f;
                    return Ok(out);
                }
            }
            Piece::Failed(message) => {
                tracing::error!(error = %message, "generation failed");
                return Err(AppError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "inference",
                    "generation failed; see the server log",
                ));
            }
            Piece::TimedOut(message) => return Err(timed_out(message)),
            Piece::ShuttingDown => return Err(AppError::shutting_down()),
        }
    }
    Err(AppError::unavailable(
        "the generation worker stopped while running this request; retry",
    ))
}

/// Server-Sent Events from a generation: `render` turns each piece into events and says when
/// the stream ends. Dropping the stream (the client went away) drops the generation, which
/// cancels it and frees its KV blocks at once.
pub fn sse<F>(
    generation: Generation,
    deadline: Deadline,
    render: F,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>>
where
    F: FnMut(Piece) -> (Vec<Event>, bool) + Send + 'static,
{
    struct State<F> {
        generation: Generation,
        deadline: Deadline,
        generated: usize,
        queue: VecDeque<Event>,
        render: F,
        ended: bool,
    }
    let state = State {
        generation,
        deadline,
        generated: 0,
        queue: VecDeque::new(),
        render,
        ended: false,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(e) = st.queue.pop_front() {
                return Some((Ok(e), st));
            }
            if st.ended {
                return None;
            }
            match st.deadline.next(&mut st.generation, st.generated).await {
                Some(p) => {
                    if matches!(p, Piece::Token { .. }) {
                        st.generated += 1;
                    }
                    let (events, end) = (st.render)(p);
                    st.queue.extend(events);
                    st.ended = end;
                }
                None => st.ended = true,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// JSON data for an SSE event.
pub fn event(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TgiParameters {
    #[serde(default)]
    max_new_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    repetition_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    do_sample: Option<bool>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Vec<String>,
    #[serde(default)]
    details: bool,
    #[serde(default)]
    return_full_text: Option<bool>,
    /// Accepted for TGI compatibility; kiln does not return prompt token details.
    #[serde(default)]
    #[allow(dead_code)]
    decoder_input_details: bool,
    #[serde(default)]
    #[allow(dead_code)]
    watermark: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TgiRequest {
    inputs: String,
    /// Which served model (TGI has no such field; an `X-Model` header works too).
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    parameters: TgiParameters,
    /// `/generate_stream` only (ignored by `/generate`, as in TGI).
    #[serde(default)]
    #[allow(dead_code)]
    stream: bool,
}

impl TgiParameters {
    fn gen_params(&self) -> GenParams {
        let p = self;
        GenParams {
            max_tokens: p.max_new_tokens,
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            repetition_penalty: p.repetition_penalty,
            frequency_penalty: p.frequency_penalty,
            do_sample: p.do_sample,
            seed: p.seed,
            stop: p.stop.clone(),
            ..GenParams::default()
        }
    }
}

/// The model-free checks of a `/generate` body (parsing and sampling settings), for the fuzz
/// targets: what any request goes through before a model is involved.
pub(crate) fn check_body(body: &[u8]) -> Result<(), AppError> {
    let req: TgiRequest =
        serde_json::from_slice(body).map_err(|e| AppError::validation(e.to_string()))?;
    req.parameters
        .gen_params()
        .resolve(&GenerationDefaults::default(), 1024, 16, vec![0; 4])
        .map(drop)
}

/// A TGI request started on its model: the generation, its deadline, the request's parameters
/// and prompt, and the model's service.
type Started = (
    Generation,
    Deadline,
    TgiParameters,
    String,
    GenerationService,
);

async fn tgi_generation(
    state: &AppState,
    header: ModelHeader,
    req: TgiRequest,
) -> Result<Started, AppError> {
    let service = &state.causal_lm(header.or_field(req.model.as_deref()).as_deref())?;
    let deadline = Deadline::starting_now(service);
    if req.inputs.is_empty() {
        return Err(AppError::validation("`inputs` must not be empty"));
    }
    let p = req.parameters;
    let params = p.gen_params();
    let slot = service.admit()?;
    let prompt = service.encode(req.inputs.clone(), true).await?;
    let request = params.into_request(service, prompt)?;
    let generation = service.start_generation(request, slot).await?;
    Ok((generation, deadline, p, req.inputs, service.clone()))
}

fn details(finish: FinishReason, generated: usize, seed: Option<u64>) -> Value {
    json!({
        "finish_reason": match finish {
            FinishReason::Length => "length",
            FinishReason::Stop => "eos_token",
        },
        "generated_tokens": generated,
        "seed": seed,
    })
}

/// `POST /generate`: `{"inputs": "...", "parameters": {...}}` → `{"generated_text": "..."}`.
pub async fn generate(
    State(state): State<AppState>,
    header: ModelHeader,
    ApiJson(req): ApiJson<TgiRequest>,
) -> Result<Json<Value>, AppError> {
    let (generation, deadline, p, inputs, _) = tgi_generation(&state, header, req).await?;
    let done = collect(generation, deadline).await?;
    let text = if p.return_full_text == Some(true) {
        inputs + &done.text
    } else {
        done.text
    };
    let mut body = json!({ "generated_text": text });
    if p.details {
        body["details"] = details(done.finish, done.tokens.len(), p.seed);
    }
    Ok(Json(body))
}

/// `POST /generate_stream`: one SSE event per token, TGI's format; the last carries
/// `generated_text` and `details`.
pub async fn generate_stream(
    State(state): State<AppState>,
    header: ModelHeader,
    ApiJson(req): ApiJson<TgiRequest>,
) -> Result<Response, AppError> {
    let (generation, deadline, p, inputs, service) = tgi_generation(&state, header, req).await?;
    let special = service.model().eos_token_ids();
    let mut text = if p.return_full_text == Some(true) {
        inputs
    } else {
        String::new()
    };
    let seed = p.seed;
    Ok(sse(generation, deadline, move |piece| match piece {
        Piece::Token {
            id,
            text: piece,
            finish,
            generated_tokens,
            ..
        } => {
            text.push_str(&piece);
            let mut e = json!({
                "index": generated_tokens,
                "token": { "id": id, "text": piece, "logprob": null, "special": special.contains(&id) },
                "generated_text": null,
                "details": null,
            });
            if let Some(f) = finish {
                e["generated_text"] = Value::String(std::mem::take(&mut text));
                e["details"] = details(f, generated_tokens, seed);
            }
            (vec![event(&e)], finish.is_some())
        }
        Piece::Failed(_) => (
            vec![event(&json!({ "error": "generation failed; see the server log", "error_type": "inference" }))],
            true,
        ),
        Piece::TimedOut(message) => (
            vec![event(&json!({ "error": message, "error_type": "timeout" }))],
            true,
        ),
        Piece::ShuttingDown => (
            vec![event(&json!({ "error": AppError::shutting_down().message, "error_type": "unavailable" }))],
            true,
        ),
    })
    .into_response())
}

/// `/info` for a causal LM.
pub fn info(state: &AppState, g: &GenerationService) -> Value {
    let i = g.model().info();
    let c = state.config();
    let m = state.metrics().for_model(g.id());
    let cpu = kiln_engine::CpuCaps::detect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "model_id": g.id(),
        "architecture": i.architecture,
        "model_type": "causal_lm",
        "vocab_size": i.vocab_size,
        "hidden_size": i.hidden_size,
        "num_layers": i.num_layers,
        "max_context": i.max_context,
        "chat_template": g.model().chat_template().is_some(),
        "device": i.device,
        "device_placement": crate::routes::placement_json(&i.placement),
        "cpu": { "arch": cpu.arch, "cores": cpu.cores, "features": cpu.feature_names() },
        "max_concurrent_requests": c.max_concurrent_requests,
        "max_batch_total_tokens": c.max_batch_total_tokens,
        "max_batch_prefill_tokens": c.max_batch_prefill_tokens,
        "max_waiting_tokens": c.max_waiting_tokens,
        "waiting_served_ratio": c.waiting_served_ratio,
        "kv_block_size": c.kv_block_size,
        "kv_cache": {
            "blocks_used": m.kv_cache_blocks_used.get(),
            "blocks_total": m.kv_cache_blocks_total.get(),
        },
        "running": m.generation_running.get(),
        "waiting": m.generation_waiting.get(),
        "load_time_ms": i.load_time.as_millis() as u64,
        "plan": crate::routes::plan_json(&i.plan),
    })
}
