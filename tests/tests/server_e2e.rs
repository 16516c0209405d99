//! End to end: the real `kiln serve` binary on a free port, called over HTTP, checked against the
//! sentence-transformers and PyTorch fixtures; bad requests get 4xx JSON errors and the server
//! keeps serving; SIGTERM ends it cleanly.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use kiln_tests::{
    cosine, fixtures, flatten, max_abs_diff, minilm_dir, read_json, read_jsonl, read_npy, workspace,
};
use serde_json::{Value, json};

/// The `kiln` binary: `$KILN_BIN`, or the one in this test's target folder, (re)built first so
/// that `cargo test -p kiln-tests` never runs a stale server.
fn kiln_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_BIN") {
        return PathBuf::from(p);
    }
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().unwrap();
            let profile_dir = exe.parent().and_then(Path::parent).unwrap();
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args(["build", "-p", "kiln-server", "--bin", "kiln"])
                .current_dir(workspace());
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let status = cmd.status().unwrap();
            assert!(status.success(), "building kiln failed");
            profile_dir.join(format!("kiln{}", std::env::consts::EXE_SUFFIX))
        })
        .clone()
}

struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(kiln_bin())
            .args(["serve", "--host", "127.0.0.1", "--port", "0", "--model"])
            .arg(model)
            .args(extra)
            .env("NO_COLOR", "1")
            .env("KILN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kiln");
        // The bound address comes from the log line `listening ... address=127.0.0.1:PORT`.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[kiln] {line}");
                if let Some(rest) = line.split("address=").nth(1) {
                    let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("kiln did not report its address");
        let server = Server {
            child,
            base: format!("http://{addr}"),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match ureq::get(&server.url("/health")).call() {
                Ok(r) if r.status() == 200 => break,
                Err(ureq::Error::Status(503, r)) => {
                    let body: Value = r.into_json().unwrap();
                    assert!(body["error"].is_string(), "503 body is a JSON error");
                }
                other => assert!(
                    Instant::now() < deadline,
                    "kiln never became healthy: {other:?}"
                ),
            }
            assert!(Instant::now() < deadline, "kiln never became healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs raw bytes; returns (status, JSON body).
    fn post_raw(&self, path: &str, content_type: Option<&str>, body: &[u8]) -> (u16, Value) {
        let mut req = ureq::post(&self.url(path));
        if let Some(ct) = content_type {
            req = req.set("content-type", ct);
        }
        let resp = match req.send_bytes(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{path}: transport error {e}"),
        };
        let status = resp.status();
        let text = resp.into_string().unwrap();
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{path}: body is not JSON: {text:?}"));
        (status, json)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, Some("application/json"), body.to_string().as_bytes())
    }

    /// SIGTERM, then the process must exit 0 on its own.
    fn terminate(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(code) = self.child.try_wait().unwrap() {
                assert!(code.success(), "kiln exited with {code} after SIGTERM");
                return;
            }
            assert!(Instant::now() < deadline, "kiln did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
    let server = Server::start(&minilm_dir(), &[]);
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
            br#"{"input": "a", "dimensions": 3}"#.to_vec(),
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
    ];
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
    server.terminate();
}

#[test]
fn predict_over_http_matches_classifier_fixture() {
    let dir = fixtures().join("tiny/bert-tiny-cls");
    let r = read_json(&dir.join("reference.json"));
    let server = Server::start(&dir, &[]);
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
