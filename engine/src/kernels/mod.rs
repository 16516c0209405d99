//! kiln's own CPU kernels, used by [`crate::backend::CpuBackend`]. Each has a plain safe
//! reference it is tested against.

pub mod gemm;
pub mod gemv;
pub mod rowwise;
