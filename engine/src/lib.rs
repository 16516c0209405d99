//! kiln's engine: the graph IR, the backend seam, and the executor.
//!
//! Design note. Models describe *what* to compute by building a [`ir::Graph`] of typed ops with
//! symbolic `batch` and `seq` dimensions; they never choose kernels or devices. The engine
//! decides *how*: [`device::prepare`] turns a graph into a [`exec::Plan`] for one
//! [`backend::Backend`], uploading weights once in the layout that backend wants, and the plan
//! runs any batch shape without rebuilding. The compiler passes and the on-disk plan cache operate
//! on the same IR between those two steps.
//!
//! Two backends implement the seam: kiln's own CPU kernels ([`backend::CpuBackend`]: direct
//! `gemm` calls into owned buffers, the attention crate's kernels) and burn-tensor on a burn
//! device ([`backend::BurnBackend`]: burn-flex now, wgpu with the same code later). They are
//! tested against each other op by op, and both against the PyTorch fixtures.
//!
//! Why our own CPU backend beside burn's: measured here, burn-flex's matmul allocates and
//! zero-fills its output on every call (15–35% slower than calling `gemm` into a preallocated
//! buffer), and its attention is ~3.5× slower than PyTorch's CPU flash kernel. burn remains the
//! device-agnostic layer and the reference.

pub mod backend;
pub mod caps;
pub mod device;
pub mod error;
pub mod exec;
pub mod ir;
pub mod kernels;
pub mod kv;
pub mod quantize;
pub mod tensor;

pub use caps::CpuCaps;
pub use device::{DeviceKind, prepare};
pub use error::{EngineError, Result};
pub use exec::{ExecOptions, Plan, Runnable};
pub use kiln_attention::{Kernel as SdpaKernel, KernelChoice as SdpaKernelChoice};
pub use kv::{KvCache, KvCacheSpec, PagedBatch};
pub use quantize::{LayerFilter, LinearFormat, MathMode, QuantOptions, Quantize, StaticScales};
pub use tensor::{HostData, HostTensor};
