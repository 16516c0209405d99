//! aarch64 BF16 tiles (FEAT_BF16: `bfdot`, `bfmmla`), in inline assembly: Rust's
//! `core::arch::aarch64` has NEON intrinsics but no BF16 ones yet. Tested under qemu against the
//! same reference as every other kernel (see `.ci/run`).
#![allow(unsafe_code)]

use std::arch::aarch64::*;
use std::arch::asm;

use super::Tile;
use crate::int8::{MR, NR};

fn add_bias(acc: &[[f32; NR]; MR], bias: &[f32], out: &mut Tile) {
    for (o, a) in out.iter_mut().zip(acc) {
        for ((o, a), b) in o.iter_mut().zip(a).zip(bias) {
            *o = a + b;
        }
    }
}

/// `bfdot`: per k-pair, `A` holds the four rows' pairs (`[row][2]`), each of four `B` registers
/// four columns' pairs; `bfdot acc.4s, b.8h, a.2h[row]` adds two products per column lane.
#[target_feature(enable = "neon,bf16")]
fn bfdot_body(a: &[u16], lda: usize, b: &[u16], acc: &mut [[f32; NR]; MR]) {
    assert!(lda % 2 == 0 && a.len() >= MR * lda && b.len() >= NR * lda);
    // SAFETY: every load below reads 8 u16 at t·8 of `a` (t < lda/2, so within MR·lda) or at
    // t·32 + g·8 of `b` (within NR·lda); the asm only reads and writes registers.
    unsafe {
        let zero = vdupq_n_f32(0.0);
        let mut c = [[zero; 4]; MR];
        for t in 0..lda / 2 {
            let av = vld1q_u16(a.as_ptr().add(t * 8));
            let bp = b.as_ptr().add(t * 32);
            let (b0, b1, b2, b3) = (
                vld1q_u16(bp),
                vld1q_u16(bp.add(8)),
                vld1q_u16(bp.add(16)),
                vld1q_u16(bp.add(24)),
            );
            let [c0, c1, c2, c3] = &mut c;
            asm!(
                "bfdot {c00:v}.4s, {b0:v}.8h, {a:v}.2h[0]",
                "bfdot {c01:v}.4s, {b1:v}.8h, {a:v}.2h[0]",
                "bfdot {c02:v}.4s, {b2:v}.8h, {a:v}.2h[0]",
                "bfdot {c03:v}.4s, {b3:v}.8h, {a:v}.2h[0]",
                "bfdot {c10:v}.4s, {b0:v}.8h, {a:v}.2h[1]",
                "bfdot {c11:v}.4s, {b1:v}.8h, {a:v}.2h[1]",
                "bfdot {c12:v}.4s, {b2:v}.8h, {a:v}.2h[1]",
                "bfdot {c13:v}.4s, {b3:v}.8h, {a:v}.2h[1]",
                "bfdot {c20:v}.4s, {b0:v}.8h, {a:v}.2h[2]",
                "bfdot {c21:v}.4s, {b1:v}.8h, {a:v}.2h[2]",
                "bfdot {c22:v}.4s, {b2:v}.8h, {a:v}.2h[2]",
                "bfdot {c23:v}.4s, {b3:v}.8h, {a:v}.2h[2]",
                "bfdot {c30:v}.4s, {b0:v}.8h, {a:v}.2h[3]",
                "bfdot {c31:v}.4s, {b1:v}.8h, {a:v}.2h[3]",
                "bfdot {c32:v}.4s, {b2:v}.8h, {a:v}.2h[3]",
                "bfdot {c33:v}.4s, {b3:v}.8h, {a:v}.2h[3]",
                c00 = inout(vreg) c0[0], c01 = inout(vreg) c0[1],
                c02 = inout(vreg) c0[2], c03 = inout(vreg) c0[3],
                c10 = inout(vreg) c1[0], c11 = inout(vreg) c1[1],
                c12 = inout(vreg) c1[2], c13 = inout(vreg) c1[3],
                c20 = inout(vreg) c2[0], c21 = inout(vreg) c2[1],
                c22 = inout(vreg) c2[2], c23 = inout(vreg) c2[3],
                c30 = inout(vreg) c3[0], c31 = inout(vreg) c3[1],
                c32 = inout(vreg) c3[2], c33 = inout(vreg) c3[3],
                b0 = in(vreg) b0, b1 = in(vreg) b1, b2 = in(vreg) b2, b3 = in(vreg) b3,
                a = in(vreg_low16) av,
                options(pure, nomem, nostack),
            );
        }
        for (r, cr) in c.iter().enumerate() {
            for (g, v) in cr.iter().enumerate() {
                vst1q_f32(acc[r].as_mut_ptr().add(g * 4), *v);
            }
        }
    }
}

/// `bfmmla`: per k-quad, an `A` register holds two rows' quads (a 2×4 matrix), a `B` register two
/// columns' quads; `bfmmla acc.4s, a.8h, b.8h` adds their 2×2 product `[r0c0, r0c1, r1c0, r1c1]`.
#[target_feature(enable = "neon,bf16")]
fn bfmmla_body(a: &[u16], lda: usize, b: &[u16], acc: &mut [[f32; NR]; MR]) {
    assert!(lda % 4 == 0 && a.len() >= MR * lda && b.len() >= NR * lda);
    // SAFETY: loads read 8 u16 at t·16 + rp·8 of `a` (t < lda/4: within MR·lda) and at
    // t·64 + cp·8 of `b` (within NR·lda); the asm only touches registers.
    unsafe {
        let zero = vdupq_n_f32(0.0);
        let mut c = [[zero; 8]; 2];
        for t in 0..lda / 4 {
            let a0 = vld1q_u16(a.as_ptr().add(t * 16));
            let a1 = vld1q_u16(a.as_ptr().add(t * 16 + 8));
            let bp = b.as_ptr().add(t * 64);
            let bv: [uint16x8_t; 8] = std::array::from_fn(|cp| vld1q_u16(bp.add(cp * 8)));
            let [r0, r1] = &mut c;
            asm!(
                "bfmmla {c00:v}.4s, {a0:v}.8h, {b0:v}.8h",
                "bfmmla {c01:v}.4s, {a0:v}.8h, {b1:v}.8h",
                "bfmmla {c02:v}.4s, {a0:v}.8h, {b2:v}.8h",
                "bfmmla {c03:v}.4s, {a0:v}.8h, {b3:v}.8h",
                "bfmmla {c04:v}.4s, {a0:v}.8h, {b4:v}.8h",
                "bfmmla {c05:v}.4s, {a0:v}.8h, {b5:v}.8h",
                "bfmmla {c06:v}.4s, {a0:v}.8h, {b6:v}.8h",
                "bfmmla {c07:v}.4s, {a0:v}.8h, {b7:v}.8h",
                "bfmmla {c10:v}.4s, {a1:v}.8h, {b0:v}.8h",
                "bfmmla {c11:v}.4s, {a1:v}.8h, {b1:v}.8h",
                "bfmmla {c12:v}.4s, {a1:v}.8h, {b2:v}.8h",
                "bfmmla {c13:v}.4s, {a1:v}.8h, {b3:v}.8h",
                "bfmmla {c14:v}.4s, {a1:v}.8h, {b4:v}.8h",
                "bfmmla {c15:v}.4s, {a1:v}.8h, {b5:v}.8h",
                "bfmmla {c16:v}.4s, {a1:v}.8h, {b6:v}.8h",
                "bfmmla {c17:v}.4s, {a1:v}.8h, {b7:v}.8h",
                c00 = inout(vreg) r0[0], c01 = inout(vreg) r0[1],
                c02 = inout(vreg) r0[2], c03 = inout(vreg) r0[3],
                c04 = inout(vreg) r0[4], c05 = inout(vreg) r0[5],
                c06 = inout(vreg) r0[6], c07 = inout(vreg) r0[7],
                c10 = inout(vreg) r1[0], c11 = inout(vreg) r1[1],
                c12 = inout(vreg) r1[2], c13 = inout(vreg) r1[3],
                c14 = inout(vreg) r1[4], c15 = inout(vreg) r1[5],
                c16 = inout(vreg) r1[6], c17 = inout(vreg) r1[7],
                a0 = in(vreg) a0, a1 = in(vreg) a1,
                b0 = in(vreg) bv[0], b1 = in(vreg) bv[1], b2 = in(vreg) bv[2], b3 = in(vreg) bv[3],
                b4 = in(vreg) bv[4], b5 = in(vreg) bv[5], b6 = in(vreg) bv[6], b7 = in(vreg) bv[7],
                options(pure, nomem, nostack),
            );
        }
        // Unpack the 2×2 blocks: c[rp][cp] = [r(2rp) c(2cp), r(2rp) c(2cp+1), r(2rp+1) c(2cp),
        // r(2rp+1) c(2cp+1)].
        for (rp, row_pair) in c.iter().enumerate() {
            for (cp, v) in row_pair.iter().enumerate() {
                let mut block = [0.0f32; 4];
                vst1q_f32(block.as_mut_ptr(), *v);
                acc[2 * rp][2 * cp] = block[0];
                acc[2 * rp][2 * cp + 1] = block[1];
                acc[2 * rp + 1][2 * cp] = block[2];
                acc[2 * rp + 1][2 * cp + 1] = block[3];
            }
        }
    }
}

pub(super) fn bfdot_tile(a: &[u16], lda: usize, b: &[u16], bias: &[f32], out: &mut Tile) {
    assert!(std::arch::is_aarch64_feature_detected!("bf16"));
    let mut acc = [[0.0f32; NR]; MR];
    // SAFETY: the CPU has FEAT_BF16 (checked above); NEON is baseline on aarch64.
    unsafe { bfdot_body(a, lda, b, &mut acc) };
    add_bias(&acc, bias, out);
}

pub(super) fn bfmmla_tile(a: &[u16], lda: usize, b: &[u16], bias: &[f32], out: &mut Tile) {
    assert!(std::arch::is_aarch64_feature_detected!("bf16"));
    let mut acc = [[0.0f32; NR]; MR];
    // SAFETY: the CPU has FEAT_BF16 (checked above); NEON is baseline on aarch64.
    unsafe { bfmmla_body(a, lda, b, &mut acc) };
    add_bias(&acc, bias, out);
}
