//! Stored tensors: constants as raw, aligned bytes with their element type and shape.
//!
//! A compiled plan keeps every weight in a [`StoredTensor`]: a logical type (what the graph sees,
//! e.g. `F32[out, in]`), the [`WeightFormat`] its bytes are laid out in, and one or more
//! [`Buffer`]s. A buffer's bytes live either in memory (built by the compiler) or in a read-only
//! mapping of a plan-cache file, so a warm start reads weights in place instead of decoding and
//! re-packing them. Formats other than plain f32 (int8 with per-channel scales, bf16) add buffers
//! of other element types; the cache stores all of them the same way.

use std::fmt;
use std::sync::Arc;

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::error::{Result, graph_err};
use crate::ir::{ConstRole, DType};
use crate::tensor::{HostData, HostTensor};

/// Element type of a stored buffer. Wider than [`DType`]: packed formats may store narrower
/// types than the graph computes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ElemType {
    F32,
    I64,
    Bf16,
    F16,
    I8,
    U8,
    I32,
}

impl ElemType {
    pub fn size(self) -> usize {
        match self {
            ElemType::F32 | ElemType::I32 => 4,
            ElemType::I64 => 8,
            ElemType::Bf16 | ElemType::F16 => 2,
            ElemType::I8 | ElemType::U8 => 1,
        }
    }
}

/// How a constant's bytes are laid out for the kernels that read it. Chosen per weight by the
/// compiler's kernel selection; a backend uploads only formats it lists in its
/// [`crate::compile::CompileTarget`].
///
/// A new weight format (e.g. a bf16 layout) adds a variant here, a packing function in
/// `compile::prepack`, a rule in `compile::kernels`, and an upload path in the backends that list
/// it (as `Int8PerChannel` has: an `i8` buffer and an `f32` scales buffer). The plan cache stores
/// any format without change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    /// As the model stored it (row-major, logical shape; a linear weight is `[out, in]`). A
    /// backend converts it at upload, as for an uncompiled constant.
    Plain,
    /// A linear weight transposed to `[in, out]` row-major f32: what the `gemm` crate streams
    /// (the CPU backend's kernel on CPUs without AVX2/FMA) and what burn's `linear` takes.
    F32InOut,
    /// A linear weight cut into panels of 16 output columns, each `[in, 16]` contiguous: the
    /// layout of the CPU backend's own GEMM kernel (`kernels::panel_gemm`), one `data` buffer of
    /// `[out/16 rounded up, in, 16]` f32.
    F32Panels16,
    /// An int8 linear weight, quantized once (symmetric, one scale per output channel, the
    /// quantization issue's scheme): a `q` buffer of `[out, in]` i8 and a `scales` buffer of
    /// `[out]` f32. Kernel-independent; the backend packs it for its int8 kernel at upload.
    Int8PerChannel,
}

impl WeightFormat {
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::Plain => "plain",
            WeightFormat::F32InOut => "f32 [in,out]",
            WeightFormat::F32Panels16 => "f32 panels×16",
            WeightFormat::Int8PerChannel => "s8 per channel",
        }
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a buffer's bytes live.
enum Bytes {
    F32(Vec<f32>),
    I64(Vec<i64>),
    /// Other element types, in 8-byte words (so any element type up to 8 bytes is aligned).
    Words(Vec<u64>),
    /// A read-only mapping of a plan-cache file; `Buffer::range` selects this buffer's bytes.
    Mapped(Mmap),
}

/// Raw bytes of one buffer, shared and immutable.
#[derive(Clone)]
pub struct Blob {
    bytes: Arc<Bytes>,
    start: usize,
    len: usize,
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match *self.bytes {
            Bytes::Mapped(_) => "mapped",
            _ => "owned",
        };
        write!(f, "Blob({kind}, {} bytes)", self.len)
    }
}

impl Blob {
    pub fn from_f32(v: Vec<f32>) -> Self {
        let len = v.len() * 4;
        Self {
            bytes: Arc::new(Bytes::F32(v)),
            start: 0,
            len,
        }
    }

    pub fn from_i64(v: Vec<i64>) -> Self {
        let len = v.len() * 8;
        Self {
            bytes: Arc::new(Bytes::I64(v)),
            start: 0,
            len,
        }
    }

    /// Copies arbitrary bytes into 8-byte-aligned storage.
    pub fn from_bytes(b: &[u8]) -> Self {
        let mut words = vec![0u64; b.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..b.len()].copy_from_slice(b);
        Self {
            bytes: Arc::new(Bytes::Words(words)),
            start: 0,
            len: b.len(),
        }
    }

    /// A whole read-only file mapping (the plan cache's entry file); cut it with [`Blob::slice`].
    pub(crate) fn from_mmap(map: Mmap) -> Self {
        let len = map.len();
        Self {
            bytes: Arc::new(Bytes::Mapped(map)),
            start: 0,
            len,
        }
    }

    /// `len` bytes at `start` of this blob, sharing its storage.
    pub fn slice(&self, start: usize, len: usize) -> Result<Self> {
        if start.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(graph_err(format!(
                "buffer {start}+{len} lies outside a blob of {} bytes",
                self.len
            )));
        }
        Ok(Self {
            bytes: self.bytes.clone(),
            start: self.start + start,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_mapped(&self) -> bool {
        matches!(*self.bytes, Bytes::Mapped(_))
    }

    pub fn as_bytes(&self) -> &[u8] {
        let all: &[u8] = match &*self.bytes {
            Bytes::F32(v) => bytemuck::cast_slice(v),
            Bytes::I64(v) => bytemuck::cast_slice(v),
            Bytes::Words(v) => bytemuck::cast_slice(v),
            Bytes::Mapped(m) => m,
        };
        &all[self.start..self.start + self.len]
    }

    /// The bytes as `f32`s, or `None` if they are misaligned or not a whole number of floats.
    pub fn as_f32(&self) -> Option<&[f32]> {
        bytemuck::try_cast_slice(self.as_bytes()).ok()
    }

    pub fn as_i64(&self) -> Option<&[i64]> {
        bytemuck::try_cast_slice(self.as_bytes()).ok()
    }
}

/// One named array of a stored tensor: its element type, shape and bytes.
#[derive(Debug, Clone)]
pub struct Buffer {
    /// What the buffer holds within its format, e.g. `data`, or `scales` for a quantized weight.
    pub name: String,
    pub elem: ElemType,
    pub shape: Vec<usize>,
    pub bytes: Blob,
}

impl Buffer {
    pub fn f32(name: &str, shape: Vec<usize>, data: Vec<f32>) -> Self {
        Self {
            name: name.into(),
            elem: ElemType::F32,
            shape,
            bytes: Blob::from_f32(data),
        }
    }

    /// Checks the byte length against the element type and shape.
    pub fn check(&self) -> Result<()> {
        let want = self
            .shape
            .iter()
            .try_fold(self.elem.size(), |n, &d| n.checked_mul(d))
            .ok_or_else(|| {
                graph_err(format!(
                    "buffer `{}` of {:?}{:?} is larger than memory",
                    self.name, self.elem, self.shape
                ))
            })?;
        if self.bytes.len() != want {
            return Err(graph_err(format!(
                "buffer `{}` of {:?}{:?} needs {want} bytes, has {}",
                self.name,
                self.elem,
                self.shape,
                self.bytes.len()
            )));
        }
        Ok(())
    }
}

/// A constant in a backend's layout: what the graph sees (`dtype`, `shape`, `role`) and how its
/// bytes are stored (`format`, `buffers`).
#[derive(Debug, Clone)]
pub struct StoredTensor {
    pub dtype: DType,
    /// The logical shape (a linear weight is `[out, in]` whatever its format).
    pub shape: Vec<usize>,
    pub role: ConstRole,
    pub format: WeightFormat,
    pub buffers: Vec<Buffer>,
}

impl StoredTensor {
    /// A host tensor as it is (format `Plain`, one `data` buffer).
    pub fn plain(t: &HostTensor, role: ConstRole) -> Self {
        let (elem, bytes) = match &t.data {
            HostData::F32(v) => (ElemType::F32, Blob::from_f32(v.clone())),
            HostData::I64(v) => (ElemType::I64, Blob::from_i64(v.clone())),
        };
        Self {
            dtype: t.dtype(),
            shape: t.shape.clone(),
            role,
            format: WeightFormat::Plain,
            buffers: vec![Buffer {
                name: "data".into(),
                elem,
                shape: t.shape.clone(),
                bytes,
            }],
        }
    }

    /// The buffer called `name`.
    pub fn buffer(&self, name: &str) -> Result<&Buffer> {
        self.buffers
            .iter()
            .find(|b| b.name == name)
            .ok_or_else(|| graph_err(format!("stored tensor has no `{name}` buffer")))
    }

    /// A `Plain` tensor back on the host (for constant folding and backends that copy).
    pub fn to_host(&self) -> Result<HostTensor> {
        if self.format != WeightFormat::Plain {
            return Err(graph_err(format!(
                "a {} tensor has no plain host form",
                self.format
            )));
        }
        let data = self.buffer("data")?;
        data.check()?;
        let bad = || graph_err("stored buffer is misaligned".to_string());
        match (self.dtype, data.elem) {
            (DType::F32, ElemType::F32) => HostTensor::f32(
                self.shape.clone(),
                data.bytes.as_f32().ok_or_else(bad)?.to_vec(),
            ),
            (DType::I64, ElemType::I64) => HostTensor::i64(
                self.shape.clone(),
                data.bytes.as_i64().ok_or_else(bad)?.to_vec(),
            ),
            (d, e) => Err(graph_err(format!(
                "a plain {d:?} tensor cannot be stored as {e:?}"
            ))),
        }
    }

    /// Total bytes of all buffers.
    pub fn nbytes(&self) -> usize {
        self.buffers.iter().map(|b| b.bytes.len()).sum()
    }
}

/// The serde form of a stored tensor: everything but the bytes, which the plan cache writes
/// beside the graph (buffers in node order) and attaches again after reading it.
#[derive(Serialize, Deserialize)]
struct StoredMeta {
    dtype: DType,
    shape: Vec<usize>,
    role: ConstRole,
    format: WeightFormat,
    buffers: Vec<BufferMeta>,
}

#[derive(Serialize, Deserialize)]
struct BufferMeta {
    name: String,
    elem: ElemType,
    shape: Vec<usize>,
}

/// Serde for [`crate::ir::Op::Weight`]'s tensor: metadata only. A deserialized tensor's buffers
/// are empty until the reader attaches their bytes ([`StoredTensor::attach`]).
pub(crate) mod serde_stored {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Arc<StoredTensor>, s: S) -> Result<S::Ok, S::Error> {
        StoredMeta {
            dtype: t.dtype,
            shape: t.shape.clone(),
            role: t.role,
            format: t.format,
            buffers: t
                .buffers
                .iter()
                .map(|b| BufferMeta {
                    name: b.name.clone(),
                    elem: b.elem,
                    shape: b.shape.clone(),
                })
                .collect(),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<StoredTensor>, D::Error> {
        let m = StoredMeta::deserialize(d)?;
        Ok(Arc::new(StoredTensor {
            dtype: m.dtype,
            shape: m.shape,
            role: m.role,
            format: m.format,
            buffers: m
                .buffers
                .into_iter()
                .map(|b| Buffer {
                    name: b.name,
                    elem: b.elem,
                    shape: b.shape,
                    bytes: Blob::from_bytes(&[]),
                })
                .collect(),
        }))
    }
}

/// Serde for [`crate::ir::Op::Constant`]'s value: refused both ways. Weights reach the plan cache
/// as [`crate::ir::Op::Weight`]s, whose bytes are stored beside the graph, never inside it.
pub(crate) mod serde_host_constant {
    use super::*;
    use serde::{Deserializer, Serializer, de, ser};

    pub fn serialize<S: Serializer>(_: &Arc<HostTensor>, _: S) -> Result<S::Ok, S::Error> {
        Err(ser::Error::custom(
            "an uncompiled constant cannot be serialized; store it as a weight first",
        ))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(_: D) -> Result<Arc<HostTensor>, D::Error> {
        Err(de::Error::custom(
            "a serialized graph holds no uncompiled constants",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_slice_and_view_their_bytes() {
        let b = Blob::from_f32(vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(b.as_f32().unwrap(), &[1.0, 2.0, 3.0, 4.0]);
        let tail = b.slice(8, 8).unwrap();
        assert_eq!(tail.as_f32().unwrap(), &[3.0, 4.0]);
        assert!(b.slice(12, 8).is_err());
        // Misaligned views are refused, not read.
        assert!(b.slice(2, 8).unwrap().as_f32().is_none());
        let raw = Blob::from_bytes(&[1, 2, 3]);
        assert_eq!(raw.as_bytes(), &[1, 2, 3]);
    }

    #[test]
    fn plain_tensors_round_trip_through_storage() {
        let t = HostTensor::f32(vec![2, 2], vec![1.0, -2.0, 3.5, 0.0]).unwrap();
        let s = StoredTensor::plain(&t, ConstRole::Other);
        assert_eq!(s.to_host().unwrap(), t);
        let i = HostTensor::i64(vec![3], vec![7, -1, 0]).unwrap();
        assert_eq!(
            StoredTensor::plain(&i, ConstRole::Other).to_host().unwrap(),
            i
        );
    }
}
