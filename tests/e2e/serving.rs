//! End to end, the serving front end of the real `kiln serve` binary: concurrent clients are
//! batched and get what they get alone; overload is a 429 at once while accepted requests all
//! succeed; a client that disconnects frees its slot and its queued work is not run; SIGTERM
//! drains in-flight requests; request timeouts; API keys; the KServe binary extension.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use kiln_tests::server::{Server, kiln_bin};
use kiln_tests::{cosine, fixtures, flatten, minilm_dir, read_jsonl, read_npy};
use serde_json::{Value, json};

fn start(model: &Path, extra: &[&str]) -> Server {
    Server::start(&kiln_bin(env!("CARGO_BIN_EXE_kiln")), model, extra)
}

fn fixture_texts() -> Vec<String> {
    read_jsonl(&fixtures().join("minilm/inputs.jsonl"))
        .iter()
        .map(|v| v["text"].as_str().unwrap().to_string())
        .collect()
}

/// A request that keeps the backend busy for a while: `n` inputs truncated at 256 tokens.
fn slow_body_of(n: usize) -> Value {
    let long = "the quick brown fox jumps over the lazy dog ".repeat(40);
    json!({ "inputs": vec![long; n] })
}

fn slow_body() -> Value {
    slow_body_of(16)
}

fn embed_one(server: &Server, text: &str) -> Vec<f32> {
    let (status, body) = server.post("/embed", &json!({ "inputs": text }));
    assert_eq!(status, 200, "{body}");
    flatten(&body[0])
}

#[test]
fn concurrent_clients_are_batched_and_get_what_they_get_alone() {
    // A generous queue delay makes the concurrent requests meet in the queue even on a loaded
    // machine; the batching itself does not depend on it.
    let server = Arc::new(start(&minilm_dir(), &["--max-queue-delay", "150ms"]));
    let texts: Vec<String> = fixture_texts().into_iter().take(16).collect();
    let alone: Vec<Vec<f32>> = texts.iter().map(|t| embed_one(&server, t)).collect();
    let (_, want) = read_npy(&fixtures().join("minilm/embeddings_normalized.npy"));
    for (i, v) in alone.iter().enumerate() {
        assert!(
            cosine(v, &want[i * 384..(i + 1) * 384]) >= 0.99999,
            "text {i}"
        );
    }
    let calls_before = server.metric("kiln_batch_total");
    let multi_before =
        server.metric("kiln_batch_size_count") - server.metric("kiln_batch_size_bucket{le=\"1\"}");

    // Two clients per text, 16 different lengths: packed engine calls mix them (and a padded
    // server, which groups equal lengths, would still find every text a partner).
    let clients: Vec<(usize, String)> = texts
        .iter()
        .cloned()
        .enumerate()
        .cycle()
        .take(2 * texts.len())
        .collect();
    let barrier = Arc::new(Barrier::new(clients.len()));
    let handles: Vec<_> = clients
        .iter()
        .map(|(_, t)| t.clone())
        .map(|t| {
            let (server, barrier) = (server.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                embed_one(&server, &t)
            })
        })
        .collect();
    let together: Vec<Vec<f32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();

    // Bit for bit: a sequence's result does not depend on what it was batched with.
    for ((i, _), b) in clients.iter().zip(&together) {
        assert_eq!(
            &alone[*i], b,
            "text {i}: batched result differs from the result alone"
        );
    }
    let calls = server.metric("kiln_batch_total") - calls_before;
    let multi = server.metric("kiln_batch_size_count")
        - server.metric("kiln_batch_size_bucket{le=\"1\"}")
        - multi_before;
    assert!(
        calls < clients.len() as f64,
        "{} concurrent requests ran in {calls} engine calls: not batched",
        clients.len()
    );
    assert!(multi >= 1.0, "no engine call ran more than one sequence");
    Arc::into_inner(server).unwrap().terminate();
}

/// Two requests in progress at most, each engine call one request, no waiting to fill a batch:
/// the settings under which overload and cancellation are observable.
const TWO_SLOTS_ONE_REQUEST_PER_CALL: &[&str] = &[
    "--max-concurrent-requests",
    "2",
    "--max-batch-requests",
    "1",
    "--max-queue-delay",
    "0",
];

#[test]
fn overload_is_refused_at_once_while_accepted_requests_all_succeed() {
    let server = Arc::new(start(&minilm_dir(), TWO_SLOTS_ONE_REQUEST_PER_CALL));
    let n = 10;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (server, barrier) = (server.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let started = Instant::now();
                let body = slow_body().to_string();
                let r = server.request(
                    "POST",
                    "/embed",
                    &[("content-type", "application/json")],
                    Some(body.as_bytes()),
                );
                (r.status, r.retry_after.clone(), r.json(), started.elapsed())
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok: Vec<&Value> = results
        .iter()
        .filter(|r| r.0 == 200)
        .map(|r| &r.2)
        .collect();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert!(!ok.is_empty(), "no request was accepted");
    assert!(
        !refused.is_empty(),
        "no request was refused at 2 concurrent"
    );
    assert_eq!(ok.len() + refused.len(), n, "only 200 and 429 expected");
    for r in &refused {
        assert!(r.1.is_some(), "429 without Retry-After");
        assert!(r.2["error"].as_str().unwrap().contains("concurrent"));
    }
    // Every accepted request got the right answer (all asked the same thing).
    for body in &ok {
        assert_eq!(*body, ok[0]);
    }
    let refusal_time = refused.iter().map(|r| r.3).max().unwrap();
    let slowest_ok = results
        .iter()
        .filter(|r| r.0 == 200)
        .map(|r| r.3)
        .max()
        .unwrap();
    assert!(
        refusal_time < slowest_ok,
        "refusals must not wait for the model ({refusal_time:?} vs {slowest_ok:?})"
    );
    assert_eq!(
        server.metric("kiln_request_failure_total{reason=\"overloaded\"}"),
        refused.len() as f64
    );
    Arc::into_inner(server).unwrap().terminate();
}

/// Sends a request on a raw socket and returns the socket without reading the answer.
fn send_and_keep(server: &Server, path: &str, body: &str) -> TcpStream {
    let mut s = TcpStream::connect(&server.addr).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        server.addr,
        body.len()
    )
    .unwrap();
    s.flush().unwrap();
    s
}

#[test]
fn a_client_that_disconnects_frees_its_slot_and_its_queued_work_is_dropped() {
    let server = Arc::new(start(&minilm_dir(), TWO_SLOTS_ONE_REQUEST_PER_CALL));
    let calls_before = server.metric("kiln_batch_total");
    // A keeps the backend busy for seconds (two engine calls of 32 x 256 tokens), long after
    // B has gone.
    let running = {
        let server = server.clone();
        std::thread::spawn(move || {
            let (status, _) = server.post("/embed", &slow_body_of(64));
            status
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // B queues behind A, then its client goes away.
    let b = send_and_keep(&server, "/embed", &slow_body().to_string());
    std::thread::sleep(Duration::from_millis(300));
    drop(b);
    // B's slot is free again: C is admitted (not 429) although A still runs.
    let deadline = Instant::now() + Duration::from_secs(5);
    let c = loop {
        let (status, body) = server.post("/embed", &json!({ "inputs": "after the cancel" }));
        if status != 429 || Instant::now() > deadline {
            break (status, body);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        c.0, 200,
        "the disconnected client's slot was not freed: {}",
        c.1
    );
    assert_eq!(running.join().unwrap(), 200);
    assert_eq!(
        server.metric("kiln_request_failure_total{reason=\"cancelled\"}"),
        1.0
    );
    // A (two engine calls) and C ran; B's queued work was dropped, not run for nobody.
    assert_eq!(server.metric("kiln_batch_total") - calls_before, 3.0);
    Arc::into_inner(server).unwrap().terminate();
}

#[test]
fn sigterm_drains_in_flight_requests_and_exits_0() {
    let mut server = start(&minilm_dir(), &["--max-queue-delay", "0"]);
    let addr = server.addr.clone();
    let streams: Vec<TcpStream> = (0..3)
        .map(|_| send_and_keep(&server, "/embed", &slow_body().to_string()))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    server.sigterm();
    for mut s in streams {
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "in-flight request after SIGTERM: {}",
            answer.lines().next().unwrap_or("")
        );
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        let vectors: Value = serde_json::from_str(body).unwrap();
        assert_eq!(vectors.as_array().unwrap().len(), 16);
    }
    let code = server.wait_exit(Duration::from_secs(30));
    assert!(code.success(), "exit status {code} after SIGTERM");
    assert!(
        TcpStream::connect(&addr).is_err(),
        "still accepting after exit"
    );
}

#[test]
fn a_request_over_its_timeout_gets_504_and_the_server_goes_on() {
    let server = start(&minilm_dir(), &["--request-timeout", "100ms"]);
    let (status, body) = server.post("/embed", &slow_body_of(64));
    assert_eq!(status, 504, "{body}");
    assert!(body["error"].as_str().unwrap().contains("timeout"));
    assert_eq!(
        server.metric("kiln_request_failure_total{reason=\"timeout\"}"),
        1.0
    );
    // The withdrawn request stops at its next engine call; then short requests fit again.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = server.post("/embed", &json!({ "inputs": "still here" }));
        if status == 200 {
            break;
        }
        assert_eq!(status, 504, "{body}");
        assert!(Instant::now() < deadline, "the server never recovered");
        std::thread::sleep(Duration::from_millis(200));
    }
    server.terminate();
}

#[test]
fn api_keys_guard_every_route_but_health_and_metrics_and_the_file_is_reloaded() {
    let dir = std::env::temp_dir().join(format!("kiln-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys");
    std::fs::write(&file, "# rotated daily\nfile-key-1\n").unwrap();
    let model = fixtures().join("tiny/bert-tiny-cls");
    let server = start(
        &model,
        &[
            "--api-key",
            "flag-key",
            "--api-keys-file",
            file.to_str().unwrap(),
        ],
    );
    let predict = |key: Option<&str>| {
        let auth = key.map(|k| format!("Bearer {k}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        server.request("POST", "/predict", &headers, Some(br#"{"inputs": "hi"}"#))
    };
    for path in ["/health", "/metrics", "/v2/health/live", "/v2/health/ready"] {
        assert_eq!(server.request("GET", path, &[], None).status, 200, "{path}");
    }
    let r = predict(None);
    assert_eq!(r.status, 401);
    assert!(r.json()["error"].as_str().unwrap().contains("API key"));
    assert_eq!(predict(Some("wrong")).status, 401);
    assert_eq!(predict(Some("flag-key")).status, 200);
    assert_eq!(predict(Some("file-key-1")).status, 200);
    for path in [
        "/info",
        "/v1/models",
        "/v2/models/bert-tiny-cls",
        "/openapi.json",
    ] {
        assert_eq!(server.request("GET", path, &[], None).status, 401, "{path}");
    }
    // Rotation: the file changes, the old key stops working and the new one works.
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(&file, "file-key-2\n").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(predict(Some("file-key-2")).status, 200);
    assert_eq!(predict(Some("file-key-1")).status, 401);
    server.terminate();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn kserve_binary_tensor_data_round_trip_matches_fixtures() {
    let server = start(&minilm_dir(), &[]);
    let texts: Vec<String> = fixture_texts().into_iter().take(3).collect();
    let (_, want) = read_npy(&fixtures().join("minilm/embeddings_normalized.npy"));
    let mut binary = Vec::new();
    for t in &texts {
        binary.extend_from_slice(&(t.len() as u32).to_le_bytes());
        binary.extend_from_slice(t.as_bytes());
    }
    let header = json!({
        "id": "req-1",
        "inputs": [{ "name": "text", "shape": [3], "datatype": "BYTES",
                     "parameters": { "binary_data_size": binary.len() } }],
        "outputs": [{ "name": "sentence_embedding", "parameters": { "binary_data": true } }],
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(&binary);
    let len = header.len().to_string();
    let r = server.request(
        "POST",
        "/v2/models/all-MiniLM-L6-v2/infer",
        &[("inference-header-content-length", &len)],
        Some(&body),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let json_len: usize = r.header_length.as_deref().unwrap().parse().unwrap();
    let head: Value = serde_json::from_slice(&r.body[..json_len]).unwrap();
    assert_eq!(head["id"], "req-1");
    assert_eq!(head["outputs"][0]["shape"], json!([3, 384]));
    assert_eq!(
        head["outputs"][0]["parameters"]["binary_data_size"],
        3 * 384 * 4
    );
    let got: Vec<f32> = r.body[json_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(got.len(), 3 * 384);
    for i in 0..3 {
        let c = cosine(&got[i * 384..(i + 1) * 384], &want[i * 384..(i + 1) * 384]);
        assert!(c >= 0.99999, "text {i}: cosine {c}");
    }
    // The same request in JSON gives the same numbers.
    let (status, j) = server.post(
        "/v2/models/all-MiniLM-L6-v2/infer",
        &json!({ "inputs": [{ "name": "text", "shape": [3, 1], "datatype": "BYTES", "data": texts }] }),
    );
    assert_eq!(status, 200, "{j}");
    assert_eq!(flatten(&j["outputs"][0]["data"]), got);
    server.terminate();
}

/// A one-label XLM-RoBERTa cross-encoder (the layout of bge-reranker-base) from the model-zoo
/// fixtures answers `/rerank` and `/predict` with transformers' logits.
#[test]
fn a_one_label_xlm_roberta_cross_encoder_reranks() {
    let dir = kiln_tests::model_zoo().join("xlm-roberta-reranker");
    let r = kiln_tests::read_json(&dir.join("reference.json"));
    let pairs = r["pairs"].as_array().unwrap();
    let logits: Vec<f64> = r["outputs"]["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l[0].as_f64().unwrap())
        .collect();
    let server = start(&dir, &[]);
    // The first two pairs share their query.
    let query = pairs[0][0].as_str().unwrap();
    let texts = [pairs[0][1].as_str().unwrap(), pairs[1][1].as_str().unwrap()];
    let (status, got) = server.post(
        "/rerank",
        &json!({ "query": query, "texts": texts, "raw_scores": true }),
    );
    assert_eq!(status, 200, "{got}");
    let ranked = got.as_array().unwrap();
    assert_eq!(ranked.len(), 2);
    for entry in ranked {
        let i = entry["index"].as_u64().unwrap() as usize;
        let score = entry["score"].as_f64().unwrap();
        assert!(
            (score - logits[i]).abs() <= 1e-4,
            "pair {i}: {score} vs {}",
            logits[i]
        );
    }
    // Sorted best first; without raw_scores, the sigmoid of the logit.
    assert!(ranked[0]["score"].as_f64() >= ranked[1]["score"].as_f64());
    let (status, got) = server.post("/rerank", &json!({ "query": query, "texts": texts }));
    assert_eq!(status, 200, "{got}");
    for entry in got.as_array().unwrap() {
        let i = entry["index"].as_u64().unwrap() as usize;
        let want = 1.0 / (1.0 + (-logits[i]).exp());
        let score = entry["score"].as_f64().unwrap();
        assert!((score - want).abs() <= 1e-4, "pair {i}: {score} vs {want}");
    }
    let (status, got) = server.post(
        "/predict",
        &json!({ "inputs": [[pairs[2][0], pairs[2][1]]], "raw_scores": true }),
    );
    assert_eq!(status, 200, "{got}");
    let score = got[0][0]["score"].as_f64().unwrap();
    assert!((score - logits[2]).abs() <= 1e-4, "{got}");
    server.terminate();
}

/// sentence-transformers prompts: `prompt_name` picks one of the folder's prompts, `prompt`
/// gives the text, `--default-prompt-name` applies to requests that give neither; either way
/// the answer is the embedding of the prompt followed by the text.
#[test]
fn prompts_are_prepended_by_name_by_text_and_by_default() {
    let from = kiln_tests::model_zoo().join("bert-st6-dense");
    let dir = std::env::temp_dir().join(format!("kiln-prompts-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_tree(&from, &dir);
    let st = dir.join("config_sentence_transformers.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&st).unwrap()).unwrap();
    config["prompts"] = json!({ "query": "query: ", "document": "" });
    std::fs::write(&st, config.to_string()).unwrap();

    let server = start(&dir, &[]);
    let embed = |body: Value| {
        let (status, got) = server.post("/embed", &body);
        assert_eq!(status, 200, "{got}");
        flatten(&got[0])
    };
    let plain = embed(json!({ "inputs": "kiln" }));
    let prefixed = embed(json!({ "inputs": "query: kiln" }));
    assert_ne!(plain, prefixed);
    assert_eq!(
        embed(json!({ "inputs": "kiln", "prompt_name": "query" })),
        prefixed
    );
    assert_eq!(
        embed(json!({ "inputs": "kiln", "prompt": "query: " })),
        prefixed
    );
    assert_eq!(
        embed(json!({ "inputs": "kiln", "prompt_name": "document" })),
        plain
    );
    let (status, got) = server.post(
        "/v1/embeddings",
        &json!({ "input": "kiln", "prompt_name": "query" }),
    );
    assert_eq!(status, 200, "{got}");
    assert_eq!(flatten(&got["data"][0]["embedding"]), prefixed);
    let (status, got) = server.post(
        "/embed",
        &json!({ "inputs": "kiln", "prompt_name": "nope" }),
    );
    assert_eq!(status, 422, "{got}");
    assert!(
        got["error"].as_str().unwrap().contains("document, query"),
        "{got}"
    );
    let (status, got) = server.post(
        "/embed",
        &json!({ "inputs": "kiln", "prompt_name": "query", "prompt": "x" }),
    );
    assert_eq!(status, 422, "{got}");
    server.terminate();

    let server = start(&dir, &["--default-prompt-name", "query"]);
    let (status, got) = server.post("/embed", &json!({ "inputs": "kiln" }));
    assert_eq!(status, 200, "{got}");
    assert_eq!(flatten(&got[0]), prefixed);
    server.terminate();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Copies a folder and its subfolders.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
