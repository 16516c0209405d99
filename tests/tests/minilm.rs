//! The real all-MiniLM-L6-v2 against sentence-transformers (`$KILN_FIXTURES/minilm`).

use kiln_engine::DeviceKind;
use kiln_models::{BatchLayout, EmbedOptions, EncoderModel, LoadOptions, TextInput};

const TRUNCATE: EmbedOptions = EmbedOptions {
    truncate: true,
    normalize: None,
};
use kiln_tests::{cosine, fixtures, max_abs_diff, minilm_dir, read_jsonl, read_npy};

fn load(device: DeviceKind) -> EncoderModel {
    let opts = LoadOptions {
        device: device.into(),
        ..LoadOptions::default()
    };
    EncoderModel::load(&minilm_dir(), &opts).unwrap()
}

fn texts() -> Vec<String> {
    read_jsonl(&fixtures().join("minilm/inputs.jsonl"))
        .iter()
        .map(|v| v["text"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn token_ids_match_including_truncation_at_256() {
    let model = load(DeviceKind::Cpu);
    assert_eq!(
        model.info().max_input_tokens,
        256,
        "sentence_bert_config.json overrides tokenizer.json's 128"
    );
    let want = read_jsonl(&fixtures().join("minilm/tokens.jsonl"));
    let inputs: Vec<TextInput> = texts().into_iter().map(TextInput::Single).collect();
    let got = model.tokenize(&inputs, true).unwrap();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let ids: Vec<i64> = w["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        assert_eq!(g.ids, ids, "text {i}");
        assert_eq!(
            g.truncated(),
            w["truncated"].as_bool().unwrap(),
            "text {i} truncated flag"
        );
        assert_eq!(
            g.untruncated_len as u64,
            w["num_tokens_untruncated"].as_u64().unwrap(),
            "text {i} untruncated length"
        );
    }
    // Refusing instead of truncating names the input and its length.
    let long = inputs
        .iter()
        .position(|_| true)
        .and_then(|_| got.iter().position(|e| e.truncated()))
        .unwrap();
    let err = model
        .tokenize(&inputs[long..=long], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("at most 256"), "{err}");
}

kiln_tests::test_device!(
    normalized_embeddings_match_sentence_transformers_on_every_device,
    |device| {
        let (shape, want) = read_npy(&fixtures().join("minilm/embeddings_normalized.npy"));
        let texts = texts();
        assert_eq!(shape, vec![texts.len(), 384]);
        for (config, opts) in kiln_tests::configurations_on(device) {
            let model = EncoderModel::load(&minilm_dir(), &opts).unwrap();
            let got = model.embed(&texts, TRUNCATE).unwrap().vectors;
            for (i, g) in got.iter().enumerate() {
                let w = &want[i * 384..(i + 1) * 384];
                let cos = cosine(g, w);
                let err = max_abs_diff(g, w);
                assert!(cos >= 0.99999, "{config}: text {i} cosine {cos}");
                assert!(err <= 1e-4, "{config}: text {i} max abs error {err}");
            }
        }
    }
);

kiln_tests::test_device!(last_hidden_states_of_first_8_texts_match, |device| {
    let (shape, want) = read_npy(&fixtures().join("minilm/last_hidden_state_first8.npy"));
    let (_, lengths) = read_npy(&fixtures().join("minilm/last_hidden_state_first8_lengths.npy"));
    let (seq, h) = (shape[1], shape[2]);
    for (config, opts) in kiln_tests::configurations_on(device) {
        let model = EncoderModel::load(&minilm_dir(), &opts).unwrap();
        let inputs: Vec<TextInput> = texts().into_iter().take(8).map(TextInput::Single).collect();
        let encoded = model.tokenize(&inputs, true).unwrap();
        // Each text alone, and all 8 as one batch (padded or packed): the same valid rows.
        let outputs = model.run_batch(&encoded).unwrap();
        let batch_hidden = &outputs
            .iter()
            .find(|(n, _)| n == "last_hidden_state")
            .unwrap()
            .1;
        let longest = encoded.iter().map(|e| e.len()).max().unwrap();
        for (i, e) in encoded.iter().enumerate() {
            assert_eq!(e.len(), lengths[i] as usize, "text {i} length");
            let outputs = model.run_batch(std::slice::from_ref(e)).unwrap();
            let hidden = &outputs
                .iter()
                .find(|(n, _)| n == "last_hidden_state")
                .unwrap()
                .1;
            let got = hidden.as_f32().unwrap();
            let w = &want[i * seq * h..(i * seq + e.len()) * h];
            let err = max_abs_diff(got, w);
            assert!(
                err <= 1e-4,
                "{config}: text {i}: last_hidden_state max abs error {err}"
            );
            let in_batch = &batch_hidden.as_f32().unwrap()[i * longest * h..][..e.len() * h];
            let err = max_abs_diff(in_batch, w);
            assert!(
                err <= 1e-4,
                "{config}: text {i} in a batch: last_hidden_state max abs error {err}"
            );
        }
    }
});

/// Packed (the default): a text's embedding is bit-for-bit the same alone and in a batch of any
/// mix of lengths (each sequence gets the attention kernel for its own length, and no padding
/// enters any sum). Padded: the same within 1e-5 (padding changes GEMM shapes and the kernel).
#[test]
fn a_text_gives_the_same_embedding_alone_and_in_a_batch_of_either_layout() {
    for (layout, tolerance) in [(BatchLayout::Packed, 0.0), (BatchLayout::Padded, 1e-5)] {
        let opts = LoadOptions {
            layout,
            ..LoadOptions::default()
        };
        let model = EncoderModel::load(&minilm_dir(), &opts).unwrap();
        // All 48 fixture texts: lengths from a few tokens to the 256 cap, so one batch mixes
        // sequences that run the math kernel with sequences that run flash.
        let texts = texts();
        let batched = model.embed(&texts, TRUNCATE).unwrap().vectors;
        for (i, t) in texts.iter().enumerate() {
            let alone = model
                .embed(std::slice::from_ref(t), TRUNCATE)
                .unwrap()
                .vectors;
            let err = max_abs_diff(&alone[0], &batched[i]);
            assert!(
                err <= tolerance,
                "{layout:?}: text {i}: alone vs batched differ by {err}"
            );
        }
    }
}

#[test]
fn unnormalized_pooling_matches_the_mean_pooled_fixture() {
    let (_, want) = read_npy(&fixtures().join("minilm/embeddings_mean.npy"));
    let texts: Vec<String> = texts().into_iter().take(16).collect();
    let model = load(DeviceKind::Cpu);
    let opts = EmbedOptions {
        truncate: true,
        normalize: Some(false),
    };
    for (i, g) in model
        .embed(&texts, opts)
        .unwrap()
        .vectors
        .iter()
        .enumerate()
    {
        let err = max_abs_diff(g, &want[i * 384..(i + 1) * 384]);
        assert!(err <= 1e-4, "text {i}: mean-pooled max abs error {err}");
    }
}
