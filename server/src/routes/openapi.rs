//! `GET /openapi.json`: an OpenAPI 3.1 description of every route, written out by hand so it says
//! exactly what the handlers accept (kept in step by the router test that requests every path it
//! lists).

use axum::Json;
use serde_json::{Value, json};

fn post(summary: &str, request: Value, response: Value) -> Value {
    json!({ "post": {
        "summary": summary,
        "requestBody": { "required": true, "content": { "application/json": { "schema": request } } },
        "responses": {
            "200": { "description": "OK", "content": { "application/json": { "schema": response } } },
            "4XX": { "description": "Bad request; JSON error body", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } },
            "429": { "description": "At --max-concurrent-requests; see Retry-After" },
            "503": { "description": "The model is still loading" },
        },
    }})
}

fn get(summary: &str) -> Value {
    json!({ "get": { "summary": summary, "responses": { "200": { "description": "OK" } } } })
}

pub fn document() -> Value {
    let texts = json!({ "oneOf": [ { "type": "string" }, { "type": "array", "items": { "type": "string" }, "minItems": 1 } ] });
    let embeddings_req = json!({
        "type": "object", "required": ["input"],
        "properties": {
            "input": texts, "model": { "type": "string" },
            "encoding_format": { "enum": ["float", "base64"] },
            "dimensions": { "type": "integer", "minimum": 1, "description": "Matryoshka: the first N values, normalised again" }, "user": { "type": "string" },
            "prompt_name": { "type": "string" }, "prompt": { "type": "string" },
        },
    });
    // Which served model; an `X-Model` header works too. Optional where only one model can
    // answer the route (or `--default-model` names one).
    let model = json!({ "type": "string" });
    let embed_req = json!({
        "type": "object", "required": ["inputs"],
        "properties": { "inputs": texts, "normalize": { "type": "boolean", "default": true }, "truncate": { "type": "boolean" }, "dimensions": { "type": "integer", "minimum": 1 }, "prompt_name": { "type": "string" }, "prompt": { "type": "string" }, "model": model },
    });
    let predict_req = json!({
        "type": "object", "required": ["inputs"],
        "properties": { "inputs": {}, "raw_scores": { "type": "boolean" }, "truncate": { "type": "boolean" }, "model": model },
    });
    let rerank_req = json!({
        "type": "object", "required": ["query", "texts"],
        "properties": {
            "query": { "type": "string" }, "texts": { "type": "array", "items": { "type": "string" } },
            "raw_scores": { "type": "boolean" }, "return_text": { "type": "boolean" }, "truncate": { "type": "boolean" },
            "model": model,
        },
    });
    let tensor = json!({
        "type": "object", "required": ["name", "shape", "datatype"],
        "properties": {
            "name": { "type": "string" }, "shape": { "type": "array", "items": { "type": "integer" } },
            "datatype": { "enum": ["BYTES", "INT64"] }, "parameters": { "type": "object" }, "data": {},
        },
    });
    let infer_req = json!({
        "type": "object", "required": ["inputs"],
        "properties": {
            "id": { "type": "string" }, "parameters": { "type": "object" },
            "inputs": { "type": "array", "items": tensor },
            "outputs": { "type": "array", "items": { "type": "object", "properties": { "name": { "type": "string" }, "parameters": { "type": "object" } } } },
        },
    });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "kiln",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Transformer inference server: OpenAI embeddings, Hugging Face TEI-style native routes and the Open Inference Protocol (KServe v2, with the binary tensor data extension). Send `Authorization: Bearer <key>` when the server has API keys (not needed for health and metrics).",
        },
        "paths": {
            "/v1/embeddings": post("OpenAI embeddings", embeddings_req, json!({ "type": "object" })),
            "/v1/models": get("OpenAI model list"),
            "/embed": post("Embeddings (TEI)", embed_req.clone(), json!({ "type": "array", "items": { "type": "array", "items": { "type": "number" } } })),
            "/predict": post("Sequence classification (TEI)", predict_req, json!({ "type": "array" })),
            "/rerank": post("Rerank texts against a query with a cross-encoder (TEI)", rerank_req, json!({ "type": "array" })),
            "/tokenize": post("Tokens the model sees (TEI)", embed_req, json!({ "type": "array" })),
            "/decode": post("The text of token ids (TEI)", json!({ "type": "object", "required": ["ids"], "properties": { "ids": { "type": "array" }, "skip_special_tokens": { "type": "boolean", "default": true }, "model": model } }), json!({ "type": "array", "items": { "type": "string" } })),
            "/similarity": post("Cosine similarity of a sentence with others (TEI)", json!({ "type": "object", "required": ["inputs"], "properties": { "inputs": { "type": "object", "required": ["source_sentence", "sentences"], "properties": { "source_sentence": { "type": "string" }, "sentences": { "type": "array", "items": { "type": "string" } } } }, "truncate": { "type": "boolean" }, "model": model } }), json!({ "type": "array", "items": { "type": "number" } })),
            "/info": get("Model and server settings (the model named by X-Model; every model's when several are served and none is named)"),
            "/health": get("200 once every model is loaded and warmed up, 503 (with the reasons) before"),
            "/metrics": get("Prometheus metrics (text format)"),
            "/openapi.json": get("This document"),
            "/v2": get("KServe v2 server metadata"),
            "/v2/health/live": get("KServe v2 liveness"),
            "/v2/health/ready": get("KServe v2 readiness"),
            "/v2/models/{model}": get("KServe v2 model metadata"),
            "/v2/models/{model}/ready": get("KServe v2 model readiness"),
            "/v2/models/{model}/config": get("Triton model configuration"),
            "/v2/models/{model}/stats": get("Triton model statistics"),
            "/v2/repository/index": post("Triton model repository index: every model with its state (READY, LOADING, UNLOADING, UNAVAILABLE and the reason)", json!({ "type": "object", "properties": { "ready": { "type": "boolean" } } }), json!({ "type": "array" })),
            "/v2/models/{model}/infer": post("KServe v2 inference (JSON, or binary tensor data with Inference-Header-Content-Length; gzip with Content-Encoding)", infer_req, json!({ "type": "object" })),
        },
        "components": { "schemas": { "Error": { "type": "object", "required": ["error"] } } },
    })
}

pub async fn spec() -> Json<Value> {
    Json(document())
}
