//! End to end: the real `kiln serve` binary on a free port, called over HTTP, checked against the
//! sentence-transformers and PyTorch fixtures; bad requests get 4xx JSON errors and the server
//! keeps serving; SIGTERM ends it cleanly.

use std::io::{Read, Write};
use std::path::Path;

use base64::Engine as _;
use kiln_tests::server::{Server, kiln_bin};
use kiln_tests::{
    cosine, fixtures, flatten, max_abs_diff, minilm_dir, read_json, read_jsonl, read_npy,
};
use serde_json::{Value, json};

fn start(model: &Path, extra: &[&str]) -> Server {
    Server::start(&kiln_bin(env!("CARGO_BIN_EXE_kiln")), model, extra)
}

const INFER: &str = "/v2/models/all-MiniLM-L6-v2/infer";

fn check_embeddings(got: &[Vec<f32>], want: &[f32]) {
    for (i, g) in got.iter().enumerate() {
        let w = &want[i * 384..(i + 1) * 384];
        let cos = cosine(g, w);
        let err = max_abs_diff(g, w);
        assert!(
            cos >= 0.99999 && err <= 1e-4,
            "text {i}: cosine {cos}, max abs error {err}"
        );
    }
}

#[test]
fn embeddings_over_http_match_fixtures_and_bad_requests_get_4xx() {
    let server = start(&minilm_dir(), &[]);
    let texts: Vec<String> = read_jsonl(&fixtures().join("minilm/inputs.jsonl"))
        .iter()
        .map(|v| v["text"].as_str().unwrap().to_string())
        .collect();
    let (_, want) = read_npy(&fixtures().join("minilm/embeddings_normalized.npy"));
    let want_tokens: u64 = read_jsonl(&fixtures().join("minilm/tokens.jsonl"))
        .iter()
        .map(|v| v["num_tokens"].as_u64().unwrap())
        .sum();

    // OpenAI shape, float.
    let (status, body) = server.post("/v1/embeddings", &json!({ "input": texts, "model": "any" }));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "all-MiniLM-L6-v2");
    assert_eq!(body["usage"]["prompt_tokens"].as_u64(), Some(want_tokens));
    let got: Vec<Vec<f32>> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["index"].as_u64(), Some(i as u64));
            flatten(&d["embedding"])
        })
        .collect();
    assert_eq!(got.len(), texts.len());
    check_embeddings(&got, &want);

    // OpenAI shape, base64 (what the official client sends by default).
    let (status, body) = server.post(
        "/v1/embeddings",
        &json!({ "input": texts, "encoding_format": "base64" }),
    );
    assert_eq!(status, 200, "{body}");
    let got: Vec<Vec<f32>> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(d["embedding"].as_str().unwrap())
                .unwrap();
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        })
        .collect();
    check_embeddings(&got, &want);

    // A single string, and TEI's /embed.
    let (status, body) = server.post("/v1/embeddings", &json!({ "input": texts[0] }));
    assert_eq!(status, 200, "{body}");
    check_embeddings(&[flatten(&body["data"][0]["embedding"])], &want);
    let (status, body) = server.post("/embed", &json!({ "inputs": [texts[0], texts[1]] }));
    assert_eq!(status, 200, "{body}");
    check_embeddings(&[flatten(&body[0]), flatten(&body[1])], &want);

    let long = "word ".repeat(600);
    let too_many: Vec<&str> = vec!["a"; 257];
    let bad: Vec<(&str, Option<&str>, Vec<u8>, u16)> = vec![
        (
            "/v1/embeddings",
            Some("application/json"),
            b"{\"input\": ".to_vec(),
            400,
        ),
        (
            "/v1/embeddings",
            Some("application/json"),
            b"not json at all".to_vec(),
            400,
        ),
        (
            "/v1/embeddings",
            Some("application/json"),
            vec![b'"', 0xff, 0xfe, b'"'],
            400,
        ),
        (
            "/v1/embeddings",
            Some("application/json"),
            br#"{"input": []}"#.to_vec(),
            422,
        ),
        (
            "/v1/embeddings",
            Some("application/json"),
            br#"{"input": 5}"#.to_vec(),
            422,
        ),
        (
            "/v1/embeddings",
            Some("application/json"),
            br#"{"input": ["ok", 3]}"#.to_vec(),
            422,
        ),
        (
            "/v1/embeddings",
            Some("application/json"),
            br#"{"input": [[101, 102]]}"#.to_vec(),
            422,
        ),
        (
            "/v1/embeddings",
            Some("application/json"),
            br#"{"model": "x"}"#.to_vec(),
            422,
        ),
        (
            "/v1/embeddings",
            Some("application/json"),
            br#"{"input": "a", "encoding_format": "hex"}"#.to_vec(),
            422,
        ),
        (
            "/v1/embeddings",
            Some("application/json"),
            br#"{"input": "a", "dimensions": 385}"#.to_vec(),
            422,
        ),
        (
            "/v1/embeddings",
            Some("application/json"),
            br#"{"input": "a", "dimensions": 0}"#.to_vec(),
            422,
        ),
        (
            "/embed",
            Some("application/json"),
            br#"{"inputs": "a", "dimensions": 385}"#.to_vec(),
            422,
        ),
        (
            "/v1/embeddings",
            Some("application/json"),
            br#"[1, 2]"#.to_vec(),
            422,
        ),
        (
            "/v1/embeddings",
            Some("text/plain"),
            br#"{"input": "a"}"#.to_vec(),
            415,
        ),
        (
            "/v1/embeddings",
            Some("application/json"),
            json!({ "input": too_many }).to_string().into_bytes(),
            413,
        ),
        (
            "/embed",
            Some("application/json"),
            br#"{"inputs": null}"#.to_vec(),
            422,
        ),
        (
            "/embed",
            Some("application/json"),
            br#"{"inputs": "a", "normalize": "yes"}"#.to_vec(),
            422,
        ),
        (
            "/embed",
            Some("application/json"),
            json!({ "inputs": long, "truncate": false })
                .to_string()
                .into_bytes(),
            422,
        ),
        (
            "/predict",
            Some("application/json"),
            br#"{"inputs": "a"}"#.to_vec(),
            422,
        ),
        ("/nope", Some("application/json"), b"{}".to_vec(), 404),
        // TEI-style routes this model does not serve, and malformed ones.
        (
            "/rerank",
            Some("application/json"),
            br#"{"query": "q", "texts": ["a"]}"#.to_vec(),
            422,
        ),
        (
            "/rerank",
            Some("application/json"),
            br#"{"texts": ["a"]}"#.to_vec(),
            422,
        ),
        (
            "/tokenize",
            Some("application/json"),
            br#"{"inputs": 3}"#.to_vec(),
            422,
        ),
        (
            "/embed",
            Some("application/json"),
            br#"{"inputs": []}"#.to_vec(),
            422,
        ),
        // KServe v2: no Content-Type (as tritonclient sends), every client error a 400.
        (INFER, None, b"{".to_vec(), 400),
        (INFER, None, br#"{"inputs": []}"#.to_vec(), 400),
        (INFER, None, br#"{"outputs": []}"#.to_vec(), 400),
        (
            INFER,
            None,
            br#"{"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a"]}]}"#
                .to_vec(),
            400,
        ),
        (
            INFER,
            None,
            br#"{"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}"#
                .to_vec(),
            400,
        ),
        (
            INFER,
            None,
            br#"{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [5]}]}"#
                .to_vec(),
            400,
        ),
        (
            INFER,
            None,
            br#"{"inputs": [{"name": "text", "shape": [-1], "datatype": "BYTES", "data": ["a"]}]}"#
                .to_vec(),
            400,
        ),
        (
            INFER,
            None,
            br#"{"inputs": [{"name": "text", "datatype": "BYTES", "data": ["a"]}]}"#.to_vec(),
            400,
        ),
        (
            INFER,
            None,
            br#"{"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}"#
                .to_vec(),
            400,
        ),
        (
            INFER,
            None,
            br#"{"inputs": [{"name": "text_pair", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}"#
                .to_vec(),
            400,
        ),
        (
            INFER,
            None,
            br#"{"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [101, 99999999]}]}"#
                .to_vec(),
            400,
        ),
        (
            INFER,
            None,
            br#"{"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [101, 102]},
                {"name": "attention_mask", "shape": [1, 2], "datatype": "INT64", "data": [0, 1]}]}"#
                .to_vec(),
            400,
        ),
        (
            INFER,
            None,
            br#"{"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [101, 102]},
                {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}"#
                .to_vec(),
            400,
        ),
        (
            INFER,
            None,
            br#"{"inputs": [{"name": "input_ids", "shape": [1, 300], "datatype": "INT64", "data": [1]}]}"#
                .to_vec(),
            400,
        ),
        (
            INFER,
            None,
            br#"{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                "outputs": [{"name": "logits"}]}"#
                .to_vec(),
            400,
        ),
        (
            "/v2/models/nope/infer",
            None,
            br#"{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}"#
                .to_vec(),
            404,
        ),
        (
            "/v2/models/all-MiniLM-L6-v2/versions/2/infer",
            None,
            br#"{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}"#
                .to_vec(),
            404,
        ),
    ];
    assert!(bad.len() >= 25, "the bad-input table covers every API");
    for (path, ct, body, want_status) in bad {
        let (status, json) = server.post_raw(path, ct, &body);
        assert_eq!(
            status,
            want_status,
            "{path} {:?}: {json}",
            String::from_utf8_lossy(&body)
        );
        let msg = json["error"]["message"].as_str().or(json["error"].as_str());
        assert!(
            msg.is_some_and(|m| !m.is_empty()),
            "{path}: error body {json}"
        );
    }
    // Binary-extension framing errors: a header length beyond the body, a BYTES element whose
    // length prefix overruns its data, binary data no input claims; a corrupt gzip body.
    let header = br#"{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 9}}]}"#;
    let mut framed = header.to_vec();
    framed.extend_from_slice(&[200, 0, 0, 0, b'h', b'i', 0, 0, 0]);
    let len = header.len().to_string();
    let too_long = (framed.len() + 1).to_string();
    let valid = br#"{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]}"#;
    let valid_len = valid.len().to_string();
    let mut extra = valid.to_vec();
    extra.extend_from_slice(&[2, 0, 0, 0, b'h', b'i', 7]);
    for (headers, body) in [
        (
            vec![("inference-header-content-length", too_long.as_str())],
            &framed,
        ),
        (vec![("inference-header-content-length", "abc")], &framed),
        (
            vec![("inference-header-content-length", len.as_str())],
            &framed,
        ),
        (
            vec![("inference-header-content-length", valid_len.as_str())],
            &extra,
        ),
        (vec![("content-encoding", "gzip")], &framed),
    ] {
        let r = server.request("POST", INFER, &headers, Some(body));
        assert_eq!(
            r.status,
            400,
            "{headers:?}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(r.json()["error"].as_str().is_some_and(|m| !m.is_empty()));
    }
    for path in [
        "/v2/models/nope",
        "/v2/models/nope/ready",
        "/v2/models/all-MiniLM-L6-v2/versions/3",
        "/v2/models/all-MiniLM-L6-v2/versions/3/config",
    ] {
        let (status, json) = server.get(path);
        assert_eq!(status, 404, "{path}: {json}");
        assert!(json["error"].is_string(), "{path}: {json}");
    }
    // A body declared over the 2 MiB --payload-limit is refused from its headers, before it is
    // read (a raw socket, since ordinary clients stop at the write error when the server does not
    // read the rest).
    for path in ["/embed", INFER, "/v1/embeddings"] {
        let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{{\"inputs\": \"",
            3 << 20
        )
        .unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut answer = vec![0; 4096];
        let n = stream.read(&mut answer).unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {answer}");
        assert!(answer.contains("payload limit"), "{path}: {answer}");
    }

    // No bad request was blamed on the model.
    let metrics = server.metrics();
    for reason in ["inference", "cancelled", "timeout"] {
        let series = format!("kiln_request_failure_total{{reason=\"{reason}\"}}");
        assert_eq!(
            kiln_tests::server::metric_value(&metrics, &series),
            0.0,
            "{series}"
        );
    }
    assert!(
        kiln_tests::server::metric_value(
            &metrics,
            "kiln_request_failure_total{reason=\"validation\"}"
        ) >= 25.0
    );

    // OpenAI routes answer in OpenAI's error shape.
    let (_, json) = server.post_raw(
        "/v1/embeddings",
        Some("application/json"),
        br#"{"input": []}"#,
    );
    assert_eq!(json["error"]["type"], "invalid_request_error");
    // Wrong method.
    match ureq::get(&server.url("/v1/embeddings")).call() {
        Err(ureq::Error::Status(405, _)) => {}
        other => panic!("GET /v1/embeddings: {other:?}"),
    }

    // Still serving, with the same answers.
    let (status, body) = server.post("/v1/embeddings", &json!({ "input": texts[3] }));
    assert_eq!(status, 200, "{body}");
    check_embeddings(&[flatten(&body["data"][0]["embedding"])], &want[3 * 384..]);
    // TEI's /decode gives back the text of /tokenize's ids; /similarity is the cosine of the
    // normalised embeddings.
    let (status, tokens) = server.post("/tokenize", &json!({ "inputs": "Hello world" }));
    assert_eq!(status, 200, "{tokens}");
    let ids: Vec<u64> = tokens[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    let (status, text) = server.post("/decode", &json!({ "ids": ids }));
    assert_eq!(status, 200, "{text}");
    assert_eq!(text, json!(["hello world"]));
    let (status, text) = server.post(
        "/decode",
        &json!({ "ids": [ids.clone(), ids], "skip_special_tokens": false }),
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(text[1], "[CLS] hello world [SEP]");
    let (status, got) = server.post("/decode", &json!({ "ids": [99999999] }));
    assert_eq!(status, 422, "{got}");
    let (status, sims) = server.post(
        "/similarity",
        &json!({ "inputs": { "source_sentence": "kiln", "sentences": ["fast", "kiln"] } }),
    );
    assert_eq!(status, 200, "{sims}");
    let embed_one = |text: &str| {
        let (status, body) = server.post("/embed", &json!({ "inputs": text }));
        assert_eq!(status, 200, "{body}");
        flatten(&body[0])
    };
    let (a, b) = (embed_one("kiln"), embed_one("fast"));
    let dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    assert!(
        (sims[0].as_f64().unwrap() as f32 - dot).abs() <= 1e-5,
        "{sims}"
    );
    assert!((sims[1].as_f64().unwrap() - 1.0).abs() <= 1e-5, "{sims}");
    let (status, got) = server.post(
        "/similarity",
        &json!({ "inputs": { "source_sentence": "kiln", "sentences": [] } }),
    );
    assert_eq!(status, 422, "{got}");
    // Matryoshka dimensions: the first 64 values, normalised again (the model normalises);
    // with normalize=false on /embed, the first 64 raw values.
    let (status, full) = server.post("/v1/embeddings", &json!({ "input": "kiln" }));
    assert_eq!(status, 200, "{full}");
    let full = flatten(&full["data"][0]["embedding"]);
    let (status, short) = server.post(
        "/v1/embeddings",
        &json!({ "input": "kiln", "dimensions": 64 }),
    );
    assert_eq!(status, 200, "{short}");
    let short = flatten(&short["data"][0]["embedding"]);
    let norm = full[..64].iter().map(|x| x * x).sum::<f32>().sqrt();
    let want: Vec<f32> = full[..64].iter().map(|x| x / norm).collect();
    assert!(kiln_tests::max_abs_diff(&short, &want) <= 1e-6, "{short:?}");
    let (status, raw) = server.post(
        "/embed",
        &json!({ "inputs": "kiln", "normalize": false, "dimensions": 64 }),
    );
    assert_eq!(status, 200, "{raw}");
    let (status, raw_full) =
        server.post("/embed", &json!({ "inputs": "kiln", "normalize": false }));
    assert_eq!(status, 200, "{raw_full}");
    assert_eq!(flatten(&raw[0]), flatten(&raw_full[0])[..64].to_vec());
    server.terminate();
}

#[test]
fn predict_over_http_matches_classifier_fixture() {
    let dir = fixtures().join("tiny/bert-tiny-cls");
    let r = read_json(&dir.join("reference.json"));
    let server = start(&dir, &[]);
    let texts: Vec<&str> = r["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let batch: Vec<Value> = texts.iter().map(|t| json!([t])).collect();
    let labels = ["negative", "neutral", "positive"];

    for raw in [true, false] {
        let (status, body) =
            server.post("/predict", &json!({ "inputs": batch, "raw_scores": raw }));
        assert_eq!(status, 200, "{body}");
        let key = if raw { "logits" } else { "probabilities" };
        let want = flatten(&r["outputs"][key]["data"]);
        for (i, ranked) in body.as_array().unwrap().iter().enumerate() {
            let ranked = ranked.as_array().unwrap();
            assert_eq!(ranked.len(), 3);
            for pair in ranked.windows(2) {
                assert!(
                    pair[0]["score"].as_f64() >= pair[1]["score"].as_f64(),
                    "sorted by score"
                );
            }
            for entry in ranked {
                let l = labels.iter().position(|l| *l == entry["label"]).unwrap();
                let got = entry["score"].as_f64().unwrap() as f32;
                assert!(
                    (got - want[i * 3 + l]).abs() <= 1e-4,
                    "text {i} {key}[{l}]: {got}"
                );
            }
        }
    }
    // A flat pair of strings is one sentence pair.
    let pair = &r["pairs"]["texts"][0];
    let (status, body) = server.post("/predict", &json!({ "inputs": pair, "raw_scores": true }));
    assert_eq!(status, 200, "{body}");
    let want = flatten(&r["pairs"]["logits"]["data"]);
    for entry in body.as_array().unwrap() {
        let l = labels.iter().position(|l| *l == entry["label"]).unwrap();
        assert!((entry["score"].as_f64().unwrap() as f32 - want[l]).abs() <= 1e-4);
    }
    // Embeddings from a classifier are refused, not faked.
    let (status, _) = server.post("/v1/embeddings", &json!({ "input": "a" }));
    assert_eq!(status, 422);
    let (status, _) = server.post("/predict", &json!({ "inputs": ["a", "b", "c"] }));
    assert_eq!(status, 422);
    server.terminate();
}

#[test]
fn rerank_scores_pairs_with_a_single_label_cross_encoder() {
    let dir = std::env::temp_dir().join(format!("kiln-rerank-{}", std::process::id()));
    let model = kiln_tests::single_label_classifier(&dir);
    let r = read_json(&fixtures().join("tiny/bert-tiny-cls/reference.json"));
    let query = r["pairs"]["texts"][0][0].as_str().unwrap();
    let texts = [
        "Stock markets fell sharply.",
        r["pairs"]["texts"][0][1].as_str().unwrap(),
        "a",
    ];
    let server = start(&model, &[]);
    let (status, raw) = server.post(
        "/rerank",
        &json!({ "query": query, "texts": texts, "raw_scores": true, "return_text": true }),
    );
    assert_eq!(status, 200, "{raw}");
    let raw = raw.as_array().unwrap().clone();
    assert_eq!(raw.len(), 3);
    for pair in raw.windows(2) {
        assert!(
            pair[0]["score"].as_f64() >= pair[1]["score"].as_f64(),
            "best first"
        );
    }
    // The fixture's pair (index 1) scores label 0's logit from PyTorch.
    let want = flatten(&r["pairs"]["logits"]["data"])[0];
    let fixture_pair = raw.iter().find(|e| e["index"] == 1).unwrap();
    assert_eq!(fixture_pair["text"], texts[1]);
    let got = fixture_pair["score"].as_f64().unwrap() as f32;
    assert!((got - want).abs() <= 1e-4, "logit {got}, want {want}");
    // Each score is the pair's /predict logit; without raw_scores, its sigmoid.
    let (status, probs) = server.post("/rerank", &json!({ "query": query, "texts": texts }));
    assert_eq!(status, 200, "{probs}");
    for e in &raw {
        let i = e["index"].as_u64().unwrap() as usize;
        let (status, p) = server.post(
            "/predict",
            &json!({ "inputs": [query, texts[i]], "raw_scores": true }),
        );
        assert_eq!(status, 200, "{p}");
        let logit = p[0]["score"].as_f64().unwrap();
        assert!((logit - e["score"].as_f64().unwrap()).abs() <= 1e-6);
        let prob = probs
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["index"] == i)
            .unwrap();
        assert!((prob["score"].as_f64().unwrap() - 1.0 / (1.0 + (-logit).exp())).abs() <= 1e-6);
        assert!(prob.get("text").is_none());
    }
    // /tokenize: the ids the model sees, one list per input.
    let (status, toks) = server.post("/tokenize", &json!({ "inputs": "hello world" }));
    assert_eq!(status, 200, "{toks}");
    let ids: Vec<u64> = toks[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [101, 7592, 2088, 102]);
    assert_eq!(toks[0][1]["text"], "hello");
    server.terminate();
    let _ = std::fs::remove_dir_all(dir);
}

/// `kiln compile --explain`, `kiln cache ls` and `kiln cache clear`, and the plan-cache metrics
/// of a server that compiled its plan and of one that found it in the cache.
#[test]
fn compile_ahead_of_time_then_serve_from_the_plan_cache() {
    let cache = std::env::temp_dir().join(format!("kiln-e2e-compile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let bin = kiln_bin(env!("CARGO_BIN_EXE_kiln"));
    let model = fixtures().join("tiny/bert-tiny-cls");
    let kiln = |args: &[&str]| {
        let out = std::process::Command::new(&bin)
            .args(args)
            .env("KILN_CACHE_DIR", &cache)
            .env("KILN_LOG", "warn")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "kiln {args:?} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let m = model.to_str().unwrap();
    let explain = kiln(&["compile", "--model", m, "--explain"]);
    for want in [
        "compiled in",
        "plan cache: miss",
        "[qkv]",
        "merged 3 linears into one [64→192] GEMM: encoder.layer.0.attention.self.{query,key,value}",
        "[bias-act]",
        "fused 3 linear + activation pairs into linear_act",
        "[add-norm]",
        "[prepack]",
        "kernels:",
        "linear [64→192] (e.g. encoder.layer.0.attention.self.{query,key,value}): ",
        "memory plan:",
    ] {
        assert!(explain.contains(want), "`{want}` missing from:\n{explain}");
    }
    let again = kiln(&["compile", "--model", m]);
    assert!(again.contains("already in the plan cache"), "{again}");
    let unfused = kiln(&["compile", "--model", m, "--no-fuse", "--explain"]);
    assert!(unfused.contains("[qkv] off"), "{unfused}");
    let ls = kiln(&["cache", "ls"]);
    assert!(ls.contains("(2 entries)"), "{ls}");
    assert!(
        ls.contains("bert-tiny-cls") && ls.contains("passes off: sdpa, qkv, bias-act, add-norm"),
        "{ls}"
    );

    // A server finds the plan `kiln compile` stored: a hit, no compile time.
    let cache_arg = cache.to_str().unwrap();
    let warm = start(&model, &["--cache-dir", cache_arg]);
    assert_eq!(warm.metric("kiln_plan_cache_hits_total"), 1.0);
    assert_eq!(warm.metric("kiln_plan_cache_misses_total"), 0.0);
    assert_eq!(warm.metric("kiln_plan_compile_duration_seconds"), 0.0);
    assert!(warm.metric("kiln_plan_cache_load_duration_seconds") > 0.0);
    let (_, info) = warm.get("/info");
    assert_eq!(info["plan"]["cache"], "hit");
    warm.terminate();

    let cleared = kiln(&["cache", "clear"]);
    assert!(cleared.contains("removed 2 compiled plans"), "{cleared}");
    assert!(kiln(&["cache", "ls"]).contains("(0 entries)"));
    let cold = start(&model, &["--cache-dir", cache_arg]);
    assert_eq!(cold.metric("kiln_plan_cache_hits_total"), 0.0);
    assert_eq!(cold.metric("kiln_plan_cache_misses_total"), 1.0);
    assert!(cold.metric("kiln_plan_compile_duration_seconds") > 0.0);
    cold.terminate();
    let _ = std::fs::remove_dir_all(&cache);
}
