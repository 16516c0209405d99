//! What the machine can do, detected at run time (never assumed from the build machine).

use serde::Serialize;

/// CPU features that decide which kernels can run.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct CpuCaps {
    pub arch: &'static str,
    pub avx2: bool,
    pub fma: bool,
    pub avx512f: bool,
    pub avx512_vnni: bool,
    pub avx_vnni: bool,
    pub avx512_bf16: bool,
    pub neon: bool,
    /// aarch64 BF16 dot/matrix instructions (`bfdot`, `bfmmla`).
    pub arm_bf16: bool,
    pub arm_i8mm: bool,
    /// Logical cores this process may use.
    pub cores: usize,
}

impl CpuCaps {
    pub fn detect() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        #[allow(unused_mut)]
        let mut caps = CpuCaps {
            arch: std::env::consts::ARCH,
            avx2: false,
            fma: false,
            avx512f: false,
            avx512_vnni: false,
            avx_vnni: false,
            avx512_bf16: false,
            neon: false,
            arm_bf16: false,
            arm_i8mm: false,
            cores,
        };
        #[cfg(target_arch = "x86_64")]
        {
            caps.avx2 = std::arch::is_x86_feature_detected!("avx2");
            caps.fma = std::arch::is_x86_feature_detected!("fma");
            caps.avx512f = std::arch::is_x86_feature_detected!("avx512f");
            caps.avx512_vnni = std::arch::is_x86_feature_detected!("avx512vnni");
            caps.avx_vnni = std::arch::is_x86_feature_detected!("avxvnni");
            caps.avx512_bf16 = std::arch::is_x86_feature_detected!("avx512bf16");
        }
        #[cfg(target_arch = "aarch64")]
        {
            caps.neon = std::arch::is_aarch64_feature_detected!("neon");
            caps.arm_bf16 = std::arch::is_aarch64_feature_detected!("bf16");
            caps.arm_i8mm = std::arch::is_aarch64_feature_detected!("i8mm");
        }
        caps
    }

    /// The detected SIMD features as short names, e.g. `["avx2", "fma"]`.
    pub fn feature_names(&self) -> Vec<&'static str> {
        [
            (self.avx2, "avx2"),
            (self.fma, "fma"),
            (self.avx512f, "avx512f"),
            (self.avx512_vnni, "avx512vnni"),
            (self.avx_vnni, "avxvnni"),
            (self.avx512_bf16, "avx512bf16"),
            (self.neon, "neon"),
            (self.arm_bf16, "bf16"),
            (self.arm_i8mm, "i8mm"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }
}

impl std::fmt::Display for CpuCaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} with {} cores [{}]",
            self.arch,
            self.cores,
            self.feature_names().join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_is_consistent() {
        let caps = CpuCaps::detect();
        assert!(caps.cores >= 1);
        // FMA-less AVX-512 machines do not exist; AVX-512 implies AVX2.
        if caps.avx512f {
            assert!(caps.avx2 && caps.fma);
        }
        assert!(caps.to_string().contains(std::env::consts::ARCH));
    }
}
