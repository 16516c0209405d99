//! Helpers shared by the engine's integration tests (`mod common;` in each test file).

// Each test file uses some of these helpers, none uses all.
#![allow(dead_code)]

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

/// Every device these tests run on: kiln's CPU kernels, burn-flex and each wgpu adapter. With
/// `KILN_REQUIRE_WGPU=1` (CI, which installs Mesa's lavapipe) a run without a wgpu adapter fails
/// instead of quietly testing fewer devices.
pub fn devices() -> Vec<kiln_engine::DeviceKind> {
    let all = kiln_engine::DeviceKind::available();
    let required = std::env::var("KILN_REQUIRE_WGPU").is_ok_and(|v| v == "1");
    assert!(
        !required || all.iter().any(|d| d.is_gpu()),
        "KILN_REQUIRE_WGPU=1 but {}",
        if kiln_engine::gpu::compiled() {
            "no wgpu adapter was found (apt-get install mesa-vulkan-drivers libvulkan1)"
        } else {
            "this build lacks the `wgpu` feature (scripts/test.sh turns it on)"
        }
    );
    all
}
