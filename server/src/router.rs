//! The HTTP API's router: every route, its middleware (request ids, tracing, panics, body
//! limits, gzip, API keys, request metrics) and its fallbacks, over the server state.
//! [`app`] builds all of it but the socket, so handlers are tested with
//! `tower::ServiceExt::oneshot`.

use axum::Router;
use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::http::{Request, StatusCode};
use axum::middleware;
use axum::routing::{get, post};
use tower::ServiceBuilder;
use tower::util::MapRequestLayer;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::decompression::{DecompressionBody, RequestDecompressionLayer};
use tower_http::trace::TraceLayer;

use crate::app::AppState;
use crate::error::AppError;
use crate::request_id;
use crate::routes::{completions, generate, kserve, native, openai, openapi};

/// The HTTP API.
pub fn app(state: AppState) -> Router {
    let limit = state.config().payload_limit;
    let metrics = state.metrics().clone();
    // Requests that run the model: counted, timed and failures classified by reason.
    let inference = Router::new()
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/generate", post(generate::generate))
        .route("/generate_stream", post(generate::generate_stream))
        .route("/embed", post(native::embed))
        .route("/predict", post(native::predict))
        .route("/rerank", post(native::rerank))
        .route("/similarity", post(native::similarity))
        .route("/v2/models/{model}/infer", post(kserve::infer))
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(kserve::infer),
        )
        .route_layer(middleware::from_fn_with_state(
            metrics,
            crate::metrics::track,
        ));
    let protected = Router::new()
        .merge(inference)
        .route("/v1/models", get(openai::models))
        .route("/tokenize", post(native::tokenize))
        .route("/decode", post(native::decode))
        .route("/info", get(native::info))
        .route("/openapi.json", get(openapi::spec))
        .route("/v2", get(kserve::server_metadata))
        .route("/v2/models/{model}", get(kserve::model_metadata))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(kserve::model_metadata),
        )
        .route("/v2/models/{model}/ready", get(kserve::model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(kserve::model_ready),
        )
        .route("/v2/models/{model}/config", get(kserve::model_config))
        .route(
            "/v2/models/{model}/versions/{version}/config",
            get(kserve::model_config),
        )
        .route("/v2/repository/index", post(kserve::repository_index))
        .route(
            "/v2/repository/models/{model}/load",
            post(kserve::repository_load),
        )
        .route(
            "/v2/repository/models/{model}/unload",
            post(kserve::repository_unload),
        )
        .route("/v2/models/stats", get(kserve::all_stats))
        .route("/v2/models/{model}/stats", get(kserve::model_stats))
        .route(
            "/v2/models/{model}/versions/{version}/stats",
            get(kserve::model_stats),
        )
        .route_layer(middleware::from_fn_with_state(
            state.keys().clone(),
            crate::auth::require_key,
        ));
    // Probes and scrapes work without a key, as load balancers and Prometheus expect.
    let open = Router::new()
        .route("/health", get(native::health))
        .route("/v2/health/live", get(kserve::live))
        .route("/v2/health/ready", get(kserve::ready))
        .route("/metrics", get(native::metrics));
    // gzip request bodies (tritonclient's `request_compression_algorithm`) are inflated before
    // the handlers read them; the payload limit applies to the inflated size.
    let decompress = ServiceBuilder::new()
        .layer(RequestDecompressionLayer::new())
        .layer(MapRequestLayer::new(
            |req: Request<DecompressionBody<Body>>| req.map(Body::new),
        ));
    Router::new()
        .merge(protected)
        .merge(open)
        .fallback(|| async { AppError::new(StatusCode::NOT_FOUND, "validation", "no such route") })
        .method_not_allowed_fallback(|| async {
            AppError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "validation",
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(
            limit,
            refuse_declared_oversize,
        ))
        .layer(decompress)
        // A panic anywhere in a handler answers that request 500 (JSON) and nothing else: the
        // connection, the other requests and the process carry on.
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http().make_span_with(request_id::span))
        .layer(middleware::from_fn(request_id::assign))
        .with_state(state)
}

/// The answer to a request whose handler panicked.
fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> axum::response::Response {
    tracing::error!(panic = %kiln_models::panic_message(&*panic), "a request handler panicked; that request gets 500, serving goes on");
    axum::response::IntoResponse::into_response(AppError::internal())
}

/// 413 at once for a body whose declared `Content-Length` is over the payload limit, before any
/// of it is read. (Bodies without a length, or gzip bodies that inflate past the limit, are cut
/// off by `DefaultBodyLimit` while they are read.)
async fn refuse_declared_oversize(
    axum::extract::State(limit): axum::extract::State<usize>,
    req: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        let err = AppError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "validation",
            format!("request body is larger than the payload limit ({limit} bytes)"),
        )
        .styled_for(req.uri().path());
        return axum::response::IntoResponse::into_response(err);
    }
    next.run(req).await
}
