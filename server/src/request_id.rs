//! Request ids: a client's `x-request-id` is kept (when it is short and printable), otherwise one
//! is made; it is echoed in the response and recorded in every log line of the request's span.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Span;

pub const HEADER: &str = "x-request-id";

static NEXT: AtomicU64 = AtomicU64::new(0);

fn make() -> String {
    // Process start time and a counter: unique per process and across restarts, and sortable.
    static EPOCH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    });
    format!("{epoch:x}-{:06x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn acceptable(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

pub async fn assign(mut req: Request, next: Next) -> Response {
    let id = match req.headers().get(HEADER) {
        Some(v) if acceptable(v) => v.clone(),
        _ => HeaderValue::from_str(&make()).expect("generated ids are ASCII"),
    };
    req.headers_mut().insert(HEADER, id.clone());
    let mut response = next.run(req).await;
    response.headers_mut().insert(HEADER, id);
    response
}

/// The tracing span of one request (`TraceLayer::make_span_with`).
pub fn span<B>(req: &axum::http::Request<B>) -> Span {
    let id = req
        .headers()
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path())
}
