//! The sentence-transformers layout: `modules.json`, `1_Pooling/config.json`, Normalize and
//! `sentence_bert_config.json`.

use std::path::Path;

use kiln_engine::ir::PoolMode;
use serde::Deserialize;

use crate::error::{ModelError, Result, read_json};

/// How token states become one embedding, as the folder describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipeline {
    pub pooling: PoolMode,
    pub normalize: bool,
    /// `max_seq_length` from `sentence_bert_config.json`, when present.
    pub max_seq_length: Option<usize>,
    /// Whether the folder has `modules.json` at all (otherwise defaults were used).
    pub declared: bool,
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

const TRANSFORMER: &str = "sentence_transformers.models.Transformer";
const POOLING: &str = "sentence_transformers.models.Pooling";
const NORMALIZE: &str = "sentence_transformers.models.Normalize";

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
        let modules_path = dir.join("modules.json");
        if !modules_path.exists() {
            return Ok(Self {
                pooling: PoolMode::Mean,
                normalize: false,
                max_seq_length,
                declared: false,
                files,
            });
        }
        let modules: Vec<ModuleEntry> = read_json(&modules_path)?;
        files.push(modules_path.clone());
        let mut pooling = None;
        let mut normalize = false;
        for (i, m) in modules.iter().enumerate() {
            match m.kind.as_str() {
                TRANSFORMER if i == 0 => {}
                POOLING => {
                    let p = dir.join(&m.path).join("config.json");
                    pooling = Some(read_pooling(&p)?);
                    files.push(p);
                }
                NORMALIZE => normalize = true,
                other => {
                    return Err(ModelError::Unsupported(format!(
                        "{}: module {i} of type `{other}` (kiln runs Transformer → Pooling → Normalize)",
                        modules_path.display()
                    )));
                }
            }
        }
        let pooling =
            pooling.ok_or_else(|| ModelError::file(&modules_path, "no Pooling module"))?;
        Ok(Self {
            pooling,
            normalize,
            max_seq_length,
            declared: true,
            files,
        })
    }
}

fn read_pooling(path: &Path) -> Result<PoolMode> {
    let c: PoolingConfig = read_json(path)?;
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
