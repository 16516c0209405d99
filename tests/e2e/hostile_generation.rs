//! End to end, hostile requests to a causal LM (the tiny GPT-2 fixture) while honest ones run:
//! each hostile request gets a 4xx with a JSON body naming the limit, and every honest
//! generation running at the same moment returns 200 with the reference's tokens. Then the
//! deadlines (`--request-timeout` on generations, `--shutdown-timeout` on draining), a panic in
//! a handler (500 for that request only), and a generation worker that dies (readiness and gRPC
//! health turn NOT_SERVING, the restart counter moves, serving resumes once it is back).
//!
//! Panics and worker deaths are made with `KILN_FAULT_INJECTION` (see `supervise::fault`).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kiln_tests::server::{
    Server, gpt2_tiny, gpt2_tiny_cases, kiln_bin, metric_value, start_gpt2_tiny,
};
use kiln_tests::{read_json, workspace};
use serde_json::{Value, json};

fn model() -> PathBuf {
    gpt2_tiny()
}

fn start(extra: &[&str]) -> Server {
    start_gpt2_tiny(&kiln_bin(env!("CARGO_BIN_EXE_kiln")), extra)
}

/// The model's context (`n_positions`).
fn context() -> u64 {
    read_json(&model().join("config.json"))["n_positions"]
        .as_u64()
        .unwrap()
}

/// Honest clients: each runs the reference cases through `/v1/completions` and `/generate`
/// until told to stop, and returns how many answers it checked.
fn honest_clients(
    server: &Server,
    n: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<usize>> {
    let cases = gpt2_tiny_cases();
    (0..n)
        .map(|i| {
            let (base, cases, stop) = (server.url(""), cases.clone(), stop.clone());
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new().build();
                let mut checked = 0;
                let mut k = i;
                while !stop.load(Ordering::Relaxed) || checked < 2 {
                    let (prompt, want) = &cases[k % cases.len()];
                    k += 1;
                    let (path, body) = if k % 2 == 0 {
                        (
                            "/v1/completions",
                            json!({ "prompt": prompt, "max_tokens": 16, "temperature": 0 }),
                        )
                    } else {
                        (
                            "/generate",
                            json!({ "inputs": prompt, "parameters": { "max_new_tokens": 16 } }),
                        )
                    };
                    let resp = agent
                        .post(&format!("{base}{path}"))
                        .set("content-type", "application/json")
                        .send_string(&body.to_string())
                        .unwrap_or_else(|e| panic!("honest request {path} failed: {e}"));
                    assert_eq!(resp.status(), 200);
                    let v: Value = resp.into_json().unwrap();
                    let text = if path == "/generate" {
                        v["generated_text"].as_str().unwrap().to_string()
                    } else {
                        v["choices"][0]["text"].as_str().unwrap().to_string()
                    };
                    assert_eq!(&text, want, "honest {path} for {prompt:?}");
                    checked += 1;
                }
                checked
            })
        })
        .collect()
}

/// Waits until every KV cache block is back in the pool.
fn kv_blocks_return(server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = server.metrics();
        let used = metric_value(&m, "kiln_kv_cache_blocks_used");
        let running = metric_value(&m, "kiln_generation_running_requests");
        let waiting = metric_value(&m, "kiln_generation_waiting_requests");
        if used == 0.0 && running == 0.0 && waiting == 0.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "KV blocks still held: used {used}, running {running}, waiting {waiting}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn error_text(body: &Value) -> String {
    match &body["error"] {
        Value::String(s) => s.clone(),
        Value::Object(o) => o["message"].as_str().unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

#[test]
fn hostile_generation_requests_get_4xx_while_honest_ones_all_succeed() {
    let server = start(&["--kv-block-size", "4"]);
    let stop = Arc::new(AtomicBool::new(false));
    let honest = honest_clients(&server, 4, &stop);
    let ctx = context();
    let huge = u64::MAX;
    let long_stop = "s".repeat(2000);
    let many_stops: Vec<String> = (0..17).map(|i| format!("stop{i}")).collect();
    let long_prompt = "kiln ".repeat(600);
    // (path, body, status, words the message must contain)
    let hostile: Vec<(&str, Value, u16, &str)> = vec![
        (
            "/v1/completions",
            json!({ "prompt": "hi", "max_tokens": huge }),
            422,
            "context",
        ),
        (
            "/v1/completions",
            json!({ "prompt": "hi", "max_tokens": 1u64 << 63 }),
            422,
            "context",
        ),
        (
            "/v1/completions",
            json!({ "prompt": "hi", "max_tokens": usize::MAX as u64 - 1 }),
            422,
            "context",
        ),
        (
            "/v1/completions",
            json!({ "prompt": "hi", "max_tokens": ctx }),
            422,
            "context",
        ),
        (
            "/v1/completions",
            json!({ "prompt": "hi", "max_tokens": -1 }),
            422,
            "",
        ),
        (
            "/v1/completions",
            json!({ "prompt": "hi", "max_tokens": 18446744073709551616.0f64 }),
            422,
            "",
        ),
        (
            "/v1/chat/completions",
            json!({ "messages": [{ "role": "user", "content": "hi" }], "max_completion_tokens": huge }),
            422,
            "context",
        ),
        (
            "/v1/chat/completions",
            json!({ "messages": [{ "role": "user", "content": "hi" }], "max_tokens": huge, "stream": true }),
            422,
            "context",
        ),
        (
            "/generate",
            json!({ "inputs": "hi", "parameters": { "max_new_tokens": huge } }),
            422,
            "context",
        ),
        (
            "/generate_stream",
            json!({ "inputs": "hi", "parameters": { "max_new_tokens": huge } }),
            422,
            "context",
        ),
        (
            "/v1/completions",
            json!({ "prompt": long_prompt, "max_tokens": 4 }),
            422,
            "context",
        ),
        (
            "/v1/completions",
            json!({ "prompt": "hi", "max_tokens": 4, "stop": long_stop }),
            422,
            "bytes",
        ),
        (
            "/v1/completions",
            json!({ "prompt": "hi", "max_tokens": 4, "stop": many_stops }),
            422,
            "stop strings",
        ),
        (
            "/generate",
            json!({ "inputs": "hi", "parameters": { "max_new_tokens": 4, "stop": [long_stop] } }),
            422,
            "bytes",
        ),
        (
            "/v1/completions",
            json!({ "prompt": "hi", "max_tokens": 4, "temperature": -1 }),
            422,
            "temperature",
        ),
        // KServe v2 refuses every invalid request with a 400.
        (
            "/v2/models/gpt2-tiny/infer",
            json!({
                "inputs": [{ "name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hi"] }],
                "parameters": { "max_tokens": huge }
            }),
            400,
            "context",
        ),
    ];
    for round in 0..3 {
        for (path, body, status, words) in &hostile {
            let reply = server.request(
                "POST",
                path,
                &[("content-type", "application/json")],
                Some(body.to_string().as_bytes()),
            );
            let v = reply.json();
            assert_eq!(
                reply.status, *status,
                "round {round}: {path} {body} answered {v}"
            );
            assert!(
                error_text(&v).contains(words),
                "{path} {body}: the message {v} should say {words:?}"
            );
        }
    }
    // Stop strings at the limits are accepted and matched without stalling anyone.
    let stops: Vec<String> = (0..16)
        .map(|i| format!("{i}{}", "a".repeat(1020)))
        .collect();
    let (status, body) = server.post(
        "/v1/completions",
        &json!({ "prompt": "The model reads tokens", "max_tokens": 60, "ignore_eos": true, "stop": stops }),
    );
    assert_eq!(status, 200, "{body}");
    stop.store(true, Ordering::Relaxed);
    let checked: usize = honest
        .into_iter()
        .map(|h| h.join().expect("honest client"))
        .sum();
    assert!(checked >= 8, "honest answers checked: {checked}");
    assert_eq!(
        server.metric(
            "kiln_worker_restarts_total{model=\"gpt2-tiny\",worker=\"generation-scheduler\"}"
        ),
        0.0
    );
    kv_blocks_return(&server);
}

#[test]
fn generations_past_the_request_timeout_get_504_and_free_their_blocks() {
    // Every generation of 120 tokens takes longer than 2 ms.
    let server = start(&[
        "--kv-block-size",
        "4",
        "--max-queue-delay",
        "0",
        "--request-timeout",
        "2ms",
    ]);
    let body = json!({ "prompt": "The model reads tokens", "max_tokens": 120, "ignore_eos": true });
    let (status, v) = server.post("/v1/completions", &body);
    assert_eq!(status, 504, "{v}");
    assert_eq!(v["error"]["code"], "timeout");
    assert!(error_text(&v).contains("request timeout"), "{v}");
    let (status, v) = server.post(
        "/generate",
        &json!({ "inputs": "The model reads tokens", "parameters": { "max_new_tokens": 120 } }),
    );
    assert_eq!(status, 504, "{v}");
    assert_eq!(v["error_type"], "timeout");
    // A stream that has started ends with an error event instead.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let resp = ureq::post(&server.url("/v1/completions"))
        .set("content-type", "application/json")
        .send_string(&sbody.to_string());
    match resp {
        Ok(resp) => {
            let events: Vec<String> = BufReader::new(resp.into_reader())
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
                .collect();
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
            let err: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
            assert_eq!(err["error"]["code"], "timeout", "{events:?}");
        }
        Err(ureq::Error::Status(code, _)) => assert_eq!(code, 504),
        Err(e) => panic!("{e}"),
    }
    kv_blocks_return(&server);
    assert!(server.metric("kiln_request_failure_total{reason=\"timeout\"}") >= 2.0);
}

/// A fault-injection folder for one server.
fn faults(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-faults-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn start_with_faults(dir: &std::path::Path, extra: &[&str]) -> Server {
    let template = workspace().join("tests/data/chatml.jinja");
    let mut args = vec!["--chat-template", template.to_str().unwrap()];
    args.extend_from_slice(extra);
    Server::start_with_env(
        &kiln_bin(env!("CARGO_BIN_EXE_kiln")),
        &model(),
        &args,
        &[("KILN_FAULT_INJECTION", dir)],
    )
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn grpc_serving(server: &Server) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus;
    let channel = tonic::transport::Channel::from_shared(server.grpc_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    r.into_inner().status == ServingStatus::Serving as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_generation_worker_turns_health_not_serving_and_is_restarted() {
    let dir = faults("worker");
    let server = tokio::task::block_in_place(|| start_with_faults(&dir, &["--kv-block-size", "4"]));
    let (prompt, want) = gpt2_tiny_cases().remove(0);
    let req = json!({ "prompt": prompt, "max_tokens": 16, "temperature": 0 });
    // gRPC health follows readiness within one tick of its watcher.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !grpc_serving(&server).await {
        assert!(
            Instant::now() < deadline,
            "gRPC health not SERVING once the model is ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::task::block_in_place(|| {
        std::fs::write(dir.join("generation-scheduler"), "").unwrap();
        // The next command wakes the scheduler, which dies; the request fails with a 5xx.
        let (status, v) = server.post("/v1/completions", &req);
        assert!(status >= 500, "{status} {v}");
        assert!(v["error"].is_object(), "{v}");
        // While it keeps dying (the file is there at every restart), readiness is false.
        wait_for("/health 503", Duration::from_secs(10), || {
            server.get("/health").0 == 503
        });
        assert_eq!(server.get("/v2/health/ready").0, 503);
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while grpc_serving(&server).await {
        assert!(Instant::now() < deadline, "gRPC health still SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::task::block_in_place(|| {
        assert!(
            server.metric(
                "kiln_worker_restarts_total{model=\"gpt2-tiny\",worker=\"generation-scheduler\"}"
            ) >= 1.0
        );
        assert_eq!(
            server.metric("kiln_worker_up{model=\"gpt2-tiny\",worker=\"generation-scheduler\"}"),
            0.0
        );
        std::fs::remove_file(dir.join("generation-scheduler")).unwrap();
        wait_for("/health 200", Duration::from_secs(15), || {
            server.get("/health").0 == 200
        });
        let (status, v) = server.post("/v1/completions", &req);
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["text"], want.as_str());
        assert!(
            server
                .log_lines()
                .iter()
                .any(|l| l.contains("worker thread panicked"))
        );
    });
    assert!(
        grpc_serving(&server).await || {
            tokio::time::sleep(Duration::from_millis(600)).await;
            grpc_serving(&server).await
        }
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_panic_in_a_handler_fails_that_request_only() {
    let dir = faults("handler");
    let server = start_with_faults(&dir, &["--kv-block-size", "4"]);
    let (prompt, want) = gpt2_tiny_cases().remove(0);
    let req = json!({ "prompt": prompt, "max_tokens": 16, "temperature": 0 });
    std::fs::write(dir.join("request-handler"), "").unwrap();
    let (status, v) = server.post("/v1/completions", &req);
    assert_eq!(status, 500, "{v}");
    assert_eq!(v["error_type"], "internal", "{v}");
    // Probes do not go through the handler that panics; the process is alive and ready.
    assert_eq!(server.get("/health").0, 200);
    std::fs::remove_file(dir.join("request-handler")).unwrap();
    let (status, v) = server.post("/v1/completions", &req);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], want.as_str());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn draining_ends_at_the_shutdown_timeout() {
    let dir = faults("drain");
    let mut server = start_with_faults(&dir, &["--kv-block-size", "4", "--shutdown-timeout", "1s"]);
    // A client that sends half a body and stalls, and a generation that cannot progress.
    let mut stalled = std::net::TcpStream::connect(&server.addr).unwrap();
    stalled
        .write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"pro")
        .unwrap();
    std::fs::write(dir.join("generation-stall"), "").unwrap();
    let url = server.url("/v1/completions");
    let in_flight = std::thread::spawn(move || {
        let r = ureq::post(&url)
            .set("content-type", "application/json")
            .send_string(
                &json!({ "prompt": "The model reads tokens", "max_tokens": 8 }).to_string(),
            );
        match r {
            Ok(resp) => (resp.status(), resp.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    server.sigterm();
    let status = server.wait_exit(Duration::from_secs(15));
    let took = asked.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took >= Duration::from_millis(900),
        "exited after {took:?}, before the timeout"
    );
    assert!(took < Duration::from_secs(8), "exited after {took:?}");
    let (code, body) = in_flight.join().unwrap();
    assert_eq!(code, 503, "the stalled generation is answered 503: {body}");
    assert!(body.contains("shutting down"), "{body}");
    drop(stalled);
    let _ = std::fs::remove_dir_all(&dir);
}
