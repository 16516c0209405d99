//! Quantized and reduced-precision kernels for kiln (int8, bf16).
//!
//! Design note. This crate holds the kernels that make a compiled plan cheaper than its fp32
//! graph: int8 GEMMs with s8 per-channel weights and u8 activations (AVX2, VNNI and a portable
//! scalar path, each tested against a scalar reference), and bf16 fast-math GEMMs. It knows
//! nothing of graphs, models or HTTP: the engine's compiler decides where a quantized kernel
//! replaces an fp32 one. The crate is part of the workspace from the start so that the dependency
//! direction (engine → quant) is fixed; its kernels arrive with the quantization work.
