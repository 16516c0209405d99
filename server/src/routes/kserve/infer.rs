//! `POST /v2/models/{model}[/versions/{version}]/infer`: JSON or binary tensor data in (with
//! `Inference-Header-Content-Length`), JSON or binary outputs back, as the client asks.

use std::collections::HashSet;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use kiln_models::bert::names;
use kiln_models::{Encoded, TextInput};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::tensors::{Input, InputTensor, bool_param, decode_input, matrix_of, texts_of};
use super::{MODEL_VERSION, ModelPath, bad, inputs_of, kserve_error, model, outputs_of};
use crate::app::{AppState, Ready};
use crate::error::AppError;
use crate::json::RawBody;
use crate::routes::check_batch;

pub const HEADER_LENGTH: &str = "inference-header-content-length";

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
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
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
    Path(path): Path<ModelPath>,
    headers: HeaderMap,
    body: Result<RawBody, AppError>,
) -> Result<Response, AppError> {
    let RawBody(body) = body.map_err(kserve_error)?;
    run_infer(state, &path.model, path.version.as_deref(), &headers, body)
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
    if let Some(g) = super::generation_model(&state, name, version)? {
        return super::generate::infer(&state, g, headers, body).await;
    }
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
