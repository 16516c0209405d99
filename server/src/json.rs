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
