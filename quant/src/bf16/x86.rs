//! The x86 bf16 tiles. AVX2+FMA: bf16 weights widened to f32 in registers (a shift for the even
//! k of each pair, a mask for the odd one), fused multiply-adds into f32 accumulators.
//! AVX512-BF16: `vdpbf16ps` on the same packed pairs, each 32-bit lane one column's (even, odd)
//! k pair, against the activation row's pair broadcast to every lane.
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

#[target_feature(enable = "avx512f,avx512bf16")]
fn avx512bf16_body(a: &[u16], lda: usize, b: &[u16], bias: &[f32], out: &mut Tile) {
    assert!(
        lda.is_multiple_of(2) && a.len() >= MR * lda && b.len() >= NR * lda && bias.len() == NR
    );
    let pairs = lda / 2;
    // CHAINS independent sums per row (pair t goes to chain t % CHAINS), added at the end, so
    // that 4 · CHAINS `vdpbf16ps` are in flight instead of waiting on each one's latency.
    const CHAINS: usize = 3;
    let mut acc = [[_mm512_setzero_ps(); MR]; CHAINS];
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let pair = |c: &mut [__m512; MR], t: usize| {
        // SAFETY: t < pairs: the 32 u16 at t·32 lie in `b` (length ≥ NR·lda = pairs·32) and the
        // pair at r·lda + 2t lies in `a` (length ≥ MR·lda); `__m512i` and `__m512bh` are both
        // 64 bytes of plain data, so reinterpreting one as the other is sound.
        unsafe {
            let bv: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(t * 32).cast()));
            for (r, cr) in c.iter_mut().enumerate() {
                let pr = ap.add(r * lda + 2 * t).cast::<i32>().read_unaligned();
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pr));
                *cr = _mm512_dpbf16_ps(*cr, av, bv);
            }
        }
    };
    crate::round_robin(&mut acc, pairs, pair);
    for (r, o) in out.iter_mut().enumerate() {
        // SAFETY: `bias` and `o` hold 16 f32 (asserted / by type).
        unsafe {
            let mut y = _mm512_loadu_ps(bias.as_ptr());
            for chain in &acc {
                y = _mm512_add_ps(y, chain[r]);
            }
            _mm512_storeu_ps(o.as_mut_ptr(), y);
        }
    }
}

pub(super) fn avx512bf16_tile(a: &[u16], lda: usize, b: &[u16], bias: &[f32], out: &mut Tile) {
    assert!(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16"));
    // SAFETY: the CPU has AVX-512F and AVX512-BF16 (checked above).
    unsafe { avx512bf16_body(a, lda, b, bias, out) }
}
