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
//! [`math`] materialises each head's scores with GEMMs, as PyTorch's math path does; the flash and
//! memory-efficient kernels arrive beside it behind the same selector.
//!
//! Conventions follow PyTorch's `scaled_dot_product_attention`: a key-padding mask entry of `true`
//! means "attend to this key" (burn uses the opposite convention; the engine converts).

mod error;
pub mod math;
mod params;
pub mod reference;
mod select;

pub use error::SdpaError;
pub use params::{CausalAlign, Mask, SdpaParams, SdpaShape};
pub use select::{Kernel, KernelChoice, Selection, select};

/// Runs attention with the kernel the selector picks for `params` and `choice`.
///
/// `q` is `[batch, q_heads, q_len, head_dim]`, `k` and `v` are `[batch, kv_heads, kv_len,
/// head_dim]`, and `out` receives `[batch, q_heads, q_len, head_dim]`. Every length is checked
/// before any work; a mismatch is an error, never a panic.
pub fn scaled_dot_product_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    params: &SdpaParams<'_>,
    choice: KernelChoice,
) -> Result<Kernel, SdpaError> {
    params.validate(q.len(), k.len(), v.len(), out.len())?;
    let selection = select(&params.summary(), choice)?;
    match selection.kernel {
        Kernel::Math => math::sdpa(q, k, v, out, params),
    }
    Ok(selection.kernel)
}
