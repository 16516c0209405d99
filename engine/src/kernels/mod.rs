//! kiln's own CPU kernels, used by [`crate::backend::CpuBackend`]. Each has a plain safe
//! reference it is tested against.

/// Whether a buffer of `len` elements holds `rows * cols`, without the product overflowing: the
/// kernels' entry checks, which guard their unchecked inner loops, must not wrap on shapes read
/// from a damaged plan file.
pub(crate) fn holds(len: usize, rows: usize, cols: usize) -> bool {
    rows.checked_mul(cols).is_some_and(|need| len >= need)
}

/// Defines `fn $name(args)` whose body is compiled three times: as written, with AVX2 enabled
/// and with AVX-512F enabled (the widest the CPU has is chosen at run time on x86-64). The body
/// must be plain safe code; the AVX2 and AVX-512 copies let the compiler vectorise its loops 8
/// or 16 wide instead of 4. Every copy runs the same IEEE operations in the same order (Rust
/// never reassociates or contracts float arithmetic), so they give bit-identical results.
macro_rules! simd_dispatch {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) {
                    imp($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    #[allow(unsafe_code)]
                    // SAFETY: `avx512` is `imp` compiled with AVX-512F allowed, and the CPU has
                    // AVX-512F (detected at run time just above).
                    unsafe {
                        avx512($($arg),*)
                    };
                    return;
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    #[allow(unsafe_code)]
                    // SAFETY: `avx2` is `imp` compiled with AVX2 allowed, and the CPU has AVX2
                    // (detected at run time just above).
                    unsafe {
                        avx2($($arg),*)
                    };
                    return;
                }
            }
            imp($($arg),*)
        }
    };
}

pub mod gemm;
pub mod gemv;
pub mod panel_gemm;
pub mod rowwise;
pub mod vmath;
