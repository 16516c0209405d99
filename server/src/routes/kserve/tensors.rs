//! Input tensors of an inference request, from JSON `data` or from the binary tensor data
//! extension (little-endian values; BYTES elements each prefixed by a 4-byte length).

use serde::Deserialize;
use serde_json::{Map, Value};

use super::bad;
use crate::error::AppError;

/// The JSON part of a KServe v2 REST infer request (encoder and generation routes alike).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InferRequest {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub parameters: Map<String, Value>,
    pub inputs: Vec<InputTensor>,
    #[serde(default)]
    pub outputs: Option<Vec<RequestedOutput>>,
}

/// One entry of an infer request's `outputs`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RequestedOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InputTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
    #[serde(default)]
    pub data: Option<Value>,
}

/// A decoded input tensor.
pub(crate) enum Data {
    Bytes(Vec<String>),
    Int64(Vec<i64>),
}

pub(crate) struct Input {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Data,
}

pub(super) fn bool_param(
    params: &Map<String, Value>,
    key: &str,
    what: &str,
) -> Result<Option<bool>, AppError> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(bad(format!(
            "{what} parameter `{key}` must be a boolean, got {}",
            crate::routes::kind_of(other)
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

/// A tensor's dimensions and element count, refusing negative dimensions and overflow.
pub(crate) fn shape_of(name: &str, shape: &[i64]) -> Result<(Vec<usize>, usize), AppError> {
    let dims: Vec<usize> = shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| {
            bad(format!(
                "input `{name}`: shape {shape:?} has a negative dimension"
            ))
        })?;
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("input `{name}`: shape {dims:?} is too large")))?;
    Ok((dims, count))
}

pub(super) fn decode_input(t: InputTensor, binary: &mut &[u8]) -> Result<Input, AppError> {
    let name = t.name;
    let (shape, count) = shape_of(&name, &t.shape)?;
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

/// Binary tensor data (REST's binary extension, gRPC's raw contents): little-endian values;
/// each BYTES element a 4-byte little-endian length and its bytes.
pub(crate) fn decode_binary(
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
                texts.push(utf8_text(name, texts.len(), &bytes[..len])?);
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
    check_count(name, flat.len(), count)?;
    match datatype {
        "BYTES" => flat
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(bad(format!(
                    "input `{name}`: element {i} must be a string, got {}",
                    crate::routes::kind_of(other)
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

/// One BYTES element as text.
pub(crate) fn utf8_text(name: &str, index: usize, bytes: &[u8]) -> Result<String, AppError> {
    std::str::from_utf8(bytes).map(str::to_string).map_err(|_| {
        bad(format!(
            "input `{name}`: element {index} is not valid UTF-8 text"
        ))
    })
}

/// Typed data (JSON `data`, gRPC `contents`) must hold exactly the shape's element count.
pub(crate) fn check_count(name: &str, got: usize, count: usize) -> Result<(), AppError> {
    if got == count {
        Ok(())
    } else {
        Err(bad(format!(
            "input `{name}`: {got} data elements for a shape of {count} elements"
        )))
    }
}

pub(crate) fn unsupported_type(name: &str, datatype: &str) -> AppError {
    bad(format!(
        "input `{name}`: datatype `{datatype}` is not accepted (text inputs are BYTES, token ids INT64)"
    ))
}

/// Rows of a `[N]` or `[N, 1]` BYTES tensor.
pub(super) fn texts_of(input: Input) -> Result<Vec<String>, AppError> {
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
pub(super) fn matrix_of(input: &Input) -> Result<(usize, usize, &[i64]), AppError> {
    match (input.shape.as_slice(), &input.data) {
        ([n, l], Data::Int64(v)) => Ok((*n, *l, v)),
        (_, Data::Int64(_)) => Err(bad(format!(
            "input `{}` must have shape [N, L], got {:?}",
            input.name, input.shape
        ))),
        (_, Data::Bytes(_)) => Err(bad(format!("input `{}` must be INT64", input.name))),
    }
}
