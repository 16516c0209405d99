//! The sentence-transformers layout: `modules.json` (Transformer, Pooling, Dense, Normalize), the
//! Pooling and Dense modules' folders, and `sentence_bert_config.json`, as both generations of
//! sentence-transformers write them: module types `sentence_transformers.models.Pooling` (up to
//! 5.x) or `sentence_transformers.sentence_transformer.modules.pooling.Pooling` and
//! `sentence_transformers.base.modules.dense.Dense` (6.x); pooling as boolean
//! `pooling_mode_*_tokens` flags or one `pooling_mode` string; the longest input from
//! `sentence_bert_config.json`'s `max_seq_length` or else `tokenizer_config.json`'s
//! `model_max_length`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_engine::ir::{Activation, PoolMode};
use serde::Deserialize;

use crate::error::{ModelError, Result, read_json};

/// A sentence-transformers `Dense` module: `activation(W·x + b)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dense {
    /// Its `model.safetensors`, relative to the model folder (`linear.weight`, `linear.bias`).
    pub weights: PathBuf,
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
    /// `None`: identity.
    pub activation: Option<Activation>,
}

/// What follows pooling, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Dense(Dense),
    Normalize,
}

/// How token states become one embedding, as the folder describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipeline {
    pub pooling: PoolMode,
    /// The modules after pooling, a final Normalize excluded (that one is `normalize`).
    pub steps: Vec<Step>,
    /// Whether the chain ends with Normalize.
    pub normalize: bool,
    /// `max_seq_length` from `sentence_bert_config.json`, else `model_max_length` from
    /// `tokenizer_config.json` when it is a real limit.
    pub max_seq_length: Option<usize>,
    /// Whether the folder has `modules.json` at all (otherwise defaults were used).
    pub declared: bool,
    /// The prompts of `config_sentence_transformers.json` by name (e.g. `query`), and the one
    /// used when a request names none.
    pub prompts: BTreeMap<String, String>,
    pub default_prompt_name: Option<String>,
    /// The files read to describe the pipeline (they shape the compiled plan).
    pub files: Vec<std::path::PathBuf>,
}

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct PoolingConfig {
    /// sentence-transformers 6: one mode by name.
    #[serde(default)]
    pooling_mode: Option<serde_json::Value>,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
    #[serde(default)]
    include_prompt: Option<bool>,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

#[derive(Deserialize, Default)]
struct SentenceTransformersConfig {
    #[serde(default)]
    prompts: BTreeMap<String, String>,
    #[serde(default)]
    default_prompt_name: Option<String>,
}

#[derive(Deserialize)]
struct TokenizerConfig {
    model_max_length: Option<f64>,
}

#[derive(Deserialize)]
struct DenseConfig {
    in_features: usize,
    out_features: usize,
    #[serde(default = "yes")]
    bias: bool,
    #[serde(default)]
    activation_function: Option<String>,
}

fn yes() -> bool {
    true
}

/// A module type's class name (`Pooling`, ...) when it is one of sentence-transformers'.
fn module_class(kind: &str) -> Option<&str> {
    kind.strip_prefix("sentence_transformers.")?
        .rsplit('.')
        .next()
}

/// `torch.nn.modules.activation.Tanh` and the like; `Ok(None)` for the identity.
fn activation(name: &str, path: &Path) -> Result<Option<Activation>> {
    let class = name.rsplit('.').next().unwrap_or(name);
    Ok(Some(match class {
        "Identity" => return Ok(None),
        "Tanh" => Activation::Tanh,
        "ReLU" => Activation::Relu,
        "GELU" => Activation::Gelu,
        "SiLU" => Activation::Silu,
        _ => {
            return Err(ModelError::Unsupported(format!(
                "{}: Dense activation `{name}` (kiln runs Identity, Tanh, ReLU, GELU, SiLU)",
                path.display()
            )));
        }
    }))
}

/// The `model_max_length` of `tokenizer_config.json`, unless it is transformers' "no limit"
/// (a huge number).
fn tokenizer_max_length(dir: &Path) -> Result<Option<usize>> {
    let p = dir.join("tokenizer_config.json");
    if !p.is_file() {
        return Ok(None);
    }
    let c: TokenizerConfig = read_json(&p)?;
    Ok(c.model_max_length
        .filter(|n| *n >= 2.0 && *n <= 1e7)
        .map(|n| n as usize))
}

impl Pipeline {
    /// Reads the folder's sentence-transformers files. Without `modules.json`, the encoder is
    /// pooled by masked mean and not normalised (what TEI and sentence-transformers do for a bare
    /// Hugging Face encoder).
    pub fn load(dir: &Path) -> Result<Self> {
        let mut files = Vec::new();
        let max_seq_length = {
            let p = dir.join("sentence_bert_config.json");
            if p.exists() {
                files.push(p.clone());
                let c: SentenceBertConfig = read_json(&p)?;
                if c.max_seq_length == Some(0) {
                    return Err(ModelError::file(&p, "max_seq_length must be positive"));
                }
                c.max_seq_length
            } else {
                None
            }
        };
        let max_seq_length = match max_seq_length {
            Some(n) => Some(n),
            None => tokenizer_max_length(dir)?,
        };
        let st_config = {
            let p = dir.join("config_sentence_transformers.json");
            if p.is_file() {
                let c: SentenceTransformersConfig = read_json(&p)?;
                if let Some(name) = &c.default_prompt_name
                    && !c.prompts.contains_key(name)
                {
                    return Err(ModelError::file(
                        &p,
                        format!("default_prompt_name `{name}` is not one of its prompts"),
                    ));
                }
                c
            } else {
                SentenceTransformersConfig::default()
            }
        };
        let (prompts, default_prompt_name) = (st_config.prompts, st_config.default_prompt_name);
        let modules_path = dir.join("modules.json");
        if !modules_path.exists() {
            return Ok(Self {
                pooling: PoolMode::Mean,
                steps: Vec::new(),
                normalize: false,
                max_seq_length,
                declared: false,
                prompts,
                default_prompt_name,
                files,
            });
        }
        let modules: Vec<ModuleEntry> = read_json(&modules_path)?;
        files.push(modules_path.clone());
        let mut pooling = None;
        let mut steps = Vec::new();
        for (i, m) in modules.iter().enumerate() {
            let unsupported = |why: &str| {
                Err(ModelError::Unsupported(format!(
                    "{}: module {i} of type `{}`{why} (kiln runs Transformer → Pooling → Dense or Normalize, any number of them)",
                    modules_path.display(),
                    m.kind
                )))
            };
            match module_class(&m.kind) {
                Some("Transformer") if i == 0 => {}
                Some("Pooling") if pooling.is_none() && i == 1 => {
                    let p = dir.join(&m.path).join("config.json");
                    pooling = Some(read_pooling(&p)?);
                    files.push(p);
                }
                Some("Dense") if pooling.is_some() => {
                    let folder = dir.join(&m.path);
                    let p = folder.join("config.json");
                    let c: DenseConfig = read_json(&p)?;
                    if c.in_features == 0 || c.out_features == 0 {
                        return Err(ModelError::file(
                            &p,
                            "in_features and out_features must be positive",
                        ));
                    }
                    let weights = folder.join("model.safetensors");
                    if !weights.is_file() {
                        return Err(ModelError::Unsupported(format!(
                            "{}: no model.safetensors (kiln reads safetensors weights only, not pytorch_model.bin)",
                            folder.display()
                        )));
                    }
                    let activation = match &c.activation_function {
                        Some(name) => activation(name, &p)?,
                        None => None,
                    };
                    files.push(p);
                    files.push(weights);
                    steps.push(Step::Dense(Dense {
                        weights: PathBuf::from(&m.path).join("model.safetensors"),
                        in_features: c.in_features,
                        out_features: c.out_features,
                        bias: c.bias,
                        activation,
                    }));
                }
                Some("Normalize") if pooling.is_some() => steps.push(Step::Normalize),
                Some("Transformer" | "Pooling" | "Dense" | "Normalize") => {
                    return unsupported(" at this place");
                }
                _ => return unsupported(""),
            }
        }
        let pooling =
            pooling.ok_or_else(|| ModelError::file(&modules_path, "no Pooling module"))?;
        let normalize = steps.last() == Some(&Step::Normalize);
        if normalize {
            steps.pop();
        }
        Ok(Self {
            pooling,
            steps,
            normalize,
            max_seq_length,
            declared: true,
            prompts,
            default_prompt_name,
            files,
        })
    }

    /// The embedding's width after the Dense modules (`hidden` when there are none); an error
    /// when a Dense module's input does not match what comes before it.
    pub fn output_width(&self, hidden: usize) -> Result<usize> {
        let mut width = hidden;
        for step in &self.steps {
            if let Step::Dense(d) = step {
                if d.in_features != width {
                    return Err(ModelError::Unsupported(format!(
                        "{}: a Dense module takes {} features but gets {width}",
                        d.weights.display(),
                        d.in_features
                    )));
                }
                width = d.out_features;
            }
        }
        Ok(width)
    }
}

fn read_pooling(path: &Path) -> Result<PoolMode> {
    let c: PoolingConfig = read_json(path)?;
    if let Some(mode) = &c.pooling_mode {
        let name = match mode {
            serde_json::Value::String(s) => s.as_str(),
            serde_json::Value::Array(a) if a.len() == 1 => a[0].as_str().unwrap_or(""),
            _ => {
                return Err(ModelError::Unsupported(format!(
                    "{}: pooling_mode {mode} (one mode; concatenated embeddings are not supported)",
                    path.display()
                )));
            }
        };
        if c.include_prompt == Some(false) {
            return Err(ModelError::Unsupported(format!(
                "{}: pooling with include_prompt=false",
                path.display()
            )));
        }
        return match name {
            "mean" => Ok(PoolMode::Mean),
            "cls" => Ok(PoolMode::Cls),
            "max" => Ok(PoolMode::Max),
            other => Err(ModelError::Unsupported(format!(
                "{}: pooling mode `{other}` (kiln runs mean, cls, max)",
                path.display()
            ))),
        };
    }
    let unsupported = [
        (c.pooling_mode_mean_sqrt_len_tokens, "mean_sqrt_len_tokens"),
        (c.pooling_mode_weightedmean_tokens, "weightedmean_tokens"),
        (c.pooling_mode_lasttoken, "lasttoken"),
        (c.include_prompt == Some(false), "include_prompt=false"),
    ];
    if let Some((_, name)) = unsupported.iter().find(|(on, _)| *on) {
        return Err(ModelError::Unsupported(format!(
            "{}: pooling mode {name}",
            path.display()
        )));
    }
    match (
        c.pooling_mode_cls_token,
        c.pooling_mode_mean_tokens,
        c.pooling_mode_max_tokens,
    ) {
        (true, false, false) => Ok(PoolMode::Cls),
        (false, true, false) => Ok(PoolMode::Mean),
        (false, false, true) => Ok(PoolMode::Max),
        (false, false, false) => Err(ModelError::file(path, "no pooling mode is enabled")),
        _ => Err(ModelError::Unsupported(format!(
            "{}: several pooling modes at once (concatenated embeddings)",
            path.display()
        ))),
    }
}
