//! int8 (dynamic and calibrated static) and bf16 fast-math on the real all-MiniLM-L6-v2 against
//! the fp32 sentence-transformers reference, and the tiny classifier's argmax.
//!
//! Bounds (the quantization issue's): int8-dynamic and int8-static cosine ≥ 0.99 on every text
//! and ≥ 0.995 on average; bf16-fast ≥ 0.999 on every text. Static scales are calibrated on
//! `tests/data/calibration.jsonl`, texts written for this purpose that share none with the
//! fixtures.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_engine::{DeviceKind, ExecOptions, MathMode, QuantOptions, Quantize};
use kiln_models::{EmbedOptions, EncoderModel, LoadOptions, TextInput, quantize};
use kiln_quant::observer::ObserverKind;
use kiln_tests::{cosine, fixtures, minilm_dir, read_json, read_jsonl, read_npy, workspace};

fn calibration_texts() -> Vec<String> {
    quantize::read_texts(&workspace().join("tests/data/calibration.jsonl")).unwrap()
}

fn options(quantize: Quantize, math_mode: MathMode, dir: &Path) -> LoadOptions {
    let scales = (quantize == Quantize::Int8Static).then(|| {
        Arc::new(
            quantize::calibrate(
                dir,
                &LoadOptions::default(),
                &calibration_texts(),
                ObserverKind::MinMax,
            )
            .unwrap(),
        )
    });
    LoadOptions {
        exec: ExecOptions {
            quant: QuantOptions {
                quantize,
                math_mode,
                scales,
                ..QuantOptions::default()
            },
            ..ExecOptions::default()
        },
        ..LoadOptions::default()
    }
}

/// `(min, mean)` cosine of each text's embedding to the fp32 reference.
fn minilm_cosines(opts: &LoadOptions) -> (f64, f64) {
    let (_, want) = read_npy(&fixtures().join("minilm/embeddings_normalized.npy"));
    let texts: Vec<String> = read_jsonl(&fixtures().join("minilm/inputs.jsonl"))
        .iter()
        .map(|v| v["text"].as_str().unwrap().to_string())
        .collect();
    let model = EncoderModel::load(&minilm_dir(), opts).unwrap();
    let got = model
        .embed(
            &texts,
            EmbedOptions {
                truncate: true,
                normalize: None,
            },
        )
        .unwrap()
        .vectors;
    let cos: Vec<f64> = got
        .iter()
        .zip(want.chunks(384))
        .map(|(g, w)| cosine(g, w))
        .collect();
    let min = cos.iter().copied().fold(1.0, f64::min);
    (min, cos.iter().sum::<f64>() / cos.len() as f64)
}

#[test]
fn int8_dynamic_minilm_within_bounds() {
    let (min, mean) = minilm_cosines(&options(
        Quantize::Int8Dynamic,
        MathMode::Precise,
        &minilm_dir(),
    ));
    eprintln!("int8-dynamic: min cosine {min:.6}, mean {mean:.6}");
    assert!(
        min >= 0.99 && mean >= 0.995,
        "int8-dynamic: min {min}, mean {mean}"
    );
}

#[test]
fn int8_static_calibrated_on_other_texts_within_bounds() {
    let (min, mean) = minilm_cosines(&options(
        Quantize::Int8Static,
        MathMode::Precise,
        &minilm_dir(),
    ));
    eprintln!("int8-static: min cosine {min:.6}, mean {mean:.6}");
    assert!(
        min >= 0.99 && mean >= 0.995,
        "int8-static: min {min}, mean {mean}"
    );
}

/// The accuracy of static quantization per observer and deny list (run with `--ignored` to
/// print the table behind the default choices).
#[test]
#[ignore]
fn int8_static_sensitivity() {
    let dir = minilm_dir();
    let ffn_down: Vec<String> = (0..6)
        .map(|l| format!("encoder.layer.{l}.output.dense"))
        .collect();
    let ffn_down: Vec<&str> = ffn_down.iter().map(String::as_str).collect();
    for observer in [ObserverKind::MinMax, ObserverKind::Percentile(0.9999)] {
        let scales = Arc::new(
            quantize::calibrate(
                &dir,
                &LoadOptions::default(),
                &calibration_texts(),
                observer,
            )
            .unwrap(),
        );
        for deny in [
            vec![],
            vec!["*.output.dense"],
            vec!["*.intermediate.dense"],
            vec!["*.output.dense", "*.intermediate.dense"],
            vec!["encoder.layer.0.*", "encoder.layer.5.*"],
            ffn_down.clone(),
            vec!["*.attention.output.dense"],
            [ffn_down.clone(), vec!["*.intermediate.dense"]].concat(),
            [ffn_down.clone(), vec!["*.attention.output.dense"]].concat(),
            vec!["*.query", "*.key", "*.value"],
        ] {
            let mut opts = options(Quantize::Int8Dynamic, MathMode::Precise, &dir);
            opts.exec.quant.quantize = Quantize::Int8Static;
            opts.exec.quant.scales = Some(scales.clone());
            opts.exec.quant.layers.deny = deny.iter().map(|s| s.to_string()).collect();
            let (min, mean) = minilm_cosines(&opts);
            eprintln!("static {observer} deny {deny:?}: min {min:.6} mean {mean:.6}");
        }
    }
}

#[test]
fn bf16_fast_minilm_within_bounds() {
    let (min, mean) = minilm_cosines(&options(Quantize::None, MathMode::Bf16Fast, &minilm_dir()));
    eprintln!("bf16-fast: min cosine {min:.6}, mean {mean:.6}");
    assert!(min >= 0.999, "bf16-fast: min {min}, mean {mean}");
}

#[test]
fn classifier_argmax_unchanged() {
    let dir: PathBuf = fixtures().join("tiny/bert-tiny-cls");
    let reference = read_json(&dir.join("reference.json"));
    let texts: Vec<TextInput> = reference["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| TextInput::Single(t.as_str().unwrap().to_string()))
        .chain(
            calibration_texts()
                .into_iter()
                .take(24)
                .map(TextInput::Single),
        )
        .collect();
    let fp32 = EncoderModel::load(&dir, &LoadOptions::default()).unwrap();
    let argmax = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
    let want: Vec<usize> = fp32
        .classify(&texts, true)
        .unwrap()
        .iter()
        .map(|c| argmax(&c.logits))
        .collect();
    for (q, m) in [
        (Quantize::Int8Dynamic, MathMode::Precise),
        (Quantize::Int8Static, MathMode::Precise),
        (Quantize::None, MathMode::Bf16Fast),
    ] {
        let model = EncoderModel::load(&dir, &options(q, m, &dir)).unwrap();
        let got: Vec<usize> = model
            .classify(&texts, true)
            .unwrap()
            .iter()
            .map(|c| argmax(&c.logits))
            .collect();
        assert_eq!(got, want, "{q} / {m}: argmax changed");
    }
}

#[test]
fn layer_filter_keeps_denied_layers_in_f32_and_other_devices_refuse() {
    let mut opts = options(Quantize::Int8Dynamic, MathMode::Precise, &minilm_dir());
    opts.exec.quant.layers.deny = vec!["*.output.dense".into(), "pooler.*".into()];
    let model = EncoderModel::load(&minilm_dir(), &opts).unwrap();
    for c in model.linear_formats() {
        let kept = c.label.ends_with(".output.dense") || c.label.starts_with("pooler");
        assert_eq!(c.format.name() == "f32", kept, "{}: {}", c.label, c.format);
    }
    let burn = LoadOptions {
        device: DeviceKind::BurnFlex.into(),
        ..options(Quantize::Int8Dynamic, MathMode::Precise, &minilm_dir())
    };
    let err = EncoderModel::load(&minilm_dir(), &burn)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("int8-dynamic") && err.contains("--device cpu"),
        "{err}"
    );
    // Static quantization without a calibration file names the command that makes one.
    let tmp = std::env::temp_dir().join(format!("kiln-no-scales-{}", std::process::id()));
    let missing = LoadOptions {
        quantize_scales: Some(tmp.join("absent.json")),
        exec: ExecOptions {
            quant: QuantOptions {
                quantize: Quantize::Int8Static,
                ..QuantOptions::default()
            },
            ..ExecOptions::default()
        },
        ..LoadOptions::default()
    };
    let err = EncoderModel::load(&minilm_dir(), &missing)
        .unwrap_err()
        .to_string();
    assert!(err.contains("kiln quantize"), "{err}");
}

#[test]
fn calibration_file_round_trips() {
    let dir = fixtures().join("tiny/bert-tiny-cls");
    let scales = quantize::calibrate(
        &dir,
        &LoadOptions::default(),
        &calibration_texts(),
        ObserverKind::MinMax,
    )
    .unwrap();
    // Query, key and value read the same input: one observer, the same scale.
    let q = &scales.layers["encoder.layer.0.attention.self.query"];
    let k = &scales.layers["encoder.layer.0.attention.self.key"];
    assert_eq!(q, k);
    assert_eq!(
        scales.layers.len(),
        2 * 6 + 2,
        "6 linears per layer, pooler and classifier"
    );
    let path = std::env::temp_dir().join(format!("kiln-scales-{}.json", std::process::id()));
    quantize::write_scales(&path, &scales).unwrap();
    assert_eq!(quantize::read_scales(&path).unwrap(), scales);
    std::fs::write(&path, "{not json").unwrap();
    assert!(quantize::read_scales(&path).is_err());
    std::fs::remove_file(&path).ok();
}
