//! A JSON body extractor whose every rejection is an [`AppError`].
//!
//! axum's `Json` answers in plain text and insists on `Content-Type: application/json`; clients
//! such as tritonclient send none. This extractor accepts a missing content type, refuses a
//! different one (415), and separates unparsable bodies (400) from well-formed JSON of the wrong
//! shape (422), naming the field and position.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use crate::error::AppError;

pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AppError> {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("");
            let essence = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if !(essence == "application/json" || essence.ends_with("+json")) {
                return Err(AppError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "validation",
                    format!("expected an application/json body, got Content-Type `{ct}`"),
                ));
            }
        }
        let RawBody(bytes) = RawBody::from_request(req, state).await?;
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            AppError::new(
                StatusCode::BAD_REQUEST,
                "validation",
                format!("request body is not valid UTF-8: {e}"),
            )
        })?;
        if holds_more_values(text.as_bytes(), MAX_JSON_VALUES) {
            return Err(AppError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "validation",
                format!(
                    "the JSON body holds more than {MAX_JSON_VALUES} values; no kiln request needs that many"
                ),
            ));
        }
        serde_json::from_str(text).map(ApiJson).map_err(|e| {
            use serde_json::error::Category;
            let status = match e.classify() {
                Category::Data => StatusCode::UNPROCESSABLE_ENTITY,
                Category::Syntax | Category::Eof | Category::Io => StatusCode::BAD_REQUEST,
            };
            let what = if status == StatusCode::BAD_REQUEST {
                "malformed JSON"
            } else {
                "invalid request"
            };
            AppError::new(status, "validation", format!("{what}: {e}"))
        })
    }
}

/// The most JSON values (strings, numbers, lists, objects...) a JSON API body may hold. Parsed
/// JSON takes tens of bytes per value however small its text (`"a",` is 4 bytes of body and over
/// 50 bytes parsed), so without a cap a body at the payload limit full of tiny values would cost
/// a dozen times its size before any field is checked. The largest real requests (a batch of
/// `--max-client-batch-size` texts, a long chat) hold a few thousand.
pub const MAX_JSON_VALUES: usize = 1 << 16;

/// Whether the JSON text holds more than `cap` values, counted without parsing: each value after
/// the first begins a list or object or follows a comma (outside strings). Malformed JSON may
/// count wrong; the parser refuses it anyway.
pub fn holds_more_values(text: &[u8], cap: usize) -> bool {
    let (mut count, mut in_string, mut escaped) = (1usize, false, false);
    for &b in text {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' | b',' => {
                count += 1;
                if count > cap {
                    return true;
                }
            }
            _ => {}
        }
    }
    false
}

/// The request body as bytes (inflated if it was gzip-compressed); a body over the payload
/// limit is a 413 and an unreadable one (a corrupt gzip stream) a 400, both as [`AppError`]s.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AppError> {
        Bytes::from_request(req, state)
            .await
            .map(RawBody)
            .map_err(|rejection| {
                let status = rejection.status();
                if status == StatusCode::PAYLOAD_TOO_LARGE {
                    AppError::new(
                        status,
                        "validation",
                        "request body is larger than the payload limit",
                    )
                } else {
                    AppError::new(
                        StatusCode::BAD_REQUEST,
                        "validation",
                        format!("cannot read request body: {}", rejection.body_text()),
                    )
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::holds_more_values;

    #[test]
    fn values_are_counted_outside_strings() {
        assert!(!holds_more_values(br#"{"inputs": ["a", "b", "c"]}"#, 5));
        assert!(holds_more_values(br#"{"inputs": ["a", "b", "c", "d"]}"#, 5));
        // Commas and brackets inside strings, escaped quotes included, are text.
        assert!(!holds_more_values(br#"{"inputs": ["a,[{,", "\",,,"]}"#, 4));
        let many = format!("[{}1]", "1,".repeat(100));
        assert!(holds_more_values(many.as_bytes(), 100));
        assert!(!holds_more_values(many.as_bytes(), 102));
    }
}
