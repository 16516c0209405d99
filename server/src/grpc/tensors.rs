//! gRPC tensors to and from the REST side's types: input tensors with typed `contents` or with
//! `raw_input_contents` become [`Input`]s (raw bytes go through the same decoder as REST's binary
//! tensor data), and an [`Answer`] becomes FP32 output tensors, raw or typed.

// Sizes here come from clients or files: arithmetic on them must be checked.
#![warn(clippy::arithmetic_side_effects)]

use std::collections::HashMap;

use super::pb::infer_parameter::ParameterChoice;
use super::pb::model_infer_request::InferInputTensor;
use super::pb::model_infer_response::InferOutputTensor;
use super::pb::{InferParameter, InferTensorContents};
use crate::error::AppError;
use crate::routes::kserve::{
    Answer, Data, Input, TensorLimits, bad, check_count, check_header, decode_binary,
    unsupported_type, utf8_text,
};

/// A boolean parameter, or an error naming it when it holds another type.
pub(super) fn bool_param(
    params: &HashMap<String, InferParameter>,
    key: &str,
    what: &str,
) -> Result<Option<bool>, AppError> {
    match params.get(key).and_then(|p| p.parameter_choice.as_ref()) {
        None => Ok(None),
        Some(ParameterChoice::BoolParam(b)) => Ok(Some(*b)),
        Some(other) => Err(bad(format!(
            "{what} parameter `{key}` must be a bool_param, got {}",
            match other {
                ParameterChoice::BoolParam(_) => "bool_param",
                ParameterChoice::Int64Param(_) => "int64_param",
                ParameterChoice::StringParam(_) => "string_param",
                ParameterChoice::DoubleParam(_) => "double_param",
                ParameterChoice::Uint64Param(_) => "uint64_param",
            }
        ))),
    }
}

/// The names of the `InferTensorContents` fields that hold data.
fn filled_fields(c: &InferTensorContents) -> Vec<&'static str> {
    [
        ("bool_contents", c.bool_contents.is_empty()),
        ("int_contents", c.int_contents.is_empty()),
        ("int64_contents", c.int64_contents.is_empty()),
        ("uint_contents", c.uint_contents.is_empty()),
        ("uint64_contents", c.uint64_contents.is_empty()),
        ("fp32_contents", c.fp32_contents.is_empty()),
        ("fp64_contents", c.fp64_contents.is_empty()),
        ("bytes_contents", c.bytes_contents.is_empty()),
    ]
    .into_iter()
    .filter(|(_, empty)| !empty)
    .map(|(name, _)| name)
    .collect()
}

/// Typed contents of an input: the field that matches its datatype, and no other.
fn decode_contents(
    name: &str,
    datatype: &str,
    contents: InferTensorContents,
    count: usize,
) -> Result<Data, AppError> {
    let field = match datatype {
        "BYTES" => "bytes_contents",
        "INT64" => "int64_contents",
        other => return Err(unsupported_type(name, other)),
    };
    if let Some(wrong) = filled_fields(&contents).into_iter().find(|f| *f != field) {
        return Err(bad(format!(
            "input `{name}`: {datatype} contents go in `{field}`, not `{wrong}`"
        )));
    }
    if datatype == "BYTES" {
        check_count(name, contents.bytes_contents.len(), count)?;
        contents
            .bytes_contents
            .iter()
            .enumerate()
            .map(|(i, b)| utf8_text(name, i, b))
            .collect::<Result<_, _>>()
            .map(Data::Bytes)
    } else {
        check_count(name, contents.int64_contents.len(), count)?;
        Ok(Data::Int64(contents.int64_contents))
    }
}

/// The request's input tensors, from typed contents or from `raw_input_contents` (one entry per
/// input, in order; then no input may carry contents).
pub(crate) fn decode_inputs(
    tensors: Vec<InferInputTensor>,
    raw: Vec<Vec<u8>>,
    limits: TensorLimits,
) -> Result<Vec<Input>, AppError> {
    if !raw.is_empty() && raw.len() != tensors.len() {
        return Err(bad(format!(
            "raw_input_contents has {} entries for {} inputs; send one per input, in the order of `inputs`",
            raw.len(),
            tensors.len()
        )));
    }
    let mut raw = raw.into_iter();
    tensors
        .into_iter()
        .map(|t| {
            let (shape, count) = check_header(&t.name, &t.datatype, &t.shape, limits)?;
            let data = match (raw.next(), t.contents) {
                (Some(_), Some(_)) => {
                    return Err(bad(format!(
                        "input `{}` has `contents` but the request uses raw_input_contents; send one",
                        t.name
                    )));
                }
                (None, None) => {
                    return Err(bad(format!(
                        "input `{}` has no `contents` and the request has no raw_input_contents",
                        t.name
                    )));
                }
                (Some(bytes), None) => decode_binary(&t.name, &t.datatype, &bytes, count)?,
                (None, Some(contents)) => decode_contents(&t.name, &t.datatype, contents, count)?,
            };
            Ok(Input {
                name: t.name,
                shape,
                data,
            })
        })
        .collect()
}

/// The answer's FP32 outputs, with their data in `raw_output_contents` (`raw`) or in each
/// tensor's `fp32_contents`.
pub(super) fn encode_outputs(answer: Answer, raw: bool) -> (Vec<InferOutputTensor>, Vec<Vec<u8>>) {
    let batch = answer.batch as i64;
    let mut raw_contents = Vec::new();
    let tensors = answer
        .outputs
        .into_iter()
        .map(|out| {
            let values = out.rows.into_iter().flatten();
            let mut tensor = InferOutputTensor {
                name: out.name.to_string(),
                datatype: "FP32".into(),
                shape: vec![batch, out.width as i64],
                ..Default::default()
            };
            if raw {
                raw_contents.push(values.flat_map(f32::to_le_bytes).collect());
            } else {
                tensor.contents = Some(InferTensorContents {
                    fp32_contents: values.collect(),
                    ..Default::default()
                });
            }
            tensor
        })
        .collect();
    (tensors, raw_contents)
}
