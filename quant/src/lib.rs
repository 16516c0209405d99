//! Quantized and reduced-precision kernels for kiln: int8 and bf16 linear layers.
//!
//! Design note. This crate holds the kernels that make a compiled plan cheaper than its fp32
//! graph. It knows nothing of graphs, models or HTTP: the engine decides where a quantized kernel
//! replaces an fp32 one, and hands this crate a weight to pack and rows to multiply.
//!
//! - [`int8`]: s8 weights (symmetric, per output channel) × u8 activations (asymmetric, per token
//!   at run time or per tensor from calibration), exact i32 accumulation, f32 out. Kernels:
//!   portable scalar, AVX2 (exact, `vpmaddwd` on i16), AVX-VNNI and AVX512-VNNI (`vpdpbusd`),
//!   chosen at run time; all give bit-identical results, tested against [`int8::reference`].
//! - [`bf16`]: weights stored as bf16, inputs rounded to bf16, f32 accumulation. Kernels:
//!   portable, AVX2+FMA, AVX512-BF16 (`vdpbf16ps`), and aarch64 `bfdot` / `bfmmla` (inline
//!   assembly; Rust has no aarch64 BF16 intrinsics yet) behind
//!   `is_aarch64_feature_detected!("bf16")`.
//! - [`observer`]: activation-range observers for static quantization (min-max, histogram
//!   percentile).
//!
//! Every kernel keeps its `unsafe` in one file next to a `// SAFETY:` comment, detects its CPU
//! features at run time, and is tested against a scalar reference in this crate. The crate has no
//! required dependencies (rayon behind the default `parallel` feature), so CI can cross-build it
//! for aarch64 and run its tests under qemu in seconds.

pub mod bf16;
pub mod int8;
pub mod observer;

pub use int8::{ActParams, ActQuant, Int8Kernel, Int8Weights, QuantError};

/// Runs `step(chain, t)` for every `t` in `0..steps`, step `t` on chain `t % C`, in increasing
/// `t` within each chain. The wide x86 tiles keep `C` independent sets of accumulators this way,
/// so that `C` times as many multiply-accumulates are in flight as one set's latency allows, and
/// add the sets at the end.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline(always)]
pub(crate) fn round_robin<A, const C: usize>(
    chains: &mut [A; C],
    steps: usize,
    mut step: impl FnMut(&mut A, usize),
) {
    let mut t = 0;
    while t + C <= steps {
        for (j, chain) in chains.iter_mut().enumerate() {
            step(chain, t + j);
        }
        t += C;
    }
    for (chain, tt) in chains.iter_mut().zip(t..steps) {
        step(chain, tt);
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    /// Notes a kernel the CPU lacks. `KILN_REQUIRE_KERNELS` (comma-separated kernel names) turns
    /// that into a failure, so that CI cannot skip the kernels it means to test (the aarch64 run
    /// under qemu requires `bfdot,bfmmla`).
    pub fn skipped(kernel: &str) {
        let required = std::env::var("KILN_REQUIRE_KERNELS").unwrap_or_default();
        assert!(
            !required.split(',').any(|r| r.trim() == kernel),
            "kernel {kernel} is required (KILN_REQUIRE_KERNELS) but this CPU does not support it"
        );
        eprintln!("kernel {kernel} is not supported by this CPU: its test is skipped");
    }

    /// A small deterministic generator for test data (no dependency needed).
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Self {
            Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        pub fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// Uniform in [0, 1).
        pub fn uniform(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
        }

        /// Roughly normal (sum of uniforms), times `scale`.
        pub fn normal_vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
            (0..n)
                .map(|_| ((0..4).map(|_| self.uniform()).sum::<f32>() - 2.0) * scale * 1.7)
                .collect()
        }

        pub fn pick<T: Copy>(&mut self, from: &[T]) -> T {
            from[(self.next_u64() % from.len() as u64) as usize]
        }
    }
}
