//! The backend seam: the set of ops a device must provide to run an engine graph.
//!
//! The executor ([`crate::exec`]) is generic over [`Backend`]; models never see it. Two
//! implementations exist: [`BurnBackend`] runs every op through burn-tensor on a burn device
//! (burn-flex on the CPU today; a wgpu device is the same code with another `burn::Device`), and
//! [`CpuBackend`] runs kiln's own CPU kernels (direct `gemm` calls into owned buffers, the
//! attention crate's kernels). Both are tested op by op against each other.

mod arena;
mod burn;
mod cpu;

pub use self::arena::Arena;
pub use self::burn::BurnBackend;
pub use self::cpu::CpuBackend;

use kiln_attention::{KernelChoice, ProblemSummary};

use crate::compile::CompileTarget;
use crate::error::{EngineError, Result};
use crate::ir::{Activation, ConstRole, PoolMode};
use crate::kv::{KvCacheSpec, PagedBatch};
use crate::quantize::LinearFormat;
use crate::storage::{StoredTensor, WeightFormat};
use crate::tensor::HostTensor;

/// Backend storage of a paged KV cache (each backend downcasts to its own type).
pub type KvStore = dyn std::any::Any + Send;

/// The error a backend returns for an op it does not implement (the decoder ops have default
/// methods, so a new backend compiles before it runs decoders).
pub(crate) fn unsupported_op(backend: String, op: &str) -> EngineError {
    EngineError::Backend {
        backend,
        reason: format!("op `{op}` is not implemented by this backend"),
    }
}

/// Transposes a row-major `[rows, cols]` matrix: how a Hugging Face `[out, in]` linear weight
/// becomes the `[in, out]` layout both backends' GEMMs stream best.
pub(crate) fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = v[r * cols + c];
        }
    }
    t
}

/// `[0, l0, l0 + l1, ...]` from a packed batch's sequence lengths; `None` if one is negative.
pub(crate) fn cumulative(lengths: &[i64]) -> Option<Vec<usize>> {
    let mut cu = Vec::with_capacity(lengths.len() + 1);
    cu.push(0usize);
    for &l in lengths {
        cu.push(cu.last()? + usize::try_from(l).ok()?);
    }
    Some(cu)
}

/// Mask argument of [`Backend::sdpa`].
#[derive(Debug, Clone)]
pub enum SdpaMaskArg<T> {
    None,
    /// `[batch, kv_len]` I64, 1 = attend.
    KeyPadding(T),
    Causal,
    /// `[sequences]` I64 lengths of a packed batch (`q`/`k`/`v` are `[1, heads, tokens, d]`).
    Varlen(T),
    /// Like `Varlen`, causal within each sequence.
    VarlenCausal(T),
}

/// Ops a device provides. Every method takes its tensor arguments by value so a backend may
/// reuse a buffer that the executor no longer needs; shapes have been checked by the graph.
///
/// Methods with a default were added for the compiler: fused ops default to running their parts
/// one after another (correct on any backend, faster where a backend overrides them), and the
/// generic ops that only spelled-out graphs use (`matmul`, `scale`, ...) default to an error.
pub trait Backend: Send + Sync + 'static {
    type Tensor: Clone + Send + Sync;

    /// Short name for logs and `/info`, e.g. `cpu` or `burn-flex`.
    fn name(&self) -> String;

    /// What the compiler may emit for this backend (weight formats it uploads).
    fn compile_target(&self) -> CompileTarget {
        CompileTarget::default()
    }

    /// Facts about the device that change what a compiled plan contains or how fast its kernels
    /// are, as `(name, value)` pairs: they are part of the plan-cache key, so a plan compiled on
    /// another machine kind (CPU features, GPU adapter and driver) is never reused here.
    fn device_facts(&self) -> Vec<(String, String)> {
        vec![("backend".into(), self.name())]
    }

    /// Moves a stored tensor (a compiled plan's weight) onto the device. The default takes
    /// `Plain` tensors through [`Backend::upload`]; packed formats need the backend's support.
    fn upload_stored(&self, t: &StoredTensor) -> Result<Self::Tensor> {
        if t.format != WeightFormat::Plain {
            return Err(unsupported_op(
                self.name(),
                &format!("{} weights", t.format),
            ));
        }
        self.upload(&t.to_host()?, t.role)
    }

    /// Moves a host tensor onto the device; `role` lets the backend choose a weight layout.
    fn upload(&self, t: &HostTensor, role: ConstRole) -> Result<Self::Tensor>;
    fn download(&self, t: Self::Tensor) -> Result<HostTensor>;

    /// Uploads a compiled plan's stored `Linear` weight to run as `format`: a `Plain` weight
    /// goes through [`Backend::upload_linear`]; a backend with int8 kernels also takes
    /// `Int8PerChannel` weights (quantized by the compiler, kept in the plan cache).
    fn upload_stored_linear(
        &self,
        t: &StoredTensor,
        format: &LinearFormat,
    ) -> Result<Self::Tensor> {
        match t.format {
            WeightFormat::Plain => self.upload_linear(&t.to_host()?, format),
            other => Err(unsupported_op(
                self.name(),
                &format!("{other} {format} weights"),
            )),
        }
    }

    /// Uploads a `Linear`'s `[out, in]` weight in `format` (int8 or bf16 pack their weight for
    /// the CPU's kernel). Backends without such kernels refuse every format but f32.
    fn upload_linear(&self, t: &HostTensor, format: &LinearFormat) -> Result<Self::Tensor> {
        match format {
            LinearFormat::F32 => self.upload(t, ConstRole::LinearWeight),
            other => Err(EngineError::Backend {
                backend: self.name(),
                reason: format!(
                    "{other} linear layers are not implemented on this device (use --device cpu)"
                ),
            }),
        }
    }

    fn embedding(&self, table: Self::Tensor, ids: Self::Tensor) -> Result<Self::Tensor>;
    /// `x @ w.T + b` for a weight uploaded with [`ConstRole::LinearWeight`].
    fn linear(
        &self,
        x: Self::Tensor,
        w: Self::Tensor,
        b: Option<Self::Tensor>,
    ) -> Result<Self::Tensor>;
    /// [`Backend::linear`] in a decoder's paged step, where few rows (one per decoding
    /// sequence) meet each weight: a backend may take a weight-streaming path.
    fn linear_decode(
        &self,
        x: Self::Tensor,
        w: Self::Tensor,
        b: Option<Self::Tensor>,
    ) -> Result<Self::Tensor> {
        self.linear(x, w, b)
    }
    fn add(&self, a: Self::Tensor, b: Self::Tensor) -> Result<Self::Tensor>;
    fn layer_norm(
        &self,
        x: Self::Tensor,
        gamma: Self::Tensor,
        beta: Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;
    fn activation(&self, x: Self::Tensor, act: Activation) -> Result<Self::Tensor>;
    fn split_heads(&self, x: Self::Tensor, heads: usize) -> Result<Self::Tensor>;
    fn merge_heads(&self, x: Self::Tensor) -> Result<Self::Tensor>;
    /// Which attention kernel this backend would run for `problem` under `choice`, and why; an
    /// error if a forced kernel cannot run it. Used at load time to log the plan and to refuse an
    /// impossible override before serving.
    fn sdpa_plan(
        &self,
        problem: &ProblemSummary,
        choice: KernelChoice,
    ) -> Result<(&'static str, String)> {
        let s = kiln_attention::select(problem, kiln_attention::Isa::detect(), choice)?;
        Ok((s.kernel.name(), s.reason))
    }

    /// Attention; returns the output and the name of the kernel that ran it (for logs and the
    /// per-kernel metric).
    fn sdpa(
        &self,
        q: Self::Tensor,
        k: Self::Tensor,
        v: Self::Tensor,
        mask: SdpaMaskArg<Self::Tensor>,
        scale: Option<f32>,
        kernel: KernelChoice,
    ) -> Result<(Self::Tensor, &'static str)>;
    /// Pools `x [batch, seq, h]` with a `[batch, seq]` mask, or a packed `x [1, tokens, h]` with
    /// `[sequences]` lengths (the mask's rank tells which).
    fn pool(&self, x: Self::Tensor, mask: Self::Tensor, mode: PoolMode) -> Result<Self::Tensor>;
    fn l2_normalize(&self, x: Self::Tensor) -> Result<Self::Tensor>;
    fn softmax(&self, x: Self::Tensor) -> Result<Self::Tensor>;

    /// Batched `a · b` (or `a · bᵀ`) over equal leading dimensions.
    fn matmul(&self, a: Self::Tensor, b: Self::Tensor, transpose_b: bool) -> Result<Self::Tensor> {
        let _ = (a, b, transpose_b);
        Err(unsupported_op(self.name(), "matmul"))
    }
    fn scale(&self, x: Self::Tensor, factor: f32) -> Result<Self::Tensor> {
        let _ = (x, factor);
        Err(unsupported_op(self.name(), "scale"))
    }
    /// Sets scores above the top-left diagonal to -∞.
    fn causal_mask(&self, x: Self::Tensor) -> Result<Self::Tensor> {
        let _ = x;
        Err(unsupported_op(self.name(), "causal_mask"))
    }
    fn slice_last(&self, x: Self::Tensor, start: usize, len: usize) -> Result<Self::Tensor> {
        let _ = (x, start, len);
        Err(unsupported_op(self.name(), "slice_last"))
    }

    /// `act(x·wᵀ + b)`.
    fn linear_act(
        &self,
        x: Self::Tensor,
        w: Self::Tensor,
        b: Option<Self::Tensor>,
        act: Activation,
    ) -> Result<Self::Tensor> {
        let y = self.linear(x, w, b)?;
        self.activation(y, act)
    }
    /// `LayerNorm(x + residual)`.
    fn add_layer_norm(
        &self,
        x: Self::Tensor,
        residual: Self::Tensor,
        gamma: Self::Tensor,
        beta: Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor> {
        let sum = self.add(x, residual)?;
        self.layer_norm(sum, gamma, beta, eps)
    }
    /// Columns `[start, start + width)` of `x [b, s, W]`, split into `heads`.
    fn slice_split_heads(
        &self,
        x: Self::Tensor,
        heads: usize,
        start: usize,
        width: usize,
    ) -> Result<Self::Tensor> {
        let part = self.slice_last(x, start, width)?;
        self.split_heads(part, heads)
    }

    /// Sizes (in elements) of the intermediate buffers one run at the current shape needs, from
    /// the plan's memory plan: a backend with an arena may allocate them up front.
    fn reserve(&self, buffer_elems: &[usize]) {
        let _ = buffer_elems;
    }

    // Decoder ops. Defaults refuse, so a backend without them still compiles and runs encoders.

    /// `x / sqrt(mean(x²) + eps) · gamma` over the last dimension.
    fn rms_norm(&self, x: Self::Tensor, gamma: Self::Tensor, eps: f32) -> Result<Self::Tensor> {
        let _ = (x, gamma, eps);
        Err(unsupported_op(self.name(), "rms_norm"))
    }

    /// Element-wise product of two tensors of one shape.
    fn mul(&self, a: Self::Tensor, b: Self::Tensor) -> Result<Self::Tensor> {
        let _ = (a, b);
        Err(unsupported_op(self.name(), "mul"))
    }

    /// Rotary embedding (rotate-half) of `x [b, h, s, d]` by `cos`/`sin [b, s, r]`.
    fn rope(&self, x: Self::Tensor, cos: Self::Tensor, sin: Self::Tensor) -> Result<Self::Tensor> {
        let _ = (x, cos, sin);
        Err(unsupported_op(self.name(), "rope"))
    }

    /// Allocates a paged KV cache for every layer, in this backend's layout.
    fn kv_cache_alloc(&self, spec: &KvCacheSpec) -> Result<Box<KvStore>> {
        let _ = spec;
        Err(unsupported_op(self.name(), "paged_sdpa"))
    }

    /// Writes the step's new keys and values of `layer` into the cache, then runs attention of
    /// `q` over each sequence's context (bottom-right causal). Returns the output and the
    /// kernel that ran. `batch` has been validated against `spec` and the token count.
    #[allow(clippy::too_many_arguments)]
    fn paged_sdpa(
        &self,
        q: Self::Tensor,
        k: Self::Tensor,
        v: Self::Tensor,
        cache: &mut KvStore,
        spec: &KvCacheSpec,
        layer: usize,
        batch: &PagedBatch,
        scale: Option<f32>,
        kernel: KernelChoice,
    ) -> Result<(Self::Tensor, &'static str)> {
        let _ = (q, k, v, cache, spec, layer, batch, scale, kernel);
        Err(unsupported_op(self.name(), "paged_sdpa"))
    }
}
