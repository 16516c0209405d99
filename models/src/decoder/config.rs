//! `config.json` and `generation_config.json` of a causal LM (GPT-2, and the Llama family with
//! Qwen2 and Qwen3), in both the transformers 4 spelling (top-level `rope_theta`,
//! `rope_scaling`, `torch_dtype`) and the transformers 5 one (`rope_parameters`, `dtype`).

use std::path::Path;

use kiln_engine::ir::Activation;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result, read_json};

/// Which decoder family a folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderArch {
    /// `GPT2LMHeadModel`: learned positions, LayerNorm, `gelu_new`, Conv1D weights.
    Gpt2,
    /// `LlamaForCausalLM`: RoPE, RMSNorm, SwiGLU, grouped-query attention; also Qwen2 (biases
    /// on q, k and v) and Qwen3 (per-head RMSNorm on q and k), which are Llama's graph with
    /// those changes.
    Llama,
}

/// RoPE frequency scaling, as `rope_scaling` / `rope_parameters` name it.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// NTK-aware scaling that grows the base once a sequence passes the original context.
    Dynamic {
        factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Llama 3.1's wavelength-dependent interpolation.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// YaRN: interpolation blended with extrapolation by a linear ramp, with an attention
    /// factor applied to cos and sin.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
}

/// Rotary embedding settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// Channels per head that rotate (`head_dim · partial_rotary_factor`).
    pub rotary_dim: usize,
    pub scaling: RopeScaling,
    pub max_position_embeddings: usize,
}

/// Everything about a decoder that changes its computation.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub arch: DecoderArch,
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    /// Longest context the position table (GPT-2) or RoPE setting (Llama) allows.
    pub max_position_embeddings: usize,
    pub norm_eps: f32,
    pub activation: Activation,
    pub tie_word_embeddings: bool,
    /// Biases on the attention's output projection (and, with `qkv_bias`, on q, k and v).
    pub attention_bias: bool,
    /// Biases on the q, k and v projections (Llama's `attention_bias`; always on for Qwen2).
    pub qkv_bias: bool,
    /// Qwen3: RMSNorm over each head's query and key (`q_norm`, `k_norm`) before RoPE.
    pub qk_norm: bool,
    pub mlp_bias: bool,
    pub rope: Option<RopeConfig>,
    /// GPT-2's `scale_attn_by_inverse_layer_idx`.
    pub scale_by_inverse_layer: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// Token ids given as a number or a list of numbers.
fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|n| n as u32))
            .collect(),
        _ => Vec::new(),
    }
}

fn activation(name: &str) -> std::result::Result<Activation, String> {
    match name {
        "gelu" => Ok(Activation::Gelu),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
        "relu" => Ok(Activation::Relu),
        "silu" | "swish" => Ok(Activation::Silu),
        other => Err(format!("activation `{other}` is not supported")),
    }
}

#[derive(Deserialize)]
struct Gpt2Raw {
    vocab_size: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    #[serde(default)]
    n_inner: Option<usize>,
    n_positions: usize,
    #[serde(default = "gpt2_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "gpt2_act")]
    activation_function: String,
    #[serde(default = "yes")]
    tie_word_embeddings: bool,
    #[serde(default = "yes")]
    scale_attn_weights: bool,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    add_cross_attention: bool,
}

fn gpt2_eps() -> f64 {
    1e-5
}
fn gpt2_act() -> String {
    "gelu_new".into()
}
fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct LlamaRaw {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    intermediate_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "llama_eps")]
    rms_norm_eps: f64,
    #[serde(default = "llama_act")]
    hidden_act: String,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<Value>,
    #[serde(default)]
    rope_parameters: Option<Value>,
    #[serde(default)]
    partial_rotary_factor: Option<f64>,
    #[serde(default)]
    pretraining_tp: Option<usize>,
}

fn llama_eps() -> f64 {
    1e-6
}
fn llama_act() -> String {
    "silu".into()
}

/// The architectures kiln generates with.
pub const DECODER_ARCHITECTURES: [&str; 4] = [
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
];

/// Whether a `config.json` describes a causal LM kiln can serve (read before choosing the
/// encoder or the decoder path).
pub fn is_causal_lm(config: &Path) -> Result<bool> {
    let v: Value = read_json(config)?;
    let archs = v
        .get("architectures")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let named = archs
        .iter()
        .filter_map(Value::as_str)
        .any(|a| a.ends_with("ForCausalLM") || a.ends_with("LMHeadModel"));
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    Ok(named || matches!(model_type, "gpt2" | "llama" | "qwen2" | "qwen3"))
}

impl DecoderConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let v: Value = read_json(path)?;
        let bad = |m: String| ModelError::file(path, m);
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let architecture = v
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let arch = match (model_type.as_str(), architecture.as_str()) {
            ("gpt2", _) | (_, "GPT2LMHeadModel") => DecoderArch::Gpt2,
            ("llama" | "qwen2" | "qwen3", _)
            | (_, "LlamaForCausalLM" | "Qwen2ForCausalLM" | "Qwen3ForCausalLM") => {
                DecoderArch::Llama
            }
            _ => {
                return Err(ModelError::Unsupported(format!(
                    "{}: architecture `{architecture}` (model_type `{model_type}`) is not supported ({})",
                    path.display(),
                    crate::supported_architectures()
                )));
            }
        };
        let parse = |e: serde_json::Error| bad(format!("invalid config: {e}"));
        let bos_token_id = ids_of(v.get("bos_token_id")).first().copied();
        let eos_token_ids = ids_of(v.get("eos_token_id"));
        let cfg = match arch {
            DecoderArch::Gpt2 => {
                let r: Gpt2Raw = serde_json::from_value(v.clone()).map_err(parse)?;
                if r.add_cross_attention {
                    return Err(ModelError::Unsupported(format!(
                        "{}: GPT-2 with cross-attention (an encoder-decoder) is not a causal LM",
                        path.display()
                    )));
                }
                if !r.scale_attn_weights {
                    return Err(ModelError::Unsupported(format!(
                        "{}: scale_attn_weights = false",
                        path.display()
                    )));
                }
                DecoderConfig {
                    arch,
                    architecture: if architecture.is_empty() {
                        "GPT2LMHeadModel".into()
                    } else {
                        architecture
                    },
                    vocab_size: r.vocab_size,
                    hidden_size: r.n_embd,
                    num_layers: r.n_layer,
                    num_heads: r.n_head,
                    num_kv_heads: r.n_head,
                    head_dim: r.n_embd.checked_div(r.n_head).unwrap_or(0),
                    intermediate_size: r.n_inner.unwrap_or(4 * r.n_embd),
                    max_position_embeddings: r.n_positions,
                    norm_eps: r.layer_norm_epsilon as f32,
                    activation: activation(&r.activation_function).map_err(bad)?,
                    tie_word_embeddings: r.tie_word_embeddings,
                    attention_bias: true,
                    qkv_bias: true,
                    qk_norm: false,
                    mlp_bias: true,
                    rope: None,
                    scale_by_inverse_layer: r.scale_attn_by_inverse_layer_idx,
                    bos_token_id,
                    eos_token_ids,
                }
            }
            DecoderArch::Llama => {
                let r: LlamaRaw = serde_json::from_value(v.clone()).map_err(parse)?;
                let qwen2 = model_type == "qwen2" || architecture == "Qwen2ForCausalLM";
                let qwen3 = model_type == "qwen3" || architecture == "Qwen3ForCausalLM";
                // Qwen's sliding-window attention is off unless `use_sliding_window` says so.
                if (qwen2 || qwen3)
                    && v.get("use_sliding_window").and_then(Value::as_bool) == Some(true)
                {
                    return Err(ModelError::Unsupported(format!(
                        "{}: use_sliding_window = true (sliding-window attention)",
                        path.display()
                    )));
                }
                if r.pretraining_tp.is_some_and(|tp| tp > 1) {
                    tracing::info!(
                        "pretraining_tp > 1 only changes how training sliced the matmuls; ignored"
                    );
                }
                let heads = r.num_attention_heads;
                let head_dim = r
                    .head_dim
                    .unwrap_or(r.hidden_size.checked_div(heads).unwrap_or(0));
                let rope = rope_config(&r, head_dim, r.max_position_embeddings, path)?;
                DecoderConfig {
                    arch,
                    architecture: if architecture.is_empty() {
                        "LlamaForCausalLM".into()
                    } else {
                        architecture
                    },
                    vocab_size: r.vocab_size,
                    hidden_size: r.hidden_size,
                    num_layers: r.num_hidden_layers,
                    num_heads: heads,
                    num_kv_heads: r.num_key_value_heads.unwrap_or(heads),
                    head_dim,
                    intermediate_size: r.intermediate_size,
                    max_position_embeddings: r.max_position_embeddings,
                    norm_eps: r.rms_norm_eps as f32,
                    activation: activation(&r.hidden_act).map_err(bad)?,
                    tie_word_embeddings: r.tie_word_embeddings,
                    attention_bias: r.attention_bias,
                    qkv_bias: r.attention_bias || qwen2,
                    qk_norm: qwen3,
                    mlp_bias: r.mlp_bias,
                    rope: Some(rope),
                    scale_by_inverse_layer: false,
                    bos_token_id,
                    eos_token_ids,
                }
            }
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(ModelError::file(path, m));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden size", self.hidden_size),
            ("layers", self.num_layers),
            ("attention heads", self.num_heads),
            ("key/value heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("intermediate size", self.intermediate_size),
            ("max positions", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.arch == DecoderArch::Gpt2 && !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(format!(
                "n_embd {} is not divisible by n_head {}",
                self.hidden_size, self.num_heads
            ));
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return bad(format!("norm epsilon {} must be positive", self.norm_eps));
        }
        if let Some(r) = &self.rope
            && (r.rotary_dim == 0 || r.rotary_dim > self.head_dim || r.rotary_dim % 2 != 0)
        {
            return bad(format!(
                "rotary dimension {} must be even and in 2..={}",
                r.rotary_dim, self.head_dim
            ));
        }
        Ok(())
    }
}

/// RoPE settings from either spelling: transformers 5's `rope_parameters` (with `rope_theta`
/// and `rope_type` inside) or transformers 4's top-level `rope_theta` plus `rope_scaling`.
fn rope_config(r: &LlamaRaw, head_dim: usize, max_pos: usize, path: &Path) -> Result<RopeConfig> {
    let bad = |m: String| ModelError::file(path, m);
    let params = r
        .rope_parameters
        .as_ref()
        .filter(|v| v.is_object())
        .or(r.rope_scaling.as_ref().filter(|v| v.is_object()));
    let get = |k: &str| params.and_then(|p| p.get(k));
    let num = |k: &str| get(k).and_then(Value::as_f64);
    let theta = num("rope_theta").or(r.rope_theta).unwrap_or(10000.0);
    if !(theta > 1.0 && theta.is_finite()) {
        return Err(bad(format!("rope_theta {theta} must be greater than 1")));
    }
    let partial = num("partial_rotary_factor")
        .or(r.partial_rotary_factor)
        .unwrap_or(1.0);
    let rotary_dim = ((head_dim as f64) * partial) as usize;
    let kind = get("rope_type")
        .or(get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = || {
        num("factor")
            .filter(|f| *f >= 1.0 && f.is_finite())
            .ok_or_else(|| bad(format!("rope scaling `{kind}` needs a factor >= 1")))
    };
    let original = num("original_max_position_embeddings").map(|v| v as usize);
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "dynamic" => RopeScaling::Dynamic {
            factor: factor()?,
            original_max_position_embeddings: original.unwrap_or(max_pos),
        },
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: num("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: num("high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: original.unwrap_or(8192),
        },
        "yarn" => RopeScaling::Yarn {
            factor: factor()?,
            original_max_position_embeddings: original.unwrap_or(max_pos),
            beta_fast: num("beta_fast").unwrap_or(32.0),
            beta_slow: num("beta_slow").unwrap_or(1.0),
            attention_factor: num("attention_factor"),
            mscale: num("mscale"),
            mscale_all_dim: num("mscale_all_dim"),
            truncate: get("truncate").and_then(Value::as_bool).unwrap_or(true),
        },
        other => {
            return Err(ModelError::Unsupported(format!(
                "{}: rope type `{other}` (kiln implements default, linear, dynamic, llama3 and yarn)",
                path.display()
            )));
        }
    };
    if let RopeScaling::Llama3 {
        low_freq_factor,
        high_freq_factor,
        ..
    } = scaling
        && high_freq_factor <= low_freq_factor
    {
        return Err(bad(
            "llama3 rope scaling needs high_freq_factor > low_freq_factor".into(),
        ));
    }
    Ok(RopeConfig {
        theta,
        rotary_dim,
        scaling,
        max_position_embeddings: max_pos,
    })
}

/// Defaults from `generation_config.json` (all optional), which a request's own settings
/// override.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub eos_token_ids: Vec<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationDefaults {
    /// Reads `generation_config.json` if the folder has one.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let v: Value = read_json(&path)?;
        let f = |k: &str| v.get(k).and_then(Value::as_f64);
        Ok(Self {
            eos_token_ids: ids_of(v.get("eos_token_id")),
            do_sample: v.get("do_sample").and_then(Value::as_bool),
            temperature: f("temperature").map(|x| x as f32),
            top_k: v.get("top_k").and_then(Value::as_u64).map(|x| x as usize),
            top_p: f("top_p").map(|x| x as f32),
            repetition_penalty: f("repetition_penalty").map(|x| x as f32),
            max_new_tokens: v
                .get("max_new_tokens")
                .and_then(Value::as_u64)
                .map(|x| x as usize),
        })
    }
}
