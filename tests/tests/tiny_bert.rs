//! The tiny random-weight BERT fixtures (`$KILN_FIXTURES/tiny`): encoder hidden states and pooler
//! output, and classifier logits for single texts and sentence pairs, on every device.

use kiln_models::{Encoded, EncoderModel, LoadOptions, TextInput};
use kiln_tests::{fixtures, flatten, max_abs_diff, read_json};

const TOL: f32 = 1e-4;

fn load(name: &str, opts: &LoadOptions) -> (EncoderModel, serde_json::Value) {
    let dir = fixtures().join("tiny").join(name);
    let model = EncoderModel::load(&dir, opts).unwrap_or_else(|e| panic!("{name}: {e}"));
    (model, read_json(&dir.join("reference.json")))
}

/// The reference's padded `[rows, len]` integer matrices, unpadded by its attention mask.
fn reference_batch(r: &serde_json::Value) -> Vec<Encoded> {
    let rows = |k: &str| -> Vec<Vec<i64>> {
        r[k].as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_i64().unwrap())
                    .collect()
            })
            .collect()
    };
    let (ids, types, mask) = (
        rows("input_ids"),
        rows("token_type_ids"),
        rows("attention_mask"),
    );
    ids.iter()
        .zip(&types)
        .zip(&mask)
        .map(|((i, t), m)| {
            let n = m.iter().filter(|&&x| x == 1).count();
            Encoded {
                ids: i[..n].to_vec(),
                type_ids: t[..n].to_vec(),
                untruncated_len: n,
            }
        })
        .collect()
}

fn texts(r: &serde_json::Value) -> Vec<String> {
    r["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

fn output(outputs: &[(String, kiln_engine::HostTensor)], name: &str) -> kiln_engine::HostTensor {
    outputs
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no output {name}"))
        .1
        .clone()
}

kiln_tests::test_device!(
    bert_tiny_hidden_states_and_pooler_match_on_every_device,
    |device| {
        for (config, opts) in kiln_tests::configurations_on(device) {
            let (model, r) = load("bert-tiny", &opts);
            let batch = reference_batch(&r);
            // Our tokenizer gives the reference ids.
            let inputs: Vec<TextInput> = texts(&r).into_iter().map(TextInput::Single).collect();
            assert_eq!(
                model.tokenize(&inputs, false).unwrap(),
                batch,
                "{config}: token ids"
            );

            let outputs = model.run_batch(&batch).unwrap();
            let hidden = output(&outputs, "last_hidden_state");
            let want = flatten(&r["outputs"]["last_hidden_state"]["data"]);
            let shape = &r["outputs"]["last_hidden_state"]["shape"];
            let (rows, len, h) = (
                shape[0].as_u64().unwrap() as usize,
                shape[1].as_u64().unwrap() as usize,
                shape[2].as_u64().unwrap() as usize,
            );
            assert_eq!(hidden.shape, vec![rows, len, h], "{config}");
            let got = hidden.as_f32().unwrap();
            for (b, e) in batch.iter().enumerate() {
                let range = b * len * h..(b * len + e.len()) * h;
                let err = max_abs_diff(&got[range.clone()], &want[range]);
                assert!(err <= TOL, "{config}: text {b} hidden state error {err}");
            }
            let pooled = output(&outputs, "pooler_output");
            let err = max_abs_diff(
                pooled.as_f32().unwrap(),
                &flatten(&r["outputs"]["pooler_output"]["data"]),
            );
            assert!(err <= TOL, "{config}: pooler_output error {err}");
        }
    }
);

kiln_tests::test_device!(
    bert_tiny_cls_logits_match_for_texts_and_pairs_on_every_device,
    |device| {
        for (config, opts) in kiln_tests::configurations_on(device) {
            let (model, r) = load("bert-tiny-cls", &opts);
            assert_eq!(model.labels(), ["negative", "neutral", "positive"]);

            let inputs: Vec<TextInput> = texts(&r).into_iter().map(TextInput::Single).collect();
            let got = model.classify(&inputs, false).unwrap();
            let want = flatten(&r["outputs"]["logits"]["data"]);
            let logits: Vec<f32> = got.iter().flat_map(|c| c.logits.clone()).collect();
            let err = max_abs_diff(&logits, &want);
            assert!(err <= TOL, "{config}: logits error {err}");
            let probs: Vec<f32> = got.iter().flat_map(|c| c.probabilities.clone()).collect();
            let err = max_abs_diff(&probs, &flatten(&r["outputs"]["probabilities"]["data"]));
            assert!(err <= TOL, "{config}: probabilities error {err}");

            let pairs = &r["pairs"];
            let inputs: Vec<TextInput> = pairs["texts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    TextInput::Pair(p[0].as_str().unwrap().into(), p[1].as_str().unwrap().into())
                })
                .collect();
            assert_eq!(
                model.tokenize(&inputs, false).unwrap(),
                reference_batch(pairs),
                "{config}: pair ids"
            );
            let got = model.classify(&inputs, false).unwrap();
            let logits: Vec<f32> = got.iter().flat_map(|c| c.logits.clone()).collect();
            let err = max_abs_diff(&logits, &flatten(&pairs["logits"]["data"]));
            assert!(err <= TOL, "{config}: pair logits error {err}");
        }
    }
);
