//! Helpers shared by kiln's fixture and end-to-end tests.
//!
//! Design note. Reference outputs live outside the repository (`../shared/fixtures`, computed by
//! PyTorch and sentence-transformers); `$KILN_FIXTURES` points elsewhere so another fixture set
//! in the same format can be swapped in without code changes. The real all-MiniLM-L6-v2 folder
//! comes from `scripts/fetch-model.sh` (or `$KILN_MODEL_DIR`); a missing model or fixture is a
//! test failure with instructions, never a silent skip.

pub mod server;

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `$KILN_FIXTURES`, or `../shared/fixtures` beside the workspace.
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("../shared/fixtures"));
    assert!(
        dir.is_dir(),
        "fixtures not found at {} (set KILN_FIXTURES)",
        dir.display()
    );
    dir
}

/// The model-zoo fixtures (one Hugging Face folder per model with its `reference.json`, made by
/// `scripts/make-zoo-fixtures.py`): `$KILN_MODEL_ZOO`, or `tests/fixtures/models`.
pub fn model_zoo() -> PathBuf {
    let dir = std::env::var_os("KILN_MODEL_ZOO")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("tests/fixtures/models"));
    assert!(
        dir.is_dir(),
        "model-zoo fixtures not found at {} (set KILN_MODEL_ZOO)",
        dir.display()
    );
    dir
}

/// The decoder fixtures (tiny random causal LMs with transformers' logits and greedy
/// generations): `$KILN_DECODER_ZOO`, or `tests/fixtures/decoders`.
pub fn decoder_zoo() -> PathBuf {
    let dir = std::env::var_os("KILN_DECODER_ZOO")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("tests/fixtures/decoders"));
    assert!(
        dir.is_dir(),
        "decoder fixtures not found at {} (set KILN_DECODER_ZOO)",
        dir.display()
    );
    dir
}

/// The all-MiniLM-L6-v2 folder: `$KILN_MODEL_DIR`, or `models/local/all-MiniLM-L6-v2`.
pub fn minilm_dir() -> PathBuf {
    let dir = std::env::var_os("KILN_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("models/local/all-MiniLM-L6-v2"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "all-MiniLM-L6-v2 not found at {}: run scripts/fetch-model.sh (or set KILN_MODEL_DIR)",
        dir.display()
    );
    dir
}

/// A `.npy` file as `(shape, f32 data)`; float64 and int64 files are converted.
pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let shape = npy.shape().iter().map(|&d| d as usize).collect();
    let npyz::DType::Plain(t) = npy.dtype() else {
        panic!("{}: unsupported npy dtype", path.display())
    };
    let data = match (t.type_char(), t.size_field()) {
        (npyz::TypeChar::Float, 4) => npy.into_vec::<f32>().unwrap(),
        (npyz::TypeChar::Float, 8) => npy
            .into_vec::<f64>()
            .unwrap()
            .into_iter()
            .map(|x| x as f32)
            .collect(),
        (npyz::TypeChar::Int, 8) => npy
            .into_vec::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as f32)
            .collect(),
        other => panic!("{}: unsupported npy dtype {other:?}", path.display()),
    };
    (shape, data)
}

/// Reads a JSON-lines file.
pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

/// A nested JSON array of numbers, flattened.
pub fn flatten(v: &serde_json::Value) -> Vec<f32> {
    match v {
        serde_json::Value::Array(a) => a.iter().flat_map(flatten).collect(),
        serde_json::Value::Number(n) => vec![n.as_f64().expect("number") as f32],
        other => panic!("not a number array: {other}"),
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A one-label cross-encoder made from the tiny 3-label classifier fixture (`bert-tiny-cls`):
/// the same encoder, and a classifier head of only label 0's row, so its single logit equals
/// label 0's logit in the fixture's `reference.json`. Written to `out` (created).
pub fn single_label_classifier(out: &Path) -> PathBuf {
    let src = fixtures().join("tiny/bert-tiny-cls");
    std::fs::create_dir_all(out).unwrap();
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
    ] {
        std::fs::copy(src.join(name), out.join(name)).unwrap();
    }
    let mut config = read_json(&src.join("config.json"));
    config["id2label"] = serde_json::json!({ "0": "score" });
    config["label2id"] = serde_json::json!({ "score": 0 });
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();

    // safetensors: u64 header length, JSON header {name: {dtype, shape, data_offsets}}, data.
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut new_header = serde_json::Map::new();
    let mut new_data = Vec::new();
    for (name, info) in &header {
        if name == "__metadata__" {
            new_header.insert(name.clone(), info.clone());
            continue;
        }
        let off = &info["data_offsets"];
        let (a, b) = (
            off[0].as_u64().unwrap() as usize,
            off[1].as_u64().unwrap() as usize,
        );
        let mut tensor = &data[a..b];
        let mut shape = info["shape"].clone();
        if name == "classifier.weight" || name == "classifier.bias" {
            // Row (or element) 0 only: the first 64 floats of the weight, the first bias.
            let width = if name == "classifier.weight" {
                shape[1].as_u64().unwrap() as usize
            } else {
                1
            };
            tensor = &tensor[..width * 4];
            shape[0] = serde_json::json!(1);
        }
        let start = new_data.len();
        new_data.extend_from_slice(tensor);
        new_header.insert(
            name.clone(),
            serde_json::json!({ "dtype": info["dtype"], "shape": shape, "data_offsets": [start, new_data.len()] }),
        );
    }
    let mut head = serde_json::to_vec(&new_header).unwrap();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut file = (head.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&head);
    file.extend_from_slice(&new_data);
    std::fs::write(out.join("model.safetensors"), file).unwrap();
    out.to_path_buf()
}

/// The wgpu adapters to test on (`wgpu:0`, `wgpu:1`, …). With `KILN_REQUIRE_WGPU=1` (CI, which
/// installs Mesa's lavapipe) finding none is a failure, not a silently shorter test run.
pub fn wgpu_devices() -> Vec<kiln_engine::DeviceKind> {
    let gpus: Vec<_> = kiln_engine::DeviceKind::available()
        .into_iter()
        .filter(|d| d.is_gpu())
        .collect();
    let required = std::env::var("KILN_REQUIRE_WGPU").is_ok_and(|v| v == "1");
    assert!(
        !required || !gpus.is_empty(),
        "KILN_REQUIRE_WGPU=1 but {}",
        if kiln_engine::gpu::compiled() {
            "no wgpu adapter was found (apt-get install mesa-vulkan-drivers libvulkan1)"
        } else {
            "this build lacks the `wgpu` feature (scripts/test.sh turns it on)"
        }
    );
    gpus
}

/// Every device a test body must hold on: kiln's CPU kernels, burn-flex, each wgpu adapter.
pub fn devices() -> Vec<kiln_engine::DeviceKind> {
    let mut all = kiln_engine::DeviceKind::ALL.to_vec();
    all.extend(wgpu_devices());
    all
}

/// One test body on every device, as separate tests per device kind (so a failure names it):
/// `test_device!(name, |device| { ... })` makes `name::cpu`, `name::burn_flex` and `name::wgpu`
/// (every wgpu adapter in turn; it passes with a note when there is none, unless
/// `KILN_REQUIRE_WGPU=1`).
#[macro_export]
macro_rules! test_device {
    ($name:ident, |$device:ident| $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn run($device: kiln_engine::DeviceKind) $body

            #[test]
            fn cpu() {
                run(kiln_engine::DeviceKind::Cpu)
            }

            #[test]
            fn burn_flex() {
                run(kiln_engine::DeviceKind::BurnFlex)
            }

            #[test]
            fn wgpu() {
                let gpus = $crate::wgpu_devices();
                if gpus.is_empty() {
                    eprintln!("no wgpu adapter in this build or on this machine: nothing to run");
                }
                for device in gpus {
                    run(device)
                }
            }
        }
    };
}

/// Every way of running a model on `device` the fixture tests must hold for: both batch
/// layouts, with the selector's attention kernel and each kernel the device offers forced
/// (`sdpa_kernel`), as `(label, options)`. burn-flex runs forced kernels on host copies (the
/// CPU's own), so it runs auto only.
pub fn configurations_on(
    device: kiln_engine::DeviceKind,
) -> Vec<(String, kiln_models::LoadOptions)> {
    use kiln_engine::{DeviceKind, ExecOptions, SdpaKernel, SdpaKernelChoice};
    use kiln_models::{BatchLayout, LoadOptions};
    let forced: Vec<SdpaKernel> = match device {
        DeviceKind::Cpu => SdpaKernel::ALL.to_vec(),
        DeviceKind::Wgpu(_) => vec![SdpaKernel::Math],
        DeviceKind::BurnFlex => Vec::new(),
    };
    let mut all = Vec::new();
    for layout in [BatchLayout::Packed, BatchLayout::Padded] {
        let choices = std::iter::once(SdpaKernelChoice::Auto)
            .chain(forced.iter().map(|&k| SdpaKernelChoice::Force(k)));
        for sdpa_kernel in choices {
            let label = format!("{device}/{layout:?}/sdpa={sdpa_kernel}");
            let opts = LoadOptions {
                device: device.into(),
                layout,
                exec: ExecOptions {
                    sdpa_kernel,
                    ..ExecOptions::default()
                },
                ..LoadOptions::default()
            };
            all.push((label, opts));
        }
    }
    all
}
