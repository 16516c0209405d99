//! Every folder of the model-zoo fixtures (`$KILN_MODEL_ZOO`, default `tests/fixtures/models`):
//! tiny random-weight models in the layouts real checkpoints use, each with the outputs
//! transformers and sentence-transformers computed (`reference.json`). A folder kiln runs must
//! tokenize exactly like the reference and give its embeddings or logits within 1e-4, one text
//! at a time and batched, packed and padded; a folder kiln does not run yet must be refused
//! with an error that names what is missing and lists what kiln runs. A new folder is picked up
//! without code changes.

use std::path::Path;

use kiln_models::{BatchLayout, EmbedOptions, EncoderModel, LoadOptions, TextInput};
use kiln_tests::{max_abs_diff, model_zoo, read_json};
use serde_json::Value;

const TOL: f32 = 1e-4;

/// What kiln runs: the reference's architecture and task.
fn runs(architecture: &str, task: &str) -> bool {
    let encoder = kiln_models::config::ENCODERS.contains(&architecture);
    let classifier = kiln_models::config::CLASSIFIERS.contains(&architecture);
    (encoder && task == "embedding") || (classifier && task == "classification")
}

fn rows(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn ids(v: &Value) -> Vec<Vec<i64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect()
}

/// The reference's inputs: texts, or pairs for a cross-encoder.
fn inputs(r: &Value) -> Vec<TextInput> {
    if let Some(pairs) = r["pairs"].as_array() {
        pairs
            .iter()
            .map(|p| {
                TextInput::Pair(
                    p[0].as_str().unwrap().to_string(),
                    p[1].as_str().unwrap().to_string(),
                )
            })
            .collect()
    } else {
        r["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| TextInput::Single(t.as_str().unwrap().to_string()))
            .collect()
    }
}

fn check_rows(name: &str, what: &str, got: &[Vec<f32>], want: &[Vec<f32>]) {
    assert_eq!(got.len(), want.len(), "{name} {what}: rows");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{name} {what}: row {i} width");
        let d = max_abs_diff(g, w);
        assert!(d <= TOL, "{name} {what}: row {i} differs by {d}");
    }
}

/// Tokenization, then the outputs one at a time and all at once, in `layout`.
fn check(dir: &Path, r: &Value, layout: BatchLayout) {
    let name = r["model"].as_str().unwrap();
    let opts = LoadOptions {
        layout,
        ..LoadOptions::default()
    };
    let model = EncoderModel::load(dir, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
    let inputs = inputs(r);
    let encoded = model.tokenize(&inputs, true).unwrap();
    let got_ids: Vec<Vec<i64>> = encoded.iter().map(|e| e.ids.clone()).collect();
    assert_eq!(got_ids, ids(&r["input_ids"]), "{name}: token ids");
    if r.get("token_type_ids").is_some() {
        let got: Vec<Vec<i64>> = encoded.iter().map(|e| e.type_ids.clone()).collect();
        assert_eq!(got, ids(&r["token_type_ids"]), "{name}: token type ids");
    }
    match r["task"].as_str().unwrap() {
        "embedding" => {
            let texts: Vec<String> = r["texts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string())
                .collect();
            let want = rows(&r["outputs"]["embeddings"]);
            let opts = EmbedOptions {
                truncate: true,
                normalize: None,
            };
            let batched = model.embed(&texts, opts).unwrap().vectors;
            check_rows(name, "embeddings, batched", &batched, &want);
            let alone: Vec<Vec<f32>> = texts
                .iter()
                .map(|t| model.embed(std::slice::from_ref(t), opts).unwrap().vectors[0].clone())
                .collect();
            check_rows(name, "embeddings, one at a time", &alone, &want);
            assert_eq!(model.info().embedding_size, want[0].len(), "{name}: width");
        }
        "classification" => {
            let want = rows(&r["outputs"]["logits"]);
            let batched: Vec<Vec<f32>> = model
                .classify(&inputs, true)
                .unwrap()
                .into_iter()
                .map(|c| c.logits)
                .collect();
            check_rows(name, "logits, batched", &batched, &want);
            let alone: Vec<Vec<f32>> = inputs
                .iter()
                .map(|i| {
                    model.classify(std::slice::from_ref(i), true).unwrap()[0]
                        .logits
                        .clone()
                })
                .collect();
            check_rows(name, "logits, one at a time", &alone, &want);
        }
        other => panic!("{name}: task `{other}` has no check"),
    }
}

#[test]
fn every_zoo_model_matches_its_reference_or_is_refused_by_name() {
    let zoo = model_zoo();
    let mut folders: Vec<_> = std::fs::read_dir(&zoo)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("reference.json").is_file())
        .collect();
    folders.sort();
    assert!(!folders.is_empty(), "no model folders in {}", zoo.display());
    let (mut ran, mut refused) = (Vec::new(), Vec::new());
    for dir in &folders {
        let r = read_json(&dir.join("reference.json"));
        let name = r["model"].as_str().unwrap().to_string();
        let architecture = r["architecture"].as_str().unwrap();
        let task = r["task"].as_str().unwrap();
        if runs(architecture, task) {
            for layout in [BatchLayout::Packed, BatchLayout::Padded] {
                check(dir, &r, layout);
            }
            ran.push(name);
        } else {
            let err = match EncoderModel::load(dir, &LoadOptions::default()) {
                Ok(_) => panic!(
                    "{name}: {architecture} ({task}) loaded, but kiln does not run it yet: update `runs`"
                ),
                Err(e) => e.to_string(),
            };
            assert!(
                matches!(
                    EncoderModel::load(dir, &LoadOptions::default()),
                    Err(kiln_models::ModelError::Unsupported(_))
                ),
                "{name}: {err}"
            );
            // The error names what is missing; for an architecture, it lists what kiln runs.
            let named = err.contains(architecture) || err.contains("SpladePooling");
            assert!(
                named,
                "{name}: the error does not say what is missing: {err}"
            );
            if err.contains(architecture) {
                assert!(err.contains("kiln runs BertModel"), "{name}: {err}");
            }
            refused.push(format!("{name} ({architecture})"));
        }
    }
    eprintln!("ran: {ran:?}\nrefused by name: {refused:?}");
    assert!(!ran.is_empty(), "no zoo model ran");
}
