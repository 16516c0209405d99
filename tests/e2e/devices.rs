//! End to end, device selection in the real `kiln serve` binary: `--device auto` without a GPU
//! falls back to the CPU and says why (in the log, `/info` and the metrics), and
//! `--device wgpu:N` serves correct embeddings from each wgpu adapter (Mesa's lavapipe in CI).

use std::path::Path;

use kiln_tests::server::{Server, kiln_bin};
use kiln_tests::{cosine, fixtures, max_abs_diff, minilm_dir, read_jsonl, read_npy};
use serde_json::json;

fn start(model: &Path, extra: &[&str]) -> Server {
    Server::start(&kiln_bin(env!("CARGO_BIN_EXE_kiln")), model, extra)
}

#[test]
fn auto_without_a_gpu_falls_back_to_the_cpu_with_a_log_line() {
    if kiln_engine::gpu::adapters().iter().any(|a| a.is_gpu()) {
        eprintln!("this machine has a GPU, which auto may pick: the fallback is not observable");
        return;
    }
    let server = start(&minilm_dir(), &["--device", "auto"]);
    let log = server.log_lines();
    let line = log
        .iter()
        .find(|l| l.contains("auto: CPU, because"))
        .unwrap_or_else(|| panic!("no fallback log line in:\n{}", log.join("\n")));
    assert!(line.contains("device=cpu"), "{line}");
    let why = if !kiln_engine::gpu::compiled() {
        "not compiled with wgpu".to_string()
    } else if kiln_engine::gpu::adapters().is_empty() {
        "no wgpu adapter was found".to_string()
    } else {
        // lavapipe and other software rasterizers are listed but passed over.
        "not a GPU".to_string()
    };
    assert!(
        line.contains(&why),
        "the log line does not say `{why}`: {line}"
    );

    let (status, info) = server.get("/info");
    assert_eq!(status, 200);
    let placement = &info["device_placement"];
    assert_eq!(placement["device"], "cpu", "{info}");
    assert!(
        placement["reason"]
            .as_str()
            .unwrap()
            .starts_with("auto: CPU"),
        "{info}"
    );
    assert!(placement["adapter"].is_null(), "{info}");
    let metrics = server.metrics();
    assert!(
        metrics.lines().any(|l| l.starts_with("kiln_device_info{")
            && l.contains("choice=\"auto\"")
            && l.contains("device=\"cpu\"")
            && l.ends_with(" 1")),
        "no kiln_device_info series for auto → cpu"
    );
    server.terminate();
}

#[test]
fn serve_on_each_wgpu_adapter_answers_embeddings_like_sentence_transformers() {
    let texts: Vec<String> = read_jsonl(&fixtures().join("minilm/inputs.jsonl"))
        .iter()
        .map(|v| v["text"].as_str().unwrap().to_string())
        .take(8)
        .collect();
    let (_, want) = read_npy(&fixtures().join("minilm/embeddings_normalized.npy"));
    let gpus = kiln_tests::wgpu_devices();
    if gpus.is_empty() {
        eprintln!("no wgpu adapter in this build or on this machine: nothing to serve on");
    }
    for gpu in gpus {
        let name = gpu.to_string();
        let server = start(&minilm_dir(), &["--device", &name]);
        let (status, body) = server.post(
            "/v1/embeddings",
            &json!({ "model": "all-MiniLM-L6-v2", "input": texts }),
        );
        assert_eq!(status, 200, "{name}: {body}");
        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), texts.len());
        for (i, item) in data.iter().enumerate() {
            let got: Vec<f32> = item["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            let reference = &want[i * 384..(i + 1) * 384];
            let cos = cosine(&got, reference);
            let err = max_abs_diff(&got, reference);
            assert!(
                cos >= 0.9999 && err <= 1e-4,
                "{name}: text {i}: cosine {cos}, max abs {err}"
            );
        }
        let (_, info) = server.get("/info");
        let placement = &info["device_placement"];
        assert_eq!(placement["device"], name.as_str(), "{info}");
        assert_eq!(
            placement["reason"].as_str().unwrap().split(':').next(),
            Some("configured")
        );
        let adapter = &placement["adapter"];
        for field in [
            "name",
            "api",
            "device_type",
            "driver",
            "shader_f16",
            "limits",
        ] {
            assert!(
                !adapter[field].is_null(),
                "{name}: /info adapter lacks {field}: {info}"
            );
        }
        let metrics = server.metrics();
        assert!(
            metrics.lines().any(|l| l.starts_with("kiln_device_info{")
                && l.contains(&format!("device=\"{name}\""))
                && l.contains(&format!(
                    "adapter=\"{}\"",
                    adapter["name"].as_str().unwrap()
                ))),
            "{name}: no kiln_device_info series for the adapter"
        );
        server.terminate();
    }
}
