//! The entry file: one compiled plan, written once and then only read (memory-mapped).
//!
//! Layout (all integers little-endian):
//!
//! | bytes | content |
//! |---|---|
//! | 0..8 | magic `KILNPLAN` |
//! | 8..12 | entry format version (u32) |
//! | 12..16 | reserved (0) |
//! | 16..24 | header length H (u64) |
//! | 24..32 | xxh3-64 of the header |
//! | 32..40 | data section offset D (u64, a multiple of 64) |
//! | 40..48 | data section length (u64) |
//! | 48..64 | reserved (0) |
//! | 64..64+H | header: JSON with the key material, the graph (weights' metadata only), each buffer's offset and length, the xxh3-64 of each 4 MiB of the data section, and the compile report |
//! | D.. | data: every weight buffer's raw bytes, each at a 64-byte-aligned offset |
//!
//! Buffers are aligned so the mapped bytes can be read in place as `f32`, `i64` or any other
//! element type (the mapping itself is page-aligned). Every checksum is verified on load —
//! header first, then the data section in parallel chunks — so a truncated, corrupted or foreign file is
//! refused, never trusted.

// Sizes here come from clients or files: arithmetic on them must be checked.
#![warn(clippy::arithmetic_side_effects)]

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use super::key::KeyMaterial;
use super::{CacheError, write_atomic};
use crate::compile::CompileReport;
use crate::ir::{Graph, Op};
use crate::storage::{Blob, Buffer, StoredTensor};

pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"KILNPLAN";
const PREAMBLE: usize = 64;
const ALIGN: usize = 64;

/// Where one buffer's bytes are, relative to the data section.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BufferRecord {
    offset: u64,
    len: u64,
}

/// The data section is checksummed in pieces of this size, verified in parallel.
const CHUNK: usize = 4 << 20;

/// What the header says about the entry (without the graph), for `kiln cache ls`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntrySummary {
    pub key: String,
    pub material: KeyMaterial,
    /// The model the plan was compiled from (its folder), for people reading `cache ls`.
    pub model: String,
    pub created_unix: u64,
    pub report: CompileReport,
}

#[derive(Serialize, Deserialize)]
struct Header {
    #[serde(flatten)]
    summary: EntrySummary,
    graph: Graph,
    buffers: Vec<BufferRecord>,
    /// xxh3-64 of each `CHUNK` bytes of the data section (padding included).
    data_xxh3: Vec<u64>,
}

/// A plan read back from its entry.
#[derive(Debug)]
pub struct CachedPlan {
    pub graph: Graph,
    pub summary: EntrySummary,
    /// Size of the entry file.
    pub bytes: u64,
}

// The writer's sizes are those of a plan in memory, not read from a file.
#[allow(clippy::arithmetic_side_effects)]
fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// Every buffer of every stored weight, in node order (the order the reader attaches them).
fn weight_buffers(graph: &Graph) -> Vec<&Buffer> {
    graph
        .nodes
        .iter()
        .filter_map(|n| match &n.op {
            Op::Weight { weight, .. } => Some(weight.buffers.iter()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Writes an entry for `graph` (whose constants must all be stored weights) at `path`,
/// atomically.
#[allow(clippy::arithmetic_side_effects)]
pub fn write(path: &Path, summary: EntrySummary, graph: &Graph) -> Result<u64, CacheError> {
    if let Some(n) = graph
        .nodes
        .iter()
        .find(|n| matches!(n.op, Op::Constant { .. }))
    {
        return Err(CacheError::Corrupt(format!(
            "constant `{}` was not stored before caching",
            n.label
        )));
    }
    let buffers = weight_buffers(graph);
    let mut records = Vec::with_capacity(buffers.len());
    let mut offset = 0usize;
    for b in &buffers {
        let bytes = b.bytes.as_bytes();
        records.push(BufferRecord {
            offset: offset as u64,
            len: bytes.len() as u64,
        });
        offset = align(offset + bytes.len());
    }
    let data_len = offset;
    // The data section as it will be written (buffers and zero padding), checksummed by chunk.
    let mut data = vec![0u8; data_len];
    for (b, r) in buffers.iter().zip(&records) {
        let bytes = b.bytes.as_bytes();
        data[r.offset as usize..r.offset as usize + bytes.len()].copy_from_slice(bytes);
    }
    let data_xxh3 = data.par_chunks(CHUNK).map(xxh3_64).collect();
    let header = Header {
        summary,
        graph: graph.clone(),
        buffers: records,
        data_xxh3,
    };
    let json = serde_json::to_vec(&header)
        .map_err(|e| CacheError::Corrupt(format!("cannot serialise the plan: {e}")))?;
    let data_start = align(PREAMBLE + json.len());
    let mut pre = Vec::with_capacity(PREAMBLE);
    pre.extend_from_slice(MAGIC);
    pre.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    pre.extend_from_slice(&0u32.to_le_bytes());
    pre.extend_from_slice(&(json.len() as u64).to_le_bytes());
    pre.extend_from_slice(&xxh3_64(&json).to_le_bytes());
    pre.extend_from_slice(&(data_start as u64).to_le_bytes());
    pre.extend_from_slice(&(data_len as u64).to_le_bytes());
    pre.resize(PREAMBLE, 0);
    let zeros = [0u8; ALIGN];
    write_atomic(path, |w| {
        w.write_all(&pre)?;
        w.write_all(&json)?;
        w.write_all(&zeros[..data_start - PREAMBLE - json.len()])?;
        w.write_all(&data)
    })?;
    Ok((data_start + data_len) as u64)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..][..8].try_into().expect("8 bytes"))
}

#[allow(unsafe_code)]
fn map(path: &Path) -> Result<Mmap, CacheError> {
    let file = fs::File::open(path).map_err(|e| CacheError::io(path, e))?;
    // SAFETY: the mapping is read-only and private. Entry files are never modified in place:
    // writers create a new file and rename it over the old name, and `kiln cache clear` unlinks;
    // both leave an existing mapping's pages intact. Every read below is bounds-checked against
    // the mapping's length and every byte is checksummed before use.
    unsafe { Mmap::map(&file) }.map_err(|e| CacheError::io(path, e))
}

/// Reads the preamble and header. `Stale` for another format version, `Corrupt` for anything
/// that does not check out.
fn read_header(bytes: &[u8]) -> Result<(Header, usize, usize), CacheError> {
    let corrupt = |m: String| CacheError::Corrupt(m);
    if bytes.len() < PREAMBLE {
        return Err(corrupt(format!(
            "{} bytes is shorter than the {PREAMBLE}-byte preamble (truncated)",
            bytes.len()
        )));
    }
    if &bytes[..8] != MAGIC {
        return Err(corrupt("not a kiln plan (bad magic)".into()));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(CacheError::Stale(format!(
            "entry format version {version}; this kiln reads version {FORMAT_VERSION}"
        )));
    }
    let header_len = usize::try_from(u64_at(bytes, 16)).unwrap_or(usize::MAX);
    let header_sum = u64_at(bytes, 24);
    let data_start = usize::try_from(u64_at(bytes, 32)).unwrap_or(usize::MAX);
    let data_len = usize::try_from(u64_at(bytes, 40)).unwrap_or(usize::MAX);
    let header_end = PREAMBLE.checked_add(header_len);
    let data_end = data_start.checked_add(data_len);
    let header_end = match (header_end, data_end) {
        (Some(h), Some(d)) if h <= data_start && d == bytes.len() && data_start % ALIGN == 0 => h,
        _ => {
            return Err(corrupt(format!(
                "sections (header {header_len} bytes, data {data_len} at {data_start}) do not \
                 fit the {}-byte file (truncated?)",
                bytes.len()
            )));
        }
    };
    let json = &bytes[PREAMBLE..header_end];
    if xxh3_64(json) != header_sum {
        return Err(corrupt("header checksum mismatch".into()));
    }
    let header: Header =
        serde_json::from_slice(json).map_err(|e| corrupt(format!("unreadable header: {e}")))?;
    Ok((header, data_start, data_len))
}

/// Reads only the summary of an entry (for listing).
pub fn summary(path: &Path) -> Result<(EntrySummary, u64), CacheError> {
    let map = map(path)?;
    let (header, _, _) = read_header(&map)?;
    Ok((header.summary, map.len() as u64))
}

/// Maps an entry, verifies it, and rebuilds its graph with every weight reading its bytes from
/// the mapping.
pub fn read(path: &Path) -> Result<CachedPlan, CacheError> {
    let map = map(path)?;
    let (header, data_start, data_len) = read_header(&map)?;
    // Every byte of the data section, checksummed in chunks, in parallel (the bulk of the
    // file); then every buffer's bounds.
    let data = &map[data_start..];
    if header.data_xxh3.len() != data_len.div_ceil(CHUNK) {
        return Err(CacheError::Corrupt(
            "data checksum count does not fit".into(),
        ));
    }
    data.par_chunks(CHUNK)
        .zip(header.data_xxh3.par_iter())
        .enumerate()
        .try_for_each(|(i, (chunk, sum))| {
            if xxh3_64(chunk) == *sum {
                Ok(())
            } else {
                Err(CacheError::Corrupt(format!(
                    "data checksum mismatch in bytes {}..",
                    i.saturating_mul(CHUNK)
                )))
            }
        })?;
    for (i, r) in header.buffers.iter().enumerate() {
        let (off, len) = (r.offset as usize, r.len as usize);
        if off % ALIGN != 0 || off.checked_add(len).is_none_or(|e| e > data_len) {
            return Err(CacheError::Corrupt(format!(
                "buffer {i} lies outside the data section"
            )));
        }
    }
    let bytes = map.len() as u64;
    let file = Blob::from_mmap(map);
    let Header {
        summary,
        mut graph,
        buffers,
        ..
    } = header;
    let mut records = buffers.iter();
    for node in &mut graph.nodes {
        let Op::Weight { weight, .. } = &mut node.op else {
            continue;
        };
        let mut filled = StoredTensor::clone(weight);
        for b in &mut filled.buffers {
            let r = records.next().ok_or_else(|| {
                CacheError::Corrupt("fewer buffer records than weight buffers".into())
            })?;
            // In the data section: checked against `data_len` above.
            let at = usize::try_from(r.offset)
                .ok()
                .and_then(|off| data_start.checked_add(off))
                .ok_or_else(|| CacheError::Corrupt("a buffer offset overflows".into()))?;
            b.bytes = file
                .slice(at, r.len as usize)
                .map_err(|e| CacheError::Corrupt(e.to_string()))?;
            b.check().map_err(|e| CacheError::Corrupt(e.to_string()))?;
        }
        *weight = Arc::new(filled);
    }
    if records.next().is_some() {
        return Err(CacheError::Corrupt(
            "more buffer records than weight buffers".into(),
        ));
    }
    graph
        .check()
        .map_err(|e| CacheError::Corrupt(format!("the stored graph does not check: {e}")))?;
    Ok(CachedPlan {
        graph,
        summary,
        bytes,
    })
}

/// `bytes` with every checksum recomputed over the sections its preamble places: the header's
/// `data_xxh3` list (when the header is a JSON object) and the header's own checksum, with the
/// preamble's offsets rewritten to fit. `None` when the preamble is missing or its sections do
/// not lie in the file. For fuzzing: a mutated entry otherwise stops at the first checksum, and
/// the checks behind the checksums are the ones a fuzzer should reach.
#[doc(hidden)]
#[allow(clippy::arithmetic_side_effects)] // every size is bounded by `bytes.len()` first
pub fn reseal(bytes: &[u8]) -> Option<Vec<u8>> {
    if bytes.len() < PREAMBLE || &bytes[..8] != MAGIC {
        return None;
    }
    let header_len = usize::try_from(u64_at(bytes, 16)).ok()?;
    let data_start = usize::try_from(u64_at(bytes, 32)).ok()?;
    let header_end = PREAMBLE.checked_add(header_len)?;
    if header_end > data_start || data_start > bytes.len() {
        return None;
    }
    let data = &bytes[data_start..];
    let mut json = bytes[PREAMBLE..header_end].to_vec();
    if let Ok(serde_json::Value::Object(mut header)) = serde_json::from_slice(&json) {
        let sums: Vec<u64> = data.chunks(CHUNK).map(xxh3_64).collect();
        header.insert("data_xxh3".into(), sums.into());
        json = serde_json::to_vec(&header).ok()?;
    }
    let data_start = align(PREAMBLE + json.len());
    let mut out = Vec::with_capacity(data_start + data.len());
    out.extend_from_slice(&bytes[..16]);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&xxh3_64(&json).to_le_bytes());
    out.extend_from_slice(&(data_start as u64).to_le_bytes());
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(&bytes[48..PREAMBLE]);
    out.extend_from_slice(&json);
    out.resize(data_start, 0);
    out.extend_from_slice(data);
    Some(out)
}

/// Seconds since the epoch, for `created_unix`.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
