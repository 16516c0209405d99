//! OpenAI-compatible routes: `/v1/embeddings` and `/v1/models`.

use axum::Json;
use axum::extract::State;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use super::texts_from;
use crate::app::AppState;
use crate::error::AppError;
use crate::infer::EmbeddingKind;
use crate::json::ApiJson;
use crate::registry::Want;

#[derive(Deserialize)]
pub struct EmbeddingsRequest {
    #[serde(default)]
    input: Value,
    /// Which served model. A server with one model answers to any name (clients ported from
    /// OpenAI often keep their old model name) and echoes its own id.
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<u64>,
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
    /// A sentence-transformers prompt of the model by name (e.g. `query`), or a prompt's text,
    /// prepended to every input.
    #[serde(default)]
    prompt_name: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
}

/// The request's model-free checks: its encoding (base64 or not) and its texts.
fn checked(req: &EmbeddingsRequest, max: usize) -> Result<(bool, Vec<String>), AppError> {
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(AppError::validation(format!(
                "encoding_format `{other}` is not supported (use `float` or `base64`)"
            )));
        }
    };
    Ok((base64, texts_from(&req.input, "input", max)?))
}

/// The model-free checks of a `/v1/embeddings` body, for the fuzz targets.
pub(crate) fn check_body(body: &[u8], max: usize) -> Result<(), AppError> {
    let req: EmbeddingsRequest =
        serde_json::from_slice(body).map_err(|e| AppError::validation(e.to_string()))?;
    checked(&req, max).map(drop)
}

pub async fn embeddings(
    State(state): State<AppState>,
    body: Result<ApiJson<EmbeddingsRequest>, AppError>,
) -> Result<Json<Value>, AppError> {
    handle(state, body).await.map_err(AppError::openai)
}

async fn handle(
    state: AppState,
    body: Result<ApiJson<EmbeddingsRequest>, AppError>,
) -> Result<Json<Value>, AppError> {
    let ApiJson(req) = body?;
    let (base64, texts) = checked(&req, state.config().max_client_batch_size)?;
    let ready = state.encoder(req.model.as_deref(), Want::Embeddings)?;
    let dimensions = ready.infer.check_dimensions(req.dimensions)?;
    let prompt = ready
        .infer
        .prompt(req.prompt_name.as_deref(), req.prompt.as_deref())?;
    let texts = crate::infer::with_prompt(texts, prompt.as_deref());
    let _slot = ready.infer.admit()?;
    let mut out = ready.infer.embed(texts, None, EmbeddingKind::Model).await?;
    if let Some(d) = dimensions {
        let renormalize = ready.infer.is_normalized(EmbeddingKind::Model);
        crate::infer::truncate_dimensions(&mut out.vectors, d, renormalize);
    }
    let data: Vec<Value> = out
        .vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({ "object": "embedding", "index": i, "embedding": embedding })
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": ready.info.id,
        "usage": { "prompt_tokens": out.tokens, "total_tokens": out.tokens },
    })))
}

/// Every served model, with its kind (`embedding`, `classifier`, `causal_lm`; `encoder` while
/// one loads) and its state (`READY`, `LOADING`, `UNLOADING`, `UNAVAILABLE`).
pub async fn models(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = state
        .models()
        .all()
        .iter()
        .map(|m| {
            json!({
                "id": m.id(),
                "object": "model",
                "created": 0,
                "owned_by": "kiln",
                "kind": m.kind_name(),
                "state": m.state().name(),
            })
        })
        .collect();
    Json(json!({ "object": "list", "data": data }))
}
