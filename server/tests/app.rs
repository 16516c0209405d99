//! The router in-process (no socket): readiness and errors while the model is loading, and a
//! request once it is loaded.

use std::path::PathBuf;

use axum::body::{Body, to_bytes};
use axum::http::{Request, StatusCode};
use kiln_server::{AppState, ServeConfig, app};
use tower::ServiceExt;

fn bert_tiny_cls() -> PathBuf {
    std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"))
        .join("tiny/bert-tiny-cls")
}

async fn call(
    state: &AppState,
    method: &str,
    uri: &str,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app(state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn not_ready_until_loaded_then_serves() {
    let state = AppState::new(ServeConfig::for_model(bert_tiny_cls())).unwrap();
    let (status, body) = call(&state, "GET", "/health", "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body["error"].as_str().unwrap().contains("loading"));
    let (status, _) = call(&state, "POST", "/predict", r#"{"inputs": "hello"}"#).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // Validation does not wait for the model.
    let (status, _) = call(&state, "POST", "/predict", r#"{"inputs": 1}"#).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    let loader = state.clone();
    tokio::task::spawn_blocking(move || loader.load())
        .await
        .unwrap()
        .unwrap();
    let (status, _) = call(&state, "GET", "/health", "").await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = call(&state, "POST", "/predict", r#"{"inputs": "hello"}"#).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body.as_array().unwrap().len(), 3);
    let (status, body) = call(&state, "GET", "/info", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["model_type"], "classifier");
    assert_eq!(body["model"]["labels"][2], "positive");
    let (status, body) = call(&state, "GET", "/v1/models", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"][0]["id"], "bert-tiny-cls");
}

#[test]
fn config_validation_names_the_flag() {
    let mut c = ServeConfig::for_model(bert_tiny_cls());
    c.max_client_batch_size = 0;
    assert!(
        c.validate()
            .unwrap_err()
            .contains("--max-client-batch-size")
    );
}

#[tokio::test]
async fn every_path_in_openapi_json_is_routed() {
    let state = AppState::new(ServeConfig::for_model(bert_tiny_cls())).unwrap();
    let loader = state.clone();
    tokio::task::spawn_blocking(move || loader.load())
        .await
        .unwrap()
        .unwrap();
    let (status, doc) = call(&state, "GET", "/openapi.json", "").await;
    assert_eq!(status, StatusCode::OK);
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 18);
    for (path, item) in paths {
        let uri = path.replace("{model}", "bert-tiny-cls");
        for method in item.as_object().unwrap().keys() {
            let req = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(&uri)
                .body(Body::from("{}"))
                .unwrap();
            let resp = app(state.clone()).oneshot(req).await.unwrap();
            let s = resp.status();
            assert!(
                s != StatusCode::NOT_FOUND && s != StatusCode::METHOD_NOT_ALLOWED,
                "{method} {uri}: {s}"
            );
            assert!(!s.is_server_error(), "{method} {uri}: {s}");
        }
    }
}

#[tokio::test]
async fn kserve_infer_on_a_classifier_and_metrics_in_process() {
    let state = AppState::new(ServeConfig::for_model(bert_tiny_cls())).unwrap();
    let loader = state.clone();
    tokio::task::spawn_blocking(move || loader.load())
        .await
        .unwrap()
        .unwrap();
    let body = r#"{"inputs": [
        {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["A man is playing a guitar."]},
        {"name": "text_pair", "shape": [1], "datatype": "BYTES", "data": ["Someone plays an instrument."]}]}"#;
    let (status, out) = call(&state, "POST", "/v2/models/bert-tiny-cls/infer", body).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["outputs"][0]["name"], "logits");
    assert_eq!(out["outputs"][0]["shape"], serde_json::json!([1, 3]));
    // The fixture's first pair, label 0 logit (PyTorch).
    let logit = out["outputs"][0]["data"][0].as_f64().unwrap();
    assert!((logit - (-0.857_589_5)).abs() <= 1e-4, "{logit}");
    let req = Request::builder()
        .uri("/metrics")
        .body(Body::empty())
        .unwrap();
    let resp = app(state.clone()).oneshot(req).await.unwrap();
    let text =
        String::from_utf8(to_bytes(resp.into_body(), 1 << 20).await.unwrap().to_vec()).unwrap();
    // Labelled with the model the request was routed to.
    let id = state.models().all()[0].id().to_string();
    assert!(
        text.contains(&format!(
            "kiln_request_success_total{{api=\"kserve\",model=\"{id}\"}} 1"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("kiln_batch_total{{model=\"{id}\"}} 1")),
        "{text}"
    );
    assert!(text.contains("kiln_model_load_duration_seconds"));
}
