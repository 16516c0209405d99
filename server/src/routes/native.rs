//! kiln's native routes, in the shape of Hugging Face TEI: `/embed`, `/predict`, `/health`,
//! `/info`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_models::{EmbedOptions, ModelKind, TextInput};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{check_batch, kind_of, texts_from};
use crate::app::AppState;
use crate::error::AppError;
use crate::json::ApiJson;

#[derive(Deserialize)]
pub struct EmbedRequest {
    #[serde(default)]
    inputs: Value,
    /// TEI's default: normalised embeddings.
    #[serde(default = "yes")]
    normalize: bool,
    #[serde(default)]
    truncate: Option<bool>,
}

fn yes() -> bool {
    true
}

pub async fn embed(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<EmbedRequest>,
) -> Result<Json<Vec<Vec<f32>>>, AppError> {
    let texts = texts_from(&req.inputs, "inputs", state.config().max_client_batch_size)?;
    let ready = state.ready()?;
    let opts = EmbedOptions {
        truncate: req.truncate.unwrap_or(state.config().auto_truncate),
        normalize: Some(req.normalize),
    };
    let out = ready.worker.run(move |m| m.embed(&texts, opts)).await??;
    Ok(Json(out.vectors))
}

#[derive(Deserialize)]
pub struct PredictRequest {
    #[serde(default)]
    inputs: Value,
    /// Return logits instead of probabilities.
    #[serde(default)]
    raw_scores: bool,
    #[serde(default)]
    truncate: Option<bool>,
}

/// TEI's `/predict` input forms: `"text"` and `["a", "b"]` (one pair) are single inputs;
/// `[["a"], ["b", "c"]]` is a batch of singles and pairs. Returns the inputs and whether the
/// request was a batch (which shapes the answer).
fn predict_inputs(v: &Value, max: usize) -> Result<(Vec<TextInput>, bool), AppError> {
    let seq = |v: &Value, at: &str| -> Result<TextInput, AppError> {
        match v {
            Value::String(s) => Ok(TextInput::Single(s.clone())),
            Value::Array(items) => match items.as_slice() {
                [Value::String(a)] => Ok(TextInput::Single(a.clone())),
                [Value::String(a), Value::String(b)] => Ok(TextInput::Pair(a.clone(), b.clone())),
                _ => Err(AppError::validation(format!(
                    "`{at}` must be a text or a list of one or two texts"
                ))),
            },
            other => Err(AppError::validation(format!(
                "`{at}` must be a text, got {}",
                kind_of(other)
            ))),
        }
    };
    match v {
        Value::Null => Err(AppError::validation("`inputs` is required")),
        Value::String(_) => Ok((vec![seq(v, "inputs")?], false)),
        Value::Array(items) if items.is_empty() => {
            Err(AppError::validation("`inputs` must not be an empty list"))
        }
        Value::Array(items) if items.iter().all(Value::is_string) => {
            if items.len() > 2 {
                return Err(AppError::validation(
                    "`inputs` as a flat list is one text or one pair (at most 2 strings); send a batch as [[\"a\"], [\"b\"]]",
                ));
            }
            Ok((vec![seq(v, "inputs")?], false))
        }
        Value::Array(items) => {
            check_batch(items.len(), max)?;
            let inputs = items
                .iter()
                .enumerate()
                .map(|(i, item)| seq(item, &format!("inputs[{i}]")))
                .collect::<Result<_, _>>()?;
            Ok((inputs, true))
        }
        other => Err(AppError::validation(format!(
            "`inputs` must be a text, a pair or a list of them, got {}",
            kind_of(other)
        ))),
    }
}

pub async fn predict(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<PredictRequest>,
) -> Result<Json<Value>, AppError> {
    let (inputs, batch) = predict_inputs(&req.inputs, state.config().max_client_batch_size)?;
    let ready = state.ready()?;
    let ModelKind::Classifier { labels } = &ready.info.kind else {
        return Err(AppError::validation(format!(
            "model `{}` is an embedding model; /predict needs a sequence classifier",
            ready.info.id
        )));
    };
    let truncate = req.truncate.unwrap_or(state.config().auto_truncate);
    let results = ready
        .worker
        .run(move |m| m.classify(&inputs, truncate))
        .await??;
    let answers: Vec<Value> = results
        .into_iter()
        .map(|c| {
            let scores = if req.raw_scores {
                c.logits
            } else {
                c.probabilities
            };
            let mut ranked: Vec<(usize, f32)> = scores.into_iter().enumerate().collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
            Value::Array(
                ranked
                    .into_iter()
                    .map(|(i, s)| json!({ "label": labels[i], "score": s }))
                    .collect(),
            )
        })
        .collect();
    Ok(Json(if batch {
        Value::Array(answers)
    } else {
        answers.into_iter().next().unwrap_or(Value::Null)
    }))
}

/// 200 once the model is loaded and warmed up, 503 before.
pub async fn health(State(state): State<AppState>) -> Response {
    if state.is_ready() {
        (StatusCode::OK, Json(json!({ "status": "ok" }))).into_response()
    } else {
        AppError::unavailable("the model is still loading").into_response()
    }
}

pub async fn info(State(state): State<AppState>) -> Result<Json<Value>, AppError> {
    let ready = state.ready()?;
    let i = &ready.info;
    let (kind, extra) = match &i.kind {
        ModelKind::Embedding { pooling, normalize } => (
            "embedding",
            json!({ "pooling": format!("{pooling:?}").to_lowercase(), "normalize": normalize }),
        ),
        ModelKind::Classifier { labels } => ("classifier", json!({ "labels": labels })),
    };
    let cpu = kiln_engine::CpuCaps::detect();
    Ok(Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "model_id": i.id,
        "architecture": i.architecture,
        "model_type": kind,
        "model": extra,
        "hidden_size": i.hidden_size,
        "num_layers": i.num_layers,
        "max_input_tokens": i.max_input_tokens,
        "device": i.device,
        "cpu": { "arch": cpu.arch, "cores": cpu.cores, "features": cpu.feature_names() },
        "max_client_batch_size": state.config().max_client_batch_size,
        "max_batch_sequences": state.config().max_batch_sequences,
        "auto_truncate": state.config().auto_truncate,
        "load_time_ms": i.load_time.as_millis() as u64,
    })))
}
