//! Request ids, the one source of them for every route and both protocols: a client's id
//! (HTTP `x-request-id`; gRPC `x-request-id` metadata or the KServe request's `id`) is kept when
//! it is short and printable, otherwise one is made. It is echoed in the response, recorded in
//! every log line of the request's span, and is the `id` OpenAI-style answers carry.
//!
//! Each request runs in a [`Context`] (a tokio task-local), which also notes the model the
//! request was routed to once one is chosen, so the request metrics can be labelled by model.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Span;

pub const HEADER: &str = "x-request-id";

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A new id: the process start time and a counter, so unique per process and across
/// restarts, and sortable.
pub fn make() -> String {
    static EPOCH: OnceLock<u64> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    });
    format!("{epoch:x}-{:06x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Whether a client's id is kept: 1 to 128 printable ASCII characters.
pub fn acceptable(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|c| c.is_ascii_graphic())
}

/// The first acceptable id among the client's, else a new one.
pub fn from_client<'a>(candidates: impl IntoIterator<Item = Option<&'a str>>) -> String {
    candidates
        .into_iter()
        .flatten()
        .find(|id| acceptable(id))
        .map_or_else(make, str::to_string)
}

/// One request: its id, and the model it was routed to once one is chosen.
pub struct Context {
    id: String,
    model: OnceLock<Arc<str>>,
}

impl Context {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The model the request was routed to (`None` when it failed before one was chosen).
    pub fn model(&self) -> Option<&str> {
        self.model.get().map(|m| &**m)
    }
}

tokio::task_local! {
    static CURRENT: Arc<Context>;
}

/// Runs `f` as the request `id`.
pub async fn scope<F: Future>(id: String, f: F) -> F::Output {
    let context = Arc::new(Context {
        id,
        model: OnceLock::new(),
    });
    CURRENT.scope(context, f).await
}

/// The request this task serves (`None` outside a request, e.g. a warm-up).
pub fn current() -> Option<Arc<Context>> {
    CURRENT.try_with(Arc::clone).ok()
}

/// This request's id, or a new one outside a request.
pub fn id() -> String {
    current().map_or_else(make, |c| c.id.clone())
}

/// Notes the model this request was routed to (the first one noted stays).
pub fn note_model(model: &str) {
    if let Some(c) = current()
        && c.model.set(model.into()).is_ok()
    {
        Span::current().record("model", model);
    }
}

/// HTTP middleware: the request's id (the client's `x-request-id` or a new one), in its
/// headers, its [`Context`] and the response's headers.
pub async fn assign(mut req: Request, next: Next) -> Response {
    let id = from_client([req.headers().get(HEADER).and_then(|v| v.to_str().ok())]);
    let value = HeaderValue::from_str(&id).expect("kept and made ids are printable ASCII");
    req.headers_mut().insert(HEADER, value.clone());
    let mut response = scope(id, next.run(req)).await;
    response.headers_mut().insert(HEADER, value);
    response
}

/// The tracing span of one HTTP request (`TraceLayer::make_span_with`); its `model` is
/// recorded once the request is routed to one.
pub fn span<B>(req: &axum::http::Request<B>) -> Span {
    let id = req
        .headers()
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::info_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        path = %req.uri().path(),
        model = tracing::field::Empty,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_id_is_kept_only_when_short_and_printable() {
        assert_eq!(from_client([Some("abc-1")]), "abc-1");
        assert_eq!(from_client([None, Some("x")]), "x");
        for bad in ["", "has space", "tab\t", &"a".repeat(129), "é"] {
            let id = from_client([Some(bad)]);
            assert_ne!(id, bad);
            assert!(acceptable(&id), "{id}");
        }
    }

    #[tokio::test]
    async fn the_context_carries_the_id_and_the_first_model_noted() {
        assert!(current().is_none());
        scope("r1".into(), async {
            assert_eq!(id(), "r1");
            note_model("a");
            note_model("b");
            assert_eq!(current().unwrap().model(), Some("a"));
        })
        .await;
        assert_ne!(id(), id(), "outside a request each id is new");
    }
}
