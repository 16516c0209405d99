//! End to end: one `kiln serve --model-repository DIR` serving a model of every kind side by side
//! (all-MiniLM-L6-v2 embeddings, the bert-tiny-cls classifier, the gpt2-tiny causal LM), each
//! answering like its fixtures while the others are busy; requests choose their model by name
//! (body `model`, `X-Model` header, KServe path) or by the routing rules; a model that cannot load
//! is unavailable with its reason while the others serve.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_tests::server::{Server, gpt2_tiny, gpt2_tiny_cases, kiln_bin};
use kiln_tests::{cosine, fixtures, flatten, minilm_dir, read_json, read_jsonl, read_npy};
use serde_json::{Value, json};

fn kiln() -> PathBuf {
    kiln_bin(env!("CARGO_BIN_EXE_kiln"))
}

/// A repository folder of links to the fixture models (and a folder that is no model).
fn repository(name: &str, models: &[(&str, &Path)]) -> PathBuf {
    let repo = std::env::temp_dir().join(format!("kiln-repo-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&repo);
    std::fs::create_dir_all(repo.join("notes")).unwrap();
    for (id, dir) in models {
        std::os::unix::fs::symlink(dir, repo.join(id)).unwrap();
    }
    repo
}

/// `kiln models ls` against `server`: its table's rows, split on whitespace.
fn models_ls(server: &Server) -> Vec<Vec<String>> {
    let port = server.addr.rsplit(':').next().unwrap();
    let out = std::process::Command::new(kiln())
        .args(["models", "ls", "--port", port])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

/// A repository of one model of each kind: all-MiniLM-L6-v2, bert-tiny-cls and gpt2-tiny.
fn every_kind(name: &str) -> PathBuf {
    repository(
        name,
        &[
            ("all-MiniLM-L6-v2", &minilm_dir()),
            ("bert-tiny-cls", &bert_tiny_cls()),
            ("gpt2-tiny", &gpt2_tiny()),
        ],
    )
}

/// `POST /v2/repository/index`: each model's entry.
fn index(server: &Server) -> Vec<Value> {
    let (status, got) = server.post_raw("/v2/repository/index", None, b"");
    assert_eq!(status, 200, "{got}");
    got.as_array().unwrap().clone()
}

/// Each model of the repository index as `name STATE`.
fn name_states(server: &Server) -> Vec<String> {
    index(server)
        .iter()
        .map(|m| {
            format!(
                "{} {}",
                m["name"].as_str().unwrap(),
                m["state"].as_str().unwrap()
            )
        })
        .collect()
}

fn bert_tiny_cls() -> PathBuf {
    fixtures().join("tiny/bert-tiny-cls")
}

fn post_with_model(server: &Server, path: &str, model: &str, body: &Value) -> (u16, Value) {
    let r = server.request(
        "POST",
        path,
        &[("content-type", "application/json"), ("x-model", model)],
        Some(body.to_string().as_bytes()),
    );
    (r.status, r.json())
}

/// What each model must answer, from its fixtures.
struct Expected {
    texts: Vec<String>,
    embeddings: Vec<f32>,
    cls_batch: Vec<Value>,
    cls_logits: Vec<f32>,
    generations: Vec<(String, String)>,
}

impl Expected {
    fn load() -> Self {
        let r = read_json(&bert_tiny_cls().join("reference.json"));
        Self {
            texts: read_jsonl(&fixtures().join("minilm/inputs.jsonl"))
                .iter()
                .map(|v| v["text"].as_str().unwrap().to_string())
                .collect(),
            embeddings: read_npy(&fixtures().join("minilm/embeddings_normalized.npy")).1,
            cls_batch: r["texts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| json!([t]))
                .collect(),
            cls_logits: flatten(&r["outputs"]["logits"]["data"]),
            generations: gpt2_tiny_cases(),
        }
    }

    fn check_embeddings(&self, body: &Value) {
        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), self.texts.len());
        for (i, d) in data.iter().enumerate() {
            let got = flatten(&d["embedding"]);
            let cos = cosine(&got, &self.embeddings[i * 384..(i + 1) * 384]);
            assert!(cos >= 0.99999, "text {i}: cosine {cos}");
        }
    }

    /// `/predict` with raw scores: each label's logit.
    /// A greedy completion of the first reference prompt by gpt2-tiny.
    fn completion(&self) -> Value {
        let (prompt, _) = &self.generations[0];
        json!({ "model": "gpt2-tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0 })
    }

    /// `server`'s gpt2-tiny completes the first reference prompt as the reference does.
    fn check_completion(&self, server: &Server) {
        let (status, got) = server.post("/v1/completions", &self.completion());
        assert_eq!(status, 200, "{got}");
        assert_eq!(got["choices"][0]["text"], self.generations[0].1.as_str());
    }

    fn check_logits(&self, body: &Value) {
        let labels = ["negative", "neutral", "positive"];
        for (i, ranked) in body.as_array().unwrap().iter().enumerate() {
            for entry in ranked.as_array().unwrap() {
                let l = labels.iter().position(|l| *l == entry["label"]).unwrap();
                let got = entry["score"].as_f64().unwrap() as f32;
                let want = self.cls_logits[i * 3 + l];
                assert!(
                    (got - want).abs() <= 1e-4,
                    "text {i} logit {l}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn a_repository_serves_every_kind_of_model_side_by_side() {
    let repo = every_kind("three");
    let server = Server::start_args(&kiln(), &["--model-repository", repo.to_str().unwrap()]);
    let want = Expected::load();

    // Every model listed, with its kind, in name order ("notes" is no model folder).
    let (status, models) = server.get("/v1/models");
    assert_eq!(status, 200, "{models}");
    let listed: Vec<(&str, &str, &str)> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap(),
                m["kind"].as_str().unwrap(),
                m["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("all-MiniLM-L6-v2", "embedding", "READY"),
            ("bert-tiny-cls", "classifier", "READY"),
            ("gpt2-tiny", "causal_lm", "READY")
        ]
    );

    // All three at once, several rounds each: every answer matches its fixtures.
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..4 {
                let body = json!({ "input": want.texts, "model": "all-MiniLM-L6-v2" });
                let (status, got) = server.post("/v1/embeddings", &body);
                assert_eq!(status, 200, "{got}");
                assert_eq!(got["model"], "all-MiniLM-L6-v2");
                want.check_embeddings(&got);
            }
        });
        s.spawn(|| {
            for _ in 0..4 {
                let body = json!({ "inputs": want.cls_batch, "raw_scores": true });
                let (status, got) = post_with_model(&server, "/predict", "bert-tiny-cls", &body);
                assert_eq!(status, 200, "{got}");
                want.check_logits(&got);
            }
        });
        s.spawn(|| {
            for (prompt, text) in want.generations.iter().take(4) {
                let body = json!({ "model": "gpt2-tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0 });
                let (status, got) = server.post("/v1/completions", &body);
                assert_eq!(status, 200, "{got}");
                assert_eq!(got["model"], "gpt2-tiny");
                assert_eq!(got["choices"][0]["text"], text.as_str());
            }
        });
    });

    // No name: the only model that can answer the route.
    let (status, got) = server.post("/embed", &json!({ "inputs": "kiln" }));
    assert_eq!(status, 200, "{got}");
    assert_eq!(got[0].as_array().unwrap().len(), 384);
    let (status, got) = server.post(
        "/predict",
        &json!({ "inputs": want.cls_batch, "raw_scores": true }),
    );
    assert_eq!(status, 200, "{got}");
    want.check_logits(&got);
    let (prompt, text) = &want.generations[0];
    let (status, got) = server.post(
        "/generate",
        &json!({ "inputs": prompt, "parameters": { "max_new_tokens": 16 } }),
    );
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["generated_text"], text.as_str());
    // Two encoders could tokenize: the request must say which.
    let (status, got) = server.post("/tokenize", &json!({ "inputs": "kiln" }));
    assert_eq!(status, 422, "{got}");
    let message = got["error"].as_str().unwrap();
    assert!(
        message.contains("`all-MiniLM-L6-v2`") && message.contains("`bert-tiny-cls`"),
        "{message}"
    );
    let (status, got) = post_with_model(
        &server,
        "/tokenize",
        "bert-tiny-cls",
        &json!({ "inputs": "kiln" }),
    );
    assert_eq!(status, 200, "{got}");

    // An unknown name is 404 with the served models; a model of the wrong kind is 422.
    let (status, got) = server.post("/v1/embeddings", &json!({ "input": "a", "model": "nope" }));
    assert_eq!(status, 404, "{got}");
    let message = got["error"]["message"]
        .as_str()
        .unwrap_or_else(|| got["error"].as_str().unwrap());
    assert!(message.contains("`gpt2-tiny` (causal_lm)"), "{message}");
    let (status, got) = server.post(
        "/v1/completions",
        &json!({ "model": "bert-tiny-cls", "prompt": "a", "max_tokens": 2 }),
    );
    assert_eq!(status, 422, "{got}");
    let (status, got) =
        post_with_model(&server, "/predict", "gpt2-tiny", &json!({ "inputs": "a" }));
    assert_eq!(status, 422, "{got}");
    assert!(
        got["error"]
            .as_str()
            .unwrap()
            .contains("causal language model")
    );

    // KServe: each model by its path, and the repository index.
    let entries = index(&server);
    let states: Vec<(&str, &str)> = entries
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [
            ("all-MiniLM-L6-v2", "READY"),
            ("bert-tiny-cls", "READY"),
            ("gpt2-tiny", "READY")
        ]
    );
    for m in ["all-MiniLM-L6-v2", "bert-tiny-cls", "gpt2-tiny"] {
        let (status, got) = server.get(&format!("/v2/models/{m}/ready"));
        assert_eq!(status, 200, "{m}: {got}");
    }
    let (status, got) = server.post(
        "/v2/models/bert-tiny-cls/infer",
        &json!({ "inputs": [{ "name": "text", "datatype": "BYTES", "shape": [1], "data": ["Hello world!"] }],
                 "outputs": [{ "name": "logits" }] }),
    );
    assert_eq!(status, 200, "{got}");
    let logits = flatten(&got["outputs"][0]["data"]);
    for (l, got) in logits.iter().enumerate() {
        assert!((got - want.cls_logits[l]).abs() <= 1e-4);
    }
    let (status, _) = server.get("/v2/models/nope/ready");
    assert_eq!(status, 404);
    let (status, got) = server.post_raw("/v2/repository/models/gpt2-tiny/unload", None, b"");
    assert_eq!(status, 400, "{got}");
    assert!(
        got["error"]
            .as_str()
            .unwrap()
            .contains("model control mode")
    );

    // /info names each model; the worker metrics carry the model.
    let (status, info) = server.get("/info");
    assert_eq!(status, 200, "{info}");
    let ids: Vec<&str> = info["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["model_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["all-MiniLM-L6-v2", "bert-tiny-cls", "gpt2-tiny"]);
    let metrics = server.metrics();
    for (worker, model) in [
        ("encoder-backend", "all-MiniLM-L6-v2"),
        ("encoder-backend", "bert-tiny-cls"),
        ("generation-scheduler", "gpt2-tiny"),
    ] {
        let up = metrics.lines().any(|l| {
            l.starts_with("kiln_worker_up{")
                && l.contains(&format!("model=\"{model}\""))
                && l.contains(&format!("worker=\"{worker}\""))
                && l.ends_with(" 1")
        });
        assert!(up, "no kiln_worker_up for {worker} of {model}:\n{metrics}");
    }
    for m in ["all-MiniLM-L6-v2", "bert-tiny-cls", "gpt2-tiny"] {
        let series = format!("kiln_model_state{{model=\"{m}\",state=\"READY\"}}");
        assert_eq!(
            kiln_tests::server::metric_value(&metrics, &series),
            1.0,
            "{series}"
        );
        let series = format!("kiln_model_loads_total{{model=\"{m}\",outcome=\"ok\"}}");
        assert_eq!(
            kiln_tests::server::metric_value(&metrics, &series),
            1.0,
            "{series}"
        );
    }
    per_model_metrics_and_statistics(&server, &metrics, &repo, want.generations.len().min(4));
    one_request_id_per_request(&server);

    let rows = models_ls(&server);
    let rows: Vec<&[String]> = rows.iter().map(|r| &r[..3]).collect();
    assert_eq!(
        rows,
        [
            ["all-MiniLM-L6-v2", "embedding", "READY"],
            ["bert-tiny-cls", "classifier", "READY"],
            ["gpt2-tiny", "causal_lm", "READY"]
        ]
    );
    server.terminate();
    std::fs::remove_dir_all(&repo).unwrap();
}

/// What the side-by-side test's requests left in the metrics and Triton's statistics: each
/// series labelled with the model that served it.
fn per_model_metrics_and_statistics(
    server: &Server,
    metrics: &str,
    repo: &Path,
    completions: usize,
) {
    let value = |series: &str| kiln_tests::server::metric_value(metrics, series);
    // The OpenAI calls to the embedder and the LM; a request for an unknown model is counted
    // without one.
    for (m, calls) in [("all-MiniLM-L6-v2", 4), ("gpt2-tiny", completions)] {
        for name in ["kiln_request_success_total", "kiln_request_total"] {
            let series = format!("{name}{{api=\"openai\",model=\"{m}\"}}");
            assert_eq!(value(&series), calls as f64, "{series}\n{metrics}");
        }
    }
    assert!(value("kiln_request_failure_total{model=\"\"}") >= 1.0);
    assert_eq!(
        value("kiln_request_failure_total{model=\"nope\"}"),
        0.0,
        "only served names become label values"
    );
    for m in ["all-MiniLM-L6-v2", "bert-tiny-cls"] {
        assert!(
            value(&format!("kiln_batch_total{{model=\"{m}\"}}")) >= 1.0,
            "{m}"
        );
        assert!(
            value(&format!(
                "kiln_queue_duration_seconds_count{{model=\"{m}\"}}"
            )) >= 1.0
        );
    }
    assert_eq!(value("kiln_batch_total{model=\"gpt2-tiny\"}"), 0.0);
    assert!(value("kiln_generated_tokens_total{model=\"gpt2-tiny\"}") >= completions as f64);
    assert!(value("kiln_kv_cache_blocks_capacity{model=\"gpt2-tiny\"}") > 0.0);
    assert_eq!(
        value("kiln_kv_cache_blocks_capacity{model=\"bert-tiny-cls\"}"),
        0.0
    );
    // Each model's memory: about its f32 weights file (the plans keep f32 weights here); the
    // LM's KV cache comes on top.
    for m in ["all-MiniLM-L6-v2", "bert-tiny-cls", "gpt2-tiny"] {
        let weights = std::fs::metadata(repo.join(m).join("model.safetensors"))
            .unwrap()
            .len() as f64;
        let bytes = value(&format!("kiln_model_memory_bytes{{model=\"{m}\"}}"));
        let kv_cache = m == "gpt2-tiny";
        assert!(
            bytes >= 0.9 * weights && (kv_cache || bytes < 1.5 * weights),
            "{m}: {bytes} bytes for a {weights}-byte weights file"
        );
        if kv_cache {
            assert!(bytes > 2.0 * weights, "{m}: no KV cache in {bytes} bytes");
        }
        let series = format!("kiln_device_info{{model=\"{m}\",device=\"cpu\"}}");
        assert_eq!(value(&series), 1.0, "{series}");
    }

    // Triton's statistics, per model.
    let (status, got) = server.get("/v2/models/bert-tiny-cls/stats");
    assert_eq!(status, 200, "{got}");
    let s = &got["model_stats"][0];
    assert_eq!(s["name"], "bert-tiny-cls");
    let stats = &s["inference_stats"];
    // Four /predict, one more without a name, one KServe infer; a completion naming it failed.
    assert_eq!(stats["success"]["count"], 6, "{got}");
    assert_eq!(stats["fail"]["count"], 1, "{got}");
    assert!(stats["success"]["ns"].as_u64().unwrap() > 0);
    assert!(stats["compute_infer"]["count"].as_u64().unwrap() >= 1);
    assert!(
        stats["compute_output"]["count"].as_u64().unwrap() >= 1,
        "{got}"
    );
    let batches = s["batch_stats"].as_array().unwrap();
    assert!(!batches.is_empty(), "{got}");
    let executions: u64 = batches
        .iter()
        .map(|b| b["compute_infer"]["count"].as_u64().unwrap())
        .sum();
    assert_eq!(executions, s["execution_count"].as_u64().unwrap(), "{got}");
    assert!(s["last_inference"].as_u64().unwrap() > 0);
    let (status, got) = server.get("/v2/models/stats");
    assert_eq!(status, 200, "{got}");
    let names: Vec<&str> = got["model_stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["all-MiniLM-L6-v2", "bert-tiny-cls", "gpt2-tiny"]);
    assert_eq!(
        got["model_stats"][0]["inference_stats"]["success"]["count"], 5,
        "four /v1/embeddings and one /embed: {got}"
    );
}

/// A request's id is the client's `x-request-id` (or a new one), echoed in the header and in
/// the `id` OpenAI-style answers carry.
fn one_request_id_per_request(server: &Server) {
    let body = json!({ "model": "gpt2-tiny", "prompt": "a", "max_tokens": 2 });
    let r = server.request(
        "POST",
        "/v1/completions",
        &[
            ("content-type", "application/json"),
            ("x-request-id", "trace-42"),
        ],
        Some(body.to_string().as_bytes()),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.request_id.as_deref(), Some("trace-42"));
    assert_eq!(r.json()["id"], "cmpl-trace-42");
    let r = server.request(
        "POST",
        "/v1/completions",
        &[("content-type", "application/json")],
        Some(body.to_string().as_bytes()),
    );
    let made = r.request_id.clone().expect("a made request id");
    assert_eq!(r.json()["id"], format!("cmpl-{made}"));
}

#[test]
fn a_model_that_cannot_load_is_unavailable_while_the_others_serve() {
    // A BERT config without weights: its kind is known, its load fails.
    let broken = std::env::temp_dir().join(format!("kiln-broken-model-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&broken);
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(
        bert_tiny_cls().join("config.json"),
        broken.join("config.json"),
    )
    .unwrap();
    let repo = repository(
        "broken",
        &[("bert-tiny-cls", &bert_tiny_cls()), ("broken", &broken)],
    );
    let server =
        Server::start_args_unready(&kiln(), &["--model-repository", repo.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(300);
    let entries = loop {
        let got = index(&server);
        let states: Vec<&str> = got.iter().map(|m| m["state"].as_str().unwrap()).collect();
        if states == ["READY", "UNAVAILABLE"] {
            break got;
        }
        assert!(Instant::now() < deadline, "index stayed {got:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let reason = entries[1]["reason"].as_str().unwrap();
    assert!(!reason.is_empty());
    // Not ready as a whole (a model that should serve does not), with the reason.
    let (status, health) = server.get("/health");
    assert_eq!(status, 503, "{health}");
    assert!(
        health["error"]
            .as_str()
            .unwrap()
            .contains("model `broken` is unavailable")
    );
    // The other model serves; the broken one answers 503 with its reason.
    let r = read_json(&bert_tiny_cls().join("reference.json"));
    let (status, got) = server.post(
        "/predict",
        &json!({ "inputs": r["texts"][0], "model": "bert-tiny-cls" }),
    );
    assert_eq!(status, 200, "{got}");
    let (status, got) = server.post("/predict", &json!({ "inputs": "a", "model": "broken" }));
    assert_eq!(status, 503, "{got}");
    assert!(got["error"].as_str().unwrap().contains(reason), "{got}");
    let rows = models_ls(&server);
    assert_eq!(rows[1][..3], ["broken", "encoder", "UNAVAILABLE"]);
    assert_eq!(
        rows[1][3..].join(" "),
        reason.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    server.terminate();
    std::fs::remove_dir_all(&repo).unwrap();
    std::fs::remove_dir_all(&broken).unwrap();
}

struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How many of a process's memory mappings are of files under `dir` (from `/proc/PID/maps`).
fn mappings_under(pid: u32, dir: &Path) -> usize {
    let dir = dir.canonicalize().unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines()
        .filter(|l| l.contains(dir.to_str().unwrap()))
        .count()
}

/// Resident memory of a process, from `/proc/PID/status`.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

#[test]
fn explicit_control_loads_and_unloads_models_while_the_others_serve() {
    let repo = every_kind("explicit");
    // A plan cache of its own: the first load compiles and stores, every later one maps the
    // stored plan (no other test's server can be writing the entry at that moment), so what an
    // unload frees is the mapping, which RSS shows at once.
    let cache = repo.with_extension("cache");
    let server = Server::start_args(
        &kiln(),
        &[
            "--model-repository",
            repo.to_str().unwrap(),
            "--model-control",
            "explicit",
            "--load-model",
            "all-MiniLM-L6-v2,bert-tiny-cls",
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
    );
    let want = Expected::load();
    // gpt2-tiny is in the repository, not loaded; the server is ready without it.
    let got = index(&server);
    assert_eq!(got[2]["name"], "gpt2-tiny");
    assert_eq!(got[2]["state"], "UNAVAILABLE");
    assert_eq!(got[2]["reason"], "unloaded");
    let (prompt, text) = &want.generations[0];
    let completion =
        json!({ "model": "gpt2-tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0 });
    let (status, got) = server.post("/v1/completions", &completion);
    assert_eq!(status, 400, "{got}");
    assert!(got["error"].to_string().contains("not loaded"), "{got}");

    // bert-tiny-cls is asked all along: none of its requests may fail while the others change.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let served = std::thread::scope(|s| {
        let honest = s.spawn(|| {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = json!({ "inputs": want.cls_batch, "raw_scores": true, "model": "bert-tiny-cls" });
                let (status, got) = server.post("/predict", &body);
                assert_eq!(status, 200, "{got}");
                want.check_logits(&got);
                n += 1;
            }
            n
        });
        // Stops the honest client however this ends (a failed assertion too), so the scope can.
        let _stop = StopOnDrop(&stop);
        // Load gpt2-tiny: it answers like its fixture.
        let (status, got) = server.post_raw("/v2/repository/models/gpt2-tiny/load", None, b"");
        assert_eq!(status, 200, "{got}");
        let (status, got) = server.post("/v1/completions", &completion);
        assert_eq!(status, 200, "{got}");
        assert_eq!(got["choices"][0]["text"], text.as_str());

        // Unload all-MiniLM-L6-v2 and load it back, twice: its routes refuse it while it is out,
        // its memory is returned (measured on the second round, whose model was mapped from the
        // plan cache), and it answers like its fixtures once back.
        let embed = json!({ "input": want.texts, "model": "all-MiniLM-L6-v2" });
        let mut freed = Vec::new();
        let mut mapped = Vec::new();
        for _ in 0..2 {
            let (status, got) = server.post("/v1/embeddings", &embed);
            assert_eq!(status, 200, "{got}");
            want.check_embeddings(&got);
            let before = rss_bytes(server.pid());
            let mapped_before = mappings_under(server.pid(), &cache);
            let (status, got) =
                server.post_raw("/v2/repository/models/all-MiniLM-L6-v2/unload", None, b"");
            assert_eq!(status, 200, "{got}");
            // RSS as /proc reports it can lag a moment behind an unmap.
            std::thread::sleep(Duration::from_millis(200));
            freed.push(before as i64 - rss_bytes(server.pid()) as i64);
            if mapped_before > 0 {
                // A plan mapped from the cache: after the unload no mapping of it is left.
                assert_eq!(
                    mappings_under(server.pid(), &cache),
                    0,
                    "the plan is still mapped"
                );
                mapped.push(mapped_before);
            }
            let (status, got) = server.post("/v1/embeddings", &embed);
            assert_eq!(status, 400, "{got}");
            let (status, _) = server.get("/v2/models/all-MiniLM-L6-v2/ready");
            assert_ne!(status, 200);
            let (status, got) =
                server.post_raw("/v2/repository/models/all-MiniLM-L6-v2/load", None, b"");
            assert_eq!(status, 200, "{got}");
        }
        let (status, got) = server.post("/v1/embeddings", &embed);
        assert_eq!(status, 200, "{got}");
        want.check_embeddings(&got);
        eprintln!("unloading all-MiniLM-L6-v2 lowered RSS by {freed:?} bytes");
        assert!(
            !mapped.is_empty(),
            "the reloaded model was not mapped from the plan cache"
        );
        // The weights (87 MiB of f32) go with the model: at least half of them must.
        assert!(
            freed[1] > 40 << 20,
            "RSS fell by only {} MiB on the second unload",
            freed[1] >> 20
        );
        drop(_stop);
        honest.join().unwrap()
    });
    assert!(served > 0);
    // A causal LM unloads too (its scheduler thread ends with it).
    let (status, got) = server.post_raw("/v2/repository/models/gpt2-tiny/unload", None, b"");
    assert_eq!(status, 200, "{got}");
    let (status, got) = server.post("/v1/completions", &completion);
    assert_eq!(status, 400, "{got}");
    let metrics = server.metrics();
    assert_eq!(
        kiln_tests::server::metric_value(
            &metrics,
            "kiln_model_unloads_total{model=\"all-MiniLM-L6-v2\"}"
        ),
        2.0
    );
    assert_eq!(
        kiln_tests::server::metric_value(
            &metrics,
            "kiln_model_state{model=\"gpt2-tiny\",state=\"UNAVAILABLE\"}"
        ),
        1.0
    );
    // An unloaded model holds nothing and runs nowhere; its counters keep their totals. The
    // embedder, loaded again, has one device series, not one per load.
    let value = |series: &str| kiln_tests::server::metric_value(&metrics, series);
    assert_eq!(value("kiln_model_memory_bytes{model=\"gpt2-tiny\"}"), 0.0);
    assert_eq!(value("kiln_device_info{model=\"gpt2-tiny\"}"), 0.0);
    assert!(value("kiln_model_memory_bytes{model=\"all-MiniLM-L6-v2\"}") > 80e6);
    assert_eq!(value("kiln_device_info{model=\"all-MiniLM-L6-v2\"}"), 1.0);
    assert!(
        kiln_tests::server::metric_value(
            &metrics,
            "kiln_generated_tokens_total{model=\"gpt2-tiny\"}"
        ) > 0.0
    );
    // Unknown models are 404 for load and unload alike.
    let (status, _) = server.post_raw("/v2/repository/models/nope/load", None, b"");
    assert_eq!(status, 404);
    server.terminate();
    std::fs::remove_dir_all(&repo).unwrap();
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn loading_past_max_loaded_models_evicts_the_least_recently_used_idle_model() {
    let repo = every_kind("lru");
    let server = Server::start_args(
        &kiln(),
        &[
            "--model-repository",
            repo.to_str().unwrap(),
            "--model-control",
            "explicit",
            "--load-model",
            "all-MiniLM-L6-v2,bert-tiny-cls",
            "--max-loaded-models",
            "2",
        ],
    );
    let want = Expected::load();
    let states = |server: &Server| -> Vec<(String, String)> {
        index(server)
            .iter()
            .map(|m| {
                let reason = m["reason"].as_str().unwrap_or("");
                (
                    m["name"].as_str().unwrap().to_string(),
                    format!("{}{reason}", m["state"].as_str().unwrap()),
                )
            })
            .collect()
    };
    // bert-tiny-cls is used first, all-MiniLM-L6-v2 last: bert-tiny-cls is the one to go.
    let (status, got) = server.post(
        "/predict",
        &json!({ "inputs": want.cls_batch, "raw_scores": true, "model": "bert-tiny-cls" }),
    );
    assert_eq!(status, 200, "{got}");
    std::thread::sleep(Duration::from_millis(20));
    let embed = json!({ "input": want.texts, "model": "all-MiniLM-L6-v2" });
    let (status, got) = server.post("/v1/embeddings", &embed);
    assert_eq!(status, 200, "{got}");
    let (status, got) = server.post_raw("/v2/repository/models/gpt2-tiny/load", None, b"");
    assert_eq!(status, 200, "{got}");
    let s = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        states(&server),
        [
            s("all-MiniLM-L6-v2", "READY"),
            s("bert-tiny-cls", "UNAVAILABLEunloaded"),
            s("gpt2-tiny", "READY")
        ]
    );
    std::thread::sleep(Duration::from_millis(20));
    want.check_completion(&server);
    // Now all-MiniLM-L6-v2 is the least recently used: loading bert-tiny-cls back evicts it.
    let (status, got) = server.post_raw("/v2/repository/models/bert-tiny-cls/load", None, b"");
    assert_eq!(status, 200, "{got}");
    assert_eq!(
        states(&server),
        [
            s("all-MiniLM-L6-v2", "UNAVAILABLEunloaded"),
            s("bert-tiny-cls", "READY"),
            s("gpt2-tiny", "READY")
        ]
    );
    let (status, got) = server.post(
        "/predict",
        &json!({ "inputs": want.cls_batch, "raw_scores": true, "model": "bert-tiny-cls" }),
    );
    assert_eq!(status, 200, "{got}");
    want.check_logits(&got);
    server.terminate();
    std::fs::remove_dir_all(&repo).unwrap();
}

/// Each model's `kiln_model_memory_bytes`.
fn memory(server: &Server) -> Vec<(String, f64)> {
    let metrics = server.metrics();
    ["all-MiniLM-L6-v2", "bert-tiny-cls", "gpt2-tiny"]
        .iter()
        .map(|m| {
            let series = format!("kiln_model_memory_bytes{{model=\"{m}\"}}");
            (
                m.to_string(),
                kiln_tests::server::metric_value(&metrics, &series),
            )
        })
        .collect()
}

#[test]
fn the_loaded_models_stay_within_the_memory_budget() {
    let repo = every_kind("budget");
    let want = Expected::load();
    // The f32 weights: all-MiniLM-L6-v2 ~87 MiB, bert-tiny-cls ~8 MiB, gpt2-tiny <1 MiB plus a
    // 16 MiB KV cache (--max-batch-total-tokens 16384).

    // At start, models load in order while they fit: 60 MiB has no room for the embedder.
    let server = Server::start_args_unready(
        &kiln(),
        &[
            "--model-repository",
            repo.to_str().unwrap(),
            "--memory-budget",
            "60MiB",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while index(&server)[2]["state"] != "READY" {
        assert!(Instant::now() < deadline, "{:?}", index(&server));
        std::thread::sleep(Duration::from_millis(50));
    }
    let entries = index(&server);
    assert_eq!(entries[0]["state"], "UNAVAILABLE");
    let reason = entries[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("does not fit in --memory-budget 60.0 MiB"),
        "{reason}"
    );
    assert_eq!(entries[1]["state"], "READY");
    let (status, got) = server.post(
        "/predict",
        &json!({ "inputs": want.cls_batch, "raw_scores": true, "model": "bert-tiny-cls" }),
    );
    assert_eq!(status, 200, "{got}");
    want.check_logits(&got);
    let (status, _) = server.get("/health");
    assert_eq!(status, 503, "a model that should serve does not");
    let held: f64 = memory(&server).iter().map(|(_, b)| b).sum();
    assert!(held > 0.0 && held <= 60.0 * 1048576.0, "{held}");
    server.terminate();

    // Explicit control: loading past the budget unloads the least recently used idle models.
    let server = Server::start_args(
        &kiln(),
        &[
            "--model-repository",
            repo.to_str().unwrap(),
            "--model-control",
            "explicit",
            "--load-model",
            "all-MiniLM-L6-v2",
            "--memory-budget",
            "100MiB",
        ],
    );
    // The classifier fits beside the embedder; the LM's KV cache does not.
    let (status, got) = server.post_raw("/v2/repository/models/bert-tiny-cls/load", None, b"");
    assert_eq!(status, 200, "{got}");
    let (status, got) = server.post(
        "/predict",
        &json!({ "inputs": want.cls_batch, "raw_scores": true, "model": "bert-tiny-cls" }),
    );
    assert_eq!(status, 200, "{got}");
    let (status, got) = server.post_raw("/v2/repository/models/gpt2-tiny/load", None, b"");
    assert_eq!(status, 200, "{got}");
    let states = name_states(&server);
    assert_eq!(
        states,
        [
            "all-MiniLM-L6-v2 UNAVAILABLE",
            "bert-tiny-cls READY",
            "gpt2-tiny READY"
        ]
    );
    let held = memory(&server);
    let total: f64 = held.iter().map(|(_, b)| b).sum();
    assert!(total <= 100.0 * 1048576.0, "{held:?}");
    want.check_completion(&server);
    server.terminate();

    // A model larger than the whole budget is refused without unloading anything.
    let server = Server::start_args(
        &kiln(),
        &[
            "--model-repository",
            repo.to_str().unwrap(),
            "--model-control",
            "explicit",
            "--load-model",
            "bert-tiny-cls",
            "--memory-budget",
            "50MiB",
        ],
    );
    let (status, got) = server.post_raw("/v2/repository/models/all-MiniLM-L6-v2/load", None, b"");
    assert_eq!(status, 400, "{got}");
    let message = got["error"].as_str().unwrap();
    assert!(
        message.contains("more than the whole --memory-budget 50.0 MiB"),
        "{message}"
    );
    assert_eq!(index(&server)[1]["state"], "READY");
    server.terminate();
    std::fs::remove_dir_all(&repo).unwrap();
}

/// The `q` quantile of `samples` (sorted in place).
fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
    samples[i]
}

/// A flood on one model does not queue another model's requests behind it: with all of the
/// embedder's slots taken by clients sending large batches, the classifier's p99 stays below
/// the bound stated here (a quarter of the embedder's own median latency, and 250 ms): the
/// two share the CPUs, but not a queue, a worker thread or admission slots.
#[test]
fn a_flood_on_one_model_does_not_raise_another_models_p99() {
    let repo = every_kind("flood");
    let server = Server::start_args(
        &kiln(),
        &[
            "--model-repository",
            repo.to_str().unwrap(),
            "--max-concurrent-requests",
            "8",
        ],
    );
    let predict = json!({ "inputs": "kiln", "model": "bert-tiny-cls" });
    let time = |body: &Value, path: &str| {
        let started = Instant::now();
        let (status, got) = server.post(path, body);
        (status, got, started.elapsed())
    };
    // Alone, as a reference for the log.
    let mut alone: Vec<Duration> = (0..50)
        .map(|_| {
            let (status, got, t) = time(&predict, "/predict");
            assert_eq!(status, 200, "{got}");
            t
        })
        .collect();
    let long = "the quick brown fox jumps over the lazy dog ".repeat(25);
    let flood = json!({ "inputs": vec![long; 8], "model": "all-MiniLM-L6-v2" });
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (mut during, mut flooded, refused) = std::thread::scope(|s| {
        let flooders: Vec<_> = (0..10)
            .map(|_| {
                s.spawn(|| {
                    let (mut times, mut refused) = (Vec::new(), 0);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let (status, got, t) = time(&flood, "/embed");
                        match status {
                            200 => times.push(t),
                            429 => {
                                refused += 1;
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            _ => panic!("flood: {status} {got}"),
                        }
                    }
                    (times, refused)
                })
            })
            .collect();
        // Let the flood fill the embedder's slots and queue.
        std::thread::sleep(Duration::from_millis(500));
        let during: Vec<Duration> = (0..200)
            .map(|_| {
                let (status, got, t) = time(&predict, "/predict");
                assert_eq!(status, 200, "the classifier failed during the flood: {got}");
                t
            })
            .collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut flooded = Vec::new();
        let mut refused = 0;
        for f in flooders {
            let (t, r) = f.join().unwrap();
            flooded.extend(t);
            refused += r;
        }
        (during, flooded, refused)
    });
    assert!(!flooded.is_empty(), "no flood request was answered");
    let p50_alone = quantile(&mut alone, 0.5);
    let p99_during = quantile(&mut during, 0.99);
    let flood_p50 = quantile(&mut flooded, 0.5);
    eprintln!(
        "classifier alone p50 {p50_alone:?}; during the flood p99 {p99_during:?}; flood p50 {flood_p50:?} ({} answered, {refused} refused with 429)",
        flooded.len()
    );
    let bound = (flood_p50 / 4).min(Duration::from_millis(250));
    assert!(
        p99_during <= bound,
        "the classifier's p99 during the flood, {p99_during:?}, is above {bound:?} (the embedder's p50 is {flood_p50:?})"
    );
    server.terminate();
    std::fs::remove_dir_all(&repo).unwrap();
}

/// Waits until the repository index satisfies `done`.
fn wait_for_index(server: &Server, what: &str, done: impl Fn(&[Value]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = index(server);
        if done(&got) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {got:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A model folder copied (not linked), so the test can change it.
fn copy_model(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn poll_mode_follows_the_repository_folder() {
    let repo = repository("poll", &[]);
    copy_model(&bert_tiny_cls(), &repo.join("bert-tiny-cls"));
    let server = Server::start_args(
        &kiln(),
        &[
            "--model-repository",
            repo.to_str().unwrap(),
            "--model-control",
            "poll",
            "--repository-poll-interval",
            "100ms",
        ],
    );
    let want = Expected::load();
    let predict = json!({ "inputs": want.cls_batch, "raw_scores": true, "model": "bert-tiny-cls" });
    // The API does not load or unload in poll mode: the folder does.
    let (status, got) = server.post_raw("/v2/repository/models/bert-tiny-cls/unload", None, b"");
    assert_eq!(status, 400, "{got}");
    assert!(got["error"].as_str().unwrap().contains("`poll`"), "{got}");

    // A folder added is served.
    std::os::unix::fs::symlink(gpt2_tiny(), repo.join("gpt2-tiny")).unwrap();
    wait_for_index(&server, "gpt2-tiny added", |m| {
        m.len() == 2 && m[1]["name"] == "gpt2-tiny" && m[1]["state"] == "READY"
    });
    want.check_completion(&server);

    // A folder changed is loaded again: its new labels show.
    let config_path = repo.join("bert-tiny-cls/config.json");
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        config.replace("\"positive\"", "\"favourable\""),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, got) = server.post("/predict", &predict);
        if status == 200 && got.to_string().contains("favourable") {
            break;
        }
        assert!(Instant::now() < deadline, "{status}: {got}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let metrics = server.metrics();
    assert_eq!(
        kiln_tests::server::metric_value(
            &metrics,
            "kiln_model_loads_total{model=\"bert-tiny-cls\",outcome=\"ok\"}"
        ),
        2.0
    );

    // A folder removed is no longer served.
    std::fs::remove_file(repo.join("gpt2-tiny")).unwrap();
    wait_for_index(&server, "gpt2-tiny removed", |m| m.len() == 1);
    let (status, got) = server.post("/v1/completions", &want.completion());
    assert_eq!(status, 404, "{got}");
    let (status, got) = server.post("/predict", &predict);
    assert_eq!(status, 200, "{got}");
    server.terminate();
    std::fs::remove_dir_all(&repo).unwrap();
}

#[test]
fn explicit_control_loads_a_folder_added_after_start() {
    let repo = repository("late", &[("bert-tiny-cls", &bert_tiny_cls())]);
    let server = Server::start_args(
        &kiln(),
        &[
            "--model-repository",
            repo.to_str().unwrap(),
            "--model-control",
            "explicit",
            "--load-model",
            "bert-tiny-cls",
        ],
    );
    let (status, _) = server.post_raw("/v2/repository/models/gpt2-tiny/load", None, b"");
    assert_eq!(status, 404);
    std::os::unix::fs::symlink(gpt2_tiny(), repo.join("gpt2-tiny")).unwrap();
    let (status, got) = server.post_raw("/v2/repository/models/gpt2-tiny/load", None, b"");
    assert_eq!(status, 200, "{got}");
    let want = Expected::load();
    want.check_completion(&server);
    let names = name_states(&server);
    assert_eq!(names, ["bert-tiny-cls READY", "gpt2-tiny READY"]);
    server.terminate();
    std::fs::remove_dir_all(&repo).unwrap();
}

#[test]
fn a_model_idle_past_the_timeout_is_unloaded() {
    let repo = repository("idle", &[("bert-tiny-cls", &bert_tiny_cls())]);
    let server = Server::start_args(
        &kiln(),
        &[
            "--model-repository",
            repo.to_str().unwrap(),
            "--model-control",
            "explicit",
            "--load-model",
            "bert-tiny-cls",
            "--model-idle-timeout",
            "1s",
        ],
    );
    let predict = json!({ "inputs": "kiln", "model": "bert-tiny-cls" });
    // Requests keep it loaded past the timeout.
    for _ in 0..6 {
        let (status, got) = server.post("/predict", &predict);
        assert_eq!(status, 200, "{got}");
        std::thread::sleep(Duration::from_millis(300));
    }
    // Then, left alone, it goes (within the timeout and a check interval or two).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = index(&server);
        if got[0]["state"] == "UNAVAILABLE" {
            assert_eq!(got[0]["reason"], "unloaded");
            break;
        }
        assert!(Instant::now() < deadline, "still loaded: {got:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let unloads = kiln_tests::server::metric_value(
        &server.metrics(),
        "kiln_model_unloads_total{model=\"bert-tiny-cls\"}",
    );
    assert_eq!(unloads, 1.0);
    // It loads again on request.
    let (status, got) = server.post_raw("/v2/repository/models/bert-tiny-cls/load", None, b"");
    assert_eq!(status, 200, "{got}");
    let (status, got) = server.post("/predict", &predict);
    assert_eq!(status, 200, "{got}");
    server.terminate();
    std::fs::remove_dir_all(&repo).unwrap();
}
