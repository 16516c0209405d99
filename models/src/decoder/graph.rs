//! GPT-2 and Llama as engine graphs.
//!
//! Both are built in one of two modes from the same layer code:
//! - [`GraphMode::Paged`] (serving): a packed step of new tokens, attention through the paged KV
//!   cache (`PagedSdpa`: prefill chunks and decode tokens alike), and logits only for each
//!   sequence's last token (`Pool { Last }` right after the last layer's attention, so the rest
//!   of that layer, the final norm and the LM head run on one row per sequence).
//! - [`GraphMode::Full`] (checking): whole sequences without a cache, causal varlen attention,
//!   and logits at every position.

use kiln_engine::HostTensor;
use kiln_engine::ir::{
    AttnMask, ConstRole, DType, Dim, Graph, GraphBuilder, Op, PoolMode, ValueId,
};

use super::config::{DecoderArch, DecoderConfig};
use super::shards::Weights;
use crate::error::{ModelError, Result};

/// Graph input and output names.
pub mod names {
    /// I64 `[1, tokens]`: the step's tokens, sequences back to back.
    pub const INPUT_IDS: &str = "input_ids";
    /// I64 `[1, tokens]` (GPT-2): each token's position in its sequence.
    pub const POSITION_IDS: &str = "position_ids";
    /// F32 `[1, tokens, rotary_dim / 2]` (Llama): each token's RoPE angles.
    pub const ROPE_COS: &str = "rope_cos";
    pub const ROPE_SIN: &str = "rope_sin";
    /// I64 `[sequences]`: tokens each sequence brings to the step.
    pub const SEQUENCE_LENGTHS: &str = "sequence_lengths";
    /// F32 `[sequences, vocab]` (paged) or `[1, tokens, vocab]` (full).
    pub const LOGITS: &str = "logits";
}

/// See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphMode {
    Paged,
    Full,
}

struct Ctx<'a> {
    g: GraphBuilder,
    w: &'a Weights,
}

impl Ctx<'_> {
    fn constant(&mut self, name: &str, t: HostTensor, role: ConstRole) -> Result<ValueId> {
        Ok(self.g.constant(name, t, role)?)
    }

    fn weight(&mut self, name: &str, shape: &[usize], role: ConstRole) -> Result<ValueId> {
        let t = self.w.tensor(name, shape)?;
        self.constant(name, t, role)
    }

    /// `nn.Linear` with an `[out, in]` weight and an optional bias.
    fn linear(
        &mut self,
        x: ValueId,
        prefix: &str,
        out: usize,
        inn: usize,
        bias: bool,
    ) -> Result<ValueId> {
        let w = self.weight(
            &format!("{prefix}.weight"),
            &[out, inn],
            ConstRole::LinearWeight,
        )?;
        let mut args = vec![x, w];
        if bias {
            args.push(self.weight(&format!("{prefix}.bias"), &[out], ConstRole::Other)?);
        }
        Ok(self.g.push(Op::Linear, &args, prefix)?)
    }

    fn op(&mut self, op: Op, inputs: &[ValueId], label: impl Into<String>) -> Result<ValueId> {
        Ok(self.g.push(op, inputs, label)?)
    }
}

/// GPT-2's `Conv1D` stores `[in, out]`; the engine's linear takes `[out, in]`. `cols` picks a
/// range of output columns (`c_attn` packs q, k and v side by side).
fn conv1d_as_linear(t: &HostTensor, cols: std::ops::Range<usize>) -> Result<HostTensor> {
    let [inn, out] = t.shape[..] else {
        return Err(ModelError::Unsupported("Conv1D weight must be 2-D".into()));
    };
    let data = t
        .as_f32()
        .ok_or_else(|| ModelError::Unsupported("Conv1D weight must be F32".into()))?;
    let n = cols.len();
    let mut w = vec![0.0f32; n * inn];
    for (o, c) in cols.clone().enumerate() {
        for i in 0..inn {
            w[o * inn + i] = data[i * out + c];
        }
    }
    Ok(HostTensor::f32(vec![n, inn], w)?)
}

fn slice_vec(t: &HostTensor, cols: std::ops::Range<usize>) -> Result<HostTensor> {
    let data = t
        .as_f32()
        .ok_or_else(|| ModelError::Unsupported("bias must be F32".into()))?;
    Ok(HostTensor::f32(vec![cols.len()], data[cols].to_vec())?)
}

/// Builds the graph of `cfg` from `weights`.
pub fn build(cfg: &DecoderConfig, weights: &Weights, mode: GraphMode) -> Result<Graph> {
    let mut c = Ctx {
        g: GraphBuilder::new(),
        w: weights,
    };
    let bs = [Dim::Batch, Dim::Seq];
    let ids = c.g.input(names::INPUT_IDS, DType::I64, &bs)?;
    let lengths =
        c.g.input(names::SEQUENCE_LENGTHS, DType::I64, &[Dim::Sequences])?;
    let x = match cfg.arch {
        DecoderArch::Gpt2 => gpt2(&mut c, cfg, ids, lengths, mode)?,
        DecoderArch::Llama => llama(&mut c, cfg, ids, lengths, mode)?,
    };
    Ok(c.g.finish(vec![(names::LOGITS.to_string(), x)])?)
}

/// Attention of one layer: `q [1, hq, s, d]`, `k`, `v [1, hkv, s, d]` → `[1, s, hq · d]`.
fn attention(
    c: &mut Ctx<'_>,
    (q, k, v): (ValueId, ValueId, ValueId),
    lengths: ValueId,
    layer: usize,
    scale: Option<f32>,
    mode: GraphMode,
    label: &str,
) -> Result<ValueId> {
    let attn = match mode {
        GraphMode::Paged => c.op(
            Op::PagedSdpa { layer, scale },
            &[q, k, v],
            format!("{label}.paged_sdpa"),
        )?,
        GraphMode::Full => c.op(
            Op::Sdpa {
                mask: AttnMask::VarlenCausal,
                scale,
            },
            &[q, k, v, lengths],
            format!("{label}.sdpa"),
        )?,
    };
    c.op(Op::MergeHeads, &[attn], format!("{label}.merge_heads"))
}

/// The last token of each sequence: `[1, tokens, h]` → `[sequences, h]`.
fn last_tokens(c: &mut Ctx<'_>, x: ValueId, lengths: ValueId, label: String) -> Result<ValueId> {
    c.op(
        Op::Pool {
            mode: PoolMode::Last,
        },
        &[x, lengths],
        label,
    )
}

/// Where paged mode drops every token but each sequence's last: right after the last layer's
/// attention. Only the last token's logits are wanted, and the last layer's keys and values (the
/// one thing it must compute for every token, for the KV cache) are written by its attention, so
/// its output projection, residual, norm and MLP run on one row per sequence instead of every
/// prompt token: 9 of the 12 `h²` weight multiplies of a layer, skipped for all but one token
/// in each prefill (about 1/16 of a 12-layer prefill's GEMM work). Full mode keeps every position.
fn prunes_after_attention(mode: GraphMode, layer: usize, cfg: &DecoderConfig) -> bool {
    mode == GraphMode::Paged && layer + 1 == cfg.num_layers
}

/// `(x, o)` cut down to each sequence's last token when [`prunes_after_attention`] says so.
fn prune(
    c: &mut Ctx<'_>,
    (x, o): (ValueId, ValueId),
    lengths: ValueId,
    prune: bool,
    label: &str,
) -> Result<(ValueId, ValueId)> {
    if !prune {
        return Ok((x, o));
    }
    Ok((
        last_tokens(c, x, lengths, format!("{label}.residual_last_token"))?,
        last_tokens(c, o, lengths, format!("{label}.last_token"))?,
    ))
}

/// Before the final norm: paged mode's last tokens, unless the last layer already cut them.
fn final_tokens(
    c: &mut Ctx<'_>,
    x: ValueId,
    lengths: ValueId,
    mode: GraphMode,
    cfg: &DecoderConfig,
) -> Result<ValueId> {
    if mode == GraphMode::Paged && cfg.num_layers == 0 {
        last_tokens(c, x, lengths, "last_token".into())
    } else {
        Ok(x)
    }
}

fn gpt2(
    c: &mut Ctx<'_>,
    cfg: &DecoderConfig,
    ids: ValueId,
    lengths: ValueId,
    mode: GraphMode,
) -> Result<ValueId> {
    let w = c.w;
    let p = w
        .prefix_of("wte.weight", &["transformer.", ""])
        .ok_or_else(|| {
            ModelError::file(
                w.first_path(),
                "tensor `transformer.wte.weight` (or `wte.weight`) not found",
            )
        })?;
    let (h, heads, d) = (cfg.hidden_size, cfg.num_heads, cfg.head_dim);
    let eps = cfg.norm_eps;
    let positions =
        c.g.input(names::POSITION_IDS, DType::I64, &[Dim::Batch, Dim::Seq])?;
    let wte = w.tensor(&format!("{p}wte.weight"), &[cfg.vocab_size, h])?;
    let wte_id = c.constant(&format!("{p}wte.weight"), wte.clone(), ConstRole::Other)?;
    let wpe = c.weight(
        &format!("{p}wpe.weight"),
        &[cfg.max_position_embeddings, h],
        ConstRole::Other,
    )?;
    let tok = c.op(Op::Embedding, &[wte_id, ids], "wte")?;
    let pos = c.op(Op::Embedding, &[wpe, positions], "wpe")?;
    let mut x = c.op(Op::Add, &[tok, pos], "embeddings")?;
    let layer_norm = |c: &mut Ctx<'_>, x: ValueId, name: &str| -> Result<ValueId> {
        let g = c.weight(&format!("{name}.weight"), &[h], ConstRole::Other)?;
        let b = c.weight(&format!("{name}.bias"), &[h], ConstRole::Other)?;
        c.op(Op::LayerNorm { eps }, &[x, g, b], name)
    };
    // Conv1D: `[in, out]` weight plus bias, as a linear.
    let conv1d = |c: &mut Ctx<'_>,
                  x: ValueId,
                  name: &str,
                  inn: usize,
                  out: usize,
                  cols: std::ops::Range<usize>,
                  label: String|
     -> Result<ValueId> {
        let wt = c.w.tensor(&format!("{name}.weight"), &[inn, out])?;
        let bt = c.w.tensor(&format!("{name}.bias"), &[out])?;
        let wv = c.constant(
            &format!("{label}.weight"),
            conv1d_as_linear(&wt, cols.clone())?,
            ConstRole::LinearWeight,
        )?;
        let bv = c.constant(
            &format!("{label}.bias"),
            slice_vec(&bt, cols)?,
            ConstRole::Other,
        )?;
        c.op(Op::Linear, &[x, wv, bv], label)
    };
    for l in 0..cfg.num_layers {
        let lp = format!("{p}h.{l}");
        let a = layer_norm(c, x, &format!("{lp}.ln_1"))?;
        let attn_name = format!("{lp}.attn.c_attn");
        let mut qkv = Vec::with_capacity(3);
        for (i, what) in ["q", "k", "v"].iter().enumerate() {
            let y = conv1d(
                c,
                a,
                &attn_name,
                h,
                3 * h,
                i * h..(i + 1) * h,
                format!("{attn_name}.{what}"),
            )?;
            qkv.push(c.op(
                Op::SplitHeads { heads },
                &[y],
                format!("{lp}.attn.{what}_heads"),
            )?);
        }
        let mut scale = 1.0 / (d as f32).sqrt();
        if cfg.scale_by_inverse_layer {
            scale /= (l + 1) as f32;
        }
        let o = attention(
            c,
            (qkv[0], qkv[1], qkv[2]),
            lengths,
            l,
            Some(scale),
            mode,
            &format!("{lp}.attn"),
        )?;
        let pruned = prunes_after_attention(mode, l, cfg);
        let (x_in, o) = prune(c, (x, o), lengths, pruned, &format!("{lp}.attn"))?;
        x = x_in;
        let o = conv1d(
            c,
            o,
            &format!("{lp}.attn.c_proj"),
            h,
            h,
            0..h,
            format!("{lp}.attn.c_proj"),
        )?;
        x = c.op(Op::Add, &[x, o], format!("{lp}.attn.residual"))?;
        let m = layer_norm(c, x, &format!("{lp}.ln_2"))?;
        let inner = cfg.intermediate_size;
        let m = conv1d(
            c,
            m,
            &format!("{lp}.mlp.c_fc"),
            h,
            inner,
            0..inner,
            format!("{lp}.mlp.c_fc"),
        )?;
        let m = c.op(
            Op::Activation(cfg.activation),
            &[m],
            format!("{lp}.mlp.act"),
        )?;
        let m = conv1d(
            c,
            m,
            &format!("{lp}.mlp.c_proj"),
            inner,
            h,
            0..h,
            format!("{lp}.mlp.c_proj"),
        )?;
        x = c.op(Op::Add, &[x, m], format!("{lp}.mlp.residual"))?;
    }
    let x = final_tokens(c, x, lengths, mode, cfg)?;
    let x = layer_norm(c, x, &format!("{p}ln_f"))?;
    // The head: tied to wte unless the file has its own `lm_head.weight`.
    let head = if !cfg.tie_word_embeddings && w.has("lm_head.weight") {
        w.tensor("lm_head.weight", &[cfg.vocab_size, h])?
    } else {
        wte
    };
    let head = c.constant("lm_head.weight", head, ConstRole::LinearWeight)?;
    c.op(Op::Linear, &[x, head], "lm_head")
}

fn llama(
    c: &mut Ctx<'_>,
    cfg: &DecoderConfig,
    ids: ValueId,
    lengths: ValueId,
    mode: GraphMode,
) -> Result<ValueId> {
    let w = c.w;
    let p = w
        .prefix_of("embed_tokens.weight", &["model.", ""])
        .ok_or_else(|| {
            ModelError::file(
                w.first_path(),
                "tensor `model.embed_tokens.weight` not found",
            )
        })?;
    let rope = cfg
        .rope
        .as_ref()
        .ok_or_else(|| ModelError::Unsupported("a Llama model needs RoPE settings".into()))?;
    let (h, hq, hkv, d) = (
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    );
    let half = rope.rotary_dim / 2;
    let table = [Dim::Batch, Dim::Seq, Dim::Fixed(half)];
    let cos = c.g.input(names::ROPE_COS, DType::F32, &table)?;
    let sin = c.g.input(names::ROPE_SIN, DType::F32, &table)?;
    let embed = w.tensor(&format!("{p}embed_tokens.weight"), &[cfg.vocab_size, h])?;
    let embed_id = c.constant(
        &format!("{p}embed_tokens.weight"),
        embed.clone(),
        ConstRole::Other,
    )?;
    let mut x = c.op(Op::Embedding, &[embed_id, ids], "embed_tokens")?;
    let eps = cfg.norm_eps;
    let rms = |c: &mut Ctx<'_>, x: ValueId, name: &str| -> Result<ValueId> {
        let g = c.weight(&format!("{name}.weight"), &[h], ConstRole::Other)?;
        c.op(Op::RmsNorm { eps }, &[x, g], name)
    };
    for l in 0..cfg.num_layers {
        let lp = format!("{p}layers.{l}");
        let a = rms(c, x, &format!("{lp}.input_layernorm"))?;
        let ap = format!("{lp}.self_attn");
        let bias = cfg.qkv_bias;
        let q = c.linear(a, &format!("{ap}.q_proj"), hq * d, h, bias)?;
        let k = c.linear(a, &format!("{ap}.k_proj"), hkv * d, h, bias)?;
        let v = c.linear(a, &format!("{ap}.v_proj"), hkv * d, h, bias)?;
        let q = c.op(Op::SplitHeads { heads: hq }, &[q], format!("{ap}.q_heads"))?;
        let k = c.op(Op::SplitHeads { heads: hkv }, &[k], format!("{ap}.k_heads"))?;
        let v = c.op(Op::SplitHeads { heads: hkv }, &[v], format!("{ap}.v_heads"))?;
        // Qwen3: each head's query and key RMS-normalised over head_dim.
        let (q, k) = if cfg.qk_norm {
            let head_norm = |c: &mut Ctx<'_>, x: ValueId, name: &str| -> Result<ValueId> {
                let g = c.weight(&format!("{name}.weight"), &[d], ConstRole::Other)?;
                c.op(Op::RmsNorm { eps }, &[x, g], name)
            };
            (
                head_norm(c, q, &format!("{ap}.q_norm"))?,
                head_norm(c, k, &format!("{ap}.k_norm"))?,
            )
        } else {
            (q, k)
        };
        let q = c.op(Op::Rope, &[q, cos, sin], format!("{ap}.q_rope"))?;
        let k = c.op(Op::Rope, &[k, cos, sin], format!("{ap}.k_rope"))?;
        let o = attention(c, (q, k, v), lengths, l, None, mode, &ap)?;
        let pruned = prunes_after_attention(mode, l, cfg);
        let (x_in, o) = prune(c, (x, o), lengths, pruned, &ap)?;
        x = x_in;
        let o = c.linear(o, &format!("{ap}.o_proj"), h, hq * d, cfg.attention_bias)?;
        x = c.op(Op::Add, &[x, o], format!("{ap}.residual"))?;
        let m = rms(c, x, &format!("{lp}.post_attention_layernorm"))?;
        let mp = format!("{lp}.mlp");
        let inner = cfg.intermediate_size;
        let gate = c.linear(m, &format!("{mp}.gate_proj"), inner, h, cfg.mlp_bias)?;
        let gate = c.op(Op::Activation(cfg.activation), &[gate], format!("{mp}.act"))?;
        let up = c.linear(m, &format!("{mp}.up_proj"), inner, h, cfg.mlp_bias)?;
        let m = c.op(Op::Mul, &[gate, up], format!("{mp}.gate_mul"))?;
        let m = c.linear(m, &format!("{mp}.down_proj"), h, inner, cfg.mlp_bias)?;
        x = c.op(Op::Add, &[x, m], format!("{mp}.residual"))?;
    }
    let x = final_tokens(c, x, lengths, mode, cfg)?;
    let x = rms(c, x, &format!("{p}norm"))?;
    let head = if w.has("lm_head.weight") && !cfg.tie_word_embeddings {
        w.tensor("lm_head.weight", &[cfg.vocab_size, h])?
    } else if cfg.tie_word_embeddings {
        embed
    } else {
        return Err(ModelError::file(
            w.first_path(),
            "missing tensor `lm_head.weight` (and tie_word_embeddings is false)",
        ));
    };
    let head = c.constant("lm_head.weight", head, ConstRole::LinearWeight)?;
    c.op(Op::Linear, &[x, head], "lm_head")
}
