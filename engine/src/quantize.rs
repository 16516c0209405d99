//! Quantization and math-mode options, and the per-`Linear` weight format they imply.
//!
//! [`linear_formats`] is a pure function of the graph and the options: for each `Linear` node it
//! says whether the weight runs in f32, int8 (with dynamic or calibrated static activations) or
//! bf16. [`crate::exec::Plan::new`] uploads each weight in its format through
//! [`crate::backend::Backend::upload_linear`]; a graph compiler's kernel-selection pass and a plan
//! cache can carry the same [`LinearFormat`] per node (the packed weights have a byte form).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use kiln_quant::{ActParams, ActQuant};
use serde::{Deserialize, Serialize};

use crate::error::{Result, graph_err};
use crate::ir::{Graph, Op, ValueId};

/// `quantize = "none" | "int8-dynamic" | "int8-static"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Quantize {
    #[default]
    None,
    /// s8 per-channel weights, u8 activations quantized per token at run time.
    Int8Dynamic,
    /// s8 per-channel weights, u8 activations with per-tensor scales from calibration.
    Int8Static,
}

impl Quantize {
    pub fn as_str(self) -> &'static str {
        match self {
            Quantize::None => "none",
            Quantize::Int8Dynamic => "int8-dynamic",
            Quantize::Int8Static => "int8-static",
        }
    }
}

impl fmt::Display for Quantize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Quantize {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Quantize::None),
            "int8-dynamic" | "int8" => Ok(Quantize::Int8Dynamic),
            "int8-static" => Ok(Quantize::Int8Static),
            other => Err(format!(
                "unknown quantization `{other}` (none, int8-dynamic or int8-static)"
            )),
        }
    }
}

/// `math_mode = "precise" | "bf16-fast"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum MathMode {
    /// f32 everywhere.
    #[default]
    Precise,
    /// Linear weights stored as bf16, inputs rounded to bf16, f32 accumulation.
    Bf16Fast,
}

impl MathMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MathMode::Precise => "precise",
            MathMode::Bf16Fast => "bf16-fast",
        }
    }
}

impl fmt::Display for MathMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MathMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "precise" | "fp32" => Ok(MathMode::Precise),
            "bf16-fast" | "bf16" => Ok(MathMode::Bf16Fast),
            other => Err(format!(
                "unknown math mode `{other}` (precise or bf16-fast)"
            )),
        }
    }
}

/// Which `Linear` layers (by node label, e.g. `encoder.layer.0.output.dense`) int8 quantization
/// and bf16 fast-math touch: those matching an `allow` pattern (all when `allow` is empty) and no `deny` pattern.
/// Patterns are globs where `*` matches any run of characters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct LayerFilter {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

impl LayerFilter {
    pub fn admits(&self, label: &str) -> bool {
        (self.allow.is_empty() || self.allow.iter().any(|p| glob(p, label)))
            && !self.deny.iter().any(|p| glob(p, label))
    }
}

/// `*`-only glob matching; `*` matches any run of characters, dots included (so
/// `*.output.dense` is every layer whose name ends in `.output.dense`).
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(at) => rest = &rest[at + mid.len()..],
            None => return false,
        }
    }
    true
}

/// Calibrated activation ranges for static quantization, per `Linear` label (what
/// `kiln quantize` writes, as JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StaticScales {
    /// Free-form provenance: model, observer, number of texts and tokens.
    #[serde(default)]
    pub source: BTreeMap<String, String>,
    pub layers: BTreeMap<String, LayerScale>,
}

/// One layer's calibrated input quantization.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerScale {
    pub scale: f32,
    pub zero_point: u8,
    /// The range observed (min-max) and the range chosen by the observer.
    pub observed_min: f32,
    pub observed_max: f32,
}

impl LayerScale {
    pub fn params(&self) -> ActParams {
        ActParams {
            scale: self.scale,
            zero_point: self.zero_point,
        }
    }
}

/// Quantization and math-mode options of a plan.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuantOptions {
    pub quantize: Quantize,
    pub math_mode: MathMode,
    pub layers: LayerFilter,
    /// Required for [`Quantize::Int8Static`].
    pub scales: Option<Arc<StaticScales>>,
}

impl QuantOptions {
    /// Whether every linear runs in f32: no quantization and precise math (the default).
    pub fn is_f32(&self) -> bool {
        self.quantize == Quantize::None && self.math_mode == MathMode::Precise
    }
}

/// How one `Linear`'s weight is stored and multiplied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LinearFormat {
    F32,
    Int8(ActQuant),
    Bf16,
}

impl LinearFormat {
    pub fn name(&self) -> &'static str {
        match self {
            LinearFormat::F32 => "f32",
            LinearFormat::Int8(ActQuant::Dynamic) => "int8-dynamic",
            LinearFormat::Int8(ActQuant::Static(_)) => "int8-static",
            LinearFormat::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for LinearFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One `Linear` node's choice: its label, its weight constant, and the format.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearChoice {
    pub label: String,
    pub weight: ValueId,
    pub format: LinearFormat,
}

/// The format of every `Linear` (and `LinearAct`) node under `opts`, in graph order. A node the
/// compiler merged from several linears (label `prefix{a,b,c}`) takes its members' format, which
/// must be the same for all. Errors when static quantization lacks a layer's scales, members of
/// a merged node differ, or one weight would need two formats.
pub fn linear_formats(graph: &Graph, opts: &QuantOptions) -> Result<Vec<LinearChoice>> {
    let mut out: Vec<LinearChoice> = Vec::new();
    for node in &graph.nodes {
        if !matches!(node.op, Op::Linear | Op::LinearAct { .. }) {
            continue;
        }
        let label = node.label.clone();
        let format = merged_format(&label, opts)?;
        let weight = node.inputs[1];
        if let Some(prev) = out
            .iter()
            .find(|c| c.weight == weight && c.format != format)
        {
            return Err(graph_err(format!(
                "layers `{}` and `{label}` share a weight but would store it as {} and {format}",
                prev.label, prev.format
            )));
        }
        out.push(LinearChoice {
            label,
            weight,
            format,
        });
    }
    Ok(out)
}

/// How many linears a (possibly merged) linear's label stands for.
pub fn member_count(label: &str) -> usize {
    crate::compile::rewrite::member_labels(label).len()
}

/// The format of a linear labelled `label`, merged (`prefix{a,b,c}`) or not.
pub fn merged_format(label: &str, opts: &QuantOptions) -> Result<LinearFormat> {
    let members = crate::compile::rewrite::member_labels(label);
    let first = layer_format(&members[0], opts)?;
    for m in &members[1..] {
        let f = layer_format(m, opts)?;
        if f != first {
            return Err(graph_err(format!(
                "merged linear `{label}`: `{}` runs as {first} but `{m}` as {f}",
                members[0]
            )));
        }
    }
    Ok(first)
}

/// The format of one (unmerged) linear layer under `opts`.
pub fn layer_format(label: &str, opts: &QuantOptions) -> Result<LinearFormat> {
    let admitted = opts.layers.admits(label);
    let quantized = opts.quantize != Quantize::None && admitted;
    Ok(match (quantized, opts.quantize) {
        (true, Quantize::Int8Dynamic) => LinearFormat::Int8(ActQuant::Dynamic),
        (true, Quantize::Int8Static) => {
            let scales = opts.scales.as_ref().ok_or_else(|| {
                graph_err("int8-static quantization needs calibrated scales (run `kiln quantize`)")
            })?;
            let layer = scales.layers.get(label).ok_or_else(|| {
                graph_err(format!(
                    "int8-static: the calibration file has no scale for layer `{label}` \
                     (calibrated for another model? exclude the layer with the deny list)"
                ))
            })?;
            if !(layer.scale > 0.0 && layer.scale.is_finite()) {
                return Err(graph_err(format!(
                    "int8-static: layer `{label}` has an invalid scale {}",
                    layer.scale
                )));
            }
            LinearFormat::Int8(ActQuant::Static(layer.params()))
        }
        _ if opts.math_mode == MathMode::Bf16Fast && admitted => LinearFormat::Bf16,
        _ => LinearFormat::F32,
    })
}

/// Adds one output per distinct `Linear` input, named `calibrate:<first layer's label>`, so that a
/// plan run over calibration texts reveals every quantized layer's input values. Returns the graph
/// and, per `Linear` label, the output that holds its input.
pub fn calibration_graph(mut graph: Graph) -> (Graph, Vec<(String, String)>) {
    let mut by_value: Vec<(ValueId, String)> = Vec::new();
    let mut layers = Vec::new();
    for node in &graph.nodes {
        if !matches!(node.op, Op::Linear) {
            continue;
        }
        let x = node.inputs[0];
        let name = match by_value.iter().find(|(v, _)| *v == x) {
            Some((_, name)) => name.clone(),
            None => {
                let name = format!("calibrate:{}", node.label);
                by_value.push((x, name.clone()));
                name
            }
        };
        layers.push((node.label.clone(), name));
    }
    for (v, name) in by_value {
        graph.outputs.push((name, v));
    }
    (graph, layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob(
            "encoder.layer.*.output.dense",
            "encoder.layer.11.output.dense"
        ));
        // `*` crosses dots: both output projections match.
        assert!(glob(
            "encoder.layer.*.output.dense",
            "encoder.layer.1.attention.output.dense"
        ));
        assert!(!glob(
            "encoder.layer.*.output.dense",
            "encoder.layer.1.intermediate.dense"
        ));
        assert!(glob("*", "anything"));
        assert!(glob("pooler.dense", "pooler.dense"));
        assert!(!glob("pooler", "pooler.dense"));
        assert!(glob("*query", "encoder.layer.0.attention.self.query"));
        assert!(glob("a*b*c", "a_b_c"));
        assert!(!glob("a*b*c", "a_c"));
        assert!(!glob("ab*ba", "aba"));
    }

    #[test]
    fn filters() {
        let f = LayerFilter {
            allow: vec!["encoder.*".into()],
            deny: vec!["*.output.dense".into()],
        };
        assert!(f.admits("encoder.layer.0.attention.self.query"));
        assert!(!f.admits("encoder.layer.0.output.dense"));
        assert!(!f.admits("classifier"));
        assert!(LayerFilter::default().admits("classifier"));
    }

    #[test]
    fn names_parse() {
        assert_eq!(
            "int8-static".parse::<Quantize>().unwrap(),
            Quantize::Int8Static
        );
        assert_eq!("bf16-fast".parse::<MathMode>().unwrap(), MathMode::Bf16Fast);
        assert!("int4".parse::<Quantize>().is_err());
        assert!("tf32".parse::<MathMode>().is_err());
    }
}
