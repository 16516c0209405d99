//! Weights from `model.safetensors`, memory-mapped and read by Hugging Face parameter names.

// Sizes here come from clients or files: arithmetic on them must be checked.
#![warn(clippy::arithmetic_side_effects)]

use std::path::{Path, PathBuf};

use kiln_engine::HostTensor;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors, tensor::Metadata};

use crate::error::{ModelError, Result};

/// A memory-mapped safetensors file. Tensors are converted to f32 host tensors on request; the
/// mapping means a weight is read from disk only when it is first touched.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    meta: Metadata,
    /// `bert.`, `roberta.` or `distilbert.` when the checkpoint stores the encoder under a task
    /// head's prefix.
    prefix: String,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SafetensorsFile({})", self.path.display())
    }
}

#[allow(unsafe_code)]
fn map_file(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: the mapping is read-only and private to this process. The one hazard is another
    // process truncating or rewriting the file while it is mapped; model folders are treated as
    // immutable while served (as every mmap-based loader, PyTorch and safetensors included,
    // assumes), and every slice taken below is bounds-checked against the mapping's length.
    unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))
}

impl SafetensorsFile {
    /// Maps `path` and parses its header. `probe` is a parameter name used to detect whether
    /// names carry a `bert.` prefix (`embeddings.word_embeddings.weight`, say).
    pub fn open(path: &Path, probe: &str) -> Result<Self> {
        let mut file = Self::open_plain(path)?;
        // A bare encoder's names, or a task model's (`BertFor*` keep the encoder under `bert.`,
        // `RobertaFor*`, `XLMRobertaFor*` and `CamembertFor*` under `roberta.`, `DistilBertFor*`
        // under `distilbert.`).
        let Some(prefix) = ["", "bert.", "roberta.", "distilbert."]
            .into_iter()
            .find(|p| file.meta.info(&format!("{p}{probe}")).is_some())
        else {
            return Err(ModelError::file(
                path,
                format!(
                    "tensor `{probe}` not found (with no prefix, `bert.`, `roberta.` or `distilbert.`)"
                ),
            ));
        };
        file.prefix = prefix.to_string();
        Ok(file)
    }

    /// Maps `path` with parameter names used as they are (no prefix detection).
    pub fn open_plain(path: &Path) -> Result<Self> {
        let mmap = map_file(path)?;
        let (header_len, meta) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| ModelError::file(path, format!("not a valid safetensors file: {e}")))?;
        // The 8-byte header length, then the header, then the data.
        let data_start = header_len.checked_add(8);
        let Some(data_start) = data_start.filter(|start| {
            start
                .checked_add(meta.data_len())
                .is_some_and(|end| end <= mmap.len())
        }) else {
            return Err(ModelError::file(
                path,
                format!(
                    "truncated: header promises {} data bytes, file has {}",
                    meta.data_len(),
                    mmap.len().saturating_sub(header_len.saturating_add(8))
                ),
            ));
        };
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start,
            meta,
            prefix: String::new(),
        })
    }

    /// The shape the file records for tensor `name`.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.meta.info(name).map(|i| i.shape.clone())
    }

    /// The names of every tensor in the file.
    pub fn names(&self) -> Vec<String> {
        self.meta.tensors().keys().cloned().collect()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether an encoder parameter (name relative to the encoder) exists.
    pub fn has(&self, name: &str) -> bool {
        self.meta.info(&format!("{}{name}", self.prefix)).is_some()
    }

    /// An encoder parameter (the `bert.` prefix is added when the file uses it).
    pub fn encoder(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        self.tensor(&format!("{}{name}", self.prefix), shape)
    }

    /// A parameter by its full name, checked against the expected shape, as f32.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let info = self
            .meta
            .info(name)
            .ok_or_else(|| ModelError::file(&self.path, format!("missing tensor `{name}`")))?;
        if info.shape != shape {
            return Err(ModelError::file(
                &self.path,
                format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    info.shape
                ),
            ));
        }
        let (start, end) = info.data_offsets;
        let outside =
            || ModelError::file(&self.path, format!("tensor `{name}` lies outside the file"));
        let (start, end) = (
            self.data_start.checked_add(start).ok_or_else(outside)?,
            self.data_start.checked_add(end).ok_or_else(outside)?,
        );
        let bytes = self.mmap.get(start..end).ok_or_else(outside)?;
        let n = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| {
                ModelError::file(
                    &self.path,
                    format!("tensor `{name}`: shape {shape:?} is too large"),
                )
            })?;
        let data: Vec<f32> = match info.dtype {
            Dtype::F32 => decode(bytes, n, f32::from_le_bytes),
            Dtype::F16 => decode(bytes, n, |b| half::f16::from_le_bytes(b).to_f32()),
            Dtype::BF16 => decode(bytes, n, |b| half::bf16::from_le_bytes(b).to_f32()),
            other => {
                return Err(ModelError::file(
                    &self.path,
                    format!("tensor `{name}` has dtype {other:?}; kiln reads F32, F16 and BF16"),
                ));
            }
        }
        .ok_or_else(|| {
            ModelError::file(
                &self.path,
                format!("tensor `{name}` has the wrong byte length"),
            )
        })?;
        Ok(HostTensor::f32(shape.to_vec(), data)?)
    }
}

fn decode<const N: usize>(bytes: &[u8], n: usize, f: impl Fn([u8; N]) -> f32) -> Option<Vec<f32>> {
    if n.checked_mul(N) != Some(bytes.len()) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunks_exact yields N bytes")))
            .collect(),
    )
}
