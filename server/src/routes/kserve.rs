//! The Open Inference Protocol (KServe v2) over REST, as NVIDIA Triton and KServe serve it, with
//! the binary tensor data extension that `tritonclient.http` uses by default.
//!
//! Inputs: `text` (BYTES, `[N]` or `[N, 1]`; classifiers also take `text_pair`) or token ids
//! `input_ids` (INT64 `[N, L]`) with optional `attention_mask` (right padding: each row a prefix
//! of ones) and `token_type_ids`. Outputs are FP32 `[N, width]`: `sentence_embedding`,
//! `normalized_embedding`, `pooled_embedding` for embedding models, `logits` and `probabilities`
//! for classifiers. Every error is `{"error": "..."}` with a 4xx status (400 for bad requests,
//! 404 for unknown models and versions).

use std::collections::HashSet;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_models::bert::names;
use kiln_models::{Encoded, ModelKind, TextInput};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::check_batch;
use crate::app::{AppState, Ready};
use crate::error::AppError;
use crate::json::RawBody;

/// The one version kiln serves of its one model.
pub const MODEL_VERSION: &str = "1";
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The Open Inference Protocol answers every client error with 400, not 422.
fn kserve_error(mut e: AppError) -> AppError {
    if e.status == StatusCode::UNPROCESSABLE_ENTITY {
        e.status = StatusCode::BAD_REQUEST;
    }
    e.kserve()
}

fn bad(message: impl Into<String>) -> AppError {
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

/// The model named in the path, or 404; 503 while it loads.
fn model<'a>(
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

struct TensorSpec {
    name: &'static str,
    datatype: &'static str,
    shape: Vec<i64>,
}

fn inputs_of(ready: &Ready) -> Vec<TensorSpec> {
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
fn outputs_of(ready: &Ready) -> (Vec<(&'static str, usize)>, usize) {
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
    Path(name): Path<String>,
) -> Result<Json<Value>, AppError> {
    metadata(&state, &name, None).map_err(kserve_error)
}

pub async fn model_metadata_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, AppError> {
    metadata(&state, &name, Some(&version)).map_err(kserve_error)
}

fn readiness(state: &AppState, name: &str, version: Option<&str>) -> Result<Json<Value>, AppError> {
    model(state, name, version)?;
    Ok(Json(json!({ "name": name, "ready": true })))
}

pub async fn model_ready(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, AppError> {
    readiness(&state, &name, None).map_err(kserve_error)
}

pub async fn model_ready_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, AppError> {
    readiness(&state, &name, Some(&version)).map_err(kserve_error)
}

/// Triton's model configuration extension, describing what kiln actually does.
fn config(state: &AppState, name: &str, version: Option<&str>) -> Result<Json<Value>, AppError> {
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
    Path(name): Path<String>,
) -> Result<Json<Value>, AppError> {
    config(&state, &name, None).map_err(kserve_error)
}

pub async fn model_config_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, AppError> {
    config(&state, &name, Some(&version)).map_err(kserve_error)
}

/// Triton's statistics extension, from the same counters as `/metrics`.
fn stats(state: &AppState, name: &str, version: Option<&str>) -> Result<Json<Value>, AppError> {
    let ready = model(state, name, version)?;
    let m = state.metrics();
    let ns = |secs: f64| (secs * 1e9) as u64;
    let stat = |count: u64, secs: f64| json!({ "count": count, "ns": ns(secs) });
    let successes: u64 = ["openai", "kserve", "native"]
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
            "name": ready.info.id,
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
    Path(name): Path<String>,
) -> Result<Json<Value>, AppError> {
    stats(&state, &name, None).map_err(kserve_error)
}

pub async fn model_stats_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, AppError> {
    stats(&state, &name, Some(&version)).map_err(kserve_error)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InputTensor>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputTensor {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// A decoded input tensor.
enum Data {
    Bytes(Vec<String>),
    Int64(Vec<i64>),
}

struct Input {
    name: String,
    shape: Vec<usize>,
    data: Data,
}

fn bool_param(
    params: &Map<String, Value>,
    key: &str,
    what: &str,
) -> Result<Option<bool>, AppError> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(bad(format!(
            "{what} parameter `{key}` must be a boolean, got {}",
            super::kind_of(other)
        ))),
    }
}

/// Flattens nested JSON arrays (the protocol allows row-major nesting or a flat list).
fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

fn decode_input(t: InputTensor, binary: &mut &[u8]) -> Result<Input, AppError> {
    let name = t.name;
    let shape: Vec<usize> = t
        .shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| {
            bad(format!(
                "input `{name}`: shape {:?} has a negative dimension",
                t.shape
            ))
        })?;
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("input `{name}`: shape {shape:?} is too large")))?;
    let binary_size = match t.parameters.get("binary_data_size") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    bad(format!(
                        "input `{name}`: binary_data_size must be a non-negative integer"
                    ))
                })?,
        ),
    };
    let data = match (binary_size, t.data) {
        (Some(_), Some(_)) => {
            return Err(bad(format!(
                "input `{name}` has both `data` and binary_data_size; send one"
            )));
        }
        (None, None) => {
            return Err(bad(format!(
                "input `{name}` has no `data` and no binary_data_size"
            )));
        }
        (Some(n), None) => {
            if binary.len() < n {
                return Err(bad(format!(
                    "input `{name}`: binary_data_size is {n} but only {} bytes of binary data are left in the body",
                    binary.len()
                )));
            }
            let (mine, rest) = binary.split_at(n);
            *binary = rest;
            decode_binary(&name, &t.datatype, mine, count)?
        }
        (None, Some(json)) => decode_json(&name, &t.datatype, &json, count)?,
    };
    Ok(Input { name, shape, data })
}

fn decode_binary(
    name: &str,
    datatype: &str,
    mut bytes: &[u8],
    count: usize,
) -> Result<Data, AppError> {
    match datatype {
        "BYTES" => {
            let mut texts = Vec::with_capacity(count.min(4096));
            while !bytes.is_empty() {
                if bytes.len() < 4 {
                    return Err(bad(format!(
                        "input `{name}`: truncated BYTES element length"
                    )));
                }
                let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
                bytes = &bytes[4..];
                if bytes.len() < len {
                    return Err(bad(format!(
                        "input `{name}`: BYTES element {} claims {len} bytes, {} are left",
                        texts.len(),
                        bytes.len()
                    )));
                }
                let text = std::str::from_utf8(&bytes[..len]).map_err(|_| {
                    bad(format!(
                        "input `{name}`: element {} is not valid UTF-8 text",
                        texts.len()
                    ))
                })?;
                texts.push(text.to_string());
                bytes = &bytes[len..];
            }
            if texts.len() != count {
                return Err(bad(format!(
                    "input `{name}`: {} BYTES elements for a shape of {count} elements",
                    texts.len()
                )));
            }
            Ok(Data::Bytes(texts))
        }
        "INT64" => {
            if bytes.len() != count * 8 {
                return Err(bad(format!(
                    "input `{name}`: {} bytes of INT64 data for a shape of {count} elements ({} bytes expected)",
                    bytes.len(),
                    count * 8
                )));
            }
            Ok(Data::Int64(
                bytes
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("chunks of 8")))
                    .collect(),
            ))
        }
        other => Err(unsupported_type(name, other)),
    }
}

fn decode_json(name: &str, datatype: &str, json: &Value, count: usize) -> Result<Data, AppError> {
    let mut flat = Vec::new();
    flatten(json, &mut flat);
    if flat.len() != count {
        return Err(bad(format!(
            "input `{name}`: {} data elements for a shape of {count} elements",
            flat.len()
        )));
    }
    match datatype {
        "BYTES" => flat
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(bad(format!(
                    "input `{name}`: element {i} must be a string, got {}",
                    super::kind_of(other)
                ))),
            })
            .collect::<Result<_, _>>()
            .map(Data::Bytes),
        "INT64" => flat
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i64().ok_or_else(|| {
                    bad(format!(
                        "input `{name}`: element {i} must be an integer, got {v}"
                    ))
                })
            })
            .collect::<Result<_, _>>()
            .map(Data::Int64),
        other => Err(unsupported_type(name, other)),
    }
}

fn unsupported_type(name: &str, datatype: &str) -> AppError {
    bad(format!(
        "input `{name}`: datatype `{datatype}` is not accepted (text inputs are BYTES, token ids INT64)"
    ))
}

/// Rows of a `[N]` or `[N, 1]` BYTES tensor.
fn texts_of(input: Input) -> Result<Vec<String>, AppError> {
    match (input.shape.as_slice(), input.data) {
        ([_] | [_, 1], Data::Bytes(t)) => Ok(t),
        (_, Data::Bytes(_)) => Err(bad(format!(
            "input `{}` must have shape [N] or [N, 1], got {:?}",
            input.name, input.shape
        ))),
        (_, Data::Int64(_)) => Err(bad(format!("input `{}` must be BYTES", input.name))),
    }
}

/// `[N, L]` INT64 rows.
fn matrix_of(input: &Input) -> Result<(usize, usize, &[i64]), AppError> {
    match (input.shape.as_slice(), &input.data) {
        ([n, l], Data::Int64(v)) => Ok((*n, *l, v)),
        (_, Data::Int64(_)) => Err(bad(format!(
            "input `{}` must have shape [N, L], got {:?}",
            input.name, input.shape
        ))),
        (_, Data::Bytes(_)) => Err(bad(format!("input `{}` must be INT64", input.name))),
    }
}

/// Token-id inputs to sequences, checked so that the engine never sees an invalid id.
fn sequences_from_ids(
    ready: &Ready,
    ids: &Input,
    mask: Option<&Input>,
    types: Option<&Input>,
) -> Result<Vec<Encoded>, AppError> {
    let (n, l, ids) = matrix_of(ids)?;
    if n == 0 || l == 0 {
        return Err(bad("input `input_ids` is empty"));
    }
    let mask = mask.map(matrix_of).transpose()?;
    let types = types.map(matrix_of).transpose()?;
    for (name, m) in [("attention_mask", &mask), ("token_type_ids", &types)] {
        if let Some((mn, ml, _)) = m
            && (*mn, *ml) != (n, l)
        {
            return Err(bad(format!(
                "input `{name}` has shape [{mn}, {ml}]; `input_ids` has [{n}, {l}]"
            )));
        }
    }
    let max = ready.info.max_input_tokens;
    let tokenizer = ready.infer.model().tokenizer();
    let mut seqs = Vec::with_capacity(n);
    for r in 0..n {
        let row = &ids[r * l..(r + 1) * l];
        let len = match &mask {
            None => l,
            Some((_, _, m)) => {
                let m = &m[r * l..(r + 1) * l];
                let len = m.iter().take_while(|&&x| x == 1).count();
                if m[len..].iter().any(|&x| x != 0) || m.iter().any(|&x| x != 0 && x != 1) {
                    return Err(bad(format!(
                        "attention_mask row {r} must be ones then zeros (right padding); kiln takes no other masks"
                    )));
                }
                len
            }
        };
        if len == 0 {
            return Err(bad(format!("row {r} of `input_ids` has no tokens")));
        }
        if len > max {
            return Err(bad(format!(
                "row {r} of `input_ids` has {len} tokens; the model accepts at most {max}"
            )));
        }
        let row = &row[..len];
        if let Some((i, id)) = row.iter().enumerate().find(|(_, id)| {
            u32::try_from(**id)
                .ok()
                .and_then(|id| tokenizer.id_to_token(id))
                .is_none()
        }) {
            return Err(bad(format!(
                "input_ids[{r}][{i}] = {id} is not in the model's vocabulary"
            )));
        }
        let type_ids = match &types {
            None => vec![0; len],
            Some((_, _, t)) => {
                let t = &t[r * l..r * l + len];
                if let Some(bad_type) = t.iter().find(|&&x| x != 0 && x != 1) {
                    return Err(bad(format!(
                        "token_type_ids row {r} has {bad_type}; BERT segment ids are 0 or 1"
                    )));
                }
                t.to_vec()
            }
        };
        seqs.push(Encoded {
            ids: row.to_vec(),
            type_ids,
            untruncated_len: len,
        });
    }
    Ok(seqs)
}

pub async fn infer(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<RawBody, AppError>,
) -> Result<Response, AppError> {
    let RawBody(body) = body.map_err(kserve_error)?;
    run_infer(state, &name, None, &headers, body)
        .await
        .map_err(kserve_error)
}

pub async fn infer_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<RawBody, AppError>,
) -> Result<Response, AppError> {
    let RawBody(body) = body.map_err(kserve_error)?;
    run_infer(state, &name, Some(&version), &headers, body)
        .await
        .map_err(kserve_error)
}

async fn run_infer(
    state: AppState,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    // Content-Type is not checked, as Triton does not: tritonclient sends none, curl sends a
    // form type, binary requests may say octet-stream. The body's own structure is checked.
    let _ = headers.get(header::CONTENT_TYPE);
    let ready = model(&state, name, version)?;
    let (json_part, mut binary): (&[u8], &[u8]) = match headers.get(HEADER_LENGTH) {
        None => (&body, &[]),
        Some(v) => {
            let n: usize = v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| bad("Inference-Header-Content-Length must be a byte count"))?;
            if n > body.len() {
                return Err(bad(format!(
                    "Inference-Header-Content-Length is {n} but the body has {} bytes",
                    body.len()
                )));
            }
            body.split_at(n)
        }
    };
    let req: InferRequest = serde_json::from_slice(json_part).map_err(|e| {
        bad(format!(
            "invalid inference request{}: {e}",
            if headers.contains_key(HEADER_LENGTH) {
                " header"
            } else {
                ""
            }
        ))
    })?;
    let truncate = bool_param(&req.parameters, "truncate", "request")?;
    let binary_default =
        bool_param(&req.parameters, "binary_data_output", "request")?.unwrap_or(false);

    let mut inputs = Vec::with_capacity(req.inputs.len());
    let mut seen = HashSet::new();
    for t in req.inputs {
        if !seen.insert(t.name.clone()) {
            return Err(bad(format!("input `{}` appears twice", t.name)));
        }
        inputs.push(decode_input(t, &mut binary)?);
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data follow the inputs that no input claims",
            binary.len()
        )));
    }
    let known: Vec<&str> = inputs_of(ready).iter().map(|t| t.name).collect();
    if let Some(unknown) = inputs.iter().find(|i| !known.contains(&i.name.as_str())) {
        return Err(bad(format!(
            "model `{}` has no input `{}` (inputs: {})",
            ready.info.id,
            unknown.name,
            known.join(", ")
        )));
    }
    let mut take = |n: &str| {
        inputs
            .iter()
            .position(|i| i.name == n)
            .map(|p| inputs.swap_remove(p))
    };
    let text = take("text");
    let pair = take("text_pair");
    let ids = take("input_ids");
    let mask = take("attention_mask");
    let types = take("token_type_ids");

    let (available, defaults) = outputs_of(ready);
    let wanted: Vec<(&'static str, usize, bool)> = match req.outputs {
        None => available[..defaults]
            .iter()
            .map(|&(n, w)| (n, w, binary_default))
            .collect(),
        Some(list) if list.is_empty() => return Err(bad("`outputs` must not be an empty list")),
        Some(list) => {
            let mut wanted = Vec::new();
            for o in list {
                let Some(&(n, w)) = available.iter().find(|(n, _)| *n == o.name) else {
                    return Err(bad(format!(
                        "model `{}` has no output `{}` (outputs: {})",
                        ready.info.id,
                        o.name,
                        available
                            .iter()
                            .map(|(n, _)| *n)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                };
                if wanted.iter().any(|(w, _, _): &(&str, usize, bool)| *w == n) {
                    return Err(bad(format!("output `{n}` is requested twice")));
                }
                let binary =
                    bool_param(&o.parameters, "binary_data", "output")?.unwrap_or(binary_default);
                wanted.push((n, w, binary));
            }
            wanted
        }
    };

    let max_batch = state.config().max_client_batch_size;
    let _slot;
    let seqs = match (text, ids) {
        (Some(_), Some(_)) => return Err(bad("send either `text` or `input_ids`, not both")),
        (None, None) => {
            return Err(bad(
                "the request needs a `text` (BYTES) or `input_ids` (INT64) input",
            ));
        }
        (Some(text), None) => {
            if mask.is_some() || types.is_some() {
                return Err(bad(
                    "`attention_mask` and `token_type_ids` go with `input_ids`, not `text`",
                ));
            }
            let texts = texts_of(text)?;
            if texts.is_empty() {
                return Err(bad("input `text` has no elements"));
            }
            check_batch(texts.len(), max_batch)?;
            let inputs: Vec<TextInput> = match pair {
                None => texts.into_iter().map(TextInput::Single).collect(),
                Some(pair) => {
                    let pairs = texts_of(pair)?;
                    if pairs.len() != texts.len() {
                        return Err(bad(format!(
                            "`text_pair` has {} elements for {} texts",
                            pairs.len(),
                            texts.len()
                        )));
                    }
                    texts
                        .into_iter()
                        .zip(pairs)
                        .map(|(a, b)| TextInput::Pair(a, b))
                        .collect()
                }
            };
            _slot = ready.infer.admit()?;
            ready.infer.tokenize(inputs, truncate).await?
        }
        (None, Some(ids)) => {
            if pair.is_some() {
                return Err(bad("`text_pair` goes with `text`"));
            }
            let seqs = sequences_from_ids(ready, &ids, mask.as_ref(), types.as_ref())?;
            check_batch(seqs.len(), max_batch)?;
            _slot = ready.infer.admit()?;
            seqs
        }
    };
    let n = seqs.len();
    let rows = if ready.infer.is_embedding() {
        // Every requested embedding output is computed in the same engine call.
        let names: Vec<&'static str> = wanted.iter().map(|(n, _, _)| *n).collect();
        ready.infer.run(seqs, names).await?
    } else {
        let c = ready.infer.classify_ids(seqs).await?;
        wanted
            .iter()
            .map(|(n, _, _)| {
                if *n == names::LOGITS {
                    c.logits.clone()
                } else {
                    c.probabilities.clone()
                }
            })
            .collect()
    };

    let mut binary_out: Vec<u8> = Vec::new();
    let mut outputs = Vec::with_capacity(wanted.len());
    for ((name, width, as_binary), rows) in wanted.iter().zip(rows) {
        let mut entry = json!({ "name": name, "datatype": "FP32", "shape": [n, width] });
        if *as_binary {
            let start = binary_out.len();
            for v in rows.iter().flatten() {
                binary_out.extend_from_slice(&v.to_le_bytes());
            }
            entry["parameters"] = json!({ "binary_data_size": binary_out.len() - start });
        } else {
            entry["data"] = json!(rows.into_iter().flatten().collect::<Vec<f32>>());
        }
        outputs.push(entry);
    }
    let mut answer = json!({
        "model_name": ready.info.id,
        "model_version": MODEL_VERSION,
        "outputs": outputs,
    });
    if let Some(id) = req.id {
        answer["id"] = Value::String(id);
    }
    let header_json = serde_json::to_vec(&answer).map_err(|_| AppError::internal())?;
    if binary_out.is_empty() && !wanted.iter().any(|w| w.2) {
        return Ok((
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            header_json,
        )
            .into_response());
    }
    let json_len = header_json.len();
    let mut body = header_json;
    body.extend_from_slice(&binary_out);
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::HeaderName::from_static(HEADER_LENGTH),
                HeaderValue::from(json_len),
            ),
        ],
        body,
    )
        .into_response())
}
