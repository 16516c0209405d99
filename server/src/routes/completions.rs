//! OpenAI `POST /v1/completions` and `POST /v1/chat/completions`, with `stream: true` as
//! Server-Sent Events in OpenAI's chunk format ending in `data: [DONE]`, and `usage`
//! (`stream_options.include_usage` adds a final usage chunk, as OpenAI does).

use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use kiln_models::decoder::chat::ChatMessage;
use serde::Deserialize;
use serde_json::{Value, json};

use super::generate::{Deadline, GenParams, collect, event, sse, stop_strings};
use crate::app::AppState;
use crate::error::AppError;
use crate::generation::{Generation, Piece};
use crate::json::ApiJson;

/// Fields both endpoints take. Unknown fields are accepted and ignored, as OpenAI-compatible
/// servers do (clients send many optional ones).
#[derive(Deserialize, Default)]
pub struct Common {
    #[serde(default)]
    #[allow(dead_code)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    /// Not in OpenAI's API; vLLM and TGI accept it.
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    repetition_penalty: Option<f32>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Value,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    logprobs: Value,
    #[serde(default)]
    ignore_eos: bool,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

impl Common {
    fn params(&self) -> Result<GenParams, AppError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(AppError::validation(
                "kiln returns one choice per request (n = 1)",
            ));
        }
        if !matches!(self.logprobs, Value::Null | Value::Bool(false)) {
            return Err(AppError::validation("logprobs are not supported"));
        }
        Ok(GenParams {
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            do_sample: None,
            seed: self.seed,
            stop: stop_strings(&self.stop)?,
            stop_token_ids: Vec::new(),
            ignore_eos: self.ignore_eos,
        })
    }
}

#[derive(Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    prompt: Value,
    #[serde(default)]
    echo: bool,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    best_of: Option<u32>,
    #[serde(flatten)]
    common: Common,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The answer's `id`: the request's id (`x-request-id`, the client's or a new one) after
/// OpenAI's prefix, so a response, its log lines and its header name the same request.
fn request_id(prefix: &str) -> String {
    format!("{prefix}-{}", crate::request_id::id())
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// The SSE events of an OpenAI stream: `chunk(text, finish)` builds one chunk.
fn openai_stream(
    generation: Generation,
    deadline: Deadline,
    include_usage: bool,
    mut chunk: impl FnMut(&str, Option<&str>) -> Value + Send + 'static,
    usage_chunk: impl Fn(Value) -> Value + Send + 'static,
) -> Response {
    sse(generation, deadline, move |piece| match piece {
        Piece::Token {
            text,
            finish,
            prompt_tokens,
            generated_tokens,
            ..
        } => {
            let mut events: Vec<Event> = Vec::new();
            match finish {
                None => {
                    if !text.is_empty() {
                        events.push(event(&chunk(&text, None)));
                    }
                }
                Some(f) => {
                    if !text.is_empty() {
                        events.push(event(&chunk(&text, None)));
                    }
                    events.push(event(&chunk("", Some(f.as_str()))));
                    if include_usage {
                        events.push(event(&usage_chunk(usage(prompt_tokens, generated_tokens))));
                    }
                    events.push(Event::default().data("[DONE]"));
                }
            }
            let end = finish.is_some();
            (events, end)
        }
        Piece::Failed(_) => (
            vec![
                event(&json!({ "error": { "message": "generation failed; see the server log", "type": "server_error", "code": "inference" } })),
                Event::default().data("[DONE]"),
            ],
            true,
        ),
        Piece::TimedOut(message) => (
            vec![
                event(&json!({ "error": { "message": message, "type": "server_error", "code": "timeout" } })),
                Event::default().data("[DONE]"),
            ],
            true,
        ),
        Piece::ShuttingDown => (
            vec![
                event(&json!({ "error": { "message": AppError::shutting_down().message, "type": "server_error", "code": "unavailable" } })),
                Event::default().data("[DONE]"),
            ],
            true,
        ),
    })
    .into_response()
}

/// A completion's prompt: text, or token ids as OpenAI's API takes them.
#[derive(Debug, PartialEq)]
enum Prompt {
    Text(String),
    /// Used as they are: no special tokens are added.
    Ids(Vec<u32>),
}

/// `prompt` as a string, a list of one string, a list of token ids, or a list of one list of
/// token ids (each below the vocabulary size). kiln answers one prompt per request.
fn prompt_of(prompt: &Value, vocab: usize) -> Result<Prompt, AppError> {
    let ids = |items: &[Value]| -> Result<Prompt, AppError> {
        if items.is_empty() {
            return Err(AppError::validation("`prompt` must not be empty"));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_u64()
                    .filter(|&id| id < vocab as u64)
                    .map(|id| id as u32)
                    .ok_or_else(|| {
                        AppError::validation(format!(
                            "prompt token {i} ({v}) is not a token id: ids are integers below the vocabulary size {vocab}"
                        ))
                    })
            })
            .collect::<Result<Vec<u32>, _>>()
            .map(Prompt::Ids)
    };
    match prompt {
        Value::String(s) if s.is_empty() => Err(AppError::validation("`prompt` must not be empty")),
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(items) => match items.as_slice() {
            [Value::String(s)] => prompt_of(&Value::String(s.clone()), vocab),
            [Value::Array(inner)] => ids(inner),
            items if items.iter().all(Value::is_number) => ids(items),
            _ => Err(AppError::validation(
                "kiln takes one prompt per request: a string, a list of token ids, or a list holding one of them",
            )),
        },
        Value::Null => Err(AppError::validation("`prompt` is required")),
        _ => Err(AppError::validation(
            "`prompt` must be a string or a list of token ids",
        )),
    }
}

pub async fn completions(
    State(state): State<AppState>,
    body: Result<ApiJson<CompletionRequest>, AppError>,
) -> Result<Response, AppError> {
    completions_inner(state, body)
        .await
        .map_err(AppError::openai)
}

async fn completions_inner(
    state: AppState,
    body: Result<ApiJson<CompletionRequest>, AppError>,
) -> Result<Response, AppError> {
    let ApiJson(req) = body?;
    let service = &state.causal_lm(req.common.model.as_deref())?;
    let deadline = Deadline::starting_now(service);
    let vocab = service.model().info().vocab_size;
    let prompt = prompt_of(&req.prompt, vocab)?;
    if req.echo || req.suffix.is_some() || req.best_of.is_some_and(|b| b != 1) {
        return Err(AppError::validation(
            "echo, suffix and best_of are not supported",
        ));
    }
    let mut params = req.common.params()?;
    // OpenAI's default for completions.
    params.max_tokens = params.max_tokens.or(Some(16));
    let slot = service.admit()?;
    let ids = match prompt {
        Prompt::Text(text) => service.encode(text, true).await?,
        Prompt::Ids(ids) => ids,
    };
    let request = params.into_request(service, ids)?;
    let generation = service.start_generation(request, slot).await?;
    let id = request_id("cmpl");
    let model = service.id().to_string();
    let created = now();
    if req.common.stream {
        let include_usage = req
            .common
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        let (id2, model2) = (id.clone(), model.clone());
        return Ok(openai_stream(
            generation,
            deadline,
            include_usage,
            move |text, finish| {
                json!({
                    "id": id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{ "text": text, "index": 0, "logprobs": null, "finish_reason": finish }],
                })
            },
            move |usage| {
                json!({
                    "id": id2, "object": "text_completion", "created": created, "model": model2,
                    "choices": [], "usage": usage,
                })
            },
        ));
    }
    let done = collect(generation, deadline).await?;
    Ok(Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{
            "text": done.text,
            "index": 0,
            "logprobs": null,
            "finish_reason": done.finish.as_str(),
        }],
        "usage": usage(done.prompt_tokens, done.tokens.len()),
    }))
    .into_response())
}

#[derive(Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    messages: Vec<Value>,
    #[serde(flatten)]
    common: Common,
}

/// A message's `content`: a string, or a list of `{"type": "text", "text": ...}` parts.
fn message(i: usize, m: &Value) -> Result<ChatMessage, AppError> {
    let role = m
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| AppError::validation(format!("messages[{i}] needs a string `role`")))?;
    let content = match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err(AppError::validation(format!(
                            "messages[{i}].content[{j}]: only text parts are supported"
                        )));
                    }
                }
            }
            text
        }
        Some(Value::Null) | None => String::new(),
        Some(_) => {
            return Err(AppError::validation(format!(
                "messages[{i}].content must be a string or a list of text parts"
            )));
        }
    };
    Ok(ChatMessage {
        role: role.to_string(),
        content,
    })
}

/// The model-free checks of a completions (`chat` false) or chat body: parsing, messages and
/// sampling settings, for the fuzz targets.
pub(crate) fn check_body(chat: bool, body: &[u8]) -> Result<(), AppError> {
    let parse_error = |e: serde_json::Error| AppError::validation(e.to_string());
    let common = if chat {
        let req: ChatRequest = serde_json::from_slice(body).map_err(parse_error)?;
        for (i, m) in req.messages.iter().enumerate() {
            message(i, m)?;
        }
        req.common
    } else {
        let req: CompletionRequest = serde_json::from_slice(body).map_err(parse_error)?;
        req.common
    };
    common
        .params()?
        .resolve(&Default::default(), 1024, 16, vec![0; 4])
        .map(drop)
}

pub async fn chat_completions(
    State(state): State<AppState>,
    body: Result<ApiJson<ChatRequest>, AppError>,
) -> Result<Response, AppError> {
    chat_inner(state, body).await.map_err(AppError::openai)
}

async fn chat_inner(
    state: AppState,
    body: Result<ApiJson<ChatRequest>, AppError>,
) -> Result<Response, AppError> {
    let ApiJson(req) = body?;
    let service = &state.causal_lm(req.common.model.as_deref())?;
    let deadline = Deadline::starting_now(service);
    if req.messages.is_empty() {
        return Err(AppError::validation("`messages` must not be empty"));
    }
    let messages = req
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let template = service.model().chat_template().ok_or_else(|| {
        AppError::validation(format!(
            "model `{}` has no chat template (tokenizer_config.json has no `chat_template`); \
             start kiln with --chat-template FILE, or use /v1/completions",
            service.id()
        ))
    })?;
    let params = req.common.params()?;
    let slot = service.admit()?;
    let prompt = template.render(&messages, true)?;
    // The template writes any special tokens itself.
    let ids = service.encode(prompt, false).await?;
    let request = params.into_request(service, ids)?;
    let generation = service.start_generation(request, slot).await?;
    let id = request_id("chatcmpl");
    let model = service.id().to_string();
    let created = now();
    if req.common.stream {
        let include_usage = req
            .common
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        let (id2, model2) = (id.clone(), model.clone());
        let mut first = true;
        return Ok(openai_stream(
            generation,
            deadline,
            include_usage,
            move |text, finish| {
                // The first chunk names the role, as OpenAI's does.
                let delta = if finish.is_some() {
                    json!({})
                } else if first {
                    first = false;
                    json!({ "role": "assistant", "content": text })
                } else {
                    json!({ "content": text })
                };
                json!({
                    "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
                })
            },
            move |usage| {
                json!({
                    "id": id2, "object": "chat.completion.chunk", "created": created, "model": model2,
                    "choices": [], "usage": usage,
                })
            },
        ));
    }
    let done = collect(generation, deadline).await?;
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": done.text },
            "logprobs": null,
            "finish_reason": done.finish.as_str(),
        }],
        "usage": usage(done.prompt_tokens, done.tokens.len()),
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::{Prompt, prompt_of};
    use serde_json::json;

    #[test]
    fn prompts_are_text_or_token_ids_as_openai_takes_them() {
        let text = Prompt::Text("hi".into());
        assert_eq!(prompt_of(&json!("hi"), 10).unwrap(), text);
        assert_eq!(prompt_of(&json!(["hi"]), 10).unwrap(), text);
        assert_eq!(
            prompt_of(&json!([1, 2, 9]), 10).unwrap(),
            Prompt::Ids(vec![1, 2, 9])
        );
        assert_eq!(
            prompt_of(&json!([[3, 4]]), 10).unwrap(),
            Prompt::Ids(vec![3, 4])
        );
        for bad in [
            json!(""),
            json!([]),
            json!([[]]),
            json!([10]),
            json!([-1]),
            json!([1.5]),
            json!([1, "a"]),
            json!(["a", "b"]),
            json!([[1], [2]]),
            json!(null),
            json!(7),
            json!([18446744073709551615u64]),
        ] {
            assert!(prompt_of(&bad, 10).is_err(), "{bad}");
        }
    }
}
