//! x86-64 int8 micro-tiles (AVX2, AVX-VNNI, AVX512-VNNI) and AVX2 activation quantization.
//!
//! Each safe wrapper checks the CPU feature at run time (a cached atomic read) and the slice
//! lengths, then calls the `#[target_feature]` body; the bodies use raw-pointer loads only inside
//! bounds established by those checks.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::{ActParams, Epilogue, MR, NR, Tile};

fn check_tile<A, B>(a: &[A], lda: usize, b: &[B], per_k: usize, ep: &Epilogue<'_>) -> usize {
    assert!(
        lda.is_multiple_of(per_k),
        "row stride must be whole groups of k"
    );
    let groups = lda / per_k;
    assert!(a.len() >= MR * lda, "activation block too short");
    assert!(b.len() >= groups * NR * per_k, "weight panel too short");
    assert!(ep.col_scale.len() == NR && ep.col_sum.len() == NR && ep.bias.len() == NR);
    groups
}

/// Shared AVX2 epilogue: `((acc − zero·colsum) as f32) · (row_scale · col_scale) + bias`, the
/// same operations in the same order as [`super::dequantize`].
#[target_feature(enable = "avx2")]
fn finish_avx2(c: &[[__m256i; 2]; MR], ep: &Epilogue<'_>, out: &mut Tile) {
    for r in 0..MR {
        let z = _mm256_set1_epi32(ep.row_zero[r]);
        let sa = _mm256_set1_ps(ep.row_scale[r]);
        for (h, &acc) in c[r].iter().enumerate() {
            // SAFETY: `check_tile` asserted that col_scale, col_sum and bias hold NR = 16 values,
            // so elements h·8 .. h·8 + 8 exist; `out[r]` holds 16 f32.
            unsafe {
                let cs = _mm256_loadu_si256(ep.col_sum.as_ptr().add(h * 8).cast());
                let sw = _mm256_loadu_ps(ep.col_scale.as_ptr().add(h * 8));
                let bias = _mm256_loadu_ps(ep.bias.as_ptr().add(h * 8));
                let corrected = _mm256_sub_epi32(acc, _mm256_mullo_epi32(z, cs));
                let y = _mm256_add_ps(
                    _mm256_mul_ps(_mm256_cvtepi32_ps(corrected), _mm256_mul_ps(sa, sw)),
                    bias,
                );
                _mm256_storeu_ps(out[r].as_mut_ptr().add(h * 8), y);
            }
        }
    }
}

/// AVX2: i16 activations (`q − zero_point`) × i16 weights, `vpmaddwd` into exact i32 sums.
#[target_feature(enable = "avx2")]
fn avx2_body(a: &[i16], lda: usize, b: &[i16], ep: &Epilogue<'_>, out: &mut Tile) {
    let pairs = check_tile(a, lda, b, 2, ep);
    let mut c = [[_mm256_setzero_si256(); 2]; MR];
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    for t in 0..pairs {
        // SAFETY: t < pairs, so the panel's 32 i16 at t·32 are inside `b` (checked length
        // pairs·NR·2), and each row's pair at r·lda + 2t is inside `a` (length ≥ MR·lda).
        unsafe {
            let b0 = _mm256_loadu_si256(bp.add(t * 32).cast());
            let b1 = _mm256_loadu_si256(bp.add(t * 32 + 16).cast());
            for (r, cr) in c.iter_mut().enumerate() {
                let ar = _mm256_set1_epi32(ap.add(r * lda + 2 * t).cast::<i32>().read_unaligned());
                cr[0] = _mm256_add_epi32(cr[0], _mm256_madd_epi16(ar, b0));
                cr[1] = _mm256_add_epi32(cr[1], _mm256_madd_epi16(ar, b1));
            }
        }
    }
    finish_avx2(&c, ep, out);
}

#[cfg(test)]
/// `vpdpbusd` done exactly with AVX2: zero-extend the u8 and sign-extend the s8 bytes to i16
/// (even and odd bytes separately) and sum both `vpmaddwd` products.
#[target_feature(enable = "avx2")]
fn dpbusd_emulated(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    let low = _mm256_set1_epi16(0x00FF);
    let a_even = _mm256_and_si256(a, low);
    let a_odd = _mm256_srli_epi16::<8>(a);
    let b_even = _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(b));
    let b_odd = _mm256_srai_epi16::<8>(b);
    let sum = _mm256_add_epi32(
        _mm256_madd_epi16(a_even, b_even),
        _mm256_madd_epi16(a_odd, b_odd),
    );
    _mm256_add_epi32(acc, sum)
}

/// The AVX-VNNI micro-tile, with `$dot` as the u8×s8 four-way dot instruction.
macro_rules! quads_tile_256 {
    ($name:ident, $features:literal, $dot:path) => {
        #[target_feature(enable = $features)]
        fn $name(a: &[u8], lda: usize, b: &[i8], ep: &Epilogue<'_>, out: &mut Tile) {
            let quads = check_tile(a, lda, b, 4, ep);
            let mut c = [[_mm256_setzero_si256(); 2]; MR];
            let (ap, bp) = (a.as_ptr(), b.as_ptr());
            for t in 0..quads {
                // SAFETY: t < quads, so the panel's 64 bytes at t·64 are inside `b` (checked
                // length quads·NR·4) and each row's quad at r·lda + 4t is inside `a`.
                unsafe {
                    let b0 = _mm256_loadu_si256(bp.add(t * 64).cast());
                    let b1 = _mm256_loadu_si256(bp.add(t * 64 + 32).cast());
                    for (r, cr) in c.iter_mut().enumerate() {
                        let ar = _mm256_set1_epi32(
                            ap.add(r * lda + 4 * t).cast::<i32>().read_unaligned(),
                        );
                        cr[0] = $dot(cr[0], ar, b0);
                        cr[1] = $dot(cr[1], ar, b1);
                    }
                }
            }
            finish_avx2(&c, ep, out);
        }
    };
}

quads_tile_256!(avxvnni_body, "avx2,avxvnni", _mm256_dpbusd_avx_epi32);
#[cfg(test)]
quads_tile_256!(avxvnni_emulated_body, "avx2", dpbusd_emulated);

/// AVX512-VNNI: one 512-bit register holds a quad of k for all 16 columns of a panel.
#[target_feature(enable = "avx512f,avx512vnni")]
fn avx512vnni_body(a: &[u8], lda: usize, b: &[i8], ep: &Epilogue<'_>, out: &mut Tile) {
    let quads = check_tile(a, lda, b, 4, ep);
    // CHAINS independent sums per row (quad t goes to chain t % CHAINS), added at the end: with
    // one chain per row the 4 rows' `vpdpbusd`s wait on their own latency (~5 cycles), with
    // CHAINS × 4 in flight they issue at the unit's throughput. Integer sums are exact in any
    // order, so the result is bit-identical.
    const CHAINS: usize = 3;
    let mut acc = [[_mm512_setzero_si512(); MR]; CHAINS];
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let quad = |c: &mut [__m512i; MR], t: usize| {
        // SAFETY: as in the 256-bit tiles: t < quads bounds both loads.
        unsafe {
            let bv = _mm512_loadu_si512(bp.add(t * 64).cast());
            for (r, cr) in c.iter_mut().enumerate() {
                let ar = _mm512_set1_epi32(ap.add(r * lda + 4 * t).cast::<i32>().read_unaligned());
                *cr = _mm512_dpbusd_epi32(*cr, ar, bv);
            }
        }
    };
    crate::round_robin(&mut acc, quads, quad);
    let mut c = acc[0];
    for other in &acc[1..] {
        for (cr, o) in c.iter_mut().zip(other) {
            *cr = _mm512_add_epi32(*cr, *o);
        }
    }
    for (r, cr) in c.iter().enumerate() {
        // SAFETY: col_sum, col_scale and bias hold 16 values (checked); out[r] holds 16 f32.
        unsafe {
            let cs = _mm512_loadu_si512(ep.col_sum.as_ptr().cast());
            let sw = _mm512_loadu_ps(ep.col_scale.as_ptr());
            let bias = _mm512_loadu_ps(ep.bias.as_ptr());
            let z = _mm512_set1_epi32(ep.row_zero[r]);
            let sa = _mm512_set1_ps(ep.row_scale[r]);
            let corrected = _mm512_sub_epi32(*cr, _mm512_mullo_epi32(z, cs));
            let y = _mm512_add_ps(
                _mm512_mul_ps(_mm512_cvtepi32_ps(corrected), _mm512_mul_ps(sa, sw)),
                bias,
            );
            _mm512_storeu_ps(out[r].as_mut_ptr(), y);
        }
    }
}

pub(super) fn avx2_tile(a: &[i16], lda: usize, b: &[i16], ep: &Epilogue<'_>, out: &mut Tile) {
    assert!(is_x86_feature_detected!("avx2"));
    // SAFETY: the CPU has AVX2 (checked above).
    unsafe { avx2_body(a, lda, b, ep, out) }
}

pub(super) fn avxvnni_tile(a: &[u8], lda: usize, b: &[i8], ep: &Epilogue<'_>, out: &mut Tile) {
    assert!(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("avxvnni"));
    // SAFETY: the CPU has AVX2 and AVX-VNNI (checked above).
    unsafe { avxvnni_body(a, lda, b, ep, out) }
}

#[cfg(test)]
pub(super) fn avxvnni_emulated_tile(
    a: &[u8],
    lda: usize,
    b: &[i8],
    ep: &Epilogue<'_>,
    out: &mut Tile,
) {
    assert!(is_x86_feature_detected!("avx2"));
    // SAFETY: the CPU has AVX2 (checked above).
    unsafe { avxvnni_emulated_body(a, lda, b, ep, out) }
}

pub(super) fn avx512vnni_tile(a: &[u8], lda: usize, b: &[i8], ep: &Epilogue<'_>, out: &mut Tile) {
    assert!(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni"));
    // SAFETY: the CPU has AVX-512F and AVX512-VNNI (checked above).
    unsafe { avx512vnni_body(a, lda, b, ep, out) }
}

#[target_feature(enable = "avx2")]
fn min_max_body(row: &[f32]) -> (f32, f32) {
    let mut lo = _mm256_set1_ps(f32::INFINITY);
    let mut hi = _mm256_set1_ps(f32::NEG_INFINITY);
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for ch in chunks {
        // SAFETY: `ch` is a slice of exactly 8 f32.
        let v = unsafe { _mm256_loadu_ps(ch.as_ptr()) };
        lo = _mm256_min_ps(lo, v);
        hi = _mm256_max_ps(hi, v);
    }
    let (mut l, mut h) = ([0.0f32; 8], [0.0f32; 8]);
    // SAFETY: both arrays hold 8 f32.
    unsafe {
        _mm256_storeu_ps(l.as_mut_ptr(), lo);
        _mm256_storeu_ps(h.as_mut_ptr(), hi);
    }
    let lo = l.iter().chain(tail).copied().fold(f32::INFINITY, f32::min);
    let hi = h
        .iter()
        .chain(tail)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    (lo, hi)
}

/// `clamp(x · (1/scale) + zero, 0, 255)` rounded half to even (`vcvtps2dq` under the default
/// rounding mode), eight at a time: exactly [`ActParams::quantize`].
#[target_feature(enable = "avx2")]
fn quantize_i32x8(v: __m256, inv: __m256, zero: __m256) -> __m256i {
    let v = _mm256_add_ps(_mm256_mul_ps(v, inv), zero);
    let v = _mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), _mm256_set1_ps(255.0));
    _mm256_cvtps_epi32(v)
}

#[target_feature(enable = "avx2")]
fn quantize_u8_body(row: &[f32], p: ActParams, out: &mut [u8]) {
    let n = row.len().min(out.len());
    let (inv, zero) = (
        _mm256_set1_ps(1.0 / p.scale),
        _mm256_set1_ps(f32::from(p.zero_point)),
    );
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 ≤ n ≤ both lengths: 8 f32 are read and 8 bytes written.
        unsafe {
            let q = quantize_i32x8(_mm256_loadu_ps(row.as_ptr().add(i)), inv, zero);
            let w16 = _mm256_packus_epi32(q, q); // lanes: q0..q3 q0..q3 | q4..q7 q4..q7
            let w8 = _mm256_packus_epi16(w16, w16);
            let v = _mm_unpacklo_epi32(
                _mm256_castsi256_si128(w8),
                _mm256_extracti128_si256::<1>(w8),
            );
            _mm_storel_epi64(out.as_mut_ptr().add(i).cast(), v);
        }
        i += 8;
    }
    for j in i..n {
        out[j] = p.quantize(row[j]);
    }
}

#[target_feature(enable = "avx2")]
fn quantize_centered_body(row: &[f32], p: ActParams, out: &mut [i16]) {
    let n = row.len().min(out.len());
    let (inv, zero) = (
        _mm256_set1_ps(1.0 / p.scale),
        _mm256_set1_ps(f32::from(p.zero_point)),
    );
    let zi = _mm256_set1_epi32(i32::from(p.zero_point));
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 ≤ n ≤ both lengths: 8 f32 are read and 8 i16 written.
        unsafe {
            let q = _mm256_sub_epi32(
                quantize_i32x8(_mm256_loadu_ps(row.as_ptr().add(i)), inv, zero),
                zi,
            );
            let w16 = _mm256_packs_epi32(q, q); // lanes: q0..q3 q0..q3 | q4..q7 q4..q7
            let v = _mm_unpacklo_epi64(
                _mm256_castsi256_si128(w16),
                _mm256_extracti128_si256::<1>(w16),
            );
            _mm_storeu_si128(out.as_mut_ptr().add(i).cast(), v);
        }
        i += 8;
    }
    let z = i16::from(p.zero_point);
    for j in i..n {
        out[j] = i16::from(p.quantize(row[j])) - z;
    }
}

pub(super) fn min_max(row: &[f32]) -> (f32, f32) {
    assert!(is_x86_feature_detected!("avx2"));
    // SAFETY: the CPU has AVX2 (checked above).
    unsafe { min_max_body(row) }
}

pub(super) fn quantize_u8(row: &[f32], p: ActParams, out: &mut [u8]) {
    assert!(is_x86_feature_detected!("avx2"));
    // SAFETY: the CPU has AVX2 (checked above).
    unsafe { quantize_u8_body(row, p, out) }
}

pub(super) fn quantize_centered(row: &[f32], p: ActParams, out: &mut [i16]) {
    assert!(is_x86_feature_detected!("avx2"));
    // SAFETY: the CPU has AVX2 (checked above).
    unsafe { quantize_centered_body(row, p, out) }
}
