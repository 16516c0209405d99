//! Input tensors of an inference request, from JSON `data` or from the binary tensor data
//! extension (little-endian values; BYTES elements each prefixed by a 4-byte length).

// Sizes here come from clients or files: arithmetic on them must be checked.
#![warn(clippy::arithmetic_side_effects)]

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::bad;
use crate::error::AppError;

/// The most input tensors, and the most requested outputs, one request may name. kiln's models
/// take at most five inputs; the cap keeps a body of thousands of tiny tensors from being
/// expanded before anything else is checked.
pub const MAX_TENSORS: usize = 16;
/// The most entries in one `parameters` object, and the most elements in a list-valued parameter.
pub const MAX_PARAMETERS: usize = 64;
/// The most dimensions of an input tensor's shape.
pub const MAX_DIMS: usize = 8;

/// The JSON part of a KServe v2 REST infer request (encoder and generation routes alike).
///
/// Every list a client controls is parsed with a cap, and tensor `data` is kept as raw JSON
/// until the tensor's header (shape, datatype) has passed the request's limits: the memory a
/// body can make the server allocate before those checks stays proportional to the caps, not to
/// the body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InferRequest {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default, deserialize_with = "parameters")]
    pub parameters: Map<String, Value>,
    #[serde(deserialize_with = "tensors")]
    pub inputs: Vec<InputTensor>,
    #[serde(default, deserialize_with = "optional_tensors")]
    pub outputs: Option<Vec<RequestedOutput>>,
}

/// One entry of an infer request's `outputs`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RequestedOutput {
    pub name: String,
    #[serde(default, deserialize_with = "parameters")]
    pub parameters: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InputTensor {
    pub name: String,
    #[serde(deserialize_with = "dims")]
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default, deserialize_with = "parameters")]
    pub parameters: Map<String, Value>,
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
}

/// A JSON list of at most `max` elements; the parse stops at the first one over.
struct Capped<T> {
    max: usize,
    what: &'static str,
    item: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Capped<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a list of at most {} {}", self.max, self.what)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out = Vec::new();
        while let Some(item) = seq.next_element()? {
            if out.len() == self.max {
                return Err(de::Error::custom(format!(
                    "more than {} {} (the most kiln accepts)",
                    self.max, self.what
                )));
            }
            out.push(item);
        }
        Ok(out)
    }
}

fn capped<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
    max: usize,
    what: &'static str,
) -> Result<Vec<T>, D::Error> {
    d.deserialize_seq(Capped {
        max,
        what,
        item: PhantomData,
    })
}

fn tensors<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    capped(d, MAX_TENSORS, "tensors")
}

fn optional_tensors<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Vec<T>>, D::Error> {
    tensors(d).map(Some)
}

fn dims<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<i64>, D::Error> {
    capped(d, MAX_DIMS, "dimensions")
}

/// A parameter value: a boolean, number, string or null, or a short list of those.
struct Parameter(Value);

impl<'de> Deserialize<'de> for Parameter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarOrList { nested: false })
            .map(Parameter)
    }
}

struct ScalarOrList {
    nested: bool,
}

impl<'de> Visitor<'de> for ScalarOrList {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a parameter value: a boolean, number or string, or a list of them")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        if self.nested {
            return Err(de::Error::custom(
                "parameter lists hold booleans, numbers or strings",
            ));
        }
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(ScalarOrList { nested: true })? {
            if out.len() == MAX_PARAMETERS {
                return Err(de::Error::custom(format!(
                    "a parameter list has more than {MAX_PARAMETERS} elements"
                )));
            }
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Value, A::Error> {
        Err(de::Error::custom(
            "parameter values are booleans, numbers, strings or lists of them, not objects",
        ))
    }
}

impl<'de> DeserializeSeed<'de> for ScalarOrList {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// A `parameters` object of at most [`MAX_PARAMETERS`] entries.
fn parameters<'de, D: Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
    struct Params;
    impl<'de> Visitor<'de> for Params {
        type Value = Map<String, Value>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "an object of at most {MAX_PARAMETERS} parameters")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(Map::new())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Map::new();
            while let Some((k, Parameter(v))) = map.next_entry::<String, Parameter>()? {
                if out.len() == MAX_PARAMETERS {
                    return Err(de::Error::custom(format!(
                        "more than {MAX_PARAMETERS} parameters"
                    )));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_any(Params)
}

/// What one request may carry in a tensor, checked on its header before its data is decoded:
/// `rows` is the request's batch limit (the first dimension), `width` the most elements per row
/// of an INT64 tensor (the model's token limit; BYTES tensors hold one text per row).
#[derive(Clone, Copy, Debug)]
pub(crate) struct TensorLimits {
    pub rows: usize,
    pub width: usize,
}

/// Refuses a tensor whose header is over the limits or of a datatype kiln does not take, before
/// any of its data is decoded; returns its dimensions and element count.
pub(crate) fn check_header(
    name: &str,
    datatype: &str,
    shape: &[i64],
    limits: TensorLimits,
) -> Result<(Vec<usize>, usize), AppError> {
    if shape.len() > MAX_DIMS {
        return Err(bad(format!(
            "input `{name}`: shape has {} dimensions, more than {MAX_DIMS} dimensions (the most kiln accepts)",
            shape.len()
        )));
    }
    let (dims, count) = shape_of(name, shape)?;
    let width_limit = match datatype {
        "BYTES" => 1,
        "INT64" => limits.width,
        other => return Err(unsupported_type(name, other)),
    };
    let rows = dims.first().copied().unwrap_or(1);
    crate::routes::check_batch(rows, limits.rows)?;
    let width = count.checked_div(rows).unwrap_or(0);
    if width > width_limit {
        return Err(bad(format!(
            "input `{name}`: shape {dims:?} has {width} elements per row; a {datatype} input takes at most {width_limit}"
        )));
    }
    Ok((dims, count))
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

/// Collects the scalars of nested JSON lists into `out`, failing once it would hold more than
/// `limit`; objects are refused without being built.
struct Flatten<'a> {
    out: &'a mut Vec<Value>,
    limit: usize,
}

impl Flatten<'_> {
    fn push<E: de::Error>(self, v: Value) -> Result<(), E> {
        if self.out.len() >= self.limit {
            // One past the limit marks the failure as "too many" for the caller.
            self.out.push(Value::Null);
            return Err(E::custom("too many elements"));
        }
        self.out.push(v);
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of strings or integers")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Flatten {
                out: &mut *self.out,
                limit: self.limit,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.push(Value::Null)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.push(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.push(v.into())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.push(v.into())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.push(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.push(Value::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<(), E> {
        self.push(Value::String(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(
            "tensor data holds strings or integers, not objects",
        ))
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

pub(super) fn decode_input(
    t: InputTensor,
    binary: &mut &[u8],
    limits: TensorLimits,
) -> Result<Input, AppError> {
    let name = t.name;
    let (shape, count) = check_header(&name, &t.datatype, &t.shape, limits)?;
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
            let expected = count.checked_mul(8).ok_or_else(|| {
                bad(format!(
                    "input `{name}`: a shape of {count} INT64 elements is too large"
                ))
            })?;
            if bytes.len() != expected {
                return Err(bad(format!(
                    "input `{name}`: {} bytes of INT64 data for a shape of {count} elements ({expected} bytes expected)",
                    bytes.len(),
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

/// JSON `data`, flattened (the protocol allows row-major nesting or a flat list) with the parse
/// stopped as soon as it holds more elements than the shape declares.
fn decode_json(
    name: &str,
    datatype: &str,
    json: &RawValue,
    count: usize,
) -> Result<Data, AppError> {
    let mut flat = Vec::new();
    let mut de = serde_json::Deserializer::from_str(json.get());
    Flatten {
        out: &mut flat,
        limit: count,
    }
    .deserialize(&mut de)
    .map_err(|e| {
        if flat.len() > count {
            bad(format!(
                "input `{name}`: more than {count} data elements for a shape of {count} elements"
            ))
        } else {
            bad(format!("input `{name}`: invalid `data`: {e}"))
        }
    })?;
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
