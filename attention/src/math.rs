//! The math kernel: materialises each head's `q_len × kv_len` scores with one GEMM, applies the
//! mask and a max-subtracted softmax row by row, and multiplies by V with a second GEMM — what
//! PyTorch's math path does with `bmm`. Memory is `O(q_len · kv_len)` per worker thread, which
//! is what the flash and memory-efficient kernels exist to avoid at long sequence lengths.
//! Work is split over `batch × q_heads` with rayon; each GEMM runs on its worker's thread.

use rayon::prelude::*;

use crate::params::SdpaParams;

/// `dst[m×n] = beta · lhs · rhs` with explicit strides (column stride, row stride) for each
/// operand; `dst` is dense row-major.
#[allow(clippy::too_many_arguments, unsafe_code)]
fn gemm_strided(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    lhs: &[f32],
    (lhs_cs, lhs_rs): (usize, usize),
    rhs: &[f32],
    (rhs_cs, rhs_rs): (usize, usize),
    beta: f32,
) {
    let last = |cs: usize, rs: usize, rows: usize, cols: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(m > 0 && n > 0 && k > 0, "gemm_strided: empty problem");
    assert!(
        dst.len() >= m * n
            && lhs.len() > last(lhs_cs, lhs_rs, m, k)
            && rhs.len() > last(rhs_cs, rhs_rs, k, n),
        "gemm_strided: operand too short for its shape and strides"
    );
    // SAFETY: the assert above proves that the furthest element each operand's strides reach
    // ((rows-1)·rs + (cols-1)·cs) lies inside its slice, and dst holds m·n elements at column
    // stride 1 and row stride n. `dst` is a unique borrow, so it aliases neither input. With
    // `read_dst = false`, gemm writes dst without reading it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Runs the math kernel. The caller has validated the buffer lengths
/// ([`SdpaParams::validate`](crate::SdpaParams::validate)); a fully masked query row produces
/// zeros, as in [`crate::reference`].
pub fn sdpa(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], params: &SdpaParams<'_>) {
    let s = params.shape;
    let d = s.head_dim;
    let (sq, sk) = (s.q_len, s.kv_len);
    let head_out = sq * d;
    if head_out == 0 {
        return;
    }
    if sk == 0 {
        out.fill(0.0);
        return;
    }
    let scale = params.scale();
    let group = s.q_heads / s.kv_heads;
    out.par_chunks_mut(head_out).enumerate().for_each_init(
        Vec::new,
        |scores: &mut Vec<f32>, (bh, out_head)| {
            let (b, h) = (bh / s.q_heads, bh % s.q_heads);
            let q_head = &q[bh * head_out..(bh + 1) * head_out];
            let kv_off = (b * s.kv_heads + h / group) * sk * d;
            let k_head = &k[kv_off..kv_off + sk * d];
            let v_head = &v[kv_off..kv_off + sk * d];
            scores.resize(sq * sk, 0.0);
            // scores = scale · Q Kᵀ: Kᵀ is K read with swapped strides.
            gemm_strided(scores, (sq, sk, d), q_head, (1, d), k_head, (d, 1), scale);
            for (i, row) in scores.chunks_mut(sk).enumerate() {
                let visible = params.mask.visible_keys(i, sq, sk);
                let allowed = params.mask.row(b, h, i, sk);
                let mut max = f32::NEG_INFINITY;
                for (j, x) in row.iter_mut().enumerate() {
                    if j >= visible || !allowed.allows(j) {
                        *x = f32::NEG_INFINITY;
                    }
                    max = max.max(*x);
                }
                if max == f32::NEG_INFINITY {
                    row.fill(0.0); // every key masked: a zero output row
                    continue;
                }
                let mut sum = 0.0f32;
                for x in row.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|x| *x *= inv);
            }
            // out = P · V
            gemm_strided(out_head, (sq, d, sk), scores, (1, sk), v_head, (1, d), 1.0);
        },
    );
}
