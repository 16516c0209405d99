//! The one GEMM call every kernel makes: the `gemm` crate into a dense row-major destination,
//! with explicit strides for the operands so `Kᵀ` is `K` read with swapped strides (no copy).

/// `dst[m×n] = (accumulate ? dst : 0) + beta · lhs · rhs`. `lhs` is `m×k` and `rhs` is `k×n`,
/// each given with its (column stride, row stride); `dst` is dense with row stride `n`. Runs on
/// the calling thread: kernels parallelise over heads and query blocks instead.
#[allow(clippy::too_many_arguments, unsafe_code)]
pub(crate) fn gemm(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    lhs: &[f32],
    (lhs_cs, lhs_rs): (usize, usize),
    rhs: &[f32],
    (rhs_cs, rhs_rs): (usize, usize),
    beta: f32,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    let last = |cs: usize, rs: usize, rows: usize, cols: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        dst.len() >= m * n
            && lhs.len() > last(lhs_cs, lhs_rs, m, k)
            && rhs.len() > last(rhs_cs, rhs_rs, k, n),
        "attention gemm: operand too short for its shape and strides"
    );
    // SAFETY: the assert above proves that the furthest element each operand's strides reach
    // ((rows-1)·rs + (cols-1)·cs) lies inside its slice, and dst holds m·n elements at column
    // stride 1 and row stride n. `dst` is a unique borrow, so it aliases neither input. With
    // `read_dst = false`, gemm writes dst without reading it; with `true` it reads the values
    // already there (initialised f32s).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
