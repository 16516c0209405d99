//! The one error type of the HTTP layer. Every failure a client can cause becomes a 4xx with a
//! precise message; internal details are logged, never sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_models::ModelError;
use serde_json::json;

/// How an error body is spelled: OpenAI's clients expect `{"error": {"message", "type", ...}}`,
/// TEI's `{"error", "error_type"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorStyle {
    Native,
    OpenAi,
    /// The Open Inference Protocol's `{"error": "..."}`.
    KServe,
}

/// Attached to every error response so the metrics layer can count failures by reason without
/// parsing bodies.
#[derive(Debug, Clone, Copy)]
pub struct ErrorKind(pub &'static str);

#[derive(Debug, Clone)]
pub struct AppError {
    pub status: StatusCode,
    /// A short machine-readable kind: `validation`, `tokenization`, `overloaded`, ...
    pub kind: &'static str,
    pub message: String,
    pub style: ErrorStyle,
    /// Seconds for a `Retry-After` header (overload answers).
    pub retry_after: Option<u64>,
}

impl AppError {
    /// 503 for a request still running when a draining server gives up on it.
    pub fn shutting_down() -> Self {
        Self::unavailable("the server is shutting down and stopped waiting for this request")
    }
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            style: ErrorStyle::Native,
            retry_after: None,
        }
    }

    /// 429 with `Retry-After`: the server is at `--max-concurrent-requests`.
    pub fn overloaded(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", message);
        e.retry_after = Some(1);
        e
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "validation", message)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "validation", message)
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }

    pub fn openai(mut self) -> Self {
        self.style = ErrorStyle::OpenAi;
        self
    }

    pub fn kserve(mut self) -> Self {
        self.style = ErrorStyle::KServe;
        self
    }

    /// The error shape of the API family a path belongs to (for answers given before a handler
    /// runs: authentication, payload size).
    pub fn styled_for(self, path: &str) -> Self {
        if path.starts_with("/v1/") {
            self.openai()
        } else if path.starts_with("/v2") {
            self.kserve()
        } else {
            self
        }
    }
}

impl From<ModelError> for AppError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Input(m) => AppError::validation(m),
            ModelError::Tokenize(m) => {
                AppError::new(StatusCode::UNPROCESSABLE_ENTITY, "tokenization", m)
            }
            other => {
                tracing::error!(error = %other, "inference failed");
                AppError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "inference",
                    "inference failed; see the server log",
                )
            }
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let body = match self.style {
            ErrorStyle::Native => json!({ "error": self.message, "error_type": self.kind }),
            ErrorStyle::KServe => json!({ "error": self.message }),
            ErrorStyle::OpenAi => json!({
                "error": {
                    "message": self.message,
                    "type": if self.status.is_server_error() { "server_error" } else { "invalid_request_error" },
                    "param": null,
                    "code": self.kind,
                }
            }),
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response.extensions_mut().insert(ErrorKind(self.kind));
        response
    }
}
