//! The protocol-neutral half of an Open Inference Protocol inference request, shared by REST
//! (`infer.rs`) and gRPC (`crate::grpc`): each decodes its wire format into [`Input`]s and the
//! names of the outputs asked for, and [`execute`] does the rest — input and output names, text
//! or token ids, the batch-size limit, admission, tokenization and the batch queue — so both
//! transports accept and refuse exactly the same requests with the same messages.

use std::collections::HashSet;

use kiln_models::bert::names;
use kiln_models::{Encoded, TextInput};

use super::tensors::{Input, TensorLimits, matrix_of, texts_of};
use super::{bad, inputs_of, outputs_of};
use crate::admission::Admission;
use crate::error::AppError;
use crate::registry::Ready;
use crate::routes::check_batch;

/// One output tensor of an answer: FP32 `[rows, width]`.
pub(crate) struct Output {
    pub name: &'static str,
    pub width: usize,
    pub rows: Vec<Vec<f32>>,
}

/// An answered request: `batch` rows in every output, in the order the outputs were asked for
/// (or the model's default outputs when none were named).
pub(crate) struct Answer {
    pub batch: usize,
    pub outputs: Vec<Output>,
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

/// The outputs asked for by name (`None`: the model's defaults), with their widths; unknown and
/// repeated names are refused.
pub(crate) fn resolve_outputs(
    ready: &Ready,
    requested: Option<&[String]>,
) -> Result<Vec<(&'static str, usize)>, AppError> {
    let (available, defaults) = outputs_of(ready);
    let Some(list) = requested else {
        return Ok(available[..defaults].to_vec());
    };
    if list.is_empty() {
        return Err(bad("`outputs` must not be an empty list"));
    }
    let mut wanted: Vec<(&'static str, usize)> = Vec::with_capacity(list.len());
    for name in list {
        let Some(&(n, w)) = available.iter().find(|(n, _)| n == name) else {
            return Err(bad(format!(
                "model `{}` has no output `{name}` (outputs: {})",
                ready.info.id,
                available
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        if wanted.iter().any(|(w, _)| *w == n) {
            return Err(bad(format!("output `{n}` is requested twice")));
        }
        wanted.push((n, w));
    }
    Ok(wanted)
}

/// What an input tensor of an encoder request may hold, checked on each tensor's header before
/// its data is decoded.
pub(crate) fn tensor_limits(ready: &Ready, max_batch: usize) -> TensorLimits {
    TensorLimits {
        rows: max_batch,
        width: ready.info.max_input_tokens,
    }
}

/// Runs decoded inputs through the model. `requested` names the outputs wanted (`None`: the
/// model's defaults); `truncate` is the request's own setting, if it has one. The caller took
/// the admission slot before it decoded the inputs, and it is held until the answer is ready.
pub(crate) async fn execute(
    ready: &Ready,
    _slot: Admission,
    max_batch: usize,
    inputs: Vec<Input>,
    requested: Option<&[String]>,
    truncate: Option<bool>,
) -> Result<Answer, AppError> {
    let mut seen = HashSet::new();
    if let Some(dup) = inputs.iter().find(|i| !seen.insert(i.name.as_str())) {
        return Err(bad(format!("input `{}` appears twice", dup.name)));
    }
    let mut inputs = inputs;
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
    let wanted = resolve_outputs(ready, requested)?;

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
            ready.infer.tokenize(inputs, truncate).await?
        }
        (None, Some(ids)) => {
            if pair.is_some() {
                return Err(bad("`text_pair` goes with `text`"));
            }
            let seqs = sequences_from_ids(ready, &ids, mask.as_ref(), types.as_ref())?;
            check_batch(seqs.len(), max_batch)?;
            seqs
        }
    };
    let batch = seqs.len();
    let rows = if ready.infer.is_embedding() {
        // Every requested embedding output is computed in the same engine call.
        let names: Vec<&'static str> = wanted.iter().map(|(n, _)| *n).collect();
        ready.infer.run(seqs, names).await?
    } else {
        let c = ready.infer.classify_ids(seqs).await?;
        wanted
            .iter()
            .map(|(n, _)| {
                if *n == names::LOGITS {
                    c.logits.clone()
                } else {
                    c.probabilities.clone()
                }
            })
            .collect()
    };
    let outputs = wanted
        .into_iter()
        .zip(rows)
        .map(|((name, width), rows)| Output { name, width, rows })
        .collect();
    Ok(Answer { batch, outputs })
}
