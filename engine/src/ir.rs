//! The graph IR: typed ops over values with symbolic `batch` and `seq` dimensions.
//!
//! A model builds a [`Graph`] through [`GraphBuilder`]; every op's output type is inferred by one
//! pure function, [`infer`], which the builder calls as nodes are added and [`Graph::check`] calls
//! again over the whole graph (so compiler passes that rewrite a graph re-validate it the same
//! way). Dimensions stay symbolic until [`Graph::bind`] resolves them for one batch, so no request
//! shape needs a new graph.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result, graph_err};
use crate::storage::StoredTensor;
use crate::tensor::HostTensor;

/// Element type of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    I64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::I64 => 8,
        }
    }
}

/// One dimension of a value's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dim {
    /// Number of sequences in the batch; bound at run time.
    Batch,
    /// Tokens per sequence (after padding); bound at run time. In a packed (padding-free)
    /// batch, `batch` is 1 and `seq` is the total number of tokens.
    Seq,
    /// Number of sequences packed into a padding-free batch. An I64 input of type
    /// `[sequences]` holds their lengths: the executor checks they are positive and sum to `seq`.
    Sequences,
    Fixed(usize),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Batch => f.write_str("batch"),
            Dim::Seq => f.write_str("seq"),
            Dim::Sequences => f.write_str("sequences"),
            Dim::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// The type of a value: element type and (possibly symbolic) shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    pub dtype: DType,
    pub dims: Vec<Dim>,
}

impl TensorType {
    pub fn new(dtype: DType, dims: impl Into<Vec<Dim>>) -> Self {
        Self {
            dtype,
            dims: dims.into(),
        }
    }

    pub fn f32(dims: impl Into<Vec<Dim>>) -> Self {
        Self::new(DType::F32, dims)
    }

    pub fn last(&self) -> Option<Dim> {
        self.dims.last().copied()
    }

    /// The shape, if every dimension is fixed (true of constants).
    pub fn fixed_shape(&self) -> Option<Vec<usize>> {
        self.dims
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => Some(*n),
                _ => None,
            })
            .collect()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}[", self.dtype)?;
        for (i, d) in self.dims.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// Element-wise activation functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Activation {
    /// Exact GELU, `x * Φ(x)` with the error function (BERT's `gelu`).
    Gelu,
    /// Tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
    Tanh,
    Silu,
}

/// How a pooling op reduces `[batch, seq, hidden]` to `[batch, hidden]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PoolMode {
    /// Mean over valid tokens (attention mask 1).
    Mean,
    /// The first token (`[CLS]`).
    Cls,
    /// Element-wise max over valid tokens.
    Max,
    /// The last valid token (a decoder's next-token position).
    Last,
}

/// Which keys an `Sdpa` node may attend to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AttnMask {
    None,
    /// A fourth input `[batch, seq]` (I64, 1 = real token) masks padding keys.
    KeyPadding,
    /// Top-left aligned causal mask.
    Causal,
    /// Padding-free batch: `q`/`k`/`v` are `[1, heads, tokens, d]` holding sequences back to
    /// back, and a fourth input `[sequences]` (I64) gives their lengths. Each sequence attends
    /// only to itself.
    Varlen,
    /// [`AttnMask::Varlen`] with a causal mask inside each sequence (a decoder's prompt run
    /// without a KV cache).
    VarlenCausal,
}

impl AttnMask {
    /// Whether the op takes a fourth (mask or lengths) input.
    pub fn has_input(self) -> bool {
        matches!(
            self,
            AttnMask::KeyPadding | AttnMask::Varlen | AttnMask::VarlenCausal
        )
    }
}

/// What a constant is used for, so a backend can store it in the layout its kernels want.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConstRole {
    /// A `[out, in]` weight of a `Linear` (Hugging Face / PyTorch layout).
    LinearWeight,
    Other,
}

/// An operation. Inputs are listed in each variant's doc.
///
/// The first group is what model builders emit; the second is made by the compiler's passes
/// (`crate::compile`), which never change what a graph computes. The serde form (used by the plan
/// cache) carries a [`Op::Weight`]'s metadata only: its bytes travel beside the graph, and an
/// uncompiled [`Op::Constant`] cannot be serialized at all (the cache stores weights first).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Op {
    /// A graph input, fed at run time.
    Input {
        name: String,
        ty: TensorType,
    },
    /// A weight or other fixed tensor.
    Constant {
        name: String,
        #[serde(with = "crate::storage::serde_host_constant")]
        value: Arc<HostTensor>,
        role: ConstRole,
    },
    /// `table [vocab, hidden]`, `ids [..] (I64)` → `[.., hidden]`.
    Embedding,
    /// `x [.., in]`, `w [out, in]`, optional `b [out]` → `[.., out]`.
    Linear,
    /// Element-wise sum of two values of the same type.
    Add,
    /// `x [.., h]`, `gamma [h]`, `beta [h]` → `[.., h]`.
    LayerNorm {
        eps: f32,
    },
    Activation(Activation),
    /// `[batch, seq, heads * d]` → `[batch, heads, seq, d]`.
    SplitHeads {
        heads: usize,
    },
    /// `[batch, heads, seq, d]` → `[batch, seq, heads * d]`.
    MergeHeads,
    /// `q [b, hq, s, d]`, `k`, `v [b, hkv, s, d]` (+ `mask [b, s]` for key padding) → like `q`.
    Sdpa {
        mask: AttnMask,
        scale: Option<f32>,
    },
    /// `x [batch, seq, h]`, `mask [batch, seq] (I64)` → `[batch, h]`; or, for a packed batch,
    /// `x [1, tokens, h]`, `lengths [sequences] (I64)` → `[sequences, h]`.
    Pool {
        mode: PoolMode,
    },
    /// L2-normalise the last dimension.
    L2Normalize,
    /// Softmax over the last dimension.
    Softmax,
    /// Batched matrix product over equal leading dimensions: `a [.., m, k]` and `b [.., k, n]`
    /// (or `b [.., n, k]` with `transpose_b`) → `[.., m, n]`.
    MatMul {
        transpose_b: bool,
    },
    /// Element-wise multiplication by a constant.
    Scale {
        factor: f32,
    },
    /// `scores [.., q, k]` with every entry above the (top-left) diagonal, `k > q`, set to -∞.
    CausalMask,
    /// The columns `[start, start + len)` of the last dimension.
    SliceLast {
        start: usize,
        len: usize,
    },

    // Made by compiler passes.
    /// `act(x·wᵀ + b)`: a `Linear` with its activation applied as the GEMM's epilogue, while each
    /// block of output rows is still in cache. Inputs as `Linear`.
    LinearAct {
        act: Activation,
    },
    /// `LayerNorm(x + residual)` in one pass over the rows: `x`, `residual` (same type),
    /// `gamma [h]`, `beta [h]` → like `x`.
    AddLayerNorm {
        eps: f32,
    },
    /// `SliceLast { start, len: width }` then `SplitHeads { heads }` without the intermediate:
    /// `x [batch, seq, W]` → `[batch, heads, seq, width / heads]` (a merged Q/K/V projection read
    /// by head).
    SliceSplitHeads {
        heads: usize,
        start: usize,
        width: usize,
    },
    /// A constant held as raw buffers in a backend's layout (made by weight pre-packing; what
    /// the plan cache stores and maps back).
    Weight {
        name: String,
        #[serde(with = "crate::storage::serde_stored")]
        weight: Arc<StoredTensor>,
    },
    /// `x [.., h]`, `gamma [h]` → `x / sqrt(mean(x²) + eps) · gamma` (Llama's RMSNorm).
    RmsNorm {
        eps: f32,
    },
    /// Element-wise product of two values of the same type (SwiGLU's gate).
    Mul,
    /// Rotary position embedding, rotate-half convention (Hugging Face Llama): `x [b, heads, s,
    /// d]`, `cos [b, s, r]`, `sin [b, s, r]` with `2r <= d` → like `x`. The first `2r` channels
    /// of each head turn by the per-token angles; the rest pass through. The tables carry the
    /// positions and any RoPE scaling, so the op is the same for every variant.
    Rope,
    /// Attention over the paged KV cache of one layer: `q [1, hq, tokens, d]`, `k`, `v [1, hkv,
    /// tokens, d]` (a packed step of new tokens) → like `q`. The new keys and values are written
    /// into the cache, then each sequence's tokens attend to its whole context with a
    /// bottom-right causal mask. The cache and the step's layout (which tokens belong to which
    /// sequence, block tables) are given to [`crate::exec::Plan::run_paged`], not as tensors.
    PagedSdpa {
        layer: usize,
        scale: Option<f32>,
    },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Constant { .. } => "constant",
            Op::Embedding => "embedding",
            Op::Linear => "linear",
            Op::Add => "add",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Activation(_) => "activation",
            Op::SplitHeads { .. } => "split_heads",
            Op::MergeHeads => "merge_heads",
            Op::Sdpa { .. } => "sdpa",
            Op::Pool { .. } => "pool",
            Op::L2Normalize => "l2_normalize",
            Op::Softmax => "softmax",
            Op::MatMul { .. } => "matmul",
            Op::Scale { .. } => "scale",
            Op::CausalMask => "causal_mask",
            Op::SliceLast { .. } => "slice_last",
            Op::LinearAct { .. } => "linear_act",
            Op::AddLayerNorm { .. } => "add_layer_norm",
            Op::SliceSplitHeads { .. } => "slice_split_heads",
            Op::Weight { .. } => "weight",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Mul => "mul",
            Op::Rope => "rope",
            Op::PagedSdpa { .. } => "paged_sdpa",
        }
    }

    /// Whether the op is a fixed value (an uncompiled constant or a stored weight).
    pub fn is_constant(&self) -> bool {
        matches!(self, Op::Constant { .. } | Op::Weight { .. })
    }
}

/// Index of a value (the output of exactly one node) in a [`Graph`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ValueId(pub usize);

/// One node: an op, its inputs, and its single output value (whose id is the node's index).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub ty: TensorType,
    /// A readable label (e.g. `encoder.layer.0.attention`), for errors and `--explain`.
    pub label: String,
}

/// A dataflow graph in topological order. Node `i` produces value `ValueId(i)`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub outputs: Vec<(String, ValueId)>,
}

/// Concrete sizes for the symbolic dimensions of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bindings {
    pub batch: usize,
    pub seq: usize,
    pub sequences: usize,
}

impl Bindings {
    pub fn resolve(&self, dims: &[Dim]) -> Vec<usize> {
        dims.iter()
            .map(|d| match d {
                Dim::Batch => self.batch,
                Dim::Seq => self.seq,
                Dim::Sequences => self.sequences,
                Dim::Fixed(n) => *n,
            })
            .collect()
    }
}

fn expect(cond: bool, op: &Op, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(graph_err(format!("{}: {}", op.name(), msg())))
    }
}

fn fixed(d: Dim) -> Option<usize> {
    match d {
        Dim::Fixed(n) => Some(n),
        _ => None,
    }
}

/// Infers the output type of `op` from its input types, or explains why they do not fit.
pub fn infer(op: &Op, inputs: &[&TensorType]) -> Result<TensorType> {
    let arity = |n: usize| {
        expect(inputs.len() == n, op, || {
            format!("expects {n} inputs, got {}", inputs.len())
        })
    };
    let all_f32 = |idx: &[usize]| {
        for &i in idx {
            expect(inputs[i].dtype == DType::F32, op, || {
                format!("input {i} must be F32, got {}", inputs[i])
            })?;
        }
        Ok::<(), EngineError>(())
    };
    match op {
        Op::Input { ty, .. } => {
            arity(0)?;
            Ok(ty.clone())
        }
        Op::Weight { weight, .. } => {
            arity(0)?;
            let dims = weight
                .shape
                .iter()
                .map(|&n| Dim::Fixed(n))
                .collect::<Vec<_>>();
            Ok(TensorType::new(weight.dtype, dims))
        }
        Op::Constant { value, .. } => {
            arity(0)?;
            let dims = value
                .shape
                .iter()
                .map(|&n| Dim::Fixed(n))
                .collect::<Vec<_>>();
            Ok(TensorType::new(value.dtype(), dims))
        }
        Op::Embedding => {
            arity(2)?;
            let (table, ids) = (inputs[0], inputs[1]);
            expect(
                table.dtype == DType::F32 && table.dims.len() == 2,
                op,
                || format!("table must be F32[vocab, hidden], got {table}"),
            )?;
            expect(table.fixed_shape().is_some(), op, || {
                "table must have fixed size".into()
            })?;
            expect(ids.dtype == DType::I64, op, || {
                format!("ids must be I64, got {ids}")
            })?;
            let mut dims = ids.dims.clone();
            dims.push(table.dims[1]);
            Ok(TensorType::f32(dims))
        }
        Op::Linear | Op::LinearAct { .. } => infer_linear(op, inputs),
        Op::Add | Op::Mul => {
            arity(2)?;
            all_f32(&[0, 1])?;
            expect(inputs[0] == inputs[1], op, || {
                format!("operands differ: {} vs {}", inputs[0], inputs[1])
            })?;
            Ok(inputs[0].clone())
        }
        Op::LayerNorm { eps } | Op::AddLayerNorm { eps } => {
            // AddLayerNorm: x, residual, gamma, beta; LayerNorm: x, gamma, beta.
            let fused = matches!(op, Op::AddLayerNorm { .. });
            let p = usize::from(fused);
            arity(3 + p)?;
            all_f32(&(0..3 + p).collect::<Vec<_>>())?;
            if fused {
                expect(inputs[0] == inputs[1], op, || {
                    format!("x {} and residual {} differ", inputs[0], inputs[1])
                })?;
            }
            expect(*eps > 0.0 && eps.is_finite(), op, || {
                format!("eps {eps} must be positive")
            })?;
            let h = inputs[0].last();
            expect(h.and_then(fixed).is_some(), op, || {
                format!("x {} must end in a fixed size", inputs[0])
            })?;
            for i in [1 + p, 2 + p] {
                expect(inputs[i].dims == [h.unwrap()], op, || {
                    format!("gamma/beta {} must be [{}]", inputs[i], h.unwrap())
                })?;
            }
            Ok(inputs[0].clone())
        }
        Op::Scale { factor } => {
            expect(factor.is_finite(), op, || {
                format!("factor {factor} must be finite")
            })?;
            arity(1)?;
            all_f32(&[0])?;
            Ok(inputs[0].clone())
        }
        Op::CausalMask => {
            arity(1)?;
            all_f32(&[0])?;
            expect(inputs[0].dims.len() >= 2, op, || {
                format!("scores {} must be at least 2-D", inputs[0])
            })?;
            Ok(inputs[0].clone())
        }
        Op::MatMul { transpose_b } => {
            arity(2)?;
            all_f32(&[0, 1])?;
            let (a, b) = (inputs[0], inputs[1]);
            let r = a.dims.len();
            expect(r >= 2 && b.dims.len() == r, op, || {
                format!("a {a} and b {b} must have the same rank, at least 2")
            })?;
            expect(a.dims[..r - 2] == b.dims[..r - 2], op, || {
                format!("a {a} and b {b} differ in their leading dimensions")
            })?;
            let (bk, bn) = if *transpose_b {
                (b.dims[r - 1], b.dims[r - 2])
            } else {
                (b.dims[r - 2], b.dims[r - 1])
            };
            expect(a.dims[r - 1] == bk, op, || {
                format!("a {a} and b {b} disagree on the inner dimension")
            })?;
            let mut dims = a.dims.clone();
            dims[r - 1] = bn;
            Ok(TensorType::f32(dims))
        }
        Op::SliceLast { start, len } => {
            arity(1)?;
            all_f32(&[0])?;
            let x = inputs[0];
            let width = x.last().and_then(fixed);
            expect(
                *len > 0 && width.is_some_and(|w| start + len <= w),
                op,
                || format!("columns {start}..{} do not fit in {x}", start + len),
            )?;
            let mut dims = x.dims.clone();
            *dims.last_mut().expect("checked non-empty") = Dim::Fixed(*len);
            Ok(TensorType::f32(dims))
        }
        Op::SliceSplitHeads {
            heads,
            start,
            width,
        } => {
            arity(1)?;
            all_f32(&[0])?;
            let x = inputs[0];
            let total = match x.dims.as_slice() {
                [_, _, Dim::Fixed(w)] => *w,
                _ => {
                    return Err(graph_err(format!(
                        "slice_split_heads: x must be [batch, seq, width], got {x}"
                    )));
                }
            };
            expect(*width > 0 && start + width <= total, op, || {
                format!("columns {start}..{} do not fit in {x}", start + width)
            })?;
            expect(*heads > 0 && width % heads == 0, op, || {
                format!("width {width} is not divisible by {heads} heads")
            })?;
            Ok(TensorType::f32([
                x.dims[0],
                Dim::Fixed(*heads),
                x.dims[1],
                Dim::Fixed(width / heads),
            ]))
        }
        Op::RmsNorm { eps } => {
            arity(2)?;
            all_f32(&[0, 1])?;
            expect(*eps > 0.0 && eps.is_finite(), op, || {
                format!("eps {eps} must be positive")
            })?;
            let h = inputs[0].last();
            expect(h.and_then(fixed).is_some(), op, || {
                format!("x {} must end in a fixed size", inputs[0])
            })?;
            expect(inputs[1].dims == [h.unwrap()], op, || {
                format!("gamma {} must be [{}]", inputs[1], h.unwrap())
            })?;
            Ok(inputs[0].clone())
        }
        Op::Rope => {
            arity(3)?;
            all_f32(&[0, 1, 2])?;
            let (x, cos, sin) = (inputs[0], inputs[1], inputs[2]);
            let d = match x.dims.as_slice() {
                [_, Dim::Fixed(_), _, Dim::Fixed(d)] => *d,
                _ => {
                    return Err(graph_err(format!(
                        "rope: x must be [batch, heads, seq, head_dim], got {x}"
                    )));
                }
            };
            expect(cos == sin, op, || format!("cos {cos} and sin {sin} differ"))?;
            let r = match cos.dims.as_slice() {
                [b, s, Dim::Fixed(r)] if *b == x.dims[0] && *s == x.dims[2] => *r,
                _ => {
                    return Err(graph_err(format!(
                        "rope: tables must be [{}, {}, rotary_dim / 2], got {cos}",
                        x.dims[0], x.dims[2]
                    )));
                }
            };
            expect(r > 0 && 2 * r <= d, op, || {
                format!("rotary half-width {r} must be in 1..={}", d / 2)
            })?;
            Ok(x.clone())
        }
        Op::PagedSdpa { scale, .. } => {
            arity(3)?;
            all_f32(&[0, 1, 2])?;
            if let Some(s) = scale {
                expect(s.is_finite() && *s > 0.0, op, || {
                    format!("scale {s} must be positive")
                })?;
            }
            let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
            for t in [q, k, v] {
                expect(t.dims.len() == 4, op, || {
                    format!("q/k/v must be 4-D, got {t}")
                })?;
            }
            expect(k == v, op, || format!("k {k} and v {v} differ"))?;
            expect(
                q.dims[0] == k.dims[0] && q.dims[2] == k.dims[2] && q.dims[3] == k.dims[3],
                op,
                || format!("q {q} and k {k} disagree on batch, tokens or head_dim"),
            )?;
            expect(fixed(q.dims[3]).is_some(), op, || {
                format!("head_dim of {q} must be fixed")
            })?;
            match (fixed(q.dims[1]), fixed(k.dims[1])) {
                (Some(hq), Some(hk)) if hk > 0 && hq % hk == 0 => {}
                _ => {
                    return Err(graph_err(format!(
                        "paged_sdpa: q heads {} must be a fixed multiple of kv heads {}",
                        q.dims[1], k.dims[1]
                    )));
                }
            }
            Ok(q.clone())
        }
        Op::Activation(_) | Op::L2Normalize | Op::Softmax => {
            arity(1)?;
            all_f32(&[0])?;
            expect(!inputs[0].dims.is_empty(), op, || {
                "needs at least one dimension".into()
            })?;
            Ok(inputs[0].clone())
        }
        Op::SplitHeads { heads } => {
            arity(1)?;
            all_f32(&[0])?;
            let x = inputs[0];
            let width = match x.dims.as_slice() {
                [_, _, Dim::Fixed(w)] => *w,
                _ => {
                    return Err(graph_err(format!(
                        "split_heads: x must be [batch, seq, width], got {x}"
                    )));
                }
            };
            expect(*heads > 0 && width % heads == 0, op, || {
                format!("width {width} is not divisible by {heads} heads")
            })?;
            Ok(TensorType::f32([
                x.dims[0],
                Dim::Fixed(*heads),
                x.dims[1],
                Dim::Fixed(width / heads),
            ]))
        }
        Op::MergeHeads => {
            arity(1)?;
            all_f32(&[0])?;
            match inputs[0].dims.as_slice() {
                [b, Dim::Fixed(h), s, Dim::Fixed(d)] => {
                    Ok(TensorType::f32([*b, *s, Dim::Fixed(h * d)]))
                }
                _ => Err(graph_err(format!(
                    "merge_heads: x must be [batch, heads, seq, d], got {}",
                    inputs[0]
                ))),
            }
        }
        Op::Sdpa { mask, scale } => {
            let n = if mask.has_input() { 4 } else { 3 };
            arity(n)?;
            all_f32(&[0, 1, 2])?;
            if let Some(s) = scale {
                expect(s.is_finite() && *s > 0.0, op, || {
                    format!("scale {s} must be positive")
                })?;
            }
            let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
            for t in [q, k, v] {
                expect(t.dims.len() == 4, op, || {
                    format!("q/k/v must be 4-D, got {t}")
                })?;
            }
            expect(k == v, op, || format!("k {k} and v {v} differ"))?;
            expect(q.dims[0] == k.dims[0] && q.dims[3] == k.dims[3], op, || {
                format!("q {q} and k {k} disagree on batch or head_dim")
            })?;
            match (fixed(q.dims[1]), fixed(k.dims[1])) {
                (Some(hq), Some(hk)) if hk > 0 && hq % hk == 0 => {}
                _ => {
                    return Err(graph_err(format!(
                        "sdpa: q heads {} must be a fixed multiple of kv heads {}",
                        q.dims[1], k.dims[1]
                    )));
                }
            }
            if *mask == AttnMask::KeyPadding {
                let m = inputs[3];
                expect(
                    m.dtype == DType::I64 && m.dims == [k.dims[0], k.dims[2]],
                    op,
                    || {
                        format!(
                            "key-padding mask must be I64[{}, {}], got {m}",
                            k.dims[0], k.dims[2]
                        )
                    },
                )?;
            }
            if matches!(mask, AttnMask::Varlen | AttnMask::VarlenCausal) {
                let m = inputs[3];
                expect(
                    m.dtype == DType::I64 && m.dims == [Dim::Sequences],
                    op,
                    || format!("varlen lengths must be I64[sequences], got {m}"),
                )?;
            }
            Ok(q.clone())
        }
        Op::Pool { .. } => {
            arity(2)?;
            all_f32(&[0])?;
            let (x, m) = (inputs[0], inputs[1]);
            expect(x.dims.len() == 3, op, || {
                format!("x must be [batch, seq, h], got {x}")
            })?;
            if m.dims == [Dim::Sequences] {
                expect(m.dtype == DType::I64, op, || {
                    format!("sequence lengths must be I64[sequences], got {m}")
                })?;
                return Ok(TensorType::f32([Dim::Sequences, x.dims[2]]));
            }
            expect(m.dtype == DType::I64 && m.dims == x.dims[..2], op, || {
                format!("mask must be I64[{}, {}], got {m}", x.dims[0], x.dims[1])
            })?;
            Ok(TensorType::f32([x.dims[0], x.dims[2]]))
        }
    }
}

fn infer_linear(op: &Op, inputs: &[&TensorType]) -> Result<TensorType> {
    expect(inputs.len() == 2 || inputs.len() == 3, op, || {
        format!(
            "expects x, w and an optional bias, got {} inputs",
            inputs.len()
        )
    })?;
    for (i, t) in inputs.iter().enumerate() {
        expect(t.dtype == DType::F32, op, || {
            format!("input {i} must be F32, got {t}")
        })?;
    }
    let (x, w) = (inputs[0], inputs[1]);
    let (out, inn) = match w.fixed_shape().as_deref() {
        Some(&[o, i]) => (o, i),
        _ => {
            return Err(graph_err(format!(
                "linear: weight must be fixed [out, in], got {w}"
            )));
        }
    };
    expect(x.last() == Some(Dim::Fixed(inn)), op, || {
        format!("x {x} does not end in the weight's input size {inn}")
    })?;
    if let Some(b) = inputs.get(2) {
        expect(b.dims == [Dim::Fixed(out)], op, || {
            format!("bias {b} must be [{out}]")
        })?;
    }
    let mut dims = x.dims.clone();
    *dims.last_mut().expect("checked non-empty") = Dim::Fixed(out);
    Ok(TensorType::f32(dims))
}

impl Graph {
    /// Bytes of the graph's constants (weights, as stored: packed or quantized ones at their
    /// stored size): what a prepared plan holds on its device besides activations.
    pub fn constant_bytes(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| match &n.op {
                Op::Constant { value, .. } => value.len() * value.dtype().size(),
                Op::Weight { weight, .. } => weight.nbytes(),
                _ => 0,
            })
            .sum()
    }

    /// Re-infers every node's type from its inputs and checks it matches what is recorded,
    /// that inputs precede their users, and that outputs exist with unique names.
    pub fn check(&self) -> Result<()> {
        for (i, node) in self.nodes.iter().enumerate() {
            for v in &node.inputs {
                if v.0 >= i {
                    return Err(graph_err(format!(
                        "node {i} ({}) uses value {} that is not defined before it",
                        node.label, v.0
                    )));
                }
            }
            let tys: Vec<&TensorType> = node.inputs.iter().map(|v| &self.nodes[v.0].ty).collect();
            let ty = infer(&node.op, &tys)
                .map_err(|e| graph_err(format!("{} ({}): {e}", node.label, node.op.name())))?;
            if ty != node.ty {
                return Err(graph_err(format!(
                    "{}: recorded type {} but inputs give {ty}",
                    node.label, node.ty
                )));
            }
        }
        let mut seen = HashMap::new();
        for (name, v) in &self.outputs {
            if v.0 >= self.nodes.len() {
                return Err(graph_err(format!(
                    "output `{name}` refers to a missing value"
                )));
            }
            if seen.insert(name.as_str(), *v).is_some() {
                return Err(graph_err(format!("output `{name}` is declared twice")));
            }
        }
        Ok(())
    }

    /// The graph's inputs, in order: `(name, type, value)`.
    pub fn inputs(&self) -> impl Iterator<Item = (&str, &TensorType, ValueId)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match &n.op {
                Op::Input { name, ty } => Some((name.as_str(), ty, ValueId(i))),
                _ => None,
            })
    }

    /// Counts nodes per op name, for `--explain` and logs.
    pub fn op_histogram(&self) -> Vec<(&'static str, usize)> {
        let mut counts: Vec<(&'static str, usize)> = Vec::new();
        for n in &self.nodes {
            match counts.iter_mut().find(|(name, _)| *name == n.op.name()) {
                Some((_, c)) => *c += 1,
                None => counts.push((n.op.name(), 1)),
            }
        }
        counts
    }
}

/// Builds a [`Graph`] node by node, inferring and checking each node's type as it is added.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    nodes: Vec<Node>,
}

impl GraphBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node; its type comes from [`infer`].
    pub fn push(
        &mut self,
        op: Op,
        inputs: &[ValueId],
        label: impl Into<String>,
    ) -> Result<ValueId> {
        let label = label.into();
        let mut tys = Vec::with_capacity(inputs.len());
        for v in inputs {
            let node = self
                .nodes
                .get(v.0)
                .ok_or_else(|| graph_err(format!("{label}: input value {} does not exist", v.0)))?;
            tys.push(&node.ty);
        }
        let ty = infer(&op, &tys).map_err(|e| graph_err(format!("{label}: {e}")))?;
        self.nodes.push(Node {
            op,
            inputs: inputs.to_vec(),
            ty,
            label,
        });
        Ok(ValueId(self.nodes.len() - 1))
    }

    pub fn ty(&self, v: ValueId) -> &TensorType {
        &self.nodes[v.0].ty
    }

    pub fn input(&mut self, name: &str, dtype: DType, dims: &[Dim]) -> Result<ValueId> {
        let ty = TensorType::new(dtype, dims);
        self.push(
            Op::Input {
                name: name.into(),
                ty,
            },
            &[],
            name,
        )
    }

    pub fn constant(&mut self, name: &str, value: HostTensor, role: ConstRole) -> Result<ValueId> {
        let op = Op::Constant {
            name: name.into(),
            value: Arc::new(value),
            role,
        };
        self.push(op, &[], name)
    }

    pub fn finish(self, outputs: Vec<(String, ValueId)>) -> Result<Graph> {
        let graph = Graph {
            nodes: self.nodes,
            outputs,
        };
        graph.check()?;
        Ok(graph)
    }
}
