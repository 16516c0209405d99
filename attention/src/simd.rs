//! Row operations of the online softmax, vectorised for the CPU the process runs on.
//!
//! The tiled kernels spend their non-GEMM time in three row operations: the maximum of a row of
//! scores, `x = exp(x - m)` with the row sum, and scaling a row. [`Isa::detect`] picks AVX-512,
//! AVX2+FMA or a portable loop once, at run time (never at build time, so one binary runs on
//! every x86-64 and aarch64 machine). Every vector path computes the same Cephes-style `exp`
//! polynomial as [`exp_portable`], and the tests compare each path with `f32::exp` and with the
//! portable loop.

use std::sync::OnceLock;

/// The instruction set the row operations use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    Avx512,
    Avx2Fma,
    Portable,
}

impl Isa {
    /// The best instruction set this CPU offers (detected once per process).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if std::is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    return Isa::Avx2Fma;
                }
            }
            Isa::Portable
        })
    }

    /// Every instruction set this CPU can run, best first (tests run each of them).
    pub fn available() -> Vec<Isa> {
        let mut all = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                all.push(Isa::Avx512);
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                all.push(Isa::Avx2Fma);
            }
        }
        all.push(Isa::Portable);
        all
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2Fma => "avx2+fma",
            Isa::Portable => "portable",
        }
    }
}

// Cephes `expf`: exp(x) = 2^n · e^r with n = round(x·log2 e) and |r| <= ln2/2, e^r by a degree-7
// polynomial. Below `EXP_LO` the result is flushed to exactly 0, which is what a masked score
// (-inf) must give.
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_LO: f32 = -87.336_55;
const EXP_HI: f32 = 88.376_26;
const P0: f32 = 1.987_569_1e-4;
const P1: f32 = 1.398_199_9e-3;
const P2: f32 = 8.333_452e-3;
const P3: f32 = 4.166_579_6e-2;
const P4: f32 = 0.166_666_65;
const P5: f32 = 0.5;

/// The scalar form of the vectorised `exp` (also the portable path).
#[inline]
pub fn exp_portable(x: f32) -> f32 {
    if x < EXP_LO {
        return 0.0;
    }
    let x = x.min(EXP_HI);
    let n = (x * LOG2E).round();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = P0;
    p = p * r + P1;
    p = p * r + P2;
    p = p * r + P3;
    p = p * r + P4;
    p = p * r + P5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Largest element of `row` (`-inf` for an empty or fully masked row).
#[allow(unsafe_code)]
pub fn row_max(isa: Isa, row: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` is only produced by `detect`/`available` after
        // `is_x86_feature_detected!("avx512f")` returned true on this CPU.
        Isa::Avx512 => unsafe { x86::row_max_avx512(row) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2Fma` is only produced after detecting avx2 and fma on this CPU.
        Isa::Avx2Fma => unsafe { x86::row_max_avx2(row) },
        _ => row.iter().copied().fold(f32::NEG_INFINITY, f32::max),
    }
}

/// `row[j] = exp(row[j] - m)` for every `j`; returns the sum of the new values. `m` is finite.
#[allow(unsafe_code)]
pub fn exp_shift_sum(isa: Isa, row: &mut [f32], m: f32) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `row_max`: the variant proves the CPU has AVX-512F.
        Isa::Avx512 => unsafe { x86::exp_shift_sum_avx512(row, m) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see `row_max`: the variant proves the CPU has AVX2 and FMA.
        Isa::Avx2Fma => unsafe { x86::exp_shift_sum_avx2(row, m) },
        _ => exp_shift_sum_portable(row, m),
    }
}

fn exp_shift_sum_portable(row: &mut [f32], m: f32) -> f32 {
    let mut sum = 0.0f32;
    for x in row.iter_mut() {
        *x = exp_portable(*x - m);
        sum += *x;
    }
    sum
}

/// `row *= a`.
#[inline]
pub fn scale(row: &mut [f32], a: f32) {
    // A plain loop: the compiler vectorises it for the baseline ISA, and it is not hot (once per
    // row per key block).
    row.iter_mut().for_each(|x| *x *= a);
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn row_max_avx512(row: &[f32]) -> f32 {
        let chunks = row.chunks_exact(16);
        let tail = chunks.remainder();
        let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
        for c in chunks {
            // SAFETY: `c` holds exactly 16 f32s; unaligned loads are allowed.
            acc = _mm512_max_ps(acc, unsafe { _mm512_loadu_ps(c.as_ptr()) });
        }
        let m = _mm512_reduce_max_ps(acc);
        tail.iter().copied().fold(m, f32::max)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row_max_avx2(row: &[f32]) -> f32 {
        let chunks = row.chunks_exact(8);
        let tail = chunks.remainder();
        let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in chunks {
            // SAFETY: `c` holds exactly 8 f32s; unaligned loads are allowed.
            acc = _mm256_max_ps(acc, unsafe { _mm256_loadu_ps(c.as_ptr()) });
        }
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds 8 f32s.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        let m = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        tail.iter().copied().fold(m, f32::max)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp512(x: __m512) -> __m512 {
        let underflow = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(EXP_LO));
        let x = _mm512_min_ps(x, _mm512_set1_ps(EXP_HI));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(P0);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P1));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P2));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P4));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P5));
        let r2 = _mm512_mul_ps(r, r);
        let y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
        let pow2 = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        let e = _mm512_mul_ps(y, _mm512_castsi512_ps(pow2));
        _mm512_mask_blend_ps(underflow, e, _mm512_setzero_ps())
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp256(x: __m256) -> __m256 {
        let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(EXP_LO));
        let x = _mm256_min_ps(x, _mm256_set1_ps(EXP_HI));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(P0);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P1));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P4));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P5));
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let e = _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
        _mm256_andnot_ps(underflow, e)
    }

    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_shift_sum_avx512(row: &mut [f32], m: f32) -> f32 {
        let shift = _mm512_set1_ps(m);
        let mut acc = _mm512_setzero_ps();
        let mut chunks = row.chunks_exact_mut(16);
        for c in &mut chunks {
            // SAFETY: `c` holds exactly 16 f32s; unaligned loads and stores are allowed.
            let e = exp512(_mm512_sub_ps(unsafe { _mm512_loadu_ps(c.as_ptr()) }, shift));
            unsafe { _mm512_storeu_ps(c.as_mut_ptr(), e) };
            acc = _mm512_add_ps(acc, e);
        }
        _mm512_reduce_add_ps(acc) + exp_shift_sum_portable(chunks.into_remainder(), m)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shift_sum_avx2(row: &mut [f32], m: f32) -> f32 {
        let shift = _mm256_set1_ps(m);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: `c` holds exactly 8 f32s; unaligned loads and stores are allowed.
            let e = exp256(_mm256_sub_ps(unsafe { _mm256_loadu_ps(c.as_ptr()) }, shift));
            unsafe { _mm256_storeu_ps(c.as_mut_ptr(), e) };
            acc = _mm256_add_ps(acc, e);
        }
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds 8 f32s.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        lanes.iter().sum::<f32>() + exp_shift_sum_portable(chunks.into_remainder(), m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portable_exp_is_close_to_libm() {
        for i in -9000..=880 {
            let x = i as f32 * 0.1 + 0.003;
            let (got, want) = (exp_portable(x), x.exp());
            if x < EXP_LO {
                assert_eq!(got, 0.0);
            } else if want > f32::MIN_POSITIVE {
                assert!(
                    ((got - want) / want).abs() < 4e-7,
                    "exp({x}) = {got}, libm {want}"
                );
            }
        }
        assert_eq!(exp_portable(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn every_isa_agrees_with_the_portable_loop() {
        let base: Vec<f32> = (0..203)
            .map(|i| ((i * 7919) % 401) as f32 * 0.05 - 20.0)
            .chain([f32::NEG_INFINITY, -100.0, 0.0])
            .collect();
        let want_max = base.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut want = base.clone();
        let want_sum = exp_shift_sum_portable(&mut want, want_max);
        for isa in Isa::available() {
            for len in [0, 1, 7, 8, 15, 16, 17, 33, base.len()] {
                let row = &base[base.len() - len..];
                let m = row_max(isa, row);
                assert_eq!(
                    m,
                    row.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                    "{isa:?} max, len {len}"
                );
            }
            let mut got = base.clone();
            let sum = exp_shift_sum(isa, &mut got, want_max);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-6 * w.abs(), "{isa:?}: {g} vs {w}");
            }
            assert!((sum - want_sum).abs() <= 1e-5 * want_sum, "{isa:?} sum");
            assert_eq!(got[base.len() - 3], 0.0, "{isa:?}: exp(-inf) must be 0");
        }
    }
}
