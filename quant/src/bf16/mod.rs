//! bf16 fast-math linear layers: weights stored as bf16 (half the bytes of f32), inputs rounded to
//! bf16 as the GEMM reads them, products accumulated in f32, bias added in the same pass.
//!
//! bf16 values are kept as their bit patterns (`u16`) so that this crate needs no dependency; the
//! conversion is round-to-nearest-even, bit-identical to `half::bf16::from_f32` (the engine tests
//! that). Kernels:
//! - portable (any CPU) and AVX2+FMA, on weights packed as k-pairs: one 32-bit word holds a
//!   column's two consecutive k values, so a shift and a mask turn a load into two f32 vectors;
//! - aarch64 `bfdot` (same k-pair layout: `bfdot` sums two products per lane) and `bfmmla`
//!   (k-quads: a 2×4 by 4×2 block product per instruction, the Graviton3 path), written as inline
//!   assembly because Rust has no BF16 intrinsics yet, behind `is_aarch64_feature_detected!`.
//!
//! The `bfdot`/`bfmmla` instructions may round their intermediate sums differently from IEEE
//! f32 (and flush subnormals); results are compared with a tolerance, not bit for bit.

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "x86_64")]
mod x86;

use crate::int8::{MR, NR, QuantError};

const MB: usize = 64;

/// One `MR × NR` f32 output tile.
pub(crate) type Tile = [[f32; NR]; MR];

/// f32 → bf16 bits, rounding to nearest, ties to even (NaNs stay NaN).
#[inline]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x0040) as u16;
    }
    let round = 0x7FFF + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// bf16 bits → f32 (exact).
#[inline]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// `x` rounded to the nearest bf16, as f32.
#[inline]
pub fn round_to_bf16(x: f32) -> f32 {
    from_bf16(to_bf16(x))
}

/// A bf16 GEMM kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bf16Kernel {
    Portable,
    /// x86-64 AVX2 + FMA: bf16 widened to f32 in registers.
    Avx2Fma,
    /// x86-64 AVX512-BF16: `vdpbf16ps`, a bf16 pair dot product into f32 per lane (Cooper Lake,
    /// Sapphire Rapids and later, Zen 4 and later), on the same packed pairs as `Avx2Fma`.
    Avx512Bf16,
    /// aarch64 `bfdot` (FEAT_BF16).
    Bfdot,
    /// aarch64 `bfmmla` (FEAT_BF16), the Graviton3 matrix instruction.
    Bfmmla,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Per panel of 16 columns, per pair of k: 16 × 2 bf16.
    Pairs,
    /// Per panel of 16 columns, per group of four k: 16 × 4 bf16.
    Quads,
}

impl Bf16Kernel {
    pub const ALL: [Bf16Kernel; 5] = [
        Bf16Kernel::Portable,
        Bf16Kernel::Avx2Fma,
        Bf16Kernel::Avx512Bf16,
        Bf16Kernel::Bfdot,
        Bf16Kernel::Bfmmla,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Portable => "portable",
            Bf16Kernel::Avx2Fma => "avx2-fma",
            Bf16Kernel::Avx512Bf16 => "avx512-bf16",
            Bf16Kernel::Bfdot => "bfdot",
            Bf16Kernel::Bfmmla => "bfmmla",
        }
    }

    /// Whether this CPU can run the kernel (detected at run time).
    pub fn is_supported(self) -> bool {
        match self {
            Bf16Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Bf16Kernel::Avx2Fma => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Bf16Kernel::Avx512Bf16 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(target_arch = "aarch64")]
            Bf16Kernel::Bfdot | Bf16Kernel::Bfmmla => {
                std::arch::is_aarch64_feature_detected!("bf16")
            }
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The fastest kernel this CPU runs: `bfmmla`, then AVX512-BF16, then AVX2+FMA, else
    /// portable.
    pub fn detect() -> Self {
        [
            Bf16Kernel::Bfmmla,
            Bf16Kernel::Avx512Bf16,
            Bf16Kernel::Avx2Fma,
        ]
        .into_iter()
        .find(|k| k.is_supported())
        .unwrap_or(Bf16Kernel::Portable)
    }

    fn layout(self) -> Layout {
        match self {
            Bf16Kernel::Bfmmla => Layout::Quads,
            _ => Layout::Pairs,
        }
    }

    fn group(self) -> usize {
        match self.layout() {
            Layout::Pairs => 2,
            Layout::Quads => 4,
        }
    }
}

impl std::fmt::Display for Bf16Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A linear layer's weight in bf16, packed for one kernel.
#[derive(Clone)]
pub struct Bf16Weights {
    k: usize,
    n: usize,
    kernel: Bf16Kernel,
    packed: Vec<u16>,
}

impl std::fmt::Debug for Bf16Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bf16Weights({}×{}, {})", self.n, self.k, self.kernel)
    }
}

const MAGIC: &[u8; 8] = b"KILNB16W";

impl Bf16Weights {
    /// Rounds a `[n, k]` weight (the Hugging Face `[out, in]` layout) to bf16 and packs it.
    pub fn pack(w: &[f32], n: usize, k: usize, kernel: Bf16Kernel) -> Result<Self, QuantError> {
        if w.len() != n * k || n == 0 || k == 0 {
            return Err(QuantError(format!(
                "bf16 weight has {} values, expected a non-empty {n}×{k}",
                w.len()
            )));
        }
        let bits: Vec<u16> = w.iter().map(|&v| to_bf16(v)).collect();
        Ok(Self::from_bits(&bits, n, k, kernel))
    }

    fn from_bits(bits: &[u16], n: usize, k: usize, kernel: Bf16Kernel) -> Self {
        let g = kernel.group();
        let kp = k.div_ceil(g) * g;
        let panels = n.div_ceil(NR);
        let mut packed = Vec::with_capacity(panels * NR * kp);
        for p in 0..panels {
            for t in 0..kp / g {
                for c in 0..NR {
                    for s in 0..g {
                        let (j, i) = (p * NR + c, t * g + s);
                        packed.push(if j < n && i < k { bits[j * k + i] } else { 0 });
                    }
                }
            }
        }
        Self {
            k,
            n,
            kernel,
            packed,
        }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn kernel(&self) -> Bf16Kernel {
        self.kernel
    }

    pub fn size_bytes(&self) -> usize {
        self.packed.len() * 2
    }

    /// The `[n, k]` bf16 bits, unpacked.
    pub fn unpacked(&self) -> Vec<u16> {
        let g = self.kernel.group();
        let kp = self.k.div_ceil(g) * g;
        let mut out = vec![0u16; self.n * self.k];
        for j in 0..self.n {
            for i in 0..self.k {
                let (p, c) = (j / NR, j % NR);
                out[j * self.k + i] = self.packed[p * NR * kp + (i / g) * NR * g + c * g + i % g];
            }
        }
        out
    }

    /// Byte form for a plan cache: magic, sizes, then the `[n, k]` bf16 bits (kernel-independent).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + 2 * self.n * self.k);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.n as u64).to_le_bytes());
        out.extend_from_slice(&(self.k as u64).to_le_bytes());
        for v in self.unpacked() {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub fn from_bytes(bytes: &[u8], kernel: Bf16Kernel) -> Result<Self, QuantError> {
        let bad = |why: &str| QuantError(format!("bf16 weight bytes: {why}"));
        if bytes.len() < 24 || &bytes[..8] != MAGIC {
            return Err(bad("missing header"));
        }
        let n = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
        let k = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes")) as usize;
        let want = n
            .checked_mul(k)
            .and_then(|nk| nk.checked_mul(2)?.checked_add(24));
        if want != Some(bytes.len()) || n == 0 || k == 0 {
            return Err(bad("length does not match the header"));
        }
        let bits: Vec<u16> = bytes[24..]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        Ok(Self::from_bits(&bits, n, k, kernel))
    }
}

/// `out[i, j] = Σ_k bf16(x[i, k]) · w[j, k] + bias[j]` with f32 accumulation, for `x` of `m × k`
/// and `out` of `m × n`. Splits rows over rayon's pool (feature `parallel`) when `threads > 1`.
pub fn linear(
    x: &[f32],
    m: usize,
    w: &Bf16Weights,
    bias: Option<&[f32]>,
    out: &mut [f32],
    threads: usize,
) -> Result<(), QuantError> {
    let (k, n) = (w.k, w.n);
    if !w.kernel.is_supported() {
        return Err(QuantError(format!(
            "the {} bf16 kernel is not supported by this CPU",
            w.kernel
        )));
    }
    if x.len() != m * k || out.len() != m * n {
        return Err(QuantError(format!(
            "bf16 linear: x has {} values and out {}, expected {m}×{k} and {m}×{n}",
            x.len(),
            out.len()
        )));
    }
    if bias.is_some_and(|b| b.len() != n) {
        return Err(QuantError(format!(
            "bf16 linear: bias must have {n} values"
        )));
    }
    if m == 0 {
        return Ok(());
    }
    let mut padded_bias = vec![0.0f32; n.div_ceil(NR) * NR];
    if let Some(b) = bias {
        padded_bias[..n].copy_from_slice(b);
    }
    let run = |rows: std::ops::Range<usize>, out: &mut [f32]| {
        block(
            &x[rows.start * k..rows.end * k],
            rows.len(),
            w,
            &padded_bias,
            out,
        );
    };
    let per = (m.div_ceil(threads.max(1)).div_ceil(MR) * MR).min(MB);
    #[cfg(feature = "parallel")]
    if threads > 1 && m > per {
        use rayon::prelude::*;
        out.par_chunks_mut(per * n)
            .enumerate()
            .for_each(|(i, o)| run(i * per..(i * per + per).min(m), o));
        return Ok(());
    }
    for (i, o) in out.chunks_mut(per * n).enumerate() {
        run(i * per..(i * per + per).min(m), o);
    }
    Ok(())
}

fn block(x: &[f32], rows: usize, w: &Bf16Weights, bias: &[f32], out: &mut [f32]) {
    let (k, n) = (w.k, w.n);
    let g = w.kernel.group();
    let lda = k.div_ceil(g) * g;
    let padded_rows = rows.div_ceil(MR) * MR;
    let mut tile: Tile = [[0.0; NR]; MR];
    // The activation block, rounded to bf16, in the layout the kernel reads: row-major f32 for
    // the portable and AVX2 kernels, row-major bf16 bits for AVX512-BF16, interleaved bf16 bits
    // for the aarch64 instructions.
    let a_f32: Vec<f32>;
    let a_bits: Vec<u16>;
    match w.kernel {
        Bf16Kernel::Portable | Bf16Kernel::Avx2Fma => {
            a_f32 = padded_rows_of(x, rows, k, padded_rows * lda, lda, round_to_bf16);
            a_bits = Vec::new();
        }
        Bf16Kernel::Avx512Bf16 => {
            a_bits = padded_rows_of(x, rows, k, padded_rows * lda, lda, to_bf16);
            a_f32 = Vec::new();
        }
        Bf16Kernel::Bfdot | Bf16Kernel::Bfmmla => {
            // bfdot: per k-pair, the MR rows' pairs side by side ([pair][row][2]);
            // bfmmla: per k-quad, the MR rows' quads side by side ([quad][row][4]), so that two
            // consecutive rows form one 2×4 operand.
            let groups = lda / g;
            let mut a = vec![0u16; padded_rows * lda];
            for r in 0..rows {
                let (tile_r, in_tile) = (r / MR, r % MR);
                for i in 0..k {
                    let at = tile_r * MR * lda + (i / g) * MR * g + in_tile * g + i % g;
                    a[at] = to_bf16(x[r * k + i]);
                }
            }
            debug_assert_eq!(a.len(), padded_rows / MR * groups * MR * g);
            a_bits = a;
            a_f32 = Vec::new();
        }
    }
    let panel_len = NR * lda;
    for panel in 0..n.div_ceil(NR) {
        let b = &w.packed[panel * panel_len..(panel + 1) * panel_len];
        let bias = &bias[panel * NR..(panel + 1) * NR];
        for r0 in (0..rows).step_by(MR) {
            match w.kernel {
                Bf16Kernel::Portable => {
                    portable_tile(&a_f32[r0 * lda..(r0 + MR) * lda], lda, b, bias, &mut tile)
                }
                #[cfg(target_arch = "x86_64")]
                Bf16Kernel::Avx2Fma => {
                    x86::avx2_tile(&a_f32[r0 * lda..(r0 + MR) * lda], lda, b, bias, &mut tile)
                }
                #[cfg(target_arch = "x86_64")]
                Bf16Kernel::Avx512Bf16 => x86::avx512bf16_tile(
                    &a_bits[r0 * lda..(r0 + MR) * lda],
                    lda,
                    b,
                    bias,
                    &mut tile,
                ),
                #[cfg(target_arch = "aarch64")]
                Bf16Kernel::Bfdot => {
                    aarch64::bfdot_tile(&a_bits[r0 * lda..(r0 + MR) * lda], lda, b, bias, &mut tile)
                }
                #[cfg(target_arch = "aarch64")]
                Bf16Kernel::Bfmmla => aarch64::bfmmla_tile(
                    &a_bits[r0 * lda..(r0 + MR) * lda],
                    lda,
                    b,
                    bias,
                    &mut tile,
                ),
                #[allow(unreachable_patterns)]
                _ => unreachable!("support checked by linear"),
            }
            let c0 = panel * NR;
            let width = NR.min(n - c0);
            for (r, t) in tile.iter().enumerate().take(MR.min(rows - r0)) {
                let o = (r0 + r) * n + c0;
                out[o..o + width].copy_from_slice(&t[..width]);
            }
        }
    }
    let _ = (&a_f32, &a_bits);
}

/// `rows` rows of `k` values of `x`, each converted by `convert`, row-major with rows `lda`
/// apart in a zero-filled buffer of `len` (the padding past `k` and past `rows` stays zero).
fn padded_rows_of<T: Copy + Default>(
    x: &[f32],
    rows: usize,
    k: usize,
    len: usize,
    lda: usize,
    convert: impl Fn(f32) -> T,
) -> Vec<T> {
    let mut a = vec![T::default(); len];
    for r in 0..rows {
        for (o, &v) in a[r * lda..r * lda + k]
            .iter_mut()
            .zip(&x[r * k..(r + 1) * k])
        {
            *o = convert(v);
        }
    }
    a
}

/// The portable tile on the k-pair layout: f32 products of bf16 values, f32 sums.
fn portable_tile(a: &[f32], lda: usize, b: &[u16], bias: &[f32], out: &mut Tile) {
    let mut acc = [[0.0f32; NR]; MR];
    for t in 0..lda / 2 {
        let bt = &b[t * NR * 2..(t + 1) * NR * 2];
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let (a0, a1) = (a[r * lda + 2 * t], a[r * lda + 2 * t + 1]);
            for (c, v) in acc_r.iter_mut().enumerate() {
                *v += a0 * from_bf16(bt[2 * c]);
                *v += a1 * from_bf16(bt[2 * c + 1]);
            }
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        for ((o, a), b) in o.iter_mut().zip(a).zip(bias) {
            *o = a + b;
        }
    }
}

/// The reference: inputs and weights rounded to bf16, products summed in f64.
pub fn reference_linear(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let mut y = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let acc: f64 = (0..k)
                .map(|p| {
                    f64::from(round_to_bf16(x[i * k + p])) * f64::from(round_to_bf16(w[j * k + p]))
                })
                .sum();
            y[i * n + j] = (acc + f64::from(bias.map_or(0.0, |b| b[j]))) as f32;
        }
    }
    y
}

#[cfg(test)]
mod tests;
