//! End to end, `kiln serve` with a causal LM (the tiny GPT-2 fixture): greedy text equal to the
//! PyTorch reference through every generation API; streamed output equal to non-streamed
//! output (native and OpenAI SSE, `[DONE]`, usage); the KServe v2 infer endpoint with BYTES in
//! and out; clear 4xx answers for encoder routes and bad requests; and a load test with many
//! concurrent streams, half of them disconnecting mid-stream, after which every KV cache block
//! is back in the pool.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use kiln_tests::server::{Server, gpt2_tiny_cases, kiln_bin, start_gpt2_tiny};
use serde_json::{Value, json};

fn start(extra: &[&str]) -> Server {
    start_gpt2_tiny(&kiln_bin(env!("CARGO_BIN_EXE_kiln")), extra)
}

/// POSTs `body` and reads the SSE `data:` payloads until the stream ends.
fn stream(server: &Server, path: &str, body: &Value) -> Vec<String> {
    let resp = ureq::post(&server.url(path))
        .set("content-type", "application/json")
        .send_string(&body.to_string())
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(resp.status(), 200);
    assert!(resp.content_type().starts_with("text/event-stream"));
    BufReader::new(resp.into_reader())
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

/// The reference's token ids of `prompt`.
fn token_ids_of(prompt: &str) -> Vec<u64> {
    let r = kiln_tests::read_json(&kiln_tests::server::gpt2_tiny().join("reference.json"));
    let case = r["greedy_generation"]["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["prompt"] == prompt)
        .unwrap_or_else(|| panic!("no reference case for {prompt:?}"));
    case["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

#[test]
fn generation_apis_match_the_reference_and_streams_match_whole_answers() {
    let server = start(&["--kv-block-size", "4"]);
    for (prompt, want) in gpt2_tiny_cases() {
        // Native: whole and streamed.
        let (status, body) = server.post(
            "/generate",
            &json!({ "inputs": prompt, "parameters": { "max_new_tokens": 16, "details": true } }),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["generated_text"], want.as_str());
        assert_eq!(body["details"]["generated_tokens"], 16);
        let events = stream(
            &server,
            "/generate_stream",
            &json!({ "inputs": prompt, "parameters": { "max_new_tokens": 16 } }),
        );
        assert_eq!(events.len(), 16);
        let parsed: Vec<Value> = events
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let text: String = parsed
            .iter()
            .map(|e| e["token"]["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, want);
        assert_eq!(parsed[15]["generated_text"], want.as_str());
        assert_eq!(parsed[15]["details"]["finish_reason"], "length");

        // OpenAI completions: whole and streamed, with usage.
        let req = json!({ "model": "x", "prompt": prompt, "max_tokens": 16, "temperature": 0 });
        let (status, whole) = server.post("/v1/completions", &req);
        assert_eq!(status, 200, "{whole}");
        assert_eq!(whole["object"], "text_completion");
        assert_eq!(whole["choices"][0]["text"], want.as_str());
        assert_eq!(whole["choices"][0]["finish_reason"], "length");
        assert_eq!(whole["usage"]["completion_tokens"], 16);
        // The same prompt as token ids (the reference's), as a list and as a list of one list.
        let ids = token_ids_of(&prompt);
        for given in [json!(ids), json!([ids])] {
            let req = json!({ "prompt": given, "max_tokens": 16, "temperature": 0 });
            let (status, got) = server.post("/v1/completions", &req);
            assert_eq!(status, 200, "{got}");
            assert_eq!(got["choices"][0]["text"], want.as_str());
            assert_eq!(got["usage"]["prompt_tokens"], ids.len());
        }
        let mut sreq = req.clone();
        sreq["stream"] = json!(true);
        sreq["stream_options"] = json!({ "include_usage": true });
        let events = stream(&server, "/v1/completions", &sreq);
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
        let finish: Vec<&Value> = chunks
            .iter()
            .map(|c| &c["choices"][0]["finish_reason"])
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finish, [&json!("length")]);
        assert_eq!(chunks.last().unwrap()["usage"], whole["usage"]);

        // OpenAI chat: whole and streamed agree.
        let req = json!({
            "messages": [{ "role": "system", "content": "Be brief." }, { "role": "user", "content": prompt }],
            "max_tokens": 12, "temperature": 0
        });
        let (status, whole) = server.post("/v1/chat/completions", &req);
        assert_eq!(status, 200, "{whole}");
        assert_eq!(whole["object"], "chat.completion");
        assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
        let mut sreq = req.clone();
        sreq["stream"] = json!(true);
        let events = stream(&server, "/v1/chat/completions", &sreq);
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk")
        );
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(
            text,
            whole["choices"][0]["message"]["content"].as_str().unwrap()
        );

        // KServe v2: BYTES in, BYTES out.
        let (status, body) = server.post(
            "/v2/models/gpt2-tiny/infer",
            &json!({
                "inputs": [{ "name": "text_input", "datatype": "BYTES", "shape": [1], "data": [prompt] }],
                "parameters": { "max_tokens": 16, "temperature": 0 }
            }),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["outputs"][0]["name"], "text_output");
        assert_eq!(body["outputs"][0]["datatype"], "BYTES");
        assert_eq!(body["outputs"][0]["data"][0], want.as_str());
    }
    // Metadata, info and metrics of a causal LM.
    let (status, meta) = server.get("/v2/models/gpt2-tiny");
    assert_eq!(status, 200);
    assert_eq!(meta["inputs"][0]["name"], "text_input");
    let (_, info) = server.get("/info");
    assert_eq!(info["model_type"], "causal_lm");
    assert!(server.metric("kiln_generated_tokens_total") >= 16.0 * 8.0);
    assert!(server.metric("kiln_time_to_first_token_seconds_count") >= 8.0);
    assert!(server.metric("kiln_inter_token_latency_seconds_count") >= 15.0 * 8.0);

    // Encoder routes answer a clear 4xx; bad generation requests too; the server goes on.
    let (status, body) = server.post("/v1/embeddings", &json!({ "input": "hi" }));
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("causal language model")
    );
    for (path, req) in [
        (
            "/v1/completions",
            json!({ "prompt": "hi", "max_tokens": 100000 }),
        ),
        ("/v1/completions", json!({ "max_tokens": 4 })),
        ("/v1/completions", json!({ "prompt": "hi", "n": 2 })),
        (
            "/v1/completions",
            json!({ "prompt": "hi", "temperature": -1 }),
        ),
        ("/v1/completions", json!({ "prompt": "hi", "top_p": 0 })),
        ("/v1/completions", json!({ "prompt": "hi", "stop": 3 })),
        ("/v1/chat/completions", json!({ "messages": [] })),
        (
            "/v1/chat/completions",
            json!({ "messages": [{ "content": "x" }] }),
        ),
        ("/generate", json!({ "inputs": "" })),
        (
            "/generate",
            json!({ "inputs": "hi", "parameters": { "max_new_tokens": 0 } }),
        ),
        (
            "/generate",
            json!({ "inputs": "hi", "parameters": { "bogus": 1 } }),
        ),
    ] {
        let (status, body) = server.post(path, &req);
        assert!(
            (400..500).contains(&status),
            "{path} {req}: {status} {body}"
        );
        assert!(
            body["error"].is_object() || body["error"].is_string(),
            "{body}"
        );
    }
    let (status, _) = server.post(
        "/v1/completions",
        &json!({ "prompt": "hi", "max_tokens": 2 }),
    );
    assert_eq!(status, 200);
}

#[test]
fn many_concurrent_streams_with_disconnects_return_every_kv_block() {
    // A small cache so that requests also wait for memory.
    let server = start(&[
        "--kv-block-size",
        "4",
        "--max-batch-total-tokens",
        "640",
        "--max-waiting-tokens",
        "1",
    ]);
    let url = server.url("/v1/completions");
    let (_, whole) = server.post(
        "/v1/completions",
        &json!({ "prompt": "The model reads tokens", "max_tokens": 40, "temperature": 0, "ignore_eos": true }),
    );
    let want = whole["choices"][0]["text"].as_str().unwrap().to_string();
    let clients = 32;
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let body = json!({
                    "prompt": "The model reads tokens", "max_tokens": 40, "temperature": 0,
                    "ignore_eos": true, "stream": true
                });
                let agent = ureq::AgentBuilder::new().build();
                let resp = agent
                    .post(&url)
                    .set("content-type", "application/json")
                    .send_string(&body.to_string())
                    .expect("stream starts");
                let mut lines = BufReader::new(resp.into_reader()).lines();
                if i % 2 == 1 {
                    // Read a few events, then hang up mid-stream.
                    for _ in 0..(2 + i % 5) {
                        let _ = lines.next();
                    }
                    return None;
                }
                let mut text = String::new();
                for line in lines.map_while(Result::ok) {
                    let Some(data) = line.strip_prefix("data: ") else {
                        continue;
                    };
                    if data == "[DONE]" {
                        return Some(text);
                    }
                    let v: Value = serde_json::from_str(data).unwrap();
                    text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
                }
                panic!("stream ended without [DONE]");
            })
        })
        .collect();
    let mut finished = 0;
    for h in handles {
        if let Some(text) = h.join().unwrap() {
            assert_eq!(text, want, "a concurrent stream equals the request alone");
            finished += 1;
        }
    }
    assert_eq!(finished, clients / 2);
    // Every block returns to the pool: disconnected ones at their next token boundary.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = server.metrics();
        let used = kiln_tests::server::metric_value(&m, "kiln_kv_cache_blocks_used");
        let running = kiln_tests::server::metric_value(&m, "kiln_generation_running_requests");
        let waiting = kiln_tests::server::metric_value(&m, "kiln_generation_waiting_requests");
        if used == 0.0 && running == 0.0 && waiting == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "KV blocks still held: used {used}, running {running}, waiting {waiting}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.metric("kiln_kv_cache_blocks_capacity"), 160.0);
    // And the server still answers.
    let (status, again) = server.post(
        "/v1/completions",
        &json!({ "prompt": "The model reads tokens", "max_tokens": 40, "temperature": 0, "ignore_eos": true }),
    );
    assert_eq!(status, 200);
    assert_eq!(again["choices"][0]["text"], want.as_str());
}
