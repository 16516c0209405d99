//! The Open Inference Protocol (KServe v2) over REST, as NVIDIA Triton and KServe serve it, with
//! the binary tensor data extension that `tritonclient.http` uses by default.
//!
//! Inputs: `text` (BYTES, `[N]` or `[N, 1]`; classifiers also take `text_pair`) or token ids
//! `input_ids` (INT64 `[N, L]`) with optional `attention_mask` (right padding: each row a prefix
//! of ones) and `token_type_ids`. Outputs are FP32 `[N, width]`: `sentence_embedding`,
//! `normalized_embedding`, `pooled_embedding` for embedding models, `logits` and `probabilities`
//! for classifiers. Every error is `{"error": "..."}` with a 4xx status (400 for bad requests,
//! 404 for unknown models and versions).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_models::ModelKind;
use kiln_models::bert::names;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::{AppState, Ready};
use crate::error::AppError;

/// The one version kiln serves of its one model.
pub const MODEL_VERSION: &str = "1";

mod execute;
mod generate;
mod infer;
mod tensors;

pub(crate) use execute::{Answer, execute, tensor_limits};
pub(crate) use tensors::{
    Data, Input, MAX_DIMS, MAX_PARAMETERS, MAX_TENSORS, TensorLimits, check_count, check_header,
    decode_binary, unsupported_type, utf8_text,
};

pub use infer::infer;
pub(crate) use infer::{decode_all, split_body};

/// The Open Inference Protocol answers every client error with 400, not 422.
pub(crate) fn kserve_error(mut e: AppError) -> AppError {
    if e.status == StatusCode::UNPROCESSABLE_ENTITY {
        e.status = StatusCode::BAD_REQUEST;
    }
    e.kserve()
}

pub(crate) fn bad(message: impl Into<String>) -> AppError {
    AppError::bad_request(message)
}

pub async fn live() -> Json<Value> {
    Json(json!({ "live": true }))
}

pub async fn ready(State(state): State<AppState>) -> Response {
    if state.is_ready() {
        Json(json!({ "ready": true })).into_response()
    } else {
        AppError::unavailable("the model is still loading")
            .kserve()
            .into_response()
    }
}

pub async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "kiln",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "model_configuration", "statistics"],
    }))
}

/// `/v2/models/{model}` and `/v2/models/{model}/versions/{version}` share their handlers.
#[derive(Deserialize)]
pub struct ModelPath {
    model: String,
    #[serde(default)]
    version: Option<String>,
}

/// 404 unless the path names the served model (and its one version).
fn check_name(state: &AppState, name: &str, version: Option<&str>) -> Result<(), AppError> {
    let id = &state.config().model_id;
    if name != id {
        return Err(AppError::not_found(format!(
            "model `{name}` is not served here (this server serves `{id}`)"
        )));
    }
    if let Some(v) = version
        && v != MODEL_VERSION
    {
        return Err(AppError::not_found(format!(
            "model `{name}` has no version `{v}` (versions: [\"{MODEL_VERSION}\"])"
        )));
    }
    Ok(())
}

/// The causal LM, when that is what is served and the path names it.
pub(crate) fn generation_model<'a>(
    state: &'a AppState,
    name: &str,
    version: Option<&str>,
) -> Result<Option<&'a crate::generation::GenerationService>, AppError> {
    match state.generation_service() {
        Some(g) => {
            check_name(state, name, version)?;
            Ok(Some(g))
        }
        None => Ok(None),
    }
}

/// The model named in the path, or 404; 503 while it loads.
pub(crate) fn model<'a>(
    state: &'a AppState,
    name: &str,
    version: Option<&str>,
) -> Result<&'a Ready, AppError> {
    let id = &state.config().model_id;
    if name != id {
        return Err(AppError::not_found(format!(
            "model `{name}` is not served here (this server serves `{id}`)"
        )));
    }
    if let Some(v) = version
        && v != MODEL_VERSION
    {
        return Err(AppError::not_found(format!(
            "model `{name}` has no version `{v}` (versions: [\"{MODEL_VERSION}\"])"
        )));
    }
    state.ready()
}

pub(crate) struct TensorSpec {
    pub name: &'static str,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

pub(crate) fn inputs_of(ready: &Ready) -> Vec<TensorSpec> {
    let mut v = vec![TensorSpec {
        name: "text",
        datatype: "BYTES",
        shape: vec![-1],
    }];
    if matches!(ready.info.kind, ModelKind::Classifier { .. }) {
        v.push(TensorSpec {
            name: "text_pair",
            datatype: "BYTES",
            shape: vec![-1],
        });
    }
    for name in ["input_ids", "attention_mask", "token_type_ids"] {
        v.push(TensorSpec {
            name,
            datatype: "INT64",
            shape: vec![-1, -1],
        });
    }
    v
}

/// Outputs and their widths; the first ones are what an infer request without `outputs` gets.
pub(crate) fn outputs_of(ready: &Ready) -> (Vec<(&'static str, usize)>, usize) {
    match &ready.info.kind {
        ModelKind::Embedding { .. } => {
            let h = ready.info.hidden_size;
            (
                vec![
                    (names::SENTENCE_EMBEDDING, h),
                    (names::NORMALIZED_EMBEDDING, h),
                    (names::POOLED_EMBEDDING, h),
                ],
                1,
            )
        }
        ModelKind::Classifier { labels } => (
            vec![
                (names::LOGITS, labels.len()),
                (names::PROBABILITIES, labels.len()),
            ],
            2,
        ),
    }
}

fn metadata(state: &AppState, name: &str, version: Option<&str>) -> Result<Json<Value>, AppError> {
    if generation_model(state, name, version)?.is_some() {
        return Ok(generate::metadata(name));
    }
    let ready = model(state, name, version)?;
    let inputs: Vec<Value> = inputs_of(ready)
        .into_iter()
        .map(|t| json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape }))
        .collect();
    let outputs: Vec<Value> = outputs_of(ready)
        .0
        .into_iter()
        .map(|(n, w)| json!({ "name": n, "datatype": "FP32", "shape": [-1, w] }))
        .collect();
    Ok(Json(json!({
        "name": ready.info.id,
        "versions": [MODEL_VERSION],
        "platform": "kiln",
        "inputs": inputs,
        "outputs": outputs,
    })))
}

pub async fn model_metadata(
    State(state): State<AppState>,
    Path(path): Path<ModelPath>,
) -> Result<Json<Value>, AppError> {
    metadata(&state, &path.model, path.version.as_deref()).map_err(kserve_error)
}

fn readiness(state: &AppState, name: &str, version: Option<&str>) -> Result<Json<Value>, AppError> {
    if generation_model(state, name, version)?.is_none() {
        model(state, name, version)?;
    }
    Ok(Json(json!({ "name": name, "ready": true })))
}

pub async fn model_ready(
    State(state): State<AppState>,
    Path(path): Path<ModelPath>,
) -> Result<Json<Value>, AppError> {
    readiness(&state, &path.model, path.version.as_deref()).map_err(kserve_error)
}

/// Triton's model configuration extension, describing what kiln actually does.
fn config(state: &AppState, name: &str, version: Option<&str>) -> Result<Json<Value>, AppError> {
    if let Some(g) = generation_model(state, name, version)? {
        return Ok(generate::config(state, g));
    }
    let ready = model(state, name, version)?;
    let c = state.config();
    let triton_type = |dt: &str| {
        if dt == "BYTES" {
            "TYPE_STRING"
        } else {
            "TYPE_INT64"
        }
    };
    let inputs: Vec<Value> = inputs_of(ready)
        .into_iter()
        .map(|t| {
            json!({
                "name": t.name,
                "data_type": triton_type(t.datatype),
                "dims": if t.shape.len() == 1 { vec![1] } else { vec![-1] },
                "optional": t.name != "text" && t.name != "input_ids",
            })
        })
        .collect();
    let outputs: Vec<Value> = outputs_of(ready)
        .0
        .into_iter()
        .map(|(n, w)| json!({ "name": n, "data_type": "TYPE_FP32", "dims": [w] }))
        .collect();
    Ok(Json(json!({
        "name": ready.info.id,
        "platform": "kiln",
        "backend": "kiln",
        "max_batch_size": c.max_client_batch_size,
        "input": inputs,
        "output": outputs,
        "dynamic_batching": {
            "max_queue_delay_microseconds": c.max_queue_delay.as_micros() as u64,
            "max_batch_tokens": c.max_batch_tokens,
            "max_batch_requests": c.max_batch_requests,
        },
        "parameters": {
            "architecture": { "string_value": ready.info.architecture },
            "max_input_tokens": { "string_value": ready.info.max_input_tokens.to_string() },
            "device": { "string_value": ready.info.device },
        },
    })))
}

pub async fn model_config(
    State(state): State<AppState>,
    Path(path): Path<ModelPath>,
) -> Result<Json<Value>, AppError> {
    config(&state, &path.model, path.version.as_deref()).map_err(kserve_error)
}

/// Triton's statistics extension, from the same counters as `/metrics`.
fn stats(state: &AppState, name: &str, version: Option<&str>) -> Result<Json<Value>, AppError> {
    if generation_model(state, name, version)?.is_none() {
        model(state, name, version)?;
    }
    let m = state.metrics();
    let ns = |secs: f64| (secs * 1e9) as u64;
    let stat = |count: u64, secs: f64| json!({ "count": count, "ns": ns(secs) });
    let successes: u64 = crate::metrics::API_FAMILIES
        .iter()
        .map(|a| m.successes.with_label_values(&[a]).get())
        .sum();
    let failures: u64 = crate::metrics::FAILURE_REASONS
        .iter()
        .map(|r| m.failures.with_label_values(&[r]).get())
        .sum();
    let (ok_secs, fail_secs) = m.outcome_seconds();
    Ok(Json(json!({
        "model_stats": [{
            "name": state.config().model_id,
            "version": MODEL_VERSION,
            "last_inference": m.last_inference_ms(),
            "inference_count": m.input_tokens.get_sample_count(),
            "execution_count": m.inferences.get(),
            "inference_stats": {
                "success": stat(successes, ok_secs),
                "fail": stat(failures, fail_secs),
                "queue": stat(m.queue_duration.get_sample_count(), m.queue_duration.get_sample_sum()),
                "compute_input": stat(m.tokenization_duration.get_sample_count(), m.tokenization_duration.get_sample_sum()),
                "compute_infer": stat(m.inference_duration.get_sample_count(), m.inference_duration.get_sample_sum()),
                "compute_output": stat(0, 0.0),
            },
            "batch_stats": [],
        }]
    })))
}

pub async fn model_stats(
    State(state): State<AppState>,
    Path(path): Path<ModelPath>,
) -> Result<Json<Value>, AppError> {
    stats(&state, &path.model, path.version.as_deref()).map_err(kserve_error)
}
