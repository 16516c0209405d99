//! Static-quantization calibration (`kiln quantize`) and the calibration file.
//!
//! Calibration runs the f32 model over a set of texts with one extra output per `Linear` input,
//! feeds each input's values to an observer (min-max or histogram percentile), and writes the
//! chosen u8 scale and zero point per layer to a JSON file. Loading with
//! `quantize = "int8-static"` reads that file; the weights are quantized (s8, per output channel)
//! when the plan is built.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_engine::ExecOptions;
use kiln_engine::quantize::{LayerScale, LinearChoice, StaticScales};
use kiln_quant::observer::{Observer, ObserverKind};

use crate::error::{ModelError, Result, read_json};
use crate::{BatchLayout, EncoderModel, LoadOptions, TextInput};

/// The calibration file's default name inside a model folder.
pub const SCALES_FILE: &str = "kiln-quant.json";

/// Reads a calibration file written by [`write_scales`].
pub fn read_scales(path: &Path) -> Result<StaticScales> {
    if !path.is_file() {
        return Err(ModelError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "int8-static needs a calibration file: run `kiln quantize --model DIR --calibrate \
                 texts.jsonl` (or point quantize_scales at one)",
            ),
        ));
    }
    read_json(path)
}

/// Writes a calibration file (JSON, atomically: a temporary file renamed into place).
pub fn write_scales(path: &Path, scales: &StaticScales) -> Result<()> {
    let json = serde_json::to_vec_pretty(scales)
        .map_err(|e| ModelError::file(path, format!("cannot serialise: {e}")))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json).map_err(|e| ModelError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}

/// Calibration texts: one per line, either a JSON string or an object with a `text` field (the
/// fixtures' `inputs.jsonl` format). Blank lines are skipped.
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    let body = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let mut texts = Vec::new();
    for (i, line) in body
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| ModelError::file(path, format!("line {}: {e}", i + 1)))?;
        let text = match &value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Object(o) => o
                .get("text")
                .and_then(|t| t.as_str())
                .ok_or_else(|| ModelError::file(path, format!("line {}: no `text` string", i + 1)))?
                .to_string(),
            _ => {
                return Err(ModelError::file(
                    path,
                    format!("line {}: expected a string or an object with `text`", i + 1),
                ));
            }
        };
        texts.push(text);
    }
    if texts.is_empty() {
        return Err(ModelError::file(path, "no calibration texts"));
    }
    Ok(texts)
}

/// Runs the f32 model over `texts` and returns each `Linear` layer's calibrated input scale.
pub fn calibrate(
    dir: &Path,
    opts: &LoadOptions,
    texts: &[String],
    observer: ObserverKind,
) -> Result<StaticScales> {
    // Calibrate the f32 model, packed (padding rows would skew the ranges).
    let opts = LoadOptions {
        exec: ExecOptions {
            sdpa_kernel: opts.exec.sdpa_kernel,
            ..ExecOptions::default()
        },
        layout: BatchLayout::Packed,
        ..opts.clone()
    };
    let (model, layers) = EncoderModel::load_for_calibration(dir, &opts)?;
    let inputs: Vec<TextInput> = texts.iter().map(|t| TextInput::Single(t.clone())).collect();
    let encoded = model.tokenize(&inputs, true)?;
    let mut observers: BTreeMap<&str, Observer> = layers
        .iter()
        .map(|(_, out)| (out.as_str(), Observer::new(observer)))
        .collect();
    let mut order: Vec<usize> = (0..encoded.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].len()));
    for chunk in order.chunks(model.max_batch) {
        let batch: Vec<_> = chunk.iter().map(|&i| encoded[i].clone()).collect();
        for (name, t) in model.run_batch(&batch)? {
            if let (Some(o), Some(values)) = (observers.get_mut(name.as_str()), t.as_f32()) {
                o.observe(values);
            }
        }
    }
    let mut scales = StaticScales::default();
    for (label, out) in &layers {
        let o = &observers[out.as_str()];
        let (Some(p), Some((lo, hi))) = (o.params(), o.range()) else {
            return Err(ModelError::Input(format!(
                "calibration saw no values for layer `{label}`"
            )));
        };
        scales.layers.insert(
            label.clone(),
            LayerScale {
                scale: p.scale,
                zero_point: p.zero_point,
                observed_min: lo,
                observed_max: hi,
            },
        );
    }
    let tokens: usize = encoded.iter().map(|e| e.len()).sum();
    for (k, v) in [
        ("model", model.info().id.clone()),
        ("observer", observer.to_string()),
        ("texts", texts.len().to_string()),
        ("tokens", tokens.to_string()),
        ("weights", "s8 symmetric per output channel".into()),
        ("activations", "u8 asymmetric per tensor".into()),
    ] {
        scales.source.insert(k.into(), v);
    }
    Ok(scales)
}

/// Logs how many `Linear` layers run in each format.
pub(crate) fn log_formats(choices: &[LinearChoice], exec: &ExecOptions) {
    if exec.quant.is_f32() {
        return;
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for c in choices {
        *counts.entry(c.format.name()).or_default() += 1;
    }
    let kept: Vec<&str> = choices
        .iter()
        .filter(|c| c.format.name() == "f32")
        .map(|c| c.label.as_str())
        .collect();
    tracing::info!(
        quantize = %exec.quant.quantize,
        math_mode = %exec.quant.math_mode,
        int8_kernel = %kiln_quant::Int8Kernel::detect(),
        bf16_kernel = %kiln_quant::bf16::Bf16Kernel::detect(),
        formats = ?counts,
        f32_layers = ?kept,
        "linear layer formats"
    );
}

/// Names the setting behind a quantization error at load.
pub(crate) fn explain_load_error(e: impl Into<ModelError>, exec: &ExecOptions) -> ModelError {
    let e = e.into();
    if exec.quant.is_f32() {
        return e;
    }
    ModelError::Unsupported(format!(
        "quantize = {}, math_mode = {}: {e}",
        exec.quant.quantize, exec.quant.math_mode
    ))
}
