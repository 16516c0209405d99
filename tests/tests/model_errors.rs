//! A broken model folder gives an error naming the file (and the tensor), never a panic.

use std::path::{Path, PathBuf};

use kiln_models::{EncoderModel, LoadOptions, ModelError};
use kiln_tests::fixtures;

/// A scratch copy of `tiny/bert-tiny` that the test may damage.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("kiln-model-errors-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let src = fixtures().join("tiny/bert-tiny");
        for entry in std::fs::read_dir(&src).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        Scratch(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    fn edit_config(&self, f: impl FnOnce(&mut serde_json::Value)) {
        let p = self.path("config.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(p, v.to_string()).unwrap();
    }

    fn load(&self) -> ModelError {
        EncoderModel::load(&self.0, &LoadOptions::default()).expect_err("loading must fail")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn assert_mentions(err: &ModelError, parts: &[&str]) {
    let msg = err.to_string();
    for p in parts {
        assert!(msg.contains(p), "error `{msg}` should mention `{p}`");
    }
}

#[test]
fn the_scratch_copy_loads_before_it_is_damaged() {
    let s = Scratch::new("intact");
    EncoderModel::load(&s.0, &LoadOptions::default()).unwrap();
}

#[test]
fn missing_files_are_named() {
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        let s = Scratch::new(&format!("missing-{file}"));
        std::fs::remove_file(s.path(file)).unwrap();
        assert_mentions(&s.load(), &[file, "missing"]);
    }
    let err = EncoderModel::load(
        Path::new("/nonexistent/kiln-model"),
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert_mentions(&err, &["/nonexistent/kiln-model", "not found"]);
}

#[test]
fn unknown_architectures_are_refused_by_name() {
    let s = Scratch::new("arch");
    s.edit_config(|c| c["architectures"] = serde_json::json!(["BertForTokenClassification"]));
    let err = s.load();
    assert!(matches!(err, ModelError::Unsupported(_)), "{err}");
    assert_mentions(&err, &["config.json", "BertForTokenClassification"]);

    let s = Scratch::new("model-type");
    s.edit_config(|c| c["model_type"] = serde_json::json!("gpt2"));
    assert_mentions(&s.load(), &["config.json", "gpt2"]);

    let s = Scratch::new("act");
    s.edit_config(|c| c["hidden_act"] = serde_json::json!("mish"));
    assert_mentions(&s.load(), &["config.json", "mish"]);
}

#[test]
fn mismatched_tensor_shapes_name_the_file_and_tensor() {
    let s = Scratch::new("shape");
    s.edit_config(|c| c["intermediate_size"] = serde_json::json!(96));
    assert_mentions(
        &s.load(),
        &[
            "model.safetensors",
            "encoder.layer.0.intermediate.dense.weight",
            "[128, 64]",
            "[96, 64]",
        ],
    );
}

#[test]
fn corrupt_files_are_errors() {
    let s = Scratch::new("truncated");
    let bytes = std::fs::read(s.path("model.safetensors")).unwrap();
    std::fs::write(s.path("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(&s.load(), &["model.safetensors", "truncated"]);

    let s = Scratch::new("garbage");
    std::fs::write(
        s.path("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00not json",
    )
    .unwrap();
    assert_mentions(&s.load(), &["model.safetensors", "not a valid safetensors"]);

    let s = Scratch::new("config-json");
    std::fs::write(s.path("config.json"), b"{ \"hidden_size\": ").unwrap();
    assert_mentions(&s.load(), &["config.json", "invalid JSON"]);

    let s = Scratch::new("tokenizer-json");
    std::fs::write(s.path("tokenizer.json"), b"{}").unwrap();
    assert_mentions(&s.load(), &["tokenizer.json"]);

    let s = Scratch::new("zero-heads");
    s.edit_config(|c| c["num_attention_heads"] = serde_json::json!(0));
    assert_mentions(&s.load(), &["config.json", "num_attention_heads"]);
}
