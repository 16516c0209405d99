//! kiln's native routes, in the shape of Hugging Face TEI: `/embed`, `/predict`, `/rerank`,
//! `/tokenize`, `/health`, `/info`.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_models::{ModelKind, TextInput};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ModelHeader, check_batch, kind_of, texts_from};
use crate::app::AppState;
use crate::error::AppError;
use crate::infer::EmbeddingKind;
use crate::json::ApiJson;
use crate::registry::{Kind, Served, Want};

#[derive(Deserialize)]
pub struct EmbedRequest {
    /// Which served model (default: see `Registry::pick`); an `X-Model` header works too.
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    inputs: Value,
    /// TEI's default: normalised embeddings.
    #[serde(default = "yes")]
    normalize: bool,
    #[serde(default)]
    truncate: Option<bool>,
    /// Matryoshka: keep the first `dimensions` values (renormalised when normalised).
    #[serde(default)]
    dimensions: Option<u64>,
    /// A sentence-transformers prompt of the model by name (e.g. `query`), or a prompt's text,
    /// prepended to every input.
    #[serde(default)]
    prompt_name: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
}

fn yes() -> bool {
    true
}

pub async fn embed(
    State(state): State<AppState>,
    header: ModelHeader,
    ApiJson(req): ApiJson<EmbedRequest>,
) -> Result<Json<Vec<Vec<f32>>>, AppError> {
    let texts = texts_from(&req.inputs, "inputs", state.config().max_client_batch_size)?;
    let ready = state.encoder(
        header.or_field(req.model.as_deref()).as_deref(),
        Want::Embeddings,
    )?;
    let dimensions = ready.infer.check_dimensions(req.dimensions)?;
    let prompt = ready
        .infer
        .prompt(req.prompt_name.as_deref(), req.prompt.as_deref())?;
    let texts = crate::infer::with_prompt(texts, prompt.as_deref());
    let _slot = ready.infer.admit()?;
    let kind = EmbeddingKind::from_normalize(Some(req.normalize));
    let mut out = ready.infer.embed(texts, req.truncate, kind).await?;
    if let Some(d) = dimensions {
        crate::infer::truncate_dimensions(&mut out.vectors, d, ready.infer.is_normalized(kind));
    }
    Ok(Json(out.vectors))
}

#[derive(Deserialize)]
pub struct PredictRequest {
    /// Which served model (default: see `Registry::pick`); an `X-Model` header works too.
    #[serde(default)]
    model: Option<String>,
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
    header: ModelHeader,
    ApiJson(req): ApiJson<PredictRequest>,
) -> Result<Json<Value>, AppError> {
    let (inputs, batch) = predict_inputs(&req.inputs, state.config().max_client_batch_size)?;
    let ready = state.encoder(
        header.or_field(req.model.as_deref()).as_deref(),
        Want::Classification,
    )?;
    let ModelKind::Classifier { labels } = &ready.info.kind else {
        return Err(AppError::validation(format!(
            "model `{}` is an embedding model; /predict needs a sequence classifier",
            ready.info.id
        )));
    };
    let _slot = ready.infer.admit()?;
    let results = ready.infer.classify(inputs, req.truncate).await?;
    let answers: Vec<Value> = results
        .logits
        .into_iter()
        .zip(results.probabilities)
        .map(|(logits, probabilities)| {
            let scores = if req.raw_scores {
                logits
            } else {
                probabilities
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

/// 200 once every model is loaded and warmed up (and every worker up), 503 with the reasons
/// before.
pub async fn health(State(state): State<AppState>) -> Response {
    match state.readiness() {
        Ok(()) => (StatusCode::OK, Json(json!({ "status": "ok" }))).into_response(),
        Err(why) => AppError::unavailable(why).into_response(),
    }
}

/// `/info`: the model named by `X-Model`, or the only one; with several and none named, every
/// model's info (or its state and the reason while it is not ready).
pub async fn info(
    State(state): State<AppState>,
    header: ModelHeader,
) -> Result<Json<Value>, AppError> {
    let models = state.models();
    let all = models.all();
    let chosen = match (header.0.as_deref(), all.as_slice()) {
        (Some(name), _) => Some(models.by_name(name)?),
        (None, [only]) => Some(only.clone()),
        (None, _) => None,
    };
    if let Some(served) = chosen {
        return model_info(&state, &served).map(Json);
    }
    let each: Vec<Value> = models
        .all()
        .iter()
        .map(|m| {
            model_info(&state, m).unwrap_or_else(
                |e| json!({ "model_id": m.id(), "state": m.state().name(), "reason": e.message }),
            )
        })
        .collect();
    Ok(Json(
        json!({ "version": env!("CARGO_PKG_VERSION"), "models": each }),
    ))
}

fn model_info(state: &AppState, served: &Served) -> Result<Value, AppError> {
    if served.kind() == Ok(Kind::CausalLm) {
        return Ok(super::generate::info(state, &served.causal_lm()?));
    }
    let ready = served.encoder()?;
    let i = &ready.info;
    let (kind, extra) = match &i.kind {
        ModelKind::Embedding { pooling, normalize } => (
            "embedding",
            json!({ "pooling": format!("{pooling:?}").to_lowercase(), "normalize": normalize }),
        ),
        ModelKind::Classifier { labels } => ("classifier", json!({ "labels": labels })),
    };
    let cpu = kiln_engine::CpuCaps::detect();
    Ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "model_id": i.id,
        "architecture": i.architecture,
        "model_type": kind,
        "model": extra,
        "hidden_size": i.hidden_size,
        "embedding_size": i.embedding_size,
        "num_layers": i.num_layers,
        "max_input_tokens": i.max_input_tokens,
        "device": i.device,
        "device_placement": crate::routes::placement_json(&i.placement),
        "cpu": { "arch": cpu.arch, "cores": cpu.cores, "features": cpu.feature_names() },
        "max_client_batch_size": state.config().max_client_batch_size,
        "max_batch_tokens": state.config().max_batch_tokens,
        "max_batch_requests": state.config().max_batch_requests,
        "max_batch_sequences": served.config.max_batch_sequences,
        "max_concurrent_requests": state.config().max_concurrent_requests,
        "max_queue_delay_ms": state.config().max_queue_delay.as_secs_f64() * 1e3,
        "request_timeout_ms": state.config().request_timeout.as_millis() as u64,
        "auto_truncate": state.config().auto_truncate,
        "load_time_ms": i.load_time.as_millis() as u64,
        "plan": crate::routes::plan_json(&i.plan),
    }))
}

#[derive(Deserialize)]
pub struct RerankRequest {
    /// Which served model (default: see `Registry::pick`); an `X-Model` header works too.
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    query: Value,
    #[serde(default)]
    texts: Value,
    /// The logit instead of its sigmoid.
    #[serde(default)]
    raw_scores: bool,
    #[serde(default)]
    return_text: bool,
    #[serde(default)]
    truncate: Option<bool>,
}

/// TEI's `/rerank`: scores `(query, text)` pairs with a cross-encoder (a classifier with one
/// label) and returns them best first as `[{"index", "score", "text"?}]`.
pub async fn rerank(
    State(state): State<AppState>,
    header: ModelHeader,
    ApiJson(req): ApiJson<RerankRequest>,
) -> Result<Json<Value>, AppError> {
    let query = match &req.query {
        Value::String(q) => q.clone(),
        Value::Null => return Err(AppError::validation("`query` is required")),
        other => {
            return Err(AppError::validation(format!(
                "`query` must be a string, got {}",
                kind_of(other)
            )));
        }
    };
    let texts = texts_from(&req.texts, "texts", state.config().max_client_batch_size)?;
    let ready = state.encoder(
        header.or_field(req.model.as_deref()).as_deref(),
        Want::Classification,
    )?;
    match &ready.info.kind {
        ModelKind::Classifier { labels } if labels.len() == 1 => {}
        ModelKind::Classifier { labels } => {
            return Err(AppError::validation(format!(
                "model `{}` is a classifier with {} labels; /rerank needs a cross-encoder with a single score (use /predict)",
                ready.info.id,
                labels.len()
            )));
        }
        ModelKind::Embedding { .. } => {
            return Err(AppError::validation(format!(
                "model `{}` is an embedding model; /rerank needs a cross-encoder",
                ready.info.id
            )));
        }
    }
    let inputs = texts
        .iter()
        .map(|t| TextInput::Pair(query.clone(), t.clone()))
        .collect();
    let _slot = ready.infer.admit()?;
    let results = ready.infer.classify(inputs, req.truncate).await?;
    let mut ranked: Vec<(usize, f32)> = results
        .logits
        .iter()
        .map(|l| {
            let logit = l.first().copied().unwrap_or(f32::NAN);
            if req.raw_scores {
                logit
            } else {
                1.0 / (1.0 + (-logit).exp())
            }
        })
        .enumerate()
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(Json(Value::Array(
        ranked
            .into_iter()
            .map(|(i, score)| {
                let mut v = json!({ "index": i, "score": score });
                if req.return_text {
                    v["text"] = Value::String(texts[i].clone());
                }
                v
            })
            .collect(),
    )))
}

/// The model-free checks of an `/embed`, `/predict`, `/rerank` or `/tokenize` body (which one
/// is `route`), for the fuzz targets.
pub(crate) fn check_body(route: &str, body: &[u8], max: usize) -> Result<(), AppError> {
    let parse_error = |e: serde_json::Error| AppError::validation(e.to_string());
    match route {
        "predict" => {
            let req: PredictRequest = serde_json::from_slice(body).map_err(parse_error)?;
            predict_inputs(&req.inputs, max).map(drop)
        }
        "rerank" => {
            let req: RerankRequest = serde_json::from_slice(body).map_err(parse_error)?;
            texts_from(&req.texts, "texts", max).map(drop)
        }
        "tokenize" => {
            let req: TokenizeRequest = serde_json::from_slice(body).map_err(parse_error)?;
            texts_from(&req.inputs, "inputs", max).map(drop)
        }
        _ => {
            let req: EmbedRequest = serde_json::from_slice(body).map_err(parse_error)?;
            texts_from(&req.inputs, "inputs", max).map(drop)
        }
    }
}

#[derive(Deserialize)]
pub struct TokenizeRequest {
    /// Which served model (default: see `Registry::pick`); an `X-Model` header works too.
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    inputs: Value,
    #[serde(default)]
    truncate: Option<bool>,
}

/// TEI's `/tokenize`: the tokens the model would see (after truncation, special tokens
/// included), one list per input (a single string is a batch of one, as in TEI).
pub async fn tokenize(
    State(state): State<AppState>,
    header: ModelHeader,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<Value>, AppError> {
    let texts = texts_from(&req.inputs, "inputs", state.config().max_client_batch_size)?;
    let ready = state.encoder(
        header.or_field(req.model.as_deref()).as_deref(),
        Want::Encoder,
    )?;
    let _slot = ready.infer.admit()?;
    let inputs = texts.into_iter().map(TextInput::Single).collect();
    let encoded = ready.infer.tokenize(inputs, req.truncate).await?;
    let tokenizer = ready.infer.model().tokenizer();
    let lists: Vec<Value> = encoded
        .iter()
        .map(|e| {
            Value::Array(
                e.ids
                    .iter()
                    .map(|&id| {
                        let text = u32::try_from(id)
                            .ok()
                            .and_then(|id| tokenizer.id_to_token(id));
                        json!({ "id": id, "text": text })
                    })
                    .collect(),
            )
        })
        .collect();
    Ok(Json(Value::Array(lists)))
}

#[derive(Deserialize)]
pub struct DecodeRequest {
    #[serde(default)]
    model: Option<String>,
    /// One list of token ids, or a list of them.
    #[serde(default)]
    ids: Value,
    #[serde(default = "yes")]
    skip_special_tokens: bool,
}

/// TEI's `/decode`: the text of token ids, one string per list.
pub async fn decode(
    State(state): State<AppState>,
    header: ModelHeader,
    ApiJson(req): ApiJson<DecodeRequest>,
) -> Result<Json<Vec<String>>, AppError> {
    let max = state.config().max_client_batch_size;
    let ids = |v: &[Value]| -> Result<Vec<u32>, AppError> {
        v.iter()
            .map(|x| {
                x.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| AppError::validation(format!("`ids` holds {x}, not a token id")))
            })
            .collect()
    };
    let lists: Vec<Vec<u32>> = match &req.ids {
        Value::Array(items) if items.iter().all(Value::is_array) && !items.is_empty() => {
            check_batch(items.len(), max)?;
            items
                .iter()
                .map(|l| ids(l.as_array().map_or(&[][..], Vec::as_slice)))
                .collect::<Result<_, _>>()?
        }
        Value::Array(items) => vec![ids(items)?],
        _ => {
            return Err(AppError::validation(
                "`ids` must be a list of token ids (or of lists)",
            ));
        }
    };
    let ready = state.encoder(
        header.or_field(req.model.as_deref()).as_deref(),
        Want::Encoder,
    )?;
    let tokenizer = ready.infer.model().tokenizer();
    lists
        .iter()
        .map(|l| {
            tokenizer
                .decode(l, req.skip_special_tokens)
                .map_err(AppError::from)
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Json)
}

#[derive(Deserialize)]
pub struct SimilarityRequest {
    #[serde(default)]
    model: Option<String>,
    inputs: SimilarityInputs,
    #[serde(default)]
    truncate: Option<bool>,
}

#[derive(Deserialize)]
pub struct SimilarityInputs {
    source_sentence: String,
    sentences: Vec<String>,
}

/// TEI's `/similarity`: the cosine similarity of `source_sentence` with each of `sentences`.
pub async fn similarity(
    State(state): State<AppState>,
    header: ModelHeader,
    ApiJson(req): ApiJson<SimilarityRequest>,
) -> Result<Json<Vec<f32>>, AppError> {
    let SimilarityInputs {
        source_sentence,
        sentences,
    } = req.inputs;
    if sentences.is_empty() {
        return Err(AppError::validation("`inputs.sentences` must not be empty"));
    }
    check_batch(sentences.len() + 1, state.config().max_client_batch_size)?;
    let ready = state.encoder(
        header.or_field(req.model.as_deref()).as_deref(),
        Want::Embeddings,
    )?;
    let _slot = ready.infer.admit()?;
    let mut texts = vec![source_sentence];
    texts.extend(sentences);
    let out = ready
        .infer
        .embed(texts, req.truncate, EmbeddingKind::Normalized)
        .await?;
    let (source, others) = out.vectors.split_first().ok_or_else(AppError::internal)?;
    Ok(Json(
        others
            .iter()
            .map(|v| v.iter().zip(source).map(|(a, b)| a * b).sum())
            .collect(),
    ))
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<AppState>) -> Response {
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
