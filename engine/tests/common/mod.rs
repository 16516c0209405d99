//! Helpers shared by the engine's integration tests (`mod common;` in each test file).

use kiln_engine::HostTensor;

/// `n` deterministic pseudo-random values in [-1, 1) from `seed` (xorshift).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 20_000) as f32 / 10_000.0 - 1.0
        })
        .collect()
}

/// An f32 tensor of `shape` filled with [`values`].
pub fn f32_tensor(shape: &[usize], seed: u64) -> HostTensor {
    HostTensor::f32(shape.to_vec(), values(shape.iter().product(), seed)).unwrap()
}
