//! kiln's own CPU kernels, used by [`crate::backend::CpuBackend`]. Each has a plain safe
//! reference it is tested against.

/// Defines `fn $name(args)` whose body is compiled twice: as written, and with AVX2 enabled
/// (chosen at run time on x86-64 CPUs that have it). The body must be plain safe code; the AVX2
/// copy lets the compiler vectorise its loops 8 wide instead of 4. Both copies run the same
/// IEEE operations in the same order, so they give bit-identical results.
macro_rules! avx2_dispatch {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) {
                    imp($($arg),*)
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
