//! The kernel selector for GPUs: a pure function of the problem, the adapter's limits and the
//! user's choice, like [`crate::select`] is for CPUs.
//!
//! The kernels themselves run in the engine's wgpu backend (this crate knows nothing about
//! devices); what they are is fixed here so both the selector and its tests can name them:
//! - **flash**: burn's fused attention (`burn_tensor::module::attention` on a CubeCL device). It
//!   tiles keys with an online softmax in workgroup memory and never materialises the scores.
//!   burn's autotune picks among its flash variants per shape, and falls back to its own
//!   separate-kernel path where no flash variant can launch (a head size its tiles do not
//!   divide). K/V must have Q's head count and no custom scale may be passed (either forces
//!   burn's unfused path), so the engine repeats KV heads for grouped-query attention and folds a
//!   custom scale into Q.
//! - **math**: the engine's own composition of burn ops: `Q·Kᵀ` as one batched GEMM, the mask
//!   as a fill, softmax, `·V`. It materialises `q_len × kv_len` scores per head: the reference
//!   path, and the one that runs anything.
//!
//! There is no memory-efficient kernel on GPUs: forcing it is an error that says so.
//!
//! Auto picks flash wherever it can run and math otherwise. Unlike the CPU, where the math
//! kernel wins below ~1 M scores per head (two cache-resident GEMMs), a GPU's math path pays a
//! round trip through device memory for every score, so there is no short-sequence crossover
//! to encode; `docs/BENCHMARKS.md` has the measurements behind this.

use crate::SdpaError;
use crate::params::ProblemSummary;
use crate::select::{Kernel, KernelChoice, Selection, forced};

/// Largest head size burn's flash tiles take; larger heads run math.
pub const GPU_FLASH_MAX_HEAD_DIM: usize = 256;

/// Workgroup (shared) memory a flash tile needs at least: WebGPU's guaranteed minimum. An
/// adapter reporting less (none that wgpu exposes today) runs math.
pub const GPU_FLASH_MIN_WORKGROUP_BYTES: u32 = 16 * 1024;

/// What the selector needs to know about a GPU adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuCaps {
    /// `max_compute_workgroup_storage_size`: shared memory per workgroup, in bytes.
    pub max_workgroup_storage_bytes: u32,
    /// Whether shaders may use f16 (reported; kiln's GPU path computes in f32 today).
    pub shader_f16: bool,
}

/// Why `kernel` cannot run `problem` on a GPU with `caps`, or `None` if it can.
pub fn gpu_unsupported(kernel: Kernel, problem: &ProblemSummary, caps: &GpuCaps) -> Option<String> {
    match kernel {
        Kernel::Math => None,
        Kernel::MemEfficient => {
            Some("there is no memory-efficient kernel on GPUs; use flash or math (or auto)".into())
        }
        Kernel::Flash if !problem.mask.is_structured() => Some(format!(
            "flash on a GPU takes only index-computable masks (none, causal, key padding, \
             varlen), not a dense {} mask; use math",
            problem.mask.name()
        )),
        Kernel::Flash if problem.shape.head_dim > GPU_FLASH_MAX_HEAD_DIM => Some(format!(
            "flash on a GPU takes head_dim up to {GPU_FLASH_MAX_HEAD_DIM}, got {}; use math",
            problem.shape.head_dim
        )),
        Kernel::Flash if caps.max_workgroup_storage_bytes < GPU_FLASH_MIN_WORKGROUP_BYTES => {
            Some(format!(
                "flash needs {GPU_FLASH_MIN_WORKGROUP_BYTES} bytes of workgroup memory, this \
                 adapter has {}; use math",
                caps.max_workgroup_storage_bytes
            ))
        }
        Kernel::Flash => None,
    }
}

/// Picks the GPU kernel for `problem`. The same function answers "is this supported": for a
/// forced kernel, an `Err` names the constraint that rules the input out.
pub fn select_gpu(
    problem: &ProblemSummary,
    caps: &GpuCaps,
    choice: KernelChoice,
) -> Result<Selection, SdpaError> {
    match choice {
        KernelChoice::Force(kernel) => forced(
            kernel,
            gpu_unsupported(kernel, problem, caps),
            " on the GPU",
        ),
        KernelChoice::Auto => Ok(match gpu_unsupported(Kernel::Flash, problem, caps) {
            None => Selection {
                kernel: Kernel::Flash,
                reason: format!(
                    "GPU: flash (burn's fused attention) takes a {} mask and head_dim {}",
                    problem.mask.name(),
                    problem.shape.head_dim
                ),
            },
            Some(why_not) => Selection {
                kernel: Kernel::Math,
                reason: format!("GPU: math, because {why_not}"),
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{MaskKind, SdpaShape};

    fn problem(head_dim: usize, mask: MaskKind) -> ProblemSummary {
        ProblemSummary {
            shape: SdpaShape {
                batch: 1,
                q_heads: 12,
                kv_heads: 4,
                q_len: 4096,
                kv_len: 4096,
                head_dim,
            },
            mask,
            varlen: false,
        }
    }

    const CAPS: GpuCaps = GpuCaps {
        max_workgroup_storage_bytes: 32 * 1024,
        shader_f16: false,
    };

    #[test]
    fn auto_takes_flash_where_it_runs_and_math_elsewhere() {
        let p = problem(64, MaskKind::CausalTopLeft);
        assert_eq!(
            select_gpu(&p, &CAPS, KernelChoice::Auto).unwrap().kernel,
            Kernel::Flash
        );
        let big_head = problem(512, MaskKind::CausalTopLeft);
        let s = select_gpu(&big_head, &CAPS, KernelChoice::Auto).unwrap();
        assert_eq!(s.kernel, Kernel::Math);
        assert!(s.reason.contains("head_dim up to 256"), "{}", s.reason);
        let dense = problem(64, MaskKind::Bool);
        assert_eq!(
            select_gpu(&dense, &CAPS, KernelChoice::Auto)
                .unwrap()
                .kernel,
            Kernel::Math
        );
        let tiny = GpuCaps {
            max_workgroup_storage_bytes: 8 * 1024,
            ..CAPS
        };
        assert_eq!(
            select_gpu(&p, &tiny, KernelChoice::Auto).unwrap().kernel,
            Kernel::Math
        );
    }

    #[test]
    fn forcing_a_kernel_the_gpu_lacks_is_an_error_that_says_why() {
        let p = problem(64, MaskKind::None);
        let err = select_gpu(&p, &CAPS, KernelChoice::Force(Kernel::MemEfficient)).unwrap_err();
        assert!(
            err.to_string()
                .contains("no memory-efficient kernel on GPUs"),
            "{err}"
        );
        let err = select_gpu(
            &problem(300, MaskKind::None),
            &CAPS,
            KernelChoice::Force(Kernel::Flash),
        )
        .unwrap_err();
        assert!(err.to_string().contains("head_dim up to 256"), "{err}");
        for kernel in [Kernel::Math, Kernel::Flash] {
            assert_eq!(
                select_gpu(&p, &CAPS, KernelChoice::Force(kernel))
                    .unwrap()
                    .kernel,
                kernel
            );
        }
    }
}
