//! The kernel selector: a pure function of the problem, the CPU and the user's choice.
//!
//! Priority (auto), measured in `docs/BENCHMARKS.md` (`cargo bench -p kiln-attention`):
//! 1. **math** when a head's score matrix is small (`q_len · kv_len <= MATH_MAX_SCORES`, i.e. up to
//!    1024 × 1024, 4 MiB of scores per thread): two large GEMM calls per head beat tiling, whose
//!    smaller GEMMs and per-tile bookkeeping cost more than they save while the scores still sit
//!    in cache. Measured (B=1, H=12, D=64): math 4.7 vs flash 5.1 ms at S = 512, 18.7 vs 19.7 ms at
//!    S = 1024; at S = 2048 the scores (16 MiB per head) spill and flash wins.
//! 2. **flash** for longer sequences with an index-computable mask (none, causal, key padding,
//!    varlen) and `head_dim <= 256`: fastest, O(S) memory, skips masked tiles.
//! 3. **memory-efficient** for everything else at length: dense boolean masks, additive biases,
//!    and head sizes above 256. O(S) memory.
//!
//! Math runs everything but needs `O(q_len · kv_len)` memory per thread.

use crate::SdpaError;
use crate::flash;
use crate::params::ProblemSummary;
use crate::simd::Isa;

/// Largest `q_len · kv_len` for which auto picks math (the measured crossover, module docs).
pub const MATH_MAX_SCORES: usize = 1024 * 1024;

/// An attention kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Materialises scores with one GEMM per head; the reference every other kernel is tested
    /// against, and the fastest for short sequences.
    Math,
    /// Tiled online softmax over query and key blocks; index-computable masks only.
    Flash,
    /// Key-chunked online softmax; any mask or additive bias.
    MemEfficient,
}

impl Kernel {
    pub const ALL: [Kernel; 3] = [Kernel::Math, Kernel::Flash, Kernel::MemEfficient];

    /// The name used in config, CLI, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Math => "math",
            Kernel::Flash => "flash",
            Kernel::MemEfficient => "mem_efficient",
        }
    }
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the user asked for: `auto` lets the selector decide; a named kernel is a hard
/// requirement (an input it cannot run is an error, never a silent fallback). This is
/// PyTorch's `torch.nn.attention.sdpa_kernel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelChoice {
    #[default]
    Auto,
    Force(Kernel),
}

impl std::str::FromStr for KernelChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(KernelChoice::Auto),
            "math" => Ok(KernelChoice::Force(Kernel::Math)),
            "flash" => Ok(KernelChoice::Force(Kernel::Flash)),
            "mem_efficient" | "mem-efficient" | "efficient" => {
                Ok(KernelChoice::Force(Kernel::MemEfficient))
            }
            other => Err(format!(
                "unknown sdpa kernel `{other}` (expected auto, flash, mem_efficient or math)"
            )),
        }
    }
}

impl std::fmt::Display for KernelChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelChoice::Auto => f.write_str("auto"),
            KernelChoice::Force(k) => f.write_str(k.name()),
        }
    }
}

/// The selector's answer: which kernel, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub kernel: Kernel,
    pub reason: String,
}

/// Why `kernel` cannot run `problem`, or `None` if it can.
pub fn unsupported(kernel: Kernel, problem: &ProblemSummary) -> Option<String> {
    match kernel {
        Kernel::Math | Kernel::MemEfficient => None,
        Kernel::Flash if !problem.mask.is_structured() => Some(format!(
            "flash takes only index-computable masks (none, causal, key padding, varlen), not a \
             dense {} mask; use mem_efficient or math",
            problem.mask.name()
        )),
        Kernel::Flash if problem.shape.head_dim > flash::MAX_HEAD_DIM => Some(format!(
            "flash takes head_dim up to {}, got {}; use mem_efficient or math",
            flash::MAX_HEAD_DIM,
            problem.shape.head_dim
        )),
        Kernel::Flash => None,
    }
}

/// The kernel `auto` runs for `problem`, without the reason: what a varlen call asks once per
/// sequence, so it builds no strings where flash applies.
pub fn auto_kernel(problem: &ProblemSummary) -> Kernel {
    let s = &problem.shape;
    if s.q_len * s.kv_len <= MATH_MAX_SCORES {
        Kernel::Math
    } else if unsupported(Kernel::Flash, problem).is_none() {
        Kernel::Flash
    } else {
        Kernel::MemEfficient
    }
}

/// A forced kernel (`sdpa_kernel = …`): the selection, or, when `why_not` names a constraint the
/// input breaks, the error that says so. `place` ends the reason (e.g. " on the GPU").
pub(crate) fn forced(
    kernel: Kernel,
    why_not: Option<String>,
    place: &str,
) -> Result<Selection, SdpaError> {
    match why_not {
        Some(reason) => Err(SdpaError::Unsupported {
            kernel: kernel.name(),
            reason,
        }),
        None => Ok(Selection {
            kernel,
            reason: format!("forced by configuration (sdpa_kernel = {kernel}){place}"),
        }),
    }
}

/// Picks the kernel for `problem` on a CPU with `isa`. The same function answers "is this
/// supported": for a forced kernel, an `Err` names the constraint that rules the input out.
pub fn select(
    problem: &ProblemSummary,
    isa: Isa,
    choice: KernelChoice,
) -> Result<Selection, SdpaError> {
    let s = &problem.shape;
    let scores = s.q_len * s.kv_len;
    match choice {
        KernelChoice::Force(kernel) => forced(kernel, unsupported(kernel, problem), ""),
        KernelChoice::Auto => {
            let kernel = auto_kernel(problem);
            let reason = match kernel {
                Kernel::Math => format!(
                    "q_len {} × kv_len {} = {scores} scores per head <= {MATH_MAX_SCORES}: two \
                     GEMMs per head beat tiling",
                    s.q_len, s.kv_len
                ),
                Kernel::Flash => format!(
                    "{scores} scores per head > {MATH_MAX_SCORES} with a {} mask and head_dim \
                     {}: flash (row ops: {})",
                    problem.mask.name(),
                    s.head_dim,
                    isa.name()
                ),
                Kernel::MemEfficient => format!(
                    "{scores} scores per head > {MATH_MAX_SCORES}; not flash because {}",
                    unsupported(Kernel::Flash, problem).unwrap_or_default()
                ),
            };
            Ok(Selection { kernel, reason })
        }
    }
}
