//! int8 linear layers: s8 weights (symmetric, one scale per output channel) times u8 activations
//! (asymmetric; one scale and zero point per token for dynamic quantization, or per tensor from
//! calibration for static quantization), accumulated exactly in i32 and dequantized to f32 with
//! the bias in the same pass.
//!
//! One driver ([`linear`]) serves every kernel: it quantizes a block of activation rows straight
//! from the f32 input into a small buffer that stays in cache (no separate pass over the tensor),
//! runs the kernel's `MR × NR` micro-tile over each packed weight panel, and the micro-tile writes
//! f32 with the dequantization and bias applied. Every kernel computes the same integers, and the
//! f32 epilogue uses the same operations in the same order, so all kernels give **bit-identical**
//! outputs; the tests hold them to exact equality with the scalar reference.
//!
//! ## AVX2 without saturation
//! `vpmaddubsw` (u8 × s8, adjacent pairs summed into i16) saturates: 255·127·2 = 64770 > 32767.
//! The usual fix is to give up one activation bit ("reduce range", 7-bit activations). We keep all
//! 8 bits and use an exact method instead: activations are stored as `q − zero_point` in i16
//! (range −255..255), weights as i16, and `vpmaddwd` multiplies 16 i16 pairs into 8 exact i32 sums.
//! That is 16 MACs per instruction against 32 for `vpmaddubsw`, but `vpmaddubsw` needs a second
//! `vpmaddwd` (by ones) to widen its i16 sums before they can be accumulated, so both spend two
//! multiplier uops per 32 MACs: the exact method costs no multiplier throughput. It doubles the
//! packed weight size (2 bytes per weight, still half of f32) and the activation block's size.
//! Subtracting the zero point before the multiply also removes the `zero_point · Σw` correction.
//!
//! ## VNNI
//! `vpdpbusd` (AVX-VNNI on 256-bit registers, AVX512-VNNI on 512-bit) multiplies u8 × s8 in groups
//! of four and adds into i32 without intermediate saturation, so u8 activations and s8 weights go
//! in as they are, and the zero point is corrected once per output from the weights' column sums.

pub mod reference;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::fmt;

/// Output columns per packed weight panel (every kernel).
pub const NR: usize = 16;
/// Rows per micro-tile (every kernel).
pub const MR: usize = 4;
/// Rows quantized together into one cache-resident activation block.
const MB: usize = 64;
/// Largest reduction length: keeps every i32 sum (|q − z|·|w|·k ≤ 255·127·k) exact.
pub const MAX_K: usize = (i32::MAX as usize) / (255 * 127);

/// An int8 GEMM kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Int8Kernel {
    /// Portable scalar code (any CPU).
    Scalar,
    /// AVX2: i16 activations (`q − zero_point`) × i16 weights through `vpmaddwd`, exact.
    Avx2,
    /// AVX-VNNI: `vpdpbusd` on 256-bit registers.
    AvxVnni,
    /// AVX512-VNNI: `vpdpbusd` on 512-bit registers.
    Avx512Vnni,
}

/// How a kernel wants the weights packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Per panel of [`NR`] columns, per pair of k: `NR × 2` i16 (column-major within the pair).
    PairsI16,
    /// Per panel of [`NR`] columns, per group of four k: `NR × 4` i8.
    QuadsI8,
}

impl Int8Kernel {
    pub const ALL: [Int8Kernel; 4] = [
        Int8Kernel::Scalar,
        Int8Kernel::Avx2,
        Int8Kernel::AvxVnni,
        Int8Kernel::Avx512Vnni,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Int8Kernel::Scalar => "scalar",
            Int8Kernel::Avx2 => "avx2",
            Int8Kernel::AvxVnni => "avx-vnni",
            Int8Kernel::Avx512Vnni => "avx512-vnni",
        }
    }

    /// Whether this CPU can run the kernel (detected at run time).
    pub fn is_supported(self) -> bool {
        match self {
            Int8Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::AvxVnni => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("avxvnni")
            }
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::Avx512Vnni => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest kernel this CPU runs: AVX512-VNNI, then AVX-VNNI, then AVX2, else scalar.
    pub fn detect() -> Self {
        [
            Int8Kernel::Avx512Vnni,
            Int8Kernel::AvxVnni,
            Int8Kernel::Avx2,
        ]
        .into_iter()
        .find(|k| k.is_supported())
        .unwrap_or(Int8Kernel::Scalar)
    }

    fn layout(self) -> Layout {
        match self {
            Int8Kernel::Avx2 => Layout::PairsI16,
            _ => Layout::QuadsI8,
        }
    }
}

impl fmt::Display for Int8Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Int8Kernel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Int8Kernel::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                format!("unknown int8 kernel `{s}` (scalar, avx2, avx-vnni, avx512-vnni)")
            })
    }
}

/// Asymmetric u8 quantization of activations: `x ≈ scale · (q − zero_point)`, `q ∈ 0..=255`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActParams {
    pub scale: f32,
    pub zero_point: u8,
}

impl ActParams {
    /// Parameters covering `[min, max]`, widened to include 0 so that zero is exact. A degenerate
    /// or non-finite range gives scale 1 (an all-zero row quantizes to zeros).
    pub fn from_range(min: f32, max: f32) -> Self {
        let (lo, hi) = (min.min(0.0), max.max(0.0));
        let scale = (hi - lo) / 255.0;
        if !(scale > 0.0 && scale.is_finite()) {
            return Self {
                scale: 1.0,
                zero_point: 0,
            };
        }
        let zero_point = (-lo / scale).round_ties_even().clamp(0.0, 255.0) as u8;
        Self { scale, zero_point }
    }

    /// The quantized value of `x`: `clamp(x / scale + zero_point, 0, 255)`, rounded half to even.
    /// Every kernel's vector code computes exactly this.
    #[inline]
    pub fn quantize(self, x: f32) -> u8 {
        let inv = 1.0 / self.scale;
        (x * inv + f32::from(self.zero_point))
            .clamp(0.0, 255.0)
            .round_ties_even() as u8
    }
}

/// How activations are quantized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ActQuant {
    /// Per token (row), from that row's min and max at run time.
    Dynamic,
    /// One scale and zero point for the whole tensor, from calibration.
    Static(ActParams),
}

/// Errors from packing or loading int8 weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantError(pub String);

impl fmt::Display for QuantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for QuantError {}

#[derive(Clone)]
enum Packed {
    PairsI16(Vec<i16>),
    QuadsI8(Vec<i8>),
}

/// A linear layer's weight, quantized (s8, symmetric, one scale per output channel) and packed
/// for one kernel.
#[derive(Clone)]
pub struct Int8Weights {
    k: usize,
    n: usize,
    kernel: Int8Kernel,
    packed: Packed,
    /// Per output channel, padded with zeros to whole panels.
    scales: Vec<f32>,
    /// `Σ_k w_q[j, k]` per output channel (for the zero-point correction), padded like `scales`.
    col_sums: Vec<i32>,
}

impl fmt::Debug for Int8Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Int8Weights({}×{}, {})", self.n, self.k, self.kernel)
    }
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// Symmetric per-channel quantization of a `[n, k]` weight: `(q, scales)` with
/// `q ∈ −127..=127` and `w[j, i] ≈ scales[j] · q[j, i]`.
pub fn quantize_weights(w: &[f32], n: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; n * k];
    let mut scales = vec![1.0f32; n];
    for j in 0..n {
        let row = &w[j * k..(j + 1) * k];
        let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        if !(amax > 0.0 && amax.is_finite()) {
            continue; // all-zero (or broken) channel: zeros with scale 1
        }
        let scale = amax / 127.0;
        scales[j] = scale;
        for (o, &v) in q[j * k..(j + 1) * k].iter_mut().zip(row) {
            *o = (v / scale).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
    }
    (q, scales)
}

const MAGIC: &[u8; 8] = b"KILNI8W1";

impl Int8Weights {
    /// Quantizes and packs a `[n, k]` weight (the Hugging Face `[out, in]` layout) for `kernel`.
    pub fn pack(w: &[f32], n: usize, k: usize, kernel: Int8Kernel) -> Result<Self, QuantError> {
        if w.len() != n * k {
            return Err(QuantError(format!(
                "weight has {} values, expected {n}×{k}",
                w.len()
            )));
        }
        let (q, scales) = quantize_weights(w, n, k);
        Self::from_quantized(&q, &scales, n, k, kernel)
    }

    /// Packs already-quantized `[n, k]` weights with their per-channel scales.
    pub fn from_quantized(
        q: &[i8],
        scales: &[f32],
        n: usize,
        k: usize,
        kernel: Int8Kernel,
    ) -> Result<Self, QuantError> {
        if q.len() != n * k || scales.len() != n {
            return Err(QuantError(format!(
                "quantized weight {}×? with {} scales does not match {n}×{k}",
                q.len(),
                scales.len()
            )));
        }
        if k == 0 || n == 0 {
            return Err(QuantError(format!("empty weight {n}×{k}")));
        }
        if k > MAX_K {
            return Err(QuantError(format!(
                "reduction length {k} exceeds {MAX_K}, beyond which i32 sums could overflow"
            )));
        }
        let panels = n.div_ceil(NR);
        let np = panels * NR;
        let at = |j: usize, i: usize| if j < n && i < k { q[j * k + i] } else { 0 };
        let packed = match kernel.layout() {
            Layout::PairsI16 => {
                let kp = round_up(k, 2);
                let mut out = Vec::with_capacity(np * kp);
                for p in 0..panels {
                    for t in 0..kp / 2 {
                        for c in 0..NR {
                            for s in 0..2 {
                                out.push(i16::from(at(p * NR + c, 2 * t + s)));
                            }
                        }
                    }
                }
                Packed::PairsI16(out)
            }
            Layout::QuadsI8 => {
                let kp = round_up(k, 4);
                let mut out = Vec::with_capacity(np * kp);
                for p in 0..panels {
                    for t in 0..kp / 4 {
                        for c in 0..NR {
                            for s in 0..4 {
                                out.push(at(p * NR + c, 4 * t + s));
                            }
                        }
                    }
                }
                Packed::QuadsI8(out)
            }
        };
        let mut padded_scales = scales.to_vec();
        padded_scales.resize(np, 0.0);
        let mut col_sums: Vec<i32> = (0..n)
            .map(|j| q[j * k..(j + 1) * k].iter().map(|&v| i32::from(v)).sum())
            .collect();
        col_sums.resize(np, 0);
        Ok(Self {
            k,
            n,
            kernel,
            packed,
            scales: padded_scales,
            col_sums,
        })
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn kernel(&self) -> Int8Kernel {
        self.kernel
    }

    /// Per-output-channel scales.
    pub fn scales(&self) -> &[f32] {
        &self.scales[..self.n]
    }

    /// Bytes held by the packed weight and its scales.
    pub fn size_bytes(&self) -> usize {
        let packed = match &self.packed {
            Packed::PairsI16(v) => v.len() * 2,
            Packed::QuadsI8(v) => v.len(),
        };
        packed + self.scales.len() * 4 + self.col_sums.len() * 4
    }

    /// The quantized `[n, k]` weight, unpacked (for tests and re-packing).
    pub fn unpacked(&self) -> Vec<i8> {
        let mut q = vec![0i8; self.n * self.k];
        for j in 0..self.n {
            let (p, c) = (j / NR, j % NR);
            for i in 0..self.k {
                q[j * self.k + i] = match &self.packed {
                    Packed::PairsI16(v) => {
                        let kp = round_up(self.k, 2);
                        v[p * NR * kp + (i / 2) * NR * 2 + c * 2 + i % 2] as i8
                    }
                    Packed::QuadsI8(v) => {
                        let kp = round_up(self.k, 4);
                        v[p * NR * kp + (i / 4) * NR * 4 + c * 4 + i % 4]
                    }
                };
            }
        }
        q
    }

    /// A self-describing byte form (for a plan cache): magic, sizes, scales, quantized weights. [`Int8Weights::from_bytes`] re-packs them, so the bytes are kernel-independent.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.n * (self.k + 4));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.n as u64).to_le_bytes());
        out.extend_from_slice(&(self.k as u64).to_le_bytes());
        for s in self.scales() {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out.extend(self.unpacked().iter().map(|&v| v as u8));
        out
    }

    /// Reads [`Int8Weights::to_bytes`] and packs for `kernel`; errors on any inconsistency.
    pub fn from_bytes(bytes: &[u8], kernel: Int8Kernel) -> Result<Self, QuantError> {
        let bad = |why: &str| QuantError(format!("int8 weight bytes: {why}"));
        if bytes.len() < 24 || &bytes[..8] != MAGIC {
            return Err(bad("missing header"));
        }
        let n = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
        let k = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes")) as usize;
        let want = n
            .checked_mul(k)
            .and_then(|nk| nk.checked_add(n.checked_mul(4)?))
            .and_then(|b| b.checked_add(24));
        if want != Some(bytes.len()) {
            return Err(bad("length does not match the header"));
        }
        let scales: Vec<f32> = bytes[24..24 + 4 * n]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let q: Vec<i8> = bytes[24 + 4 * n..].iter().map(|&b| b as i8).collect();
        Self::from_quantized(&q, &scales, n, k, kernel)
    }
}

/// Per-row quantization parameters of one activation block.
#[derive(Clone, Copy)]
struct RowParams {
    scale: f32,
    zero: i32,
}

/// What a micro-tile needs to dequantize: per-row scale and zero point (zero is 0 for the AVX2
/// layout, which stores `q − zero_point`), per-column scale, column sum and bias.
pub(crate) struct Epilogue<'a> {
    pub row_scale: [f32; MR],
    pub row_zero: [i32; MR],
    pub col_scale: &'a [f32],
    pub col_sum: &'a [i32],
    pub bias: &'a [f32],
}

/// One `MR × NR` f32 output tile.
pub(crate) type Tile = [[f32; NR]; MR];

/// The scalar epilogue every vector kernel reproduces exactly:
/// `((acc − zero·colsum) as f32) · (row_scale · col_scale) + bias`.
#[inline]
pub(crate) fn dequantize(acc: i32, r: usize, c: usize, ep: &Epilogue<'_>) -> f32 {
    let corrected = acc.wrapping_sub(ep.row_zero[r].wrapping_mul(ep.col_sum[c]));
    (corrected as f32) * (ep.row_scale[r] * ep.col_scale[c]) + ep.bias[c]
}

/// The portable micro-tile on the quads layout.
fn scalar_tile(a: &[u8], lda: usize, b: &[i8], quads: usize, ep: &Epilogue<'_>, out: &mut Tile) {
    let mut acc = [[0i32; NR]; MR];
    for t in 0..quads {
        let bq = &b[t * NR * 4..(t + 1) * NR * 4];
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let aq = &a[r * lda + 4 * t..r * lda + 4 * t + 4];
            for (c, acc_rc) in acc_r.iter_mut().enumerate() {
                let w = &bq[c * 4..c * 4 + 4];
                *acc_rc += (0..4)
                    .map(|s| i32::from(aq[s]) * i32::from(w[s]))
                    .sum::<i32>();
            }
        }
    }
    for r in 0..MR {
        for c in 0..NR {
            out[r][c] = dequantize(acc[r][c], r, c, ep);
        }
    }
}

/// Which micro-tile runs (a kernel, plus test-only variants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TileFn {
    Kernel(Int8Kernel),
    /// The AVX-VNNI kernel with `vpdpbusd` replaced by an exact AVX2 sequence, so the kernel's
    /// loads, loop and epilogue are tested on CPUs without AVX-VNNI.
    #[cfg(all(test, target_arch = "x86_64"))]
    AvxVnniEmulated,
}

impl TileFn {
    fn layout(self) -> Layout {
        match self {
            TileFn::Kernel(k) => k.layout(),
            #[cfg(all(test, target_arch = "x86_64"))]
            TileFn::AvxVnniEmulated => Layout::QuadsI8,
        }
    }

    fn simd_quantize(self) -> bool {
        !matches!(self, TileFn::Kernel(Int8Kernel::Scalar))
    }
}

/// `out[i, j] = Σ_k x̂[i, k] · ŵ[j, k] + bias[j]` for `x` of `m × k` rows (f32) and `out` of
/// `m × n`: activations quantized as `act` says inside the GEMM, weights as packed, f32 out.
///
/// Splits rows over rayon's pool (feature `parallel`) when `threads > 1`.
pub fn linear(
    x: &[f32],
    m: usize,
    w: &Int8Weights,
    bias: Option<&[f32]>,
    act: ActQuant,
    out: &mut [f32],
    threads: usize,
) -> Result<(), QuantError> {
    linear_then(x, m, w, bias, act, out, threads, &|_| {})
}

/// [`linear`], then `post` on each block of finished output rows (whole rows, at most [`MB`] of
/// them) on the thread that computed it, while the block is still in cache: an activation as
/// the GEMM's epilogue instead of one more pass over the whole output in memory.
#[allow(clippy::too_many_arguments)]
pub fn linear_then(
    x: &[f32],
    m: usize,
    w: &Int8Weights,
    bias: Option<&[f32]>,
    act: ActQuant,
    out: &mut [f32],
    threads: usize,
    post: &(dyn Fn(&mut [f32]) + Sync),
) -> Result<(), QuantError> {
    if !w.kernel.is_supported() {
        return Err(QuantError(format!(
            "the {} int8 kernel is not supported by this CPU",
            w.kernel
        )));
    }
    linear_with(
        TileFn::Kernel(w.kernel),
        x,
        m,
        w,
        bias,
        act,
        out,
        threads,
        post,
    )
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_with(
    tile: TileFn,
    x: &[f32],
    m: usize,
    w: &Int8Weights,
    bias: Option<&[f32]>,
    act: ActQuant,
    out: &mut [f32],
    threads: usize,
    post: &(dyn Fn(&mut [f32]) + Sync),
) -> Result<(), QuantError> {
    let (k, n) = (w.k, w.n);
    if x.len() != m * k || out.len() != m * n {
        return Err(QuantError(format!(
            "int8 linear: x has {} values and out {}, expected {m}×{k} and {m}×{n}",
            x.len(),
            out.len()
        )));
    }
    if bias.is_some_and(|b| b.len() != n) {
        return Err(QuantError(format!(
            "int8 linear: bias must have {n} values"
        )));
    }
    if tile.layout() != w.kernel.layout() {
        return Err(QuantError(
            "int8 linear: weights packed for another layout".into(),
        ));
    }
    if let ActQuant::Static(p) = act
        && !(p.scale > 0.0 && p.scale.is_finite())
    {
        return Err(QuantError(format!(
            "int8 linear: static scale {} must be positive",
            p.scale
        )));
    }
    if m == 0 {
        return Ok(());
    }
    let mut padded_bias = vec![0.0f32; w.scales.len()];
    if let Some(b) = bias {
        padded_bias[..n].copy_from_slice(b);
    }
    let run = |rows: std::ops::Range<usize>, out: &mut [f32]| {
        block(
            tile,
            &x[rows.start * k..rows.end * k],
            rows.len(),
            w,
            &padded_bias,
            act,
            out,
        );
        post(out);
    };
    // Rows per task: an even share, in whole micro-tiles, at most one activation block.
    let per = round_up(m.div_ceil(threads.max(1)), MR).min(MB);
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

/// Quantizes up to [`MB`] rows and multiplies them by every panel.
fn block(
    tile: TileFn,
    x: &[f32],
    rows: usize,
    w: &Int8Weights,
    bias: &[f32],
    act: ActQuant,
    out: &mut [f32],
) {
    let (k, n) = (w.k, w.n);
    let padded_rows = round_up(rows, MR);
    let mut params = vec![
        RowParams {
            scale: 1.0,
            zero: 0
        };
        padded_rows
    ];
    let params_of = |row: &[f32], simd: bool| match act {
        ActQuant::Static(p) => p,
        ActQuant::Dynamic => {
            let (lo, hi) = min_max(row, simd);
            ActParams::from_range(lo, hi)
        }
    };
    let simd = tile.simd_quantize();
    let mut tile_out: Tile = [[0.0; NR]; MR];
    let panels = n.div_ceil(NR);
    // The activation block, in the layout the kernel reads, and the kernel over each panel.
    match (tile.layout(), &w.packed) {
        (Layout::PairsI16, Packed::PairsI16(b)) => {
            let lda = round_up(k, 2);
            let mut a = vec![0i16; padded_rows * lda];
            for r in 0..rows {
                let row = &x[r * k..(r + 1) * k];
                let p = params_of(row, simd);
                params[r] = RowParams {
                    scale: p.scale,
                    zero: 0,
                };
                quantize_centered(row, p, &mut a[r * lda..r * lda + k], simd);
            }
            for panel in 0..panels {
                let bp = &b[panel * NR * lda..(panel + 1) * NR * lda];
                for r0 in (0..rows).step_by(MR) {
                    let ep = epilogue(w, bias, &params[r0..r0 + MR], panel);
                    run_pairs(
                        tile,
                        &a[r0 * lda..(r0 + MR) * lda],
                        lda,
                        bp,
                        &ep,
                        &mut tile_out,
                    );
                    store(&tile_out, out, n, r0, rows, panel);
                }
            }
        }
        (Layout::QuadsI8, Packed::QuadsI8(b)) => {
            let lda = round_up(k, 4);
            let mut a = vec![0u8; padded_rows * lda];
            for r in 0..rows {
                let row = &x[r * k..(r + 1) * k];
                let p = params_of(row, simd);
                params[r] = RowParams {
                    scale: p.scale,
                    zero: i32::from(p.zero_point),
                };
                quantize_u8(row, p, &mut a[r * lda..r * lda + k], simd);
            }
            for panel in 0..panels {
                let bp = &b[panel * NR * lda..(panel + 1) * NR * lda];
                for r0 in (0..rows).step_by(MR) {
                    let ep = epilogue(w, bias, &params[r0..r0 + MR], panel);
                    run_quads(
                        tile,
                        &a[r0 * lda..(r0 + MR) * lda],
                        lda,
                        bp,
                        &ep,
                        &mut tile_out,
                    );
                    store(&tile_out, out, n, r0, rows, panel);
                }
            }
        }
        _ => unreachable!("layout checked by linear_with"),
    }
}

fn epilogue<'a>(
    w: &'a Int8Weights,
    bias: &'a [f32],
    p: &[RowParams],
    panel: usize,
) -> Epilogue<'a> {
    let cols = panel * NR..(panel + 1) * NR;
    Epilogue {
        row_scale: std::array::from_fn(|r| p[r].scale),
        row_zero: std::array::from_fn(|r| p[r].zero),
        col_scale: &w.scales[cols.clone()],
        col_sum: &w.col_sums[cols.clone()],
        bias: &bias[cols],
    }
}

/// Copies the valid part of a tile (rows below `rows`, columns below `n`) into `out`.
fn store(tile: &Tile, out: &mut [f32], n: usize, r0: usize, rows: usize, panel: usize) {
    let c0 = panel * NR;
    let width = NR.min(n - c0);
    for (r, t) in tile.iter().enumerate().take(MR.min(rows - r0)) {
        let o = (r0 + r) * n + c0;
        out[o..o + width].copy_from_slice(&t[..width]);
    }
}

fn run_pairs(tile: TileFn, a: &[i16], lda: usize, b: &[i16], ep: &Epilogue<'_>, out: &mut Tile) {
    match tile {
        #[cfg(target_arch = "x86_64")]
        TileFn::Kernel(Int8Kernel::Avx2) => x86::avx2_tile(a, lda, b, ep, out),
        _ => {
            let _ = (a, lda, b, ep, out);
            unreachable!("only the AVX2 kernel uses the i16 pair layout")
        }
    }
}

fn run_quads(tile: TileFn, a: &[u8], lda: usize, b: &[i8], ep: &Epilogue<'_>, out: &mut Tile) {
    match tile {
        #[cfg(target_arch = "x86_64")]
        TileFn::Kernel(Int8Kernel::AvxVnni) => x86::avxvnni_tile(a, lda, b, ep, out),
        #[cfg(target_arch = "x86_64")]
        TileFn::Kernel(Int8Kernel::Avx512Vnni) => x86::avx512vnni_tile(a, lda, b, ep, out),
        #[cfg(all(test, target_arch = "x86_64"))]
        TileFn::AvxVnniEmulated => x86::avxvnni_emulated_tile(a, lda, b, ep, out),
        _ => scalar_tile(a, lda, b, lda / 4, ep, out),
    }
}

/// `(min, max)` of a row (NaNs are skipped by the scalar path; vector and scalar paths agree on
/// all other inputs).
fn min_max(row: &[f32], simd: bool) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        return x86::min_max(row);
    }
    let _ = simd;
    row.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

fn quantize_u8(row: &[f32], p: ActParams, out: &mut [u8], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        return x86::quantize_u8(row, p, out);
    }
    let _ = simd;
    for (o, &v) in out.iter_mut().zip(row) {
        *o = p.quantize(v);
    }
}

fn quantize_centered(row: &[f32], p: ActParams, out: &mut [i16], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        return x86::quantize_centered(row, p, out);
    }
    let _ = simd;
    let z = i16::from(p.zero_point);
    for (o, &v) in out.iter_mut().zip(row) {
        *o = i16::from(p.quantize(v)) - z;
    }
}

#[cfg(test)]
mod tests;
