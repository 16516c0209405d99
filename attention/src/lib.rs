//! Scaled dot-product attention for kiln.
//!
//! Design note. Attention is the one op whose best kernel depends on both the hardware and the
//! input (sequence lengths, masks, head sizes), so it lives in its own crate behind one entry
//! point, [`scaled_dot_product_attention`], and a pure selector, [`select`], that names the
//! kernel for a given problem or says why none can run it. The engine asks the selector when it
//! builds a plan and logs the answer; models only ever emit an `Sdpa` node and never choose.
//!
//! Kernels work on plain `f32` slices in `[batch, heads, seq, head_dim]` row-major layout so that
//! they know nothing about tensors, devices or HTTP. [`reference`] is a plain safe loop that every
//! kernel is tested against (and it against PyTorch's float64 fixtures). The **math** kernel in
//! [`math`] materialises each head's scores with GEMMs, as PyTorch's math path does; [`flash`] and
//! [`mem_efficient`] tile over keys with an online softmax so memory stays linear in the sequence
//! length. All three run on the same blocks of work (`task.rs`): a run of query rows of one
//! (sequence, head), cut the same way from a padded batch or from a padding-free ("varlen")
//! batch, so every kernel supports varlen and the driver parallelises over batch × heads × query
//! blocks. Decoders run [`scaled_dot_product_attention_paged`] over a paged KV cache (prefill
//! chunks and decode steps alike, bottom-right causal), with the same selector and kernels.
//!
//! Conventions follow PyTorch's `scaled_dot_product_attention`: a key-padding mask entry of `true`
//! means "attend to this key" (burn uses the opposite convention; the engine converts).

mod error;
pub mod flash;
mod gemm;
mod gpu_select;
mod half_inputs;
pub mod math;
pub mod mem_efficient;
mod paged;
mod params;
pub mod reference;
mod select;
pub mod simd;
mod task;
mod tiled;

pub use error::SdpaError;
pub use gpu_select::{
    GPU_FLASH_MAX_HEAD_DIM, GPU_FLASH_MIN_WORKGROUP_BYTES, GpuCaps, gpu_unsupported, select_gpu,
};
pub use half_inputs::{
    HalfElement, scaled_dot_product_attention_half, scaled_dot_product_attention_varlen_half,
};
pub use paged::{PagedParams, scaled_dot_product_attention_paged};
pub use params::{
    CausalAlign, Mask, MaskKind, ProblemSummary, SdpaParams, SdpaShape, VarlenParams,
};
pub use select::{
    Kernel, KernelChoice, MATH_MAX_SCORES, Selection, auto_kernel, select, unsupported,
};
pub use simd::Isa;

use task::Shared;

/// Runs attention with the kernel the selector picks for `params` and `choice`.
///
/// `q` is `[batch, q_heads, q_len, head_dim]`, `k` and `v` are `[batch, kv_heads, kv_len,
/// head_dim]`, and `out` receives `[batch, q_heads, q_len, head_dim]`. Every length is checked
/// before any work; a mismatch, or a forced kernel that cannot run the input, is an error,
/// never a panic. Returns the kernel that ran.
pub fn scaled_dot_product_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    params: &SdpaParams<'_>,
    choice: KernelChoice,
) -> Result<Kernel, SdpaError> {
    params.validate(q.len(), k.len(), v.len(), out.len())?;
    let kernel = select(&params.summary(), Isa::detect(), choice)?.kernel;
    let shared = Shared {
        mask: params.mask,
        scale: params.scale(),
    };
    let s = params.shape;
    let k_t = keys_transposed(kernel, k, s.kv_len, s.head_dim);
    let blocks = task::padded(q, k, &k_t, v, out, params, kernel);
    task::run(blocks, shared);
    Ok(kernel)
}

/// Padding-free attention over sequences packed back to back (see [`VarlenParams`] for the
/// layout). Each sequence attends only to itself, and under `auto` each sequence gets the kernel
/// the selector picks for its own length, so a sequence's output is bit-for-bit what it would be
/// alone, whatever it is packed with. Returns the kernel of the longest sequence.
pub fn scaled_dot_product_attention_varlen(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    params: &VarlenParams<'_>,
    choice: KernelChoice,
) -> Result<Kernel, SdpaError> {
    params.validate(q.len(), k.len(), v.len(), out.len())?;
    let summary = params.summary();
    let kernel = select(&summary, Isa::detect(), choice)?.kernel;
    let shared = Shared {
        mask: params.causal.map_or(Mask::None, Mask::Causal),
        scale: params.scale(),
    };
    // The longest sequence needs the most tiled kernel, so it decides whether Kᵀ is needed.
    let k_t = keys_transposed(kernel, k, params.total_kv(), params.head_dim);
    let kernel_of = |q_len: usize, kv_len: usize| match choice {
        KernelChoice::Force(forced) => forced,
        KernelChoice::Auto => {
            let mut one = summary;
            (one.shape.q_len, one.shape.kv_len) = (q_len, kv_len);
            auto_kernel(&one)
        }
    };
    let blocks = task::varlen(q, k, &k_t, v, out, params, kernel_of);
    task::run(blocks, shared);
    Ok(kernel)
}

/// The tiled kernels read `Kᵀ` (see `task::transpose_keys`); math reads `K` once per head and
/// needs no copy.
fn keys_transposed(kernel: Kernel, k: &[f32], len: usize, d: usize) -> Vec<f32> {
    match kernel {
        Kernel::Math => Vec::new(),
        Kernel::Flash | Kernel::MemEfficient => task::transpose_keys(k, len, d),
    }
}
