//! Request handlers, one module per API family, and the input checks they share.

pub mod completions;
pub mod generate;
pub mod kserve;
pub mod native;
pub mod openai;
pub mod openapi;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde_json::Value;

use crate::error::AppError;

/// The `X-Model` header: which served model a request is for, on routes whose body has no
/// `model` field or leaves it out (a body's `model` wins).
pub struct ModelHeader(pub Option<String>);

impl ModelHeader {
    /// The body's `model` if it has one, else the header's.
    pub fn or_field(self, field: Option<&str>) -> Option<String> {
        field.map(str::to_string).or(self.0)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ModelHeader {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .headers
                .get("x-model")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        ))
    }
}

/// A list of texts from a JSON value that must be a string or an array of strings.
/// `field` names the request field in error messages.
pub fn texts_from(value: &Value, field: &str, max: usize) -> Result<Vec<String>, AppError> {
    let texts = match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => {
            if items.is_empty() {
                return Err(AppError::validation(format!(
                    "`{field}` must not be an empty list"
                )));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(_) | Value::Array(_) => Err(AppError::validation(format!(
                        "`{field}[{i}]` is a token id or token list; kiln takes text (strings) only"
                    ))),
                    other => Err(AppError::validation(format!(
                        "`{field}[{i}]` must be a string, got {}",
                        kind_of(other)
                    ))),
                })
                .collect::<Result<_, _>>()?
        }
        Value::Null => return Err(AppError::validation(format!("`{field}` is required"))),
        other => {
            return Err(AppError::validation(format!(
                "`{field}` must be a string or a list of strings, got {}",
                kind_of(other)
            )));
        }
    };
    check_batch(texts.len(), max)?;
    Ok(texts)
}

/// 413 when a request carries more inputs than `--max-client-batch-size`.
pub fn check_batch(n: usize, max: usize) -> Result<(), AppError> {
    if n > max {
        return Err(AppError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "validation",
            format!("{n} inputs exceed the limit of {max} per request (max_client_batch_size)"),
        ));
    }
    Ok(())
}

pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// `/info`'s `device_placement`: the resolved device, why, and the GPU adapter (name, graphics
/// API, type, driver, limits, f16 support) when it is one.
pub(crate) fn placement_json(p: &kiln_models::DevicePlacement) -> serde_json::Value {
    serde_json::json!({
        "device": p.device.to_string(),
        "reason": p.reason,
        "adapter": p.adapter,
    })
}

/// `/info`'s `plan`: how the model's plan came to be (compiled, or read from the plan cache).
pub(crate) fn plan_json(p: &kiln_models::PlanInfo) -> serde_json::Value {
    serde_json::json!({
        "cache": p.cache.as_str(),
        "cache_key": p.key,
        "compile_ms": p.compile_time.as_secs_f64() * 1e3,
        "cache_load_ms": p.cache_load_time.as_secs_f64() * 1e3,
        "passes": p.report.options.describe(),
    })
}
