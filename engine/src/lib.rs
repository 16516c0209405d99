//! kiln's engine: the graph IR, the backend seam, and the executor.
//!
//! Design note. Models describe *what* to compute by building a [`ir::Graph`] of typed ops with
//! symbolic `batch` and `seq` dimensions; they never choose kernels or devices. The engine
//! decides *how*, in three steps:
//!
//! 1. [`compile`] rewrites the graph for one backend: fusion passes, kernel selection, weight
//!    pre-packing, a memory plan (each pass a file in `compile/`, tested on small graphs).
//! 2. [`cache`] stores the compiled graph and its packed weights on disk, keyed by the model
//!    files' contents, the options, the device's facts and kiln's build; the next start maps the
//!    entry instead of compiling.
//! 3. [`device::prepare`] turns a graph (compiled or not) into an [`exec::Plan`] for one
//!    [`backend::Backend`], and the plan runs any batch shape without rebuilding (dimensions stay
//!    symbolic; kernels that care about sizes choose per call, see `docs/COMPILER.md`).
//!
//! [`load`] is the one entry point that runs the three for a model: given the model's files, a
//! graph builder and the options, it returns a runnable plan and how it came to be. Models of
//! every kind (encoders, decoders) load through it, so all of them get the plan cache.
//!
//! Weight formats: a weight's layout is a [`storage::WeightFormat`] chosen per linear by the
//! `kernels` pass ([`compile::select_linear`], a pure rule over the linear's
//! [`quantize::LinearFormat`] and the formats the backend lists in [`compile::CompileTarget`]);
//! `prepack` turns the f32 weight into a [`storage::StoredTensor`] of that format, which the plan
//! cache stores and maps back as aligned raw bytes. int8 and bf16 linears keep a plain weight in
//! the plan, and the backend packs it for its kernel at load ([`backend::Backend::upload_linear`]).
//!
//! Two backends implement the seam: kiln's own CPU kernels ([`backend::CpuBackend`]: direct
//! `gemm` calls into owned buffers, the attention crate's kernels) and burn-tensor on a burn
//! device ([`backend::BurnBackend`]: burn-flex, or a GPU through wgpu with the same code when
//! built with the `wgpu` feature; [`gpu`] lists adapters and [`device`] resolves `--device auto`).
//! They are tested against each other op by op on every device the machine has, and all against
//! the PyTorch fixtures.
//!
//! Why our own CPU backend beside burn's: measured here, burn-flex's matmul allocates and
//! zero-fills its output on every call (15–35% slower than calling `gemm` into a preallocated
//! buffer), and its attention is ~3.5× slower than PyTorch's CPU flash kernel. burn remains the
//! device-agnostic layer and the reference.

pub mod backend;
pub mod cache;
pub mod caps;
pub mod compile;
pub mod device;
pub mod error;
pub mod exec;
pub mod gpu;
pub mod ir;
pub mod kernels;
pub mod kv;
pub mod load;
pub mod quantize;
pub mod storage;
pub mod tensor;

pub use caps::CpuCaps;
pub use device::{DeviceChoice, DeviceKind, prepare};
pub use error::{EngineError, Result};
pub use exec::{ExecOptions, Plan, Runnable};
pub use kiln_attention::{Kernel as SdpaKernel, KernelChoice as SdpaKernelChoice};
pub use kv::{KvCache, KvCacheSpec, PagedBatch};
pub use load::{CacheOutcome, PlanInfo, PlanSpec};
pub use quantize::{LayerFilter, LinearFormat, MathMode, QuantOptions, Quantize, StaticScales};
pub use tensor::{HostData, HostTensor};
