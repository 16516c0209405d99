//! `POST /v2/models/{model}[/versions/{version}]/infer`: JSON or binary tensor data in (with
//! `Inference-Header-Content-Length`), JSON or binary outputs back, as the client asks.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::execute::{execute, tensor_limits};
use super::tensors::{InferRequest, Input, InputTensor, TensorLimits, bool_param, decode_input};
use super::{MODEL_VERSION, ModelPath, bad, kserve_error, model};
use crate::app::AppState;
use crate::error::AppError;
use crate::json::RawBody;

pub const HEADER_LENGTH: &str = "inference-header-content-length";

pub async fn infer(
    State(state): State<AppState>,
    Path(path): Path<ModelPath>,
    headers: HeaderMap,
    body: Result<RawBody, AppError>,
) -> Result<Response, AppError> {
    let RawBody(body) = body.map_err(kserve_error)?;
    run_infer(state, &path.model, path.version.as_deref(), &headers, body)
        .await
        .map_err(kserve_error)
}

/// A body split at its `Inference-Header-Content-Length` (the binary extension; `None`: all
/// JSON) into the parsed request and the binary data after it.
pub(crate) fn split_body<'a>(
    body: &'a [u8],
    header_length: Option<&str>,
) -> Result<(InferRequest, &'a [u8]), AppError> {
    let (json_part, binary): (&[u8], &[u8]) = match header_length {
        None => (body, &[]),
        Some(v) => {
            let n: usize = v
                .trim()
                .parse()
                .map_err(|_| bad("Inference-Header-Content-Length must be a byte count"))?;
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
            if header_length.is_some() {
                " header"
            } else {
                ""
            }
        ))
    })?;
    Ok((req, binary))
}

/// Every input tensor decoded, each checked against `limits` on its header first, with the
/// binary data consumed in order and none left over.
pub(crate) fn decode_all(
    tensors: Vec<InputTensor>,
    mut binary: &[u8],
    limits: TensorLimits,
) -> Result<Vec<Input>, AppError> {
    let mut inputs = Vec::with_capacity(tensors.len());
    for t in tensors {
        inputs.push(decode_input(t, &mut binary, limits)?);
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data follow the inputs that no input claims",
            binary.len()
        )));
    }
    Ok(inputs)
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
    if let Some(g) = super::generation_model(&state, name, version)? {
        return super::generate::infer(&state, &g, headers, body).await;
    }
    let ready = model(&state, name, version)?;
    let header_length = headers
        .get(HEADER_LENGTH)
        .map(|v| v.to_str().unwrap_or("?"));
    let (req, binary) = split_body(&body, header_length)?;
    let truncate = bool_param(&req.parameters, "truncate", "request")?;
    let binary_default =
        bool_param(&req.parameters, "binary_data_output", "request")?.unwrap_or(false);

    // The slot is taken before any tensor data is decoded, so --max-concurrent-requests also
    // bounds how many requests are expanding their inputs at once.
    let max_batch = state.config().max_client_batch_size;
    let limits = tensor_limits(&ready, max_batch);
    let slot = ready.infer.admit()?;
    let inputs = decode_all(req.inputs, binary, limits)?;
    // Each requested output may ask for binary or JSON data; the rest follow the request.
    let (requested, binary_flags) = match req.outputs {
        None => (None, Vec::new()),
        Some(list) => {
            let mut names = Vec::with_capacity(list.len());
            let mut flags = Vec::with_capacity(list.len());
            for o in list {
                flags.push(
                    bool_param(&o.parameters, "binary_data", "output")?.unwrap_or(binary_default),
                );
                names.push(o.name);
            }
            (Some(names), flags)
        }
    };
    let answer = execute(
        &ready,
        slot,
        max_batch,
        inputs,
        requested.as_deref(),
        truncate,
    )
    .await?;
    let n = answer.batch;
    let wanted: Vec<bool> = (0..answer.outputs.len())
        .map(|i| binary_flags.get(i).copied().unwrap_or(binary_default))
        .collect();

    let mut binary_out: Vec<u8> = Vec::new();
    let mut outputs = Vec::with_capacity(wanted.len());
    for (out, as_binary) in answer.outputs.into_iter().zip(&wanted) {
        let (name, width, rows) = (out.name, out.width, out.rows);
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
    if binary_out.is_empty() && !wanted.iter().any(|&b| b) {
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
