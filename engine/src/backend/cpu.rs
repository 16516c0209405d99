//! kiln's own CPU backend: owned `f32` buffers, direct `gemm` calls, the attention crate's
//! kernels, and in-place element-wise ops whenever the executor hands over the last reference.
//! Intermediate buffers come from and return to an [`Arena`], so a plan that has run once at a
//! shape runs again without allocating them; compiled weights are read in place from their
//! stored bytes (a mapping of the plan-cache file on a warm start).

use std::sync::Arc;

use kiln_attention::{
    KernelChoice, Mask, PagedParams, SdpaParams, SdpaShape, VarlenParams,
    scaled_dot_product_attention, scaled_dot_product_attention_paged,
    scaled_dot_product_attention_varlen,
};

use kiln_quant::bf16::{Bf16Kernel, Bf16Weights};
use kiln_quant::{ActQuant, Int8Kernel, Int8Weights};

use super::arena::Arena;
use super::{Backend, KvStore, SdpaMaskArg, cumulative};
use crate::caps::CpuCaps;
use crate::compile::CompileTarget;
use crate::error::{EngineError, Result};
use crate::ir::{Activation, ConstRole, DType, PoolMode};
use crate::kernels::{gemm, gemv, panel_gemm, rowwise};
use crate::kv::{KvCacheSpec, PagedBatch};
use crate::quantize::LinearFormat;
use crate::storage::{Blob, ElemType, StoredTensor, WeightFormat};
use crate::tensor::{HostData, HostTensor};

/// A tensor on [`CpuBackend`]. Buffers are shared until written (`Arc::make_mut`), so ops that
/// receive the only reference work in place.
#[derive(Debug, Clone)]
pub struct CpuTensor {
    shape: Vec<usize>,
    data: CpuData,
}

#[derive(Debug, Clone)]
enum CpuData {
    F32(Arc<Vec<f32>>),
    I64(Arc<Vec<i64>>),
    /// A constant read in place from stored bytes (checked at upload to view as `f32`/`i64`).
    StoredF32(Blob),
    StoredI64(Blob),
    /// A linear weight in a packed f32 format (`F32Panels16` for kiln's GEMM, `F32InOut` for
    /// the `gemm` crate's). `shape` stays the logical `[out, in]`.
    PackedLinear(Blob, WeightFormat),
    /// A linear weight quantized to s8 per output channel and packed for the detected int8
    /// kernel, with how its input activations are quantized.
    Int8Linear(Arc<(Int8Weights, ActQuant)>),
    /// A linear weight in bf16, packed for the detected bf16 kernel.
    Bf16Linear(Arc<Bf16Weights>),
}

/// kiln's own CPU kernels.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    threads: usize,
    arena: Arc<Arena>,
}

impl CpuBackend {
    pub fn new(threads: usize) -> Self {
        Self {
            threads: threads.max(1),
            arena: Arc::new(Arena::default()),
        }
    }

    /// The arena intermediate buffers come from (for tests and metrics).
    pub fn arena(&self) -> &Arena {
        &self.arena
    }

    /// Hands a consumed tensor's buffer back to the arena if nothing else holds it.
    fn recycle(&self, t: CpuTensor) {
        if let CpuData::F32(d) = t.data
            && let Ok(v) = Arc::try_unwrap(d)
        {
            self.arena.give(v);
        }
    }

    fn packed<'a>(&self, w: &'a CpuTensor) -> Result<(&'a [f32], WeightFormat)> {
        match &w.data {
            CpuData::PackedLinear(b, format) => Ok((
                b.as_f32()
                    .ok_or_else(|| self.err("linear weight bytes are not f32-aligned"))?,
                *format,
            )),
            _ => Err(self.err("linear weight was not uploaded as ConstRole::LinearWeight")),
        }
    }

    /// The linear-weight format this CPU runs fastest: kiln's panel GEMM where AVX2 and FMA
    /// exist, else the `gemm` crate (which has kernels for other ISAs, NEON included).
    fn linear_format() -> WeightFormat {
        let caps = CpuCaps::detect();
        if caps.avx2 && caps.fma {
            WeightFormat::F32Panels16
        } else {
            WeightFormat::F32InOut
        }
    }

    /// An `[out, in]` f32 weight in this CPU's linear format.
    fn pack_linear(&self, v: &[f32], out: usize, inn: usize) -> CpuData {
        let format = Self::linear_format();
        let packed = match format {
            WeightFormat::F32Panels16 => panel_gemm::pack(v, out, inn),
            _ => super::transpose(v, out, inn),
        };
        CpuData::PackedLinear(Blob::from_f32(packed), format)
    }

    /// `act(x @ w.T + b)` for any weight format; with `small_m` (a decoder's paged step), a few
    /// rows on an `[in, out]` weight take the weight-streaming GEMV.
    fn linear_impl(
        &self,
        x: CpuTensor,
        w: CpuTensor,
        b: Option<CpuTensor>,
        act: Option<Activation>,
        small_m: bool,
    ) -> Result<CpuTensor> {
        let [out_f, in_f] = w.shape[..] else {
            return Err(self.err(format!("linear weight has shape {:?}", w.shape)));
        };
        let xs = self.f32_ref(&x, "linear input")?;
        let m = xs.len() / in_f.max(1);
        let bias = b
            .as_ref()
            .map(|b| self.f32_ref(b, "linear bias"))
            .transpose()?;
        let mut y = self.arena.take(m * out_f);
        match &w.data {
            // The quantized kernels quantize the input rows, multiply and add the bias in one
            // pass, writing every output.
            CpuData::Int8Linear(packed) => {
                let (weights, act_quant) = &**packed;
                // The activation runs on each block of rows as soon as it is done, in cache.
                let post = |rows: &mut [f32]| {
                    if let Some(act) = act {
                        rowwise::activation_serial(rows, act);
                    }
                };
                kiln_quant::int8::linear_then(
                    xs,
                    m,
                    weights,
                    bias,
                    *act_quant,
                    &mut y,
                    self.threads,
                    &post,
                )
                .map_err(|e| self.err(e.to_string()))?;
            }
            CpuData::Bf16Linear(weights) => {
                kiln_quant::bf16::linear(xs, m, weights, bias, &mut y, self.threads)
                    .map_err(|e| self.err(e.to_string()))?;
                if let Some(act) = act {
                    rowwise::activation(&mut y, act);
                }
            }
            CpuData::PackedLinear(..) => {
                let (packed, format) = self.packed(&w)?;
                match format {
                    WeightFormat::F32Panels16 => panel_gemm::linear(
                        &mut y,
                        xs,
                        packed,
                        m,
                        in_f,
                        out_f,
                        bias,
                        act,
                        self.threads,
                    ),
                    _ if small_m && m <= gemv::SMALL_M => {
                        // A decode step's few rows: read the weights once, across threads.
                        match bias {
                            Some(bias) => y
                                .chunks_mut(out_f.max(1))
                                .for_each(|row| row.copy_from_slice(bias)),
                            None => y.fill(0.0),
                        }
                        gemv::matmul_small_m(
                            &mut y,
                            xs,
                            packed,
                            m,
                            in_f,
                            out_f,
                            true,
                            self.threads,
                        );
                        if let Some(act) = act {
                            rowwise::activation(&mut y, act);
                        }
                    }
                    _ => gemm::linear(&mut y, xs, packed, m, in_f, out_f, bias, act, self.threads),
                }
            }
            _ => return Err(self.err("linear weight was not uploaded as ConstRole::LinearWeight")),
        }
        let mut shape = x.shape.clone();
        *shape
            .last_mut()
            .ok_or_else(|| self.err("linear input is a scalar"))? = out_f;
        self.recycle(x);
        Ok(f32_tensor(shape, y))
    }

    fn err(&self, reason: impl Into<String>) -> EngineError {
        EngineError::Backend {
            backend: self.name(),
            reason: reason.into(),
        }
    }

    /// The tensor's values in a buffer this op may overwrite: its own if it held the only
    /// reference, else a copy in an arena buffer.
    fn f32_of(&self, t: CpuTensor, what: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let data = match t.data {
            CpuData::F32(d) => match Arc::try_unwrap(d) {
                Ok(v) => v,
                Err(shared) => self.copy_of(&shared),
            },
            CpuData::StoredF32(b) => self.copy_of(b.as_f32().ok_or_else(|| self.misaligned())?),
            _ => return Err(self.err(format!("{what}: expected an F32 tensor"))),
        };
        Ok((t.shape, data))
    }

    fn copy_of(&self, src: &[f32]) -> Vec<f32> {
        let mut v = self.arena.take(src.len());
        v.copy_from_slice(src);
        v
    }

    fn misaligned(&self) -> EngineError {
        self.err("stored constant is not aligned for its element type")
    }

    fn f32_ref<'a>(&self, t: &'a CpuTensor, what: &str) -> Result<&'a [f32]> {
        match &t.data {
            CpuData::F32(d) => Ok(d),
            CpuData::StoredF32(b) => b.as_f32().ok_or_else(|| self.misaligned()),
            _ => Err(self.err(format!("{what}: expected an F32 tensor"))),
        }
    }

    fn i64_ref<'a>(&self, t: &'a CpuTensor, what: &str) -> Result<&'a [i64]> {
        match &t.data {
            CpuData::I64(d) => Ok(d),
            CpuData::StoredI64(b) => b.as_i64().ok_or_else(|| self.misaligned()),
            _ => Err(self.err(format!("{what}: expected an I64 tensor"))),
        }
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new(rayon::current_num_threads())
    }
}

fn f32_tensor(shape: Vec<usize>, data: Vec<f32>) -> CpuTensor {
    CpuTensor {
        shape,
        data: CpuData::F32(Arc::new(data)),
    }
}

/// `[a, b, c, d]` → `[a, c, b, d]` (swap the two middle axes), the head split/merge shuffle,
/// reading each source row of `c·d` values at `offset` within rows `row_stride` apart (so a
/// head split can read its columns straight out of a merged Q/K/V projection).
#[allow(clippy::too_many_arguments)]
fn swap_middle_into(
    out: &mut [f32],
    src: &[f32],
    (a, b, c, d): (usize, usize, usize, usize),
    row_stride: usize,
    offset: usize,
) {
    // One output block of `b·d` values per (i, k), written from `b` source rows; blocks are
    // disjoint, so large copies (a Q/K/V split of a 32×128 batch) run across threads.
    let block = |ik: usize, o: &mut [f32]| {
        let (i, k) = (ik / c, ik % c);
        for (j, t) in o.chunks_mut(d).enumerate() {
            let s = (i * b + j) * row_stride + offset + k * d;
            t.copy_from_slice(&src[s..s + d]);
        }
    };
    let out = &mut out[..a * b * c * d];
    if b * d == 0 {
        return;
    }
    if out.len() >= rowwise::PAR_MIN_ELEMS {
        use rayon::prelude::*;
        out.par_chunks_mut(b * d)
            .enumerate()
            .for_each(|(ik, o)| block(ik, o));
    } else {
        out.chunks_mut(b * d)
            .enumerate()
            .for_each(|(ik, o)| block(ik, o));
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;

    fn name(&self) -> String {
        "cpu".into()
    }

    fn compile_target(&self) -> CompileTarget {
        let mut formats = vec![Self::linear_format()];
        // The last is for int8 linears only (the compiler picks it when a layer runs int8).
        for f in [
            WeightFormat::F32Panels16,
            WeightFormat::F32InOut,
            WeightFormat::Plain,
            WeightFormat::Int8PerChannel,
        ] {
            if !formats.contains(&f) {
                formats.push(f);
            }
        }
        CompileTarget {
            linear_formats: formats,
        }
    }

    fn device_facts(&self) -> Vec<(String, String)> {
        let caps = CpuCaps::detect();
        vec![
            ("backend".into(), self.name()),
            ("arch".into(), caps.arch.into()),
            ("cpu_features".into(), caps.feature_names().join(",")),
        ]
    }

    fn reserve(&self, buffer_elems: &[usize]) {
        self.arena.reserve(buffer_elems);
    }

    fn upload(&self, t: &HostTensor, role: ConstRole) -> Result<CpuTensor> {
        let data = match (&t.data, role) {
            (HostData::F32(v), ConstRole::LinearWeight) => {
                let [out, inn] = t.shape[..] else {
                    return Err(self.err(format!("linear weight must be 2-D, got {:?}", t.shape)));
                };
                self.pack_linear(v, out, inn)
            }
            (HostData::F32(v), ConstRole::Other) => CpuData::F32(Arc::new(v.clone())),
            (HostData::I64(v), _) => CpuData::I64(Arc::new(v.clone())),
        };
        Ok(CpuTensor {
            shape: t.shape.clone(),
            data,
        })
    }

    fn upload_stored(&self, t: &StoredTensor) -> Result<CpuTensor> {
        let buf = t.buffer("data")?;
        buf.check()?;
        let viewable = match buf.elem {
            ElemType::F32 => buf.bytes.as_f32().is_some(),
            ElemType::I64 => buf.bytes.as_i64().is_some(),
            _ => false,
        };
        if !viewable {
            return Err(self.err(format!(
                "stored {:?} data cannot be read in place",
                buf.elem
            )));
        }
        let data = match (t.format, t.role, t.dtype) {
            (WeightFormat::Plain, ConstRole::LinearWeight, _) => {
                return self.upload(&t.to_host()?, t.role);
            }
            (WeightFormat::Plain, ConstRole::Other, DType::F32) => {
                CpuData::StoredF32(buf.bytes.clone())
            }
            (WeightFormat::Plain, ConstRole::Other, DType::I64) => {
                CpuData::StoredI64(buf.bytes.clone())
            }
            (WeightFormat::F32InOut, ConstRole::LinearWeight, DType::F32)
                if t.shape.len() == 2 && buf.shape == [t.shape[1], t.shape[0]] =>
            {
                CpuData::PackedLinear(buf.bytes.clone(), WeightFormat::F32InOut)
            }
            (WeightFormat::F32Panels16, ConstRole::LinearWeight, DType::F32)
                if t.shape.len() == 2
                    && buf.shape
                        == [
                            t.shape[0].div_ceil(panel_gemm::NR),
                            t.shape[1],
                            panel_gemm::NR,
                        ] =>
            {
                CpuData::PackedLinear(buf.bytes.clone(), WeightFormat::F32Panels16)
            }
            (format, role, dtype) => {
                return Err(self.err(format!(
                    "cannot use a {format} {dtype:?} tensor with role {role:?}"
                )));
            }
        };
        Ok(CpuTensor {
            shape: t.shape.clone(),
            data,
        })
    }

    fn download(&self, t: CpuTensor) -> Result<HostTensor> {
        match t.data {
            CpuData::F32(d) => HostTensor::f32(t.shape, Arc::unwrap_or_clone(d)),
            CpuData::I64(d) => HostTensor::i64(t.shape, Arc::unwrap_or_clone(d)),
            CpuData::StoredF32(b) => HostTensor::f32(
                t.shape,
                b.as_f32().ok_or_else(|| self.misaligned())?.to_vec(),
            ),
            CpuData::StoredI64(b) => HostTensor::i64(
                t.shape,
                b.as_i64().ok_or_else(|| self.misaligned())?.to_vec(),
            ),
            CpuData::PackedLinear(..) | CpuData::Int8Linear(_) | CpuData::Bf16Linear(_) => {
                Err(self.err("a packed weight cannot be downloaded"))
            }
        }
    }

    fn upload_stored_linear(&self, t: &StoredTensor, format: &LinearFormat) -> Result<CpuTensor> {
        let (WeightFormat::Int8PerChannel, LinearFormat::Int8(act)) = (t.format, format) else {
            return match t.format {
                WeightFormat::Plain => self.upload_linear(&t.to_host()?, format),
                other => Err(self.err(format!("cannot run a {other} weight as {format}"))),
            };
        };
        let [out, inn] = t.shape[..] else {
            return Err(self.err(format!("an int8 weight must be 2-D, got {:?}", t.shape)));
        };
        let (q, scales) = (t.buffer("q")?, t.buffer("scales")?);
        q.check()?;
        scales.check()?;
        if q.elem != ElemType::I8
            || q.shape != [out, inn]
            || scales.elem != ElemType::F32
            || scales.shape != [out]
        {
            return Err(self.err(format!(
                "int8 weight buffers {:?}{:?} and {:?}{:?} do not fit [{out}, {inn}]",
                q.elem, q.shape, scales.elem, scales.shape
            )));
        }
        let q: Vec<i8> = q.bytes.as_bytes().iter().map(|&b| b as i8).collect();
        let scales = scales.bytes.as_f32().ok_or_else(|| self.misaligned())?;
        let weights = Int8Weights::from_quantized(&q, scales, out, inn, Int8Kernel::detect())
            .map_err(|e| self.err(e.to_string()))?;
        Ok(CpuTensor {
            shape: t.shape.clone(),
            data: CpuData::Int8Linear(Arc::new((weights, *act))),
        })
    }

    fn upload_linear(&self, t: &HostTensor, format: &LinearFormat) -> Result<CpuTensor> {
        let (HostData::F32(v), [out, inn]) = (&t.data, &t.shape[..]) else {
            return Err(self.err(format!("linear weight must be 2-D F32, got {:?}", t.shape)));
        };
        let (out, inn) = (*out, *inn);
        let quant = |e: kiln_quant::QuantError| self.err(e.to_string());
        let data = match format {
            LinearFormat::F32 => return self.upload(t, ConstRole::LinearWeight),
            LinearFormat::Int8(act) => CpuData::Int8Linear(Arc::new((
                Int8Weights::pack(v, out, inn, Int8Kernel::detect()).map_err(quant)?,
                *act,
            ))),
            LinearFormat::Bf16 => CpuData::Bf16Linear(Arc::new(
                Bf16Weights::pack(v, out, inn, Bf16Kernel::detect()).map_err(quant)?,
            )),
        };
        Ok(CpuTensor {
            shape: t.shape.clone(),
            data,
        })
    }

    fn embedding(&self, table: CpuTensor, ids: CpuTensor) -> Result<CpuTensor> {
        let rows = self.f32_ref(&table, "embedding table")?;
        let ids_v = self.i64_ref(&ids, "embedding ids")?;
        let [vocab, hidden] = table.shape[..] else {
            return Err(self.err(format!("embedding table has shape {:?}", table.shape)));
        };
        let mut out = self.arena.take(ids_v.len() * hidden);
        for (&id, o) in ids_v.iter().zip(out.chunks_mut(hidden.max(1))) {
            let row = usize::try_from(id)
                .ok()
                .filter(|&r| r < vocab)
                .ok_or_else(|| self.err(format!("id {id} is outside the table of {vocab} rows")))?;
            o.copy_from_slice(&rows[row * hidden..(row + 1) * hidden]);
        }
        let mut shape = ids.shape.clone();
        shape.push(hidden);
        Ok(f32_tensor(shape, out))
    }

    fn linear(&self, x: CpuTensor, w: CpuTensor, b: Option<CpuTensor>) -> Result<CpuTensor> {
        self.linear_impl(x, w, b, None, false)
    }

    fn linear_act(
        &self,
        x: CpuTensor,
        w: CpuTensor,
        b: Option<CpuTensor>,
        act: Activation,
    ) -> Result<CpuTensor> {
        self.linear_impl(x, w, b, Some(act), false)
    }

    fn linear_decode(&self, x: CpuTensor, w: CpuTensor, b: Option<CpuTensor>) -> Result<CpuTensor> {
        self.linear_impl(x, w, b, None, true)
    }

    fn add(&self, a: CpuTensor, b: CpuTensor) -> Result<CpuTensor> {
        let bs = self.f32_ref(&b, "add rhs")?;
        let (shape, mut av) = self.f32_of(a, "add lhs")?;
        if av.len() != bs.len() {
            return Err(self.err(format!("add: {} vs {} elements", av.len(), bs.len())));
        }
        rowwise::add(&mut av, bs);
        self.recycle(b);
        Ok(f32_tensor(shape, av))
    }

    fn layer_norm(&self, x: CpuTensor, g: CpuTensor, b: CpuTensor, eps: f32) -> Result<CpuTensor> {
        let (gs, bs) = (self.f32_ref(&g, "gamma")?, self.f32_ref(&b, "beta")?);
        let (shape, mut xv) = self.f32_of(x, "layer_norm input")?;
        rowwise::layer_norm(&mut xv, gs.len(), gs, bs, eps);
        Ok(f32_tensor(shape, xv))
    }

    fn add_layer_norm(
        &self,
        x: CpuTensor,
        residual: CpuTensor,
        g: CpuTensor,
        b: CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        let (gs, bs) = (self.f32_ref(&g, "gamma")?, self.f32_ref(&b, "beta")?);
        let rs = self.f32_ref(&residual, "residual")?;
        let (shape, mut xv) = self.f32_of(x, "add_layer_norm input")?;
        if xv.len() != rs.len() {
            return Err(self.err(format!(
                "add_layer_norm: {} vs {} elements",
                xv.len(),
                rs.len()
            )));
        }
        rowwise::add_layer_norm(&mut xv, rs, gs.len(), gs, bs, eps);
        self.recycle(residual);
        Ok(f32_tensor(shape, xv))
    }

    fn activation(&self, x: CpuTensor, act: Activation) -> Result<CpuTensor> {
        let (shape, mut xv) = self.f32_of(x, "activation input")?;
        rowwise::activation(&mut xv, act);
        Ok(f32_tensor(shape, xv))
    }

    fn split_heads(&self, x: CpuTensor, heads: usize) -> Result<CpuTensor> {
        let [_, _, w] = x.shape[..] else {
            return Err(self.err(format!("split_heads: x must be 3-D, got {:?}", x.shape)));
        };
        self.slice_split_heads(x, heads, 0, w)
    }

    fn slice_split_heads(
        &self,
        x: CpuTensor,
        heads: usize,
        start: usize,
        width: usize,
    ) -> Result<CpuTensor> {
        let [b, s, w] = x.shape[..] else {
            return Err(self.err(format!("split_heads: x must be 3-D, got {:?}", x.shape)));
        };
        if heads == 0 || !width.is_multiple_of(heads) || start + width > w {
            return Err(self.err(format!(
                "split_heads: columns {start}..{} of {w} in {heads} heads",
                start + width
            )));
        }
        let d = width / heads;
        let xs = self.f32_ref(&x, "split_heads input")?;
        let mut out = self.arena.take(b * s * width);
        swap_middle_into(&mut out, xs, (b, s, heads, d), w, start);
        self.recycle(x);
        Ok(f32_tensor(vec![b, heads, s, d], out))
    }

    fn merge_heads(&self, x: CpuTensor) -> Result<CpuTensor> {
        let [b, h, s, d] = x.shape[..] else {
            return Err(self.err(format!("merge_heads: x must be 4-D, got {:?}", x.shape)));
        };
        let xs = self.f32_ref(&x, "merge_heads input")?;
        let mut out = self.arena.take(xs.len());
        swap_middle_into(&mut out, xs, (b, h, s, d), s * d, 0);
        self.recycle(x);
        Ok(f32_tensor(vec![b, s, h * d], out))
    }

    fn slice_last(&self, x: CpuTensor, start: usize, len: usize) -> Result<CpuTensor> {
        let w = *x.shape.last().unwrap_or(&0);
        if len == 0 || start + len > w {
            return Err(self.err(format!(
                "slice_last: columns {start}..{} of {w}",
                start + len
            )));
        }
        let xs = self.f32_ref(&x, "slice_last input")?;
        let rows = xs.len() / w;
        let mut out = self.arena.take(rows * len);
        for (o, r) in out.chunks_mut(len).zip(xs.chunks(w)) {
            o.copy_from_slice(&r[start..start + len]);
        }
        let mut shape = x.shape.clone();
        *shape.last_mut().expect("checked non-empty") = len;
        self.recycle(x);
        Ok(f32_tensor(shape, out))
    }

    fn matmul(&self, a: CpuTensor, b: CpuTensor, transpose_b: bool) -> Result<CpuTensor> {
        let r = a.shape.len();
        if r < 2 || b.shape.len() != r || a.shape[..r - 2] != b.shape[..r - 2] {
            return Err(self.err(format!(
                "matmul: shapes {:?} and {:?} do not fit",
                a.shape, b.shape
            )));
        }
        let (m, k) = (a.shape[r - 2], a.shape[r - 1]);
        let (bk, n) = if transpose_b {
            (b.shape[r - 1], b.shape[r - 2])
        } else {
            (b.shape[r - 2], b.shape[r - 1])
        };
        if bk != k {
            return Err(self.err(format!("matmul: inner sizes {k} and {bk} differ")));
        }
        let batches: usize = a.shape[..r - 2].iter().product();
        let (xs, ys) = (
            self.f32_ref(&a, "matmul lhs")?,
            self.f32_ref(&b, "matmul rhs")?,
        );
        let mut out = self.arena.take(batches * m * n);
        // b's strides: [k, n] row-major, or [n, k] read transposed.
        let (rs, cs) = if transpose_b { (1, k) } else { (n, 1) };
        for i in 0..batches {
            gemm::matmul_strided(
                &mut out[i * m * n..(i + 1) * m * n],
                &xs[i * m * k..(i + 1) * m * k],
                &ys[i * k * n..(i + 1) * k * n],
                (m, k, n),
                (rs, cs),
                self.threads,
            );
        }
        let mut shape = a.shape.clone();
        shape[r - 1] = n;
        self.recycle(a);
        self.recycle(b);
        Ok(f32_tensor(shape, out))
    }

    fn scale(&self, x: CpuTensor, factor: f32) -> Result<CpuTensor> {
        let (shape, mut xv) = self.f32_of(x, "scale input")?;
        xv.iter_mut().for_each(|v| *v *= factor);
        Ok(f32_tensor(shape, xv))
    }

    fn causal_mask(&self, x: CpuTensor) -> Result<CpuTensor> {
        let r = x.shape.len();
        if r < 2 {
            return Err(self.err("causal_mask: scores must be at least 2-D"));
        }
        let (q, k) = (x.shape[r - 2], x.shape[r - 1]);
        let (shape, mut xv) = self.f32_of(x, "causal_mask input")?;
        for matrix in xv.chunks_mut((q * k).max(1)) {
            for (i, row) in matrix.chunks_mut(k.max(1)).enumerate() {
                row.iter_mut()
                    .skip(i + 1)
                    .for_each(|v| *v = f32::NEG_INFINITY);
            }
        }
        Ok(f32_tensor(shape, xv))
    }

    fn sdpa(
        &self,
        q: CpuTensor,
        k: CpuTensor,
        v: CpuTensor,
        mask: SdpaMaskArg<CpuTensor>,
        scale: Option<f32>,
        kernel: KernelChoice,
    ) -> Result<(CpuTensor, &'static str)> {
        let (qs, ks, vs) = (
            self.f32_ref(&q, "q")?,
            self.f32_ref(&k, "k")?,
            self.f32_ref(&v, "v")?,
        );
        let (Ok(qd), Ok(kd)) = (
            <[usize; 4]>::try_from(&q.shape[..]),
            <[usize; 4]>::try_from(&k.shape[..]),
        ) else {
            return Err(self.err("sdpa: q and k must be 4-D"));
        };
        let shape = SdpaShape::of(qd, kd);
        let mut out = self.arena.take(qs.len());
        let padded = |mask: Mask<'_>, out: &mut [f32]| {
            let params = SdpaParams { shape, mask, scale };
            scaled_dot_product_attention(qs, ks, vs, out, &params, kernel)
        };
        let ran = match &mask {
            SdpaMaskArg::None => padded(Mask::None, &mut out)?,
            SdpaMaskArg::Causal => {
                padded(Mask::Causal(kiln_attention::CausalAlign::TopLeft), &mut out)?
            }
            SdpaMaskArg::KeyPadding(m) => {
                let keep: Vec<bool> = self
                    .i64_ref(m, "key-padding mask")?
                    .iter()
                    .map(|&x| x != 0)
                    .collect();
                padded(Mask::KeyPadding(&keep), &mut out)?
            }
            SdpaMaskArg::Varlen(lengths) | SdpaMaskArg::VarlenCausal(lengths) => {
                let causal = matches!(mask, SdpaMaskArg::VarlenCausal(_))
                    .then_some(kiln_attention::CausalAlign::TopLeft);
                if shape.batch != 1 {
                    return Err(self.err(format!(
                        "sdpa: a packed batch has batch 1, got {}",
                        shape.batch
                    )));
                }
                let cu = cumulative(self.i64_ref(lengths, "sequence lengths")?)
                    .ok_or_else(|| self.err("sdpa: sequence lengths must be non-negative"))?;
                let params = VarlenParams {
                    q_heads: shape.q_heads,
                    kv_heads: shape.kv_heads,
                    head_dim: shape.head_dim,
                    cu_seqlens_q: &cu,
                    cu_seqlens_k: &cu,
                    causal,
                    scale,
                };
                scaled_dot_product_attention_varlen(qs, ks, vs, &mut out, &params, kernel)?
            }
        };
        let shape = q.shape.clone();
        for t in [q, k, v] {
            self.recycle(t);
        }
        Ok((f32_tensor(shape, out), ran.name()))
    }

    fn pool(&self, x: CpuTensor, mask: CpuTensor, mode: PoolMode) -> Result<CpuTensor> {
        let [b, s, h] = x.shape[..] else {
            return Err(self.err(format!("pool: x must be 3-D, got {:?}", x.shape)));
        };
        let xs = self.f32_ref(&x, "pool input")?;
        let ms = self.i64_ref(&mask, "pool mask")?;
        // Each output row pools a list of token rows of x: a padded batch's sequence `bi` is
        // rows `bi·s ..` where the mask is 1; a packed batch's sequence is a run of rows.
        let segments: Vec<Vec<usize>> = if mask.shape.len() == 1 {
            let cu = cumulative(ms)
                .filter(|cu| b == 1 && cu.last() == Some(&s))
                .ok_or_else(|| self.err("pool: sequence lengths do not tile the batch"))?;
            cu.windows(2).map(|w| (w[0]..w[1]).collect()).collect()
        } else {
            (0..b)
                .map(|bi| {
                    (0..s)
                        .filter(|&si| ms[bi * s + si] != 0)
                        .map(|si| bi * s + si)
                        .collect()
                })
                .collect()
        };
        let mut out = vec![0.0f32; segments.len() * h];
        for (rows, o) in segments.iter().zip(out.chunks_mut(h)) {
            let row = |r: usize| &xs[r * h..(r + 1) * h];
            match mode {
                PoolMode::Cls => {
                    if let Some(&first) = rows.first() {
                        o.copy_from_slice(row(first));
                    }
                }
                PoolMode::Last => {
                    if let Some(&last) = rows.last() {
                        o.copy_from_slice(row(last));
                    }
                }
                PoolMode::Mean => {
                    for &r in rows {
                        o.iter_mut().zip(row(r)).for_each(|(a, v)| *a += v);
                    }
                    // sentence-transformers clamps the token count at 1e-9.
                    let denom = (rows.len() as f32).max(1e-9);
                    o.iter_mut().for_each(|a| *a /= denom);
                }
                PoolMode::Max => {
                    // sentence-transformers fills padding with -1e9 before taking the max.
                    o.fill(-1e9);
                    for &r in rows {
                        o.iter_mut().zip(row(r)).for_each(|(a, v)| *a = a.max(*v));
                    }
                }
            }
        }
        let n = segments.len();
        self.recycle(x);
        Ok(f32_tensor(vec![n, h], out))
    }

    fn l2_normalize(&self, x: CpuTensor) -> Result<CpuTensor> {
        let width = *x.shape.last().unwrap_or(&1);
        let (shape, mut xv) = self.f32_of(x, "l2_normalize input")?;
        rowwise::l2_normalize(&mut xv, width);
        Ok(f32_tensor(shape, xv))
    }

    fn softmax(&self, x: CpuTensor) -> Result<CpuTensor> {
        let width = *x.shape.last().unwrap_or(&1);
        let (shape, mut xv) = self.f32_of(x, "softmax input")?;
        rowwise::softmax(&mut xv, width);
        Ok(f32_tensor(shape, xv))
    }

    fn rms_norm(&self, x: CpuTensor, g: CpuTensor, eps: f32) -> Result<CpuTensor> {
        let gs = self.f32_ref(&g, "gamma")?;
        let (shape, mut xv) = self.f32_of(x, "rms_norm input")?;
        rowwise::rms_norm(&mut xv, gs.len(), gs, eps);
        Ok(f32_tensor(shape, xv))
    }

    fn mul(&self, a: CpuTensor, b: CpuTensor) -> Result<CpuTensor> {
        let bs = self.f32_ref(&b, "mul rhs")?;
        let (shape, mut av) = self.f32_of(a, "mul lhs")?;
        if av.len() != bs.len() {
            return Err(self.err(format!("mul: {} vs {} elements", av.len(), bs.len())));
        }
        av.iter_mut().zip(bs).for_each(|(x, y)| *x *= y);
        Ok(f32_tensor(shape, av))
    }

    fn rope(&self, x: CpuTensor, cos: CpuTensor, sin: CpuTensor) -> Result<CpuTensor> {
        let [b, h, s, d] = x.shape[..] else {
            return Err(self.err(format!("rope: x must be 4-D, got {:?}", x.shape)));
        };
        let r = *cos.shape.last().unwrap_or(&0);
        let (cs, ss) = (
            self.f32_ref(&cos, "rope cos")?,
            self.f32_ref(&sin, "rope sin")?,
        );
        if cs.len() != b * s * r || ss.len() != cs.len() || 2 * r > d || r == 0 {
            return Err(self.err(format!(
                "rope: tables {:?} do not fit x {:?}",
                cos.shape, x.shape
            )));
        }
        let (shape, mut xv) = self.f32_of(x, "rope input")?;
        // Head row i is (batch i / (h·s), token i % s): its table row is batch·s + token.
        rowwise::rope(&mut xv, d, cs, ss, r, |i| (i / (h * s)) * s + i % s);
        Ok(f32_tensor(shape, xv))
    }

    fn kv_cache_alloc(&self, spec: &KvCacheSpec) -> Result<Box<KvStore>> {
        let per_layer = spec.num_blocks * spec.kv_heads * spec.block_size * spec.head_dim;
        // Zeroed allocations: the pages are committed only when a block is first written.
        let layers = (0..spec.layers)
            .map(|_| (vec![0.0f32; per_layer], vec![0.0f32; per_layer]))
            .collect();
        Ok(Box::new(CpuKvStore { layers }))
    }

    fn paged_sdpa(
        &self,
        q: CpuTensor,
        k: CpuTensor,
        v: CpuTensor,
        cache: &mut KvStore,
        spec: &KvCacheSpec,
        layer: usize,
        batch: &PagedBatch,
        scale: Option<f32>,
        kernel: KernelChoice,
    ) -> Result<(CpuTensor, &'static str)> {
        let store = cache
            .downcast_mut::<CpuKvStore>()
            .ok_or_else(|| self.err("the KV cache was not allocated by the cpu backend"))?;
        let (qs, ks, vs) = (
            self.f32_ref(&q, "q")?,
            self.f32_ref(&k, "k")?,
            self.f32_ref(&v, "v")?,
        );
        let (&[1, q_heads, tokens, head_dim], &[1, kv_heads, _, _]) = (&q.shape[..], &k.shape[..])
        else {
            return Err(self.err(format!(
                "paged_sdpa: q {:?} and k {:?} must be [1, heads, tokens, d]",
                q.shape, k.shape
            )));
        };
        if kv_heads != spec.kv_heads || head_dim != spec.head_dim {
            return Err(self.err(format!(
                "paged_sdpa: k has {kv_heads} heads of {head_dim}, the cache {} of {}",
                spec.kv_heads, spec.head_dim
            )));
        }
        let (kc, vc) = &mut store.layers[layer];
        let (bs, d) = (spec.block_size, head_dim);
        // Write the new keys and values: token t of head h goes to its slot's row in block
        // `slot / bs`, head h.
        // Keys on one thread, values on another (a prefill writes megabytes per layer).
        let slots = batch.slots(bs);
        let write = |cache: &mut [f32], new: &[f32]| {
            for (t, slot) in slots.iter().enumerate() {
                let (block, off) = (slot / bs, slot % bs);
                for h in 0..kv_heads {
                    let dst = ((block * kv_heads + h) * bs + off) * d;
                    let src = (h * tokens + t) * d;
                    cache[dst..dst + d].copy_from_slice(&new[src..src + d]);
                }
            }
        };
        rayon::join(|| write(kc, ks), || write(vc, vs));
        let cu = batch.cu_seqlens_q();
        let params = PagedParams {
            q_heads,
            kv_heads,
            head_dim,
            block_size: bs,
            num_blocks: spec.num_blocks,
            cu_seqlens_q: &cu,
            context_lens: &batch.context_lens,
            block_tables: &batch.block_tables,
            scale,
        };
        // Every kernel writes every output row, so an arena buffer needs no zeroing.
        let mut out = self.arena.take(qs.len());
        let ran = scaled_dot_product_attention_paged(qs, kc, vc, &mut out, &params, kernel)?;
        let shape = q.shape.clone();
        for t in [q, k, v] {
            self.recycle(t);
        }
        Ok((f32_tensor(shape, out), ran.name()))
    }
}

/// The cpu backend's KV cache: per layer, keys and values as `[num_blocks, kv_heads,
/// block_size, head_dim]`, the layout the paged attention kernel reads.
struct CpuKvStore {
    layers: Vec<(Vec<f32>, Vec<f32>)>,
}
