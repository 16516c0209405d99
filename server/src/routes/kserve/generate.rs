//! The Open Inference Protocol for a causal LM, as Triton's LLM backends spell it: input
//! `text_input` (BYTES, one prompt per element), output `text_output` (BYTES), sampling settings
//! as request `parameters` (`max_tokens`, `temperature`, `top_p`, `top_k`,
//! `repetition_penalty`, `seed`, `stop`, `ignore_eos`). Outputs come back as JSON strings, or in
//! the binary tensor format (each element a 4-byte little-endian length and its bytes) when
//! `binary_data` is asked for.

use axum::Json;
use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::tensors::{TensorLimits, bool_param, decode_input, texts_of};
use super::{MODEL_VERSION, bad};
use crate::app::AppState;
use crate::error::AppError;
use crate::generation::GenerationService;
use crate::routes::check_batch;
use crate::routes::generate::{Deadline, GenParams, collect};

pub const TEXT_INPUT: &str = "text_input";
pub const TEXT_OUTPUT: &str = "text_output";

pub fn metadata(id: &str) -> Json<Value> {
    Json(json!({
        "name": id,
        "versions": [MODEL_VERSION],
        "platform": "kiln",
        "inputs": [{ "name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1] }],
        "outputs": [{ "name": TEXT_OUTPUT, "datatype": "BYTES", "shape": [-1] }],
    }))
}

pub fn config(state: &AppState, g: &GenerationService) -> Json<Value> {
    let c = state.config();
    let i = g.model().info();
    Json(json!({
        "name": g.id(),
        "platform": "kiln",
        "backend": "kiln",
        "max_batch_size": c.max_client_batch_size,
        "input": [{ "name": TEXT_INPUT, "data_type": "TYPE_STRING", "dims": [1] }],
        "output": [{ "name": TEXT_OUTPUT, "data_type": "TYPE_STRING", "dims": [1] }],
        "model_transaction_policy": { "decoupled": false },
        "parameters": {
            "architecture": { "string_value": i.architecture },
            "max_context": { "string_value": i.max_context.to_string() },
            "max_batch_total_tokens": { "string_value": c.max_batch_total_tokens.to_string() },
            "device": { "string_value": i.device },
        },
    }))
}

fn number<T: serde::de::DeserializeOwned>(
    params: &Map<String, Value>,
    key: &str,
) -> Result<Option<T>, AppError> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|_| bad(format!("parameter `{key}` has the wrong type"))),
    }
}

fn params_of(p: &Map<String, Value>) -> Result<GenParams, AppError> {
    let stop = match p.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => crate::routes::generate::stop_strings(v)?,
    };
    Ok(GenParams {
        max_tokens: number(p, "max_tokens")?,
        temperature: number(p, "temperature")?,
        top_k: number(p, "top_k")?,
        top_p: number(p, "top_p")?,
        repetition_penalty: number(p, "repetition_penalty")?,
        presence_penalty: number(p, "presence_penalty")?,
        frequency_penalty: number(p, "frequency_penalty")?,
        do_sample: None,
        seed: number(p, "seed")?,
        stop,
        stop_token_ids: Vec::new(),
        ignore_eos: bool_param(p, "ignore_eos", "request")?.unwrap_or(false),
    })
}

/// Generation through `POST /v2/models/{model}/infer`.
pub async fn infer(
    state: &AppState,
    g: &GenerationService,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let deadline = Deadline::starting_now(g);
    let header_length = headers
        .get(super::infer::HEADER_LENGTH)
        .map(|v| v.to_str().unwrap_or("?"));
    let (req, mut binary) = super::infer::split_body(&body, header_length)?;
    let mut prompts = None;
    for t in req.inputs {
        if t.name != TEXT_INPUT {
            return Err(bad(format!(
                "model `{}` has no input `{}` (a causal LM takes `{TEXT_INPUT}`)",
                g.id(),
                t.name
            )));
        }
        if prompts.is_some() {
            return Err(bad(format!("input `{TEXT_INPUT}` appears twice")));
        }
        // A causal LM takes one text per row; the batch limit is checked on the header.
        let limits = TensorLimits {
            rows: state.config().max_client_batch_size,
            width: 1,
        };
        prompts = Some(texts_of(decode_input(t, &mut binary, limits)?)?);
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data follow the inputs that no input claims",
            binary.len()
        )));
    }
    let prompts =
        prompts.ok_or_else(|| bad(format!("the request needs a `{TEXT_INPUT}` input")))?;
    if prompts.is_empty() || prompts.iter().any(String::is_empty) {
        return Err(bad(format!("`{TEXT_INPUT}` needs non-empty texts")));
    }
    check_batch(prompts.len(), state.config().max_client_batch_size)?;
    let binary_default =
        bool_param(&req.parameters, "binary_data_output", "request")?.unwrap_or(false);
    let as_binary = match &req.outputs {
        None => binary_default,
        Some(list) => {
            let [o] = list.as_slice() else {
                return Err(bad(format!("request exactly one output, `{TEXT_OUTPUT}`")));
            };
            if o.name != TEXT_OUTPUT {
                return Err(bad(format!(
                    "model `{}` has no output `{}` (outputs: {TEXT_OUTPUT})",
                    g.id(),
                    o.name
                )));
            }
            bool_param(&o.parameters, "binary_data", "output")?.unwrap_or(binary_default)
        }
    };
    let params = params_of(&req.parameters)?;
    // Every prompt is its own request in the batch; they generate concurrently. Each takes an
    // admission slot before any of them is tokenized.
    let slots = (0..prompts.len())
        .map(|_| g.admit())
        .collect::<Result<Vec<_>, _>>()?;
    let mut running = Vec::with_capacity(prompts.len());
    for (p, slot) in prompts.into_iter().zip(slots) {
        let ids = g.encode(p, true).await?;
        let request = params.clone().into_request(g, ids)?;
        running.push(g.start_generation(request, slot).await?);
    }
    let mut texts = Vec::with_capacity(running.len());
    for generation in running {
        texts.push(collect(generation, deadline.clone()).await?.text);
    }
    let n = texts.len();
    let mut entry = json!({ "name": TEXT_OUTPUT, "datatype": "BYTES", "shape": [n] });
    let mut tail = Vec::new();
    if as_binary {
        for t in &texts {
            tail.extend_from_slice(&(t.len() as u32).to_le_bytes());
            tail.extend_from_slice(t.as_bytes());
        }
        entry["parameters"] = json!({ "binary_data_size": tail.len() });
    } else {
        entry["data"] = json!(texts);
    }
    let mut answer = json!({
        "model_name": g.id(),
        "model_version": MODEL_VERSION,
        "outputs": [entry],
    });
    if let Some(id) = req.id {
        answer["id"] = Value::String(id);
    }
    let head = serde_json::to_vec(&answer).map_err(|_| AppError::internal())?;
    if !as_binary {
        return Ok((
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            head,
        )
            .into_response());
    }
    let len = head.len();
    let mut out = head;
    out.extend_from_slice(&tail);
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::HeaderName::from_static(super::infer::HEADER_LENGTH),
                HeaderValue::from(len),
            ),
        ],
        out,
    )
        .into_response())
}
