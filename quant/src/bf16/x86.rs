//! The AVX2+FMA bf16 tile: bf16 weights widened to f32 in registers (a shift for the even k of
//! each pair, a mask for the odd one), fused multiply-adds into f32 accumulators.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::Tile;
use crate::int8::{MR, NR};

#[target_feature(enable = "avx2,fma")]
fn avx2_body(a: &[f32], lda: usize, b: &[u16], bias: &[f32], out: &mut Tile) {
    assert!(
        lda.is_multiple_of(2) && a.len() >= MR * lda && b.len() >= NR * lda && bias.len() == NR
    );
    let pairs = lda / 2;
    let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    let mut c = [[_mm256_setzero_ps(); 2]; MR];
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    for t in 0..pairs {
        // SAFETY: t < pairs: the 32 u16 at t·32 lie in `b` (length ≥ NR·lda = pairs·32), and the
        // pair at r·lda + 2t lies in `a` (length ≥ MR·lda).
        unsafe {
            let v0 = _mm256_loadu_si256(bp.add(t * 32).cast());
            let v1 = _mm256_loadu_si256(bp.add(t * 32 + 16).cast());
            let even0 = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v0));
            let odd0 = _mm256_castsi256_ps(_mm256_and_si256(v0, high));
            let even1 = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v1));
            let odd1 = _mm256_castsi256_ps(_mm256_and_si256(v1, high));
            for (r, cr) in c.iter_mut().enumerate() {
                let a0 = _mm256_broadcast_ss(&*ap.add(r * lda + 2 * t));
                let a1 = _mm256_broadcast_ss(&*ap.add(r * lda + 2 * t + 1));
                cr[0] = _mm256_fmadd_ps(a1, odd0, _mm256_fmadd_ps(a0, even0, cr[0]));
                cr[1] = _mm256_fmadd_ps(a1, odd1, _mm256_fmadd_ps(a0, even1, cr[1]));
            }
        }
    }
    for (cr, o) in c.iter().zip(out.iter_mut()) {
        for (h, half) in cr.iter().enumerate() {
            // SAFETY: `bias` and `o` hold 16 f32 (asserted / by type).
            unsafe {
                let y = _mm256_add_ps(*half, _mm256_loadu_ps(bias.as_ptr().add(h * 8)));
                _mm256_storeu_ps(o.as_mut_ptr().add(h * 8), y);
            }
        }
    }
}

pub(super) fn avx2_tile(a: &[f32], lda: usize, b: &[u16], bias: &[f32], out: &mut Tile) {
    assert!(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"));
    // SAFETY: the CPU has AVX2 and FMA (checked above).
    unsafe { avx2_body(a, lda, b, bias, out) }
}
