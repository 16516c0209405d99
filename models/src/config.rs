//! `config.json` of a BERT-family model.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_engine::ir::Activation;
use serde::Deserialize;

use crate::error::{ModelError, Result, read_json};

/// What the model folder's head computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// A bare encoder: embeddings come from pooling its hidden states.
    Encoder,
    /// `BertForSequenceClassification`: logits over `id2label`.
    SequenceClassification,
}

/// The fields of a Hugging Face BERT `config.json` that change the computation.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    // DistilBERT names these `dim`, `n_layers`, `n_heads`, `hidden_dim` and `activation`.
    #[serde(alias = "dim")]
    pub hidden_size: usize,
    #[serde(alias = "n_layers")]
    pub num_hidden_layers: usize,
    #[serde(alias = "n_heads")]
    pub num_attention_heads: usize,
    #[serde(alias = "hidden_dim")]
    pub intermediate_size: usize,
    #[serde(default = "default_act", alias = "activation")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    /// RoBERTa's position ids start after it (`padding_idx + 1`).
    #[serde(default)]
    pub pad_token_id: Option<usize>,
    #[serde(default)]
    pub id2label: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub num_labels: Option<usize>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

/// The encoder classes embeddings come from.
pub const ENCODERS: [&str; 7] = [
    "BertModel",
    "BertForMaskedLM",
    "BertForPreTraining",
    "RobertaModel",
    "XLMRobertaModel",
    "CamembertModel",
    "DistilBertModel",
];
/// The encoder classes with a classification head.
pub const CLASSIFIERS: [&str; 5] = [
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification",
    "CamembertForSequenceClassification",
    "DistilBertForSequenceClassification",
];

/// The `model_type`s of the BERT family that share this graph.
const MODEL_TYPES: [&str; 5] = ["bert", "roberta", "xlm-roberta", "camembert", "distilbert"];

/// BERT; RoBERTa and its kin (XLM-R, CamemBERT): the same layers, with RoBERTa's position ids
/// counted from `padding_idx + 1`, one token type, and its own classification head; DistilBERT:
/// BERT's layers under other names, no token types, and a `pre_classifier` + ReLU head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Bert,
    Roberta,
    DistilBert,
}

impl BertConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let value: serde_json::Value = read_json(path)?;
        // The architecture first: another family's config lacks BERT's fields, and saying which
        // architecture is not supported helps more than naming a missing field.
        let names: Vec<String> = value
            .get("architectures")
            .and_then(|a| serde_json::from_value(a.clone()).ok())
            .unwrap_or_default();
        architecture_of(&names)
            .map_err(|m| ModelError::Unsupported(format!("{}: {m}", path.display())))?;
        let config: BertConfig = serde_json::from_value(value)
            .map_err(|e| ModelError::file(path, format!("invalid JSON: {e}")))?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(ModelError::file(path, msg));
        self.architecture()
            .map_err(|m| ModelError::Unsupported(format!("{}: {m}", path.display())))?;
        if let Some(t) = &self.model_type
            && !MODEL_TYPES.contains(&t.as_str())
        {
            return Err(ModelError::Unsupported(format!(
                "{}: model_type `{t}` is not supported ({})",
                path.display(),
                crate::supported_architectures()
            )));
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return bad(format!(
                "layer_norm_eps {} must be positive",
                self.layer_norm_eps
            ));
        }
        if let Some(p) = &self.position_embedding_type
            && p != "absolute"
        {
            return Err(ModelError::Unsupported(format!(
                "{}: position_embedding_type `{p}` (only `absolute` is implemented)",
                path.display()
            )));
        }
        self.activation().map_err(|m| ModelError::file(path, m))?;
        Ok(())
    }

    pub fn activation(&self) -> Result<Activation, String> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            "silu" | "swish" => Ok(Activation::Silu),
            other => Err(format!("hidden_act `{other}` is not supported")),
        }
    }

    pub fn architecture(&self) -> Result<Architecture, String> {
        architecture_of(&self.architectures)
    }

    pub fn family(&self) -> Family {
        let distil = self.model_type.as_deref() == Some("distilbert")
            || self
                .architectures
                .iter()
                .any(|a| a.starts_with("DistilBert"));
        if distil {
            return Family::DistilBert;
        }
        let roberta_type = matches!(
            self.model_type.as_deref(),
            Some("roberta" | "xlm-roberta" | "camembert")
        );
        let roberta_class = self.architectures.iter().any(|a| {
            a.starts_with("Roberta") || a.starts_with("XLMRoberta") || a.starts_with("Camembert")
        });
        if roberta_type || roberta_class {
            Family::Roberta
        } else {
            Family::Bert
        }
    }

    /// What position ids start at: 0, or RoBERTa's `padding_idx + 1`.
    pub fn position_offset(&self) -> usize {
        match self.family() {
            Family::Bert | Family::DistilBert => 0,
            Family::Roberta => self.pad_token_id.unwrap_or(1) + 1,
        }
    }

    /// The longest sequence the position table allows.
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.position_offset())
    }

    /// Labels in id order: `id2label` if given, else `LABEL_0..LABEL_{n-1}`.
    pub fn labels(&self, num_labels: usize) -> Vec<String> {
        (0..num_labels)
            .map(|i| {
                self.id2label
                    .as_ref()
                    .and_then(|m| m.get(&i.to_string()).cloned())
                    .unwrap_or_else(|| format!("LABEL_{i}"))
            })
            .collect()
    }
}

/// What `config.json`'s `architectures` ask for (none: a bare encoder).
fn architecture_of(architectures: &[String]) -> Result<Architecture, String> {
    if architectures.is_empty() {
        return Ok(Architecture::Encoder);
    }
    for a in architectures {
        if CLASSIFIERS.contains(&a.as_str()) {
            return Ok(Architecture::SequenceClassification);
        }
        if ENCODERS.contains(&a.as_str()) {
            return Ok(Architecture::Encoder);
        }
    }
    Err(format!(
        "architecture `{}` is not supported ({})",
        architectures.join("`, `"),
        crate::supported_architectures()
    ))
}
