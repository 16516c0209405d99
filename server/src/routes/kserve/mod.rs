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

use std::sync::Arc;

use crate::app::AppState;
use crate::error::AppError;
use crate::generation::GenerationService;
use crate::registry::Ready;
use crate::registry::{Kind, Served};

/// The one version kiln serves of each model.
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

pub(crate) use generate::{TEXT_INPUT, TEXT_OUTPUT};
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
    match state.readiness() {
        Ok(()) => Json(json!({ "ready": true })).into_response(),
        Err(why) => AppError::unavailable(why).kserve().into_response(),
    }
}

pub async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "kiln",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "model_configuration", "statistics", "model_repository"],
    }))
}

/// The body of `POST /v2/repository/index` (optional): `{"ready": true}` lists only the ready
/// models.
#[derive(Deserialize, Default)]
pub struct IndexRequest {
    #[serde(default)]
    ready: bool,
}

/// Triton's model repository extension: every model with its state (`READY`, `LOADING`, `UNLOADING`,
/// `UNAVAILABLE` with the reason), as `tritonclient`'s `get_model_repository_index` reads it.
pub async fn repository_index(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, AppError> {
    let req: IndexRequest = if body.iter().all(u8::is_ascii_whitespace) {
        IndexRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| bad(format!("invalid index request: {e}")).kserve())?
    };
    let models: Vec<Value> = index(&state, req.ready)
        .into_iter()
        .map(|e| {
            let mut v = json!({ "name": e.name, "version": MODEL_VERSION, "state": e.state });
            if let Some(why) = e.reason {
                v["reason"] = Value::String(why);
            }
            v
        })
        .collect();
    Ok(Json(Value::Array(models)))
}

/// One repository index entry.
pub(crate) struct IndexEntry {
    pub name: String,
    pub state: &'static str,
    pub reason: Option<String>,
}

/// The repository index, for HTTP and gRPC alike: every model (or only the ready ones).
pub(crate) fn index(state: &AppState, ready_only: bool) -> Vec<IndexEntry> {
    state
        .models()
        .all()
        .iter()
        .filter(|m| !ready_only || m.is_ready())
        .map(|m| {
            let st = m.state();
            IndexEntry {
                name: m.id().to_string(),
                state: st.name(),
                reason: st.reason(),
            }
        })
        .collect()
}

/// `POST /v2/repository/models/{model}/load`: answers once the model is loaded (or failed to).
pub async fn repository_load(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<Value>, AppError> {
    state.load_model(&model).await.map_err(kserve_error)?;
    Ok(Json(json!({})))
}

/// `POST /v2/repository/models/{model}/unload`: answers once its in-flight requests are done and
/// its memory is freed.
pub async fn repository_unload(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<Value>, AppError> {
    state.unload_model(&model).await.map_err(kserve_error)?;
    Ok(Json(json!({})))
}

/// `/v2/models/{model}` and `/v2/models/{model}/versions/{version}` share their handlers.
#[derive(Deserialize)]
pub struct ModelPath {
    model: String,
    #[serde(default)]
    version: Option<String>,
}

/// The served model the path names, or 404 (an unknown model or version).
pub(crate) fn served(
    state: &AppState,
    name: &str,
    version: Option<&str>,
) -> Result<Arc<Served>, AppError> {
    let served = state.models().by_name(name)?;
    if let Some(v) = version
        && v != MODEL_VERSION
    {
        return Err(AppError::not_found(format!(
            "model `{name}` has no version `{v}` (versions: [\"{MODEL_VERSION}\"])"
        )));
    }
    crate::request_id::note_model(served.id());
    Ok(served)
}

/// The causal LM the path names (`None` when it names an encoder), or 404, or 503.
pub(crate) fn generation_model(
    state: &AppState,
    name: &str,
    version: Option<&str>,
) -> Result<Option<GenerationService>, AppError> {
    let served = served(state, name, version)?;
    match served.kind() {
        Ok(Kind::CausalLm) => served.causal_lm().map(Some),
        _ => Ok(None),
    }
}

/// The encoder the path names, or 404; 503 while it loads; 422 for a causal LM.
pub(crate) fn model(
    state: &AppState,
    name: &str,
    version: Option<&str>,
) -> Result<Arc<Ready>, AppError> {
    served(state, name, version)?.encoder()
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
            let h = ready.info.embedding_size;
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
    let inputs: Vec<Value> = inputs_of(&ready)
        .into_iter()
        .map(|t| json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape }))
        .collect();
    let outputs: Vec<Value> = outputs_of(&ready)
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
        return Ok(generate::config(state, &g));
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
    let inputs: Vec<Value> = inputs_of(&ready)
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
    let outputs: Vec<Value> = outputs_of(&ready)
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

/// Triton's statistics extension for one model, from the same series as `/metrics` (its
/// `model` label) and the model's [`crate::metrics::ModelStats`].
fn stats(state: &AppState, name: &str, version: Option<&str>) -> Result<Json<Value>, AppError> {
    let served = served(state, name, version)?;
    let id = served.id();
    Ok(Json(json!({ "model_stats": [model_stat(state, id)] })))
}

/// `GET /v2/models/stats`: every served model's statistics.
pub async fn all_stats(State(state): State<AppState>) -> Json<Value> {
    let all: Vec<Value> = state
        .models()
        .all()
        .iter()
        .map(|m| model_stat(&state, m.id()))
        .collect();
    Json(json!({ "model_stats": all }))
}

fn model_stat(state: &AppState, id: &str) -> Value {
    let m = state.metrics().for_model(id);
    let stat = |(count, ns): (u64, u64)| json!({ "count": count, "ns": ns });
    let hist =
        |h: &prometheus::Histogram| stat((h.get_sample_count(), (h.get_sample_sum() * 1e9) as u64));
    let batch_stats: Vec<Value> = m
        .stats
        .batches()
        .into_iter()
        .map(|(size, b)| {
            json!({
                "batch_size": size,
                "compute_input": stat((b.count, b.input_ns)),
                "compute_infer": stat((b.count, b.infer_ns)),
                "compute_output": stat((b.count, b.output_ns)),
            })
        })
        .collect();
    json!({
        "name": id,
        "version": MODEL_VERSION,
        "last_inference": m.stats.last_inference_ms(),
        "inference_count": m.input_tokens.get_sample_count(),
        "execution_count": m.inferences.get(),
        "inference_stats": {
            "success": stat(m.stats.success.get()),
            "fail": stat(m.stats.fail.get()),
            "queue": hist(&m.queue_duration),
            "compute_input": hist(&m.tokenization_duration),
            "compute_infer": hist(&m.inference_duration),
            "compute_output": stat(m.stats.compute_output.get()),
        },
        "batch_stats": batch_stats,
    })
}

pub async fn model_stats(
    State(state): State<AppState>,
    Path(path): Path<ModelPath>,
) -> Result<Json<Value>, AppError> {
    stats(&state, &path.model, path.version.as_deref()).map_err(kserve_error)
}
