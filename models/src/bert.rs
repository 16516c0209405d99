//! BERT-family encoders as an engine graph: embeddings, `num_hidden_layers` post-norm encoder
//! layers, and the head the folder asks for (pooling and the sentence-transformers modules for
//! embeddings; a classification head). RoBERTa, XLM-R and CamemBERT are BERT with positions
//! from `padding_idx + 1` and their own head; DistilBERT is BERT without token types under
//! other parameter names ([`crate::config::Family`]).

/// Layers `int8-static` keeps in f32 unless the user sets an allow or deny list: the
/// feed-forward block (`intermediate.dense`, and `*.output.dense`, which also covers the
/// attention output projection). Measured on all-MiniLM-L6-v2's fixtures, calibrated on
/// tests/data/calibration.jsonl with the min-max observer: every layer int8 gives min cosine
/// 0.973 / mean 0.991; this list gives 0.994 / 0.999. A per-tensor activation scale cannot
/// follow BERT's few large-magnitude channels after the LayerNorms and GELU, while the per-token
/// scales of int8-dynamic can (all layers int8: within the bounds).
pub const STATIC_INT8_DEFAULT_DENY: &[&str] = &["*.intermediate.dense", "*.output.dense"];

use kiln_engine::ir::{
    Activation, AttnMask, ConstRole, DType, Dim, GraphBuilder, Op, PoolMode, ValueId,
};

use crate::config::{BertConfig, Family};
use crate::error::Result;
use crate::st::Step;
use crate::weights::SafetensorsFile;

/// Names of the graph's inputs (I64 `[batch, seq]`, `[1, tokens]` when packed) and outputs.
pub mod names {
    pub const INPUT_IDS: &str = "input_ids";
    pub const TOKEN_TYPE_IDS: &str = "token_type_ids";
    pub const POSITION_IDS: &str = "position_ids";
    pub const ATTENTION_MASK: &str = "attention_mask";
    /// Packed layout only: I64 `[sequences]`, the length of each sequence.
    pub const SEQUENCE_LENGTHS: &str = "sequence_lengths";

    pub const LAST_HIDDEN_STATE: &str = "last_hidden_state";
    pub const POOLER_OUTPUT: &str = "pooler_output";
    /// The embedding as the model folder defines it (normalised if it has a Normalize module).
    pub const SENTENCE_EMBEDDING: &str = "sentence_embedding";
    /// Pooled, never normalised.
    pub const POOLED_EMBEDDING: &str = "pooled_embedding";
    /// Pooled, always L2-normalised.
    pub const NORMALIZED_EMBEDDING: &str = "normalized_embedding";
    pub const LOGITS: &str = "logits";
    pub const PROBABILITIES: &str = "probabilities";
}

/// How a batch of sequences is laid out for the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchLayout {
    /// Sequences packed back to back as `[1, tokens]` with their lengths: no padding is
    /// computed, and attention runs the varlen kernels.
    #[default]
    Packed,
    /// Right-padded to the longest sequence as `[batch, seq]` with an attention mask.
    Padded,
}

impl std::str::FromStr for BatchLayout {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "packed" | "varlen" => Ok(BatchLayout::Packed),
            "padded" => Ok(BatchLayout::Padded),
            other => Err(format!(
                "unknown batch layout `{other}` (expected packed or padded)"
            )),
        }
    }
}

/// What to put on top of the encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// Pool the last hidden state, run the sentence-transformers modules that follow (Dense,
    /// Normalize) and optionally L2-normalise: `sentence_embedding`.
    Embedding {
        pooling: PoolMode,
        steps: Vec<Step>,
        normalize: bool,
    },
    /// Pooler (`tanh(W·h_cls + b)`) and `classifier`: `logits` and `probabilities`.
    Classifier { num_labels: usize },
}

/// One encoder layer's parameter names (BERT's and RoBERTa's, or DistilBERT's).
struct LayerNames {
    prefix: String,
    query: String,
    key: String,
    value: String,
    attention_output: String,
    attention_norm: String,
    intermediate: String,
    output: String,
    output_norm: String,
}

impl LayerNames {
    fn of(family: Family, layer: usize) -> Self {
        match family {
            Family::DistilBert => {
                let p = format!("transformer.layer.{layer}");
                Self {
                    query: format!("{p}.attention.q_lin"),
                    key: format!("{p}.attention.k_lin"),
                    value: format!("{p}.attention.v_lin"),
                    attention_output: format!("{p}.attention.out_lin"),
                    attention_norm: format!("{p}.sa_layer_norm"),
                    intermediate: format!("{p}.ffn.lin1"),
                    output: format!("{p}.ffn.lin2"),
                    output_norm: format!("{p}.output_layer_norm"),
                    prefix: p,
                }
            }
            Family::Bert | Family::Roberta => {
                let p = format!("encoder.layer.{layer}");
                Self {
                    query: format!("{p}.attention.self.query"),
                    key: format!("{p}.attention.self.key"),
                    value: format!("{p}.attention.self.value"),
                    attention_output: format!("{p}.attention.output.dense"),
                    attention_norm: format!("{p}.attention.output.LayerNorm"),
                    intermediate: format!("{p}.intermediate.dense"),
                    output: format!("{p}.output.dense"),
                    output_norm: format!("{p}.output.LayerNorm"),
                    prefix: p,
                }
            }
        }
    }
}

struct Ctx<'a> {
    g: GraphBuilder,
    w: &'a SafetensorsFile,
}

impl Ctx<'_> {
    fn weight(&mut self, name: &str, shape: &[usize], role: ConstRole) -> Result<ValueId> {
        let t = self.w.encoder(name, shape)?;
        Ok(self.g.constant(name, t, role)?)
    }

    fn full_weight(&mut self, name: &str, shape: &[usize], role: ConstRole) -> Result<ValueId> {
        let t = self.w.tensor(name, shape)?;
        Ok(self.g.constant(name, t, role)?)
    }

    fn linear(&mut self, x: ValueId, prefix: &str, out: usize, inn: usize) -> Result<ValueId> {
        let w = self.weight(
            &format!("{prefix}.weight"),
            &[out, inn],
            ConstRole::LinearWeight,
        )?;
        let b = self.weight(&format!("{prefix}.bias"), &[out], ConstRole::Other)?;
        Ok(self.g.push(Op::Linear, &[x, w, b], prefix)?)
    }

    fn layer_norm(&mut self, x: ValueId, prefix: &str, h: usize, eps: f32) -> Result<ValueId> {
        let g = self.weight(&format!("{prefix}.weight"), &[h], ConstRole::Other)?;
        let b = self.weight(&format!("{prefix}.bias"), &[h], ConstRole::Other)?;
        Ok(self.g.push(Op::LayerNorm { eps }, &[x, g, b], prefix)?)
    }
}

/// Builds the graph. Weight names are Hugging Face's, with or without the `bert.` prefix.
pub fn build(
    cfg: &BertConfig,
    weights: &SafetensorsFile,
    head: Head,
    layout: BatchLayout,
) -> Result<kiln_engine::ir::Graph> {
    let h = cfg.hidden_size;
    let eps = cfg.layer_norm_eps as f32;
    let act = cfg
        .activation()
        .map_err(|m| crate::ModelError::file(weights.path(), m))?;
    let mut c = Ctx {
        g: GraphBuilder::new(),
        w: weights,
    };
    let bs = [Dim::Batch, Dim::Seq];
    let ids = c.g.input(names::INPUT_IDS, DType::I64, &bs)?;
    let types = c.g.input(names::TOKEN_TYPE_IDS, DType::I64, &bs)?;
    let positions = c.g.input(names::POSITION_IDS, DType::I64, &bs)?;
    // Padded: a [batch, seq] mask. Packed: the sequences' lengths. Attention and pooling take
    // either; the engine runs the matching kernels.
    let (mask, attn_mask) = match layout {
        BatchLayout::Padded => (
            c.g.input(names::ATTENTION_MASK, DType::I64, &bs)?,
            AttnMask::KeyPadding,
        ),
        BatchLayout::Packed => (
            c.g.input(names::SEQUENCE_LENGTHS, DType::I64, &[Dim::Sequences])?,
            AttnMask::Varlen,
        ),
    };

    // Embeddings: word + position + token type, then LayerNorm.
    let word_t = c.weight(
        "embeddings.word_embeddings.weight",
        &[cfg.vocab_size, h],
        ConstRole::Other,
    )?;
    let pos_t = c.weight(
        "embeddings.position_embeddings.weight",
        &[cfg.max_position_embeddings, h],
        ConstRole::Other,
    )?;
    let word = c.g.push(Op::Embedding, &[word_t, ids], "embeddings.word")?;
    let pos =
        c.g.push(Op::Embedding, &[pos_t, positions], "embeddings.position")?;
    let mut sum = c.g.push(Op::Add, &[word, pos], "embeddings.add_position")?;
    if cfg.family() != Family::DistilBert {
        let type_t = c.weight(
            "embeddings.token_type_embeddings.weight",
            &[cfg.type_vocab_size, h],
            ConstRole::Other,
        )?;
        let typ =
            c.g.push(Op::Embedding, &[type_t, types], "embeddings.token_type")?;
        sum =
            c.g.push(Op::Add, &[sum, typ], "embeddings.add_token_type")?;
    }
    let mut x = c.layer_norm(sum, "embeddings.LayerNorm", h, eps)?;

    let heads = cfg.num_attention_heads;
    for l in 0..cfg.num_hidden_layers {
        let n = LayerNames::of(cfg.family(), l);
        let p = &n.prefix;
        let split = |c: &mut Ctx<'_>, v: ValueId, what: &str| -> Result<ValueId> {
            Ok(c.g.push(
                Op::SplitHeads { heads },
                &[v],
                format!("{p}.attention.{what}_heads"),
            )?)
        };
        let q = c.linear(x, &n.query, h, h)?;
        let k = c.linear(x, &n.key, h, h)?;
        let v = c.linear(x, &n.value, h, h)?;
        let (q, k, v) = (
            split(&mut c, q, "q")?,
            split(&mut c, k, "k")?,
            split(&mut c, v, "v")?,
        );
        let attn = c.g.push(
            Op::Sdpa {
                mask: attn_mask,
                scale: None,
            },
            &[q, k, v, mask],
            format!("{p}.attention.self.sdpa"),
        )?;
        let attn = c.g.push(
            Op::MergeHeads,
            &[attn],
            format!("{p}.attention.merge_heads"),
        )?;
        let o = c.linear(attn, &n.attention_output, h, h)?;
        let o =
            c.g.push(Op::Add, &[o, x], format!("{p}.attention.output.residual"))?;
        x = c.layer_norm(o, &n.attention_norm, h, eps)?;

        let i = c.linear(x, &n.intermediate, cfg.intermediate_size, h)?;
        let i =
            c.g.push(Op::Activation(act), &[i], format!("{p}.intermediate.act"))?;
        let o = c.linear(i, &n.output, h, cfg.intermediate_size)?;
        let o = c.g.push(Op::Add, &[o, x], format!("{p}.output.residual"))?;
        x = c.layer_norm(o, &n.output_norm, h, eps)?;
    }

    let mut outputs = vec![(names::LAST_HIDDEN_STATE.to_string(), x)];
    let pooler = |c: &mut Ctx<'_>| -> Result<ValueId> {
        let cls = c.g.push(
            Op::Pool {
                mode: PoolMode::Cls,
            },
            &[x, mask],
            "pooler.cls",
        )?;
        let d = c.linear(cls, "pooler.dense", h, h)?;
        Ok(c.g.push(Op::Activation(Activation::Tanh), &[d], "pooler.act")?)
    };
    match head {
        Head::Embedding {
            pooling,
            steps,
            normalize,
        } => {
            if weights.has("pooler.dense.weight") {
                let p = pooler(&mut c)?;
                outputs.push((names::POOLER_OUTPUT.to_string(), p));
            }
            let mut pooled =
                c.g.push(Op::Pool { mode: pooling }, &[x, mask], "pooling")?;
            // The modules after pooling: "pooled" is the chain's output before its final
            // Normalize, so a request may still ask for it unnormalised.
            let dir = weights.path().parent().unwrap_or(std::path::Path::new("."));
            for (i, step) in steps.iter().enumerate() {
                pooled = match step {
                    Step::Normalize => {
                        c.g.push(Op::L2Normalize, &[pooled], format!("modules.{i}.normalize"))?
                    }
                    Step::Dense(d) => dense(&mut c.g, dir, d, pooled, i)?,
                };
            }
            let normalized = c.g.push(Op::L2Normalize, &[pooled], "normalize")?;
            let sentence = if normalize { normalized } else { pooled };
            outputs.push((names::SENTENCE_EMBEDDING.to_string(), sentence));
            outputs.push((names::POOLED_EMBEDDING.to_string(), pooled));
            outputs.push((names::NORMALIZED_EMBEDDING.to_string(), normalized));
        }
        Head::Classifier { num_labels } => {
            // The features the last linear reads: BERT's pooler; RoBERTa's `classifier.dense`
            // + tanh and DistilBERT's `pre_classifier` + ReLU, on the first token.
            let first_token_dense =
                |c: &mut Ctx<'_>, name: &str, act: Activation| -> Result<ValueId> {
                    let cls = c.g.push(
                        Op::Pool {
                            mode: PoolMode::Cls,
                        },
                        &[x, mask],
                        format!("{name}.cls"),
                    )?;
                    let w =
                        c.full_weight(&format!("{name}.weight"), &[h, h], ConstRole::LinearWeight)?;
                    let b = c.full_weight(&format!("{name}.bias"), &[h], ConstRole::Other)?;
                    let d = c.g.push(Op::Linear, &[cls, w, b], name)?;
                    Ok(c.g.push(Op::Activation(act), &[d], format!("{name}.act"))?)
                };
            let (features, out) = match cfg.family() {
                Family::Bert => (pooler(&mut c)?, "classifier"),
                Family::Roberta => (
                    first_token_dense(&mut c, "classifier.dense", Activation::Tanh)?,
                    "classifier.out_proj",
                ),
                Family::DistilBert => (
                    first_token_dense(&mut c, "pre_classifier", Activation::Relu)?,
                    "classifier",
                ),
            };
            let w = c.full_weight(
                &format!("{out}.weight"),
                &[num_labels, h],
                ConstRole::LinearWeight,
            )?;
            let b = c.full_weight(&format!("{out}.bias"), &[num_labels], ConstRole::Other)?;
            let logits = c.g.push(Op::Linear, &[features, w, b], out)?;
            let probs = c.g.push(Op::Softmax, &[logits], "classifier.softmax")?;
            outputs.push((names::POOLER_OUTPUT.to_string(), features));
            outputs.push((names::LOGITS.to_string(), logits));
            outputs.push((names::PROBABILITIES.to_string(), probs));
        }
    }
    Ok(c.g.finish(outputs)?)
}

/// A sentence-transformers Dense module on `x [batch, in]`: `activation(W·x + b)`.
fn dense(
    g: &mut GraphBuilder,
    dir: &std::path::Path,
    d: &crate::st::Dense,
    x: ValueId,
    i: usize,
) -> Result<ValueId> {
    let file = SafetensorsFile::open_plain(&dir.join(&d.weights))?;
    let name = format!("modules.{i}.linear");
    let w = file.tensor("linear.weight", &[d.out_features, d.in_features])?;
    let w = g.constant(&format!("{name}.weight"), w, ConstRole::LinearWeight)?;
    let mut inputs = vec![x, w];
    if d.bias {
        let b = file.tensor("linear.bias", &[d.out_features])?;
        inputs.push(g.constant(&format!("{name}.bias"), b, ConstRole::Other)?);
    }
    let y = g.push(Op::Linear, &inputs, name.clone())?;
    Ok(match d.activation {
        Some(act) => g.push(Op::Activation(act), &[y], format!("{name}.act"))?,
        None => y,
    })
}
