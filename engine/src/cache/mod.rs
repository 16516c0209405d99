//! The on-disk plan cache: compiled plans kept between runs, so a restart, a new replica on the
//! same volume or a rollout skips compiling (and decoding and re-packing every weight).
//!
//! Layout of the cache folder (`$KILN_CACHE_DIR`, else the per-user cache folder, see
//! [`default_dir`]):
//!
//! - `plans/<key>.kiln` — one entry per compiled plan ([`entry`] describes the format);
//! - `hashes.json` — the memo of model files' content hashes ([`key`] explains it).
//!
//! Writes are atomic: an entry is written to a temporary file in the same folder, flushed to
//! disk (`fsync`), renamed over its final name, and the folder is synced. Two processes
//! compiling the same model at once both write complete files; the last rename wins and either
//! file is a valid entry. A reader maps a file that is never modified in place.
//!
//! An entry that is truncated, corrupted, of another format version or for another key is
//! detected on load (checksums on every byte), logged, removed and rebuilt — never trusted, and
//! never a crash.

pub mod entry;
pub mod key;

use std::fs;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::time::Instant;

use thiserror::Error;

use crate::compile::CompileReport;
use crate::ir::{Graph, Op};
use crate::storage::StoredTensor;

pub use entry::{CachedPlan, EntrySummary};
pub use key::{IR_VERSION, KeyMaterial};

#[derive(Debug, Error)]
pub enum CacheError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The entry cannot be trusted (truncated, bad checksum, unreadable).
    #[error("corrupt entry: {0}")]
    Corrupt(String),
    /// The entry is intact but from another entry-format version or for another key.
    #[error("stale entry: {0}")]
    Stale(String),
}

impl CacheError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The cache folder: `$KILN_CACHE_DIR` if set, else `$XDG_CACHE_HOME/kiln`, else the platform's
/// per-user cache folder (`~/.cache/kiln` on Linux, `~/Library/Caches/kiln` on macOS,
/// `%LOCALAPPDATA%\kiln` on Windows). `None` when none of these is known.
pub fn default_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = env("KILN_CACHE_DIR") {
        return Some(d);
    }
    if cfg!(windows) {
        return env("LOCALAPPDATA").map(|d| d.join("kiln"));
    }
    if let Some(d) = env("XDG_CACHE_HOME") {
        return Some(d.join("kiln"));
    }
    let home = env("HOME")?;
    Some(if cfg!(target_os = "macos") {
        home.join("Library/Caches/kiln")
    } else {
        home.join(".cache/kiln")
    })
}

/// Writes a file atomically: a temporary file beside `path` is written by `fill`, synced to
/// disk, and renamed over `path`; then the folder is synced so the rename itself is durable.
pub(crate) fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<fs::File>) -> io::Result<()>,
) -> Result<(), CacheError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(|| "entry".into(), |n| n.to_string_lossy().into_owned());
    // Unique per process (pid) and per write within it (counter).
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let result = (|| {
        let file = fs::File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        fill(&mut w)?;
        let file = w.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        // Make the rename durable (on Unix a folder can be opened and synced).
        #[cfg(unix)]
        fs::File::open(dir)?.sync_all()?;
        Ok(())
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        CacheError::io(path, e)
    })
}

/// What looking a key up found.
#[derive(Debug)]
// Returned once per model load and matched at once: boxing the plan would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Lookup {
    Hit(CachedPlan),
    Miss,
    /// An entry existed but could not be used (the reason); it has been removed.
    Rejected(String),
}

/// Facts about an entry, for `kiln cache ls`.
#[derive(Debug)]
pub struct EntryInfo {
    pub path: PathBuf,
    pub bytes: u64,
    /// The entry's summary, or why it cannot be read.
    pub summary: Result<EntrySummary, String>,
}

/// The writing process of a temporary file `.{name}.{pid}.{n}.tmp` (see [`write_atomic`]).
fn tmp_owner(file_name: &str) -> Option<u32> {
    let stem = file_name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let mut parts = stem.rsplitn(3, '.');
    let _n = parts.next()?;
    parts.next()?.parse().ok()
}

/// Removes temporary files left by writers that died mid-write (killed, or out of power): their
/// process is gone. A live writer's file is left alone. Where processes cannot be looked up
/// (no `/proc`), nothing is removed; `kiln cache clear` removes them all.
fn remove_orphans(plans: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(dir) = fs::read_dir(plans) else {
        return;
    };
    for item in dir.flatten() {
        let name = item.file_name().to_string_lossy().into_owned();
        if let Some(pid) = tmp_owner(&name)
            && pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            match fs::remove_file(item.path()) {
                Ok(()) => {
                    tracing::info!(file = %name, "removed a plan cache file left by a writer that died mid-write")
                }
                Err(e) => {
                    tracing::debug!(file = %name, error = %e, "cannot remove a leftover plan cache file")
                }
            }
        }
    }
}

/// A cache folder.
#[derive(Debug, Clone)]
pub struct PlanCache {
    dir: PathBuf,
}

impl PlanCache {
    /// Opens (creating if needed) a cache folder.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        fs::create_dir_all(dir.join("plans")).map_err(|e| CacheError::io(dir, e))?;
        remove_orphans(&dir.join("plans"));
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry_path(&self, key: &str) -> PathBuf {
        self.dir.join("plans").join(format!("{key}.kiln"))
    }

    /// Content hashes of model files (memoised; see [`key`]), and how many had to be read.
    pub fn file_hashes(&self, paths: &[PathBuf]) -> Result<(Vec<String>, usize), CacheError> {
        key::HashMemo::new(self.dir.join("hashes.json")).hashes(paths)
    }

    /// A hash identifying the running kiln build (see [`KeyMaterial::kiln_build`]).
    pub fn build_hash(&self) -> String {
        key::build_hash(&key::HashMemo::new(self.dir.join("hashes.json")))
    }

    /// Looks `material`'s key up. A corrupt or stale entry is logged, removed and reported as
    /// `Rejected`, so the caller rebuilds it.
    pub fn load(&self, material: &KeyMaterial) -> Lookup {
        let key = material.key();
        let path = self.entry_path(&key);
        if !path.exists() {
            return Lookup::Miss;
        }
        let started = Instant::now();
        let checked = entry::read(&path).and_then(|plan| {
            if plan.summary.key != key || plan.summary.material != *material {
                Err(CacheError::Stale(
                    "the entry was built from other inputs than its name says".into(),
                ))
            } else {
                Ok(plan)
            }
        });
        match checked {
            Ok(plan) => {
                tracing::debug!(
                    key,
                    ms = started.elapsed().as_secs_f64() * 1e3,
                    "plan cache hit"
                );
                Lookup::Hit(plan)
            }
            Err(e) => {
                // The caller reports the rebuild and its reason (one line for the operator).
                tracing::debug!(
                    path = %path.display(),
                    error = %e,
                    "plan cache entry rejected; it will be rebuilt"
                );
                let _ = fs::remove_file(&path);
                Lookup::Rejected(e.to_string())
            }
        }
    }

    /// Removes `material`'s entry (one that read back but could not be used), so the next
    /// load rebuilds it instead of failing on it again.
    pub fn evict(&self, material: &KeyMaterial) {
        let path = self.entry_path(&material.key());
        if let Err(e) = fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a plan cache entry");
        }
    }

    /// Stores a compiled graph under `material`'s key. Constants not yet stored as weights
    /// (when `prepack` is off) are stored as they are. Returns the entry's size in bytes.
    pub fn store(
        &self,
        material: &KeyMaterial,
        model: &str,
        graph: &Graph,
        report: &CompileReport,
    ) -> Result<u64, CacheError> {
        let key = material.key();
        let graph = stored(graph);
        let summary = EntrySummary {
            key: key.clone(),
            material: material.clone(),
            model: model.into(),
            created_unix: entry::now_unix(),
            report: report.clone(),
        };
        let bytes = entry::write(&self.entry_path(&key), summary, &graph)?;
        self.remove_superseded(material);
        Ok(bytes)
    }

    /// Removes entries for the same model, options and device built by another kiln build:
    /// without this, every upgrade (or developer rebuild) would leave a full copy of each
    /// model's weights behind. (During a rolling update, replicas of the old build that restart
    /// later compile again; running ones keep their mapped plans.)
    fn remove_superseded(&self, material: &KeyMaterial) {
        let inputs = |m: &KeyMaterial| {
            let mut m = m.clone();
            m.kiln_build.clear();
            m.kiln_version.clear();
            m
        };
        let ours = inputs(material);
        let key = material.key();
        for e in self.list().unwrap_or_default() {
            if let Ok(s) = &e.summary
                && s.key != key
                && inputs(&s.material) == ours
            {
                tracing::info!(key = %s.key, "removing a plan of an older kiln build");
                let _ = fs::remove_file(&e.path);
            }
        }
    }

    /// Every entry, newest first.
    pub fn list(&self) -> Result<Vec<EntryInfo>, CacheError> {
        let plans = self.dir.join("plans");
        let mut out = Vec::new();
        let dir = match fs::read_dir(&plans) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(CacheError::io(&plans, e)),
        };
        for item in dir {
            let path = item.map_err(|e| CacheError::io(&plans, e))?.path();
            if path.extension().is_none_or(|e| e != "kiln") {
                continue;
            }
            let bytes = fs::metadata(&path).map_or(0, |m| m.len());
            let summary = entry::summary(&path)
                .map(|(s, _)| s)
                .map_err(|e| e.to_string());
            out.push(EntryInfo {
                path,
                bytes,
                summary,
            });
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.summary.as_ref().map_or(0, |s| s.created_unix)));
        Ok(out)
    }

    /// Removes every entry, leftover temporary file and the hash memo. Returns how many
    /// entries were removed. Processes that have an entry mapped keep reading it.
    pub fn clear(&self) -> Result<usize, CacheError> {
        let plans = self.dir.join("plans");
        let mut removed = 0;
        if let Ok(dir) = fs::read_dir(&plans) {
            for item in dir.flatten() {
                let path = item.path();
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                let is_entry = path.extension().is_some_and(|e| e == "kiln");
                let is_tmp = name.as_deref().is_some_and(|n| n.ends_with(".tmp"));
                if is_entry || is_tmp {
                    fs::remove_file(&path).map_err(|e| CacheError::io(&path, e))?;
                    removed += usize::from(is_entry);
                }
            }
        }
        let memo = self.dir.join("hashes.json");
        if memo.exists() {
            fs::remove_file(&memo).map_err(|e| CacheError::io(&memo, e))?;
        }
        Ok(removed)
    }
}

/// `graph` with every uncompiled constant turned into a plain stored weight.
fn stored(graph: &Graph) -> Graph {
    let mut g = graph.clone();
    for n in &mut g.nodes {
        if let Op::Constant { name, value, role } = &n.op {
            n.op = Op::Weight {
                name: name.clone(),
                weight: std::sync::Arc::new(StoredTensor::plain(value, *role)),
            };
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;
    use crate::compile::{CompileOptions, compile};
    use crate::exec::{ExecOptions, Plan};
    use crate::ir::{Activation, ConstRole, DType, Dim, GraphBuilder};
    use crate::tensor::HostTensor;

    fn tensor(shape: &[usize], seed: u64) -> HostTensor {
        let n = shape.iter().product();
        let mut s = seed | 1;
        let v = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        HostTensor::f32(shape.to_vec(), v).unwrap()
    }

    /// A small two-layer MLP with layer norm and ids: every kind of stored buffer.
    fn model() -> Graph {
        let mut g = GraphBuilder::new();
        let ids = g.input("ids", DType::I64, &[Dim::Batch, Dim::Seq]).unwrap();
        let table = g
            .constant("emb", tensor(&[11, 8], 1), ConstRole::Other)
            .unwrap();
        let x = g.push(Op::Embedding, &[table, ids], "emb").unwrap();
        let w1 = g
            .constant("w1", tensor(&[16, 8], 2), ConstRole::LinearWeight)
            .unwrap();
        let b1 = g
            .constant("b1", tensor(&[16], 3), ConstRole::Other)
            .unwrap();
        let h = g.push(Op::Linear, &[x, w1, b1], "up").unwrap();
        let h = g
            .push(Op::Activation(Activation::Gelu), &[h], "act")
            .unwrap();
        let w2 = g
            .constant("w2", tensor(&[8, 16], 4), ConstRole::LinearWeight)
            .unwrap();
        let y = g.push(Op::Linear, &[h, w2], "down").unwrap();
        let y = g.push(Op::Add, &[y, x], "res").unwrap();
        let gamma = g.constant("g", tensor(&[8], 5), ConstRole::Other).unwrap();
        let beta = g.constant("b", tensor(&[8], 6), ConstRole::Other).unwrap();
        let y = g
            .push(Op::LayerNorm { eps: 1e-5 }, &[y, gamma, beta], "ln")
            .unwrap();
        g.finish(vec![("y".into(), y)]).unwrap()
    }

    fn material(tag: &str) -> KeyMaterial {
        KeyMaterial {
            kiln_version: "test".into(),
            kiln_build: "test".into(),
            ir_version: IR_VERSION,
            entry_format: entry::FORMAT_VERSION,
            model_files: vec![("model".into(), tag.into())],
            options: Default::default(),
            device: vec![("backend".into(), "cpu".into())],
        }
    }

    fn run(g: &Graph) -> Vec<f32> {
        let feeds = vec![(
            "ids".to_string(),
            HostTensor::i64(vec![2, 3], vec![0, 5, 10, 3, 3, 7]).unwrap(),
        )];
        let plan = Plan::new(g.clone(), CpuBackend::new(2), ExecOptions::default()).unwrap();
        plan.run(&feeds).unwrap().remove(0).1.into_f32().unwrap()
    }

    fn temp_cache(name: &str) -> PlanCache {
        let dir = std::env::temp_dir().join(format!("kiln-cache-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        PlanCache::open(&dir).unwrap()
    }

    fn compiled(options: &CompileOptions) -> (Graph, CompileReport) {
        let c = compile(
            model(),
            &CpuBackend::new(1),
            options,
            ExecOptions::default(),
        )
        .unwrap();
        (c.graph, c.report)
    }

    #[test]
    fn a_round_trip_maps_weights_in_place_and_gives_bit_identical_outputs() {
        for options in [CompileOptions::default(), CompileOptions::none()] {
            let cache = temp_cache(if options.disabled.is_empty() {
                "rt"
            } else {
                "rt-off"
            });
            let (graph, report) = compiled(&options);
            let m = material("a");
            assert!(matches!(cache.load(&m), Lookup::Miss));
            let bytes = cache.store(&m, "test-model", &graph, &report).unwrap();
            let Lookup::Hit(plan) = cache.load(&m) else {
                panic!("stored entry not found")
            };
            assert_eq!(plan.bytes, bytes);
            assert_eq!(plan.summary.report, report);
            assert_eq!(plan.summary.model, "test-model");
            for n in &plan.graph.nodes {
                if let Op::Weight { weight, .. } = &n.op {
                    assert!(weight.buffers.iter().all(|b| b.bytes.is_mapped()));
                }
            }
            let (a, b) = (run(&graph), run(&plan.graph));
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(cache.list().unwrap().len(), 1);
            assert_eq!(cache.clear().unwrap(), 1);
            assert!(matches!(cache.load(&m), Lookup::Miss));
            let _ = fs::remove_dir_all(cache.dir());
        }
    }

    #[test]
    fn truncated_corrupted_foreign_and_old_entries_are_rejected_and_removed() {
        let cache = temp_cache("corrupt");
        let (graph, report) = compiled(&CompileOptions::default());
        let m = material("c");
        cache.store(&m, "m", &graph, &report).unwrap();
        let path = cache.entry_path(&m.key());
        let good = fs::read(&path).unwrap();
        let mut damaged: Vec<(String, Vec<u8>)> = Vec::new();
        for cut in [0, 10, 63, 64, 200, good.len() / 2, good.len() - 1] {
            damaged.push((format!("truncated at {cut}"), good[..cut].to_vec()));
        }
        for at in [0, 9, 20, 70, good.len() / 2, good.len() - 3] {
            let mut b = good.clone();
            b[at] ^= 0x5a;
            damaged.push((format!("byte {at} flipped"), b));
        }
        let mut old = good.clone();
        old[8..12].copy_from_slice(&(entry::FORMAT_VERSION + 1).to_le_bytes());
        damaged.push(("another format version".into(), old));
        damaged.push(("garbage".into(), b"not a plan at all".repeat(100)));
        let mut longer = good.clone();
        longer.extend_from_slice(&[0; 100]);
        damaged.push(("trailing bytes".into(), longer));
        for (what, bytes) in damaged {
            fs::write(&path, &bytes).unwrap();
            match cache.load(&m) {
                Lookup::Rejected(why) => {
                    assert!(!why.is_empty(), "{what}");
                    assert!(!path.exists(), "{what}: a rejected entry is removed");
                }
                other => panic!("{what}: expected a rejection, got {other:?}"),
            }
        }
        // An intact entry stored under another key's name is refused too.
        let other = material("other");
        cache.store(&other, "m", &graph, &report).unwrap();
        fs::rename(cache.entry_path(&other.key()), &path).unwrap();
        assert!(matches!(cache.load(&m), Lookup::Rejected(why) if why.contains("stale")));
        let _ = fs::remove_dir_all(cache.dir());
    }

    /// `entry` with its header JSON changed by `mutate` and its checksums and offsets redone: a
    /// damaged entry that every checksum passes.
    fn forged(entry: &[u8], mutate: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
        let u64_at = |at: usize| u64::from_le_bytes(entry[at..at + 8].try_into().unwrap()) as usize;
        let (header_len, data_start) = (u64_at(16), u64_at(32));
        let mut header: serde_json::Value =
            serde_json::from_slice(&entry[64..64 + header_len]).unwrap();
        mutate(&mut header);
        let json = serde_json::to_vec(&header).unwrap();
        let mut out = entry[..64].to_vec();
        out[16..24].copy_from_slice(&(json.len() as u64).to_le_bytes());
        out[32..40].copy_from_slice(&((64 + json.len()) as u64).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&entry[data_start..]);
        entry::reseal(&out).unwrap()
    }

    #[test]
    fn a_resealed_entry_passes_its_checksums() {
        let cache = temp_cache("reseal");
        let (graph, report) = compiled(&CompileOptions::default());
        let m = material("r");
        cache.store(&m, "m", &graph, &report).unwrap();
        let path = cache.entry_path(&m.key());
        let good = fs::read(&path).unwrap();
        let expected = run(&graph);
        // Resealing a good entry changes nothing the reader sees.
        fs::write(&path, entry::reseal(&good).unwrap()).unwrap();
        let Lookup::Hit(plan) = cache.load(&m) else {
            panic!("a resealed good entry was rejected")
        };
        assert_eq!(run(&plan.graph), expected);
        // A flipped data byte fails its checksum, and passes it once resealed.
        let mut damaged = good.clone();
        *damaged.last_mut().unwrap() ^= 1;
        fs::write(&path, &damaged).unwrap();
        assert!(matches!(cache.load(&m), Lookup::Rejected(why) if why.contains("checksum")));
        cache.store(&m, "m", &graph, &report).unwrap();
        fs::write(&path, entry::reseal(&damaged).unwrap()).unwrap();
        assert!(matches!(cache.load(&m), Lookup::Hit(_)));
        assert!(entry::reseal(&good[..40]).is_none());
        let _ = fs::remove_dir_all(cache.dir());
    }

    /// Every JSON object under `v` that has all of `keys`.
    fn objects_with<'a>(
        v: &'a mut serde_json::Value,
        keys: &[&str],
        out: &mut Vec<&'a mut serde_json::Map<String, serde_json::Value>>,
    ) {
        match v {
            serde_json::Value::Object(m) => {
                if keys.iter().all(|k| m.contains_key(*k)) {
                    out.push(m);
                } else {
                    m.values_mut().for_each(|x| objects_with(x, keys, out));
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(|x| objects_with(x, keys, out)),
            _ => {}
        }
    }

    #[test]
    fn entries_with_forged_sizes_are_rejected_without_a_panic() {
        let cache = temp_cache("forged");
        let (graph, report) = compiled(&CompileOptions::default());
        let m = material("f");
        cache.store(&m, "m", &graph, &report).unwrap();
        let path = cache.entry_path(&m.key());
        let good = fs::read(&path).unwrap();
        type Mutation = Box<dyn Fn(&mut serde_json::Value)>;
        let set_shape = |keys: &'static [&'static str], shape: serde_json::Value| -> Mutation {
            Box::new(move |h| {
                let mut found = Vec::new();
                objects_with(h, keys, &mut found);
                assert!(!found.is_empty(), "no object with {keys:?}");
                for o in found {
                    o.insert("shape".into(), shape.clone());
                }
            })
        };
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "buffer shapes whose product overflows",
                set_shape(
                    &["elem", "shape", "name"],
                    serde_json::json!([1u64 << 62, 8]),
                ),
            ),
            (
                "rank-1 weights",
                set_shape(&["format", "buffers", "shape"], serde_json::json!([8])),
            ),
            (
                "weights of a huge logical shape",
                set_shape(
                    &["format", "buffers", "shape"],
                    serde_json::json!([1u64 << 40, 1u64 << 40]),
                ),
            ),
            (
                "buffer records past the data",
                Box::new(|h| {
                    for r in h["buffers"].as_array_mut().unwrap() {
                        r["offset"] = serde_json::json!(u64::MAX - 63);
                    }
                }),
            ),
        ];
        for (what, mutate) in cases {
            fs::write(&path, forged(&good, mutate)).unwrap();
            let outcome = std::panic::catch_unwind(|| cache.load(&m));
            match outcome {
                Ok(Lookup::Rejected(why)) => assert!(!why.is_empty(), "{what}"),
                Ok(other) => panic!("{what}: expected a rejection, got {other:?}"),
                Err(_) => panic!("{what}: loading panicked"),
            }
        }
        let _ = fs::remove_dir_all(cache.dir());
    }

    #[test]
    fn temporary_files_of_dead_writers_are_removed_on_open() {
        let cache = temp_cache("orphans");
        let plans = cache.dir().join("plans");
        // No process has pid u32::MAX - 1 (Linux caps pids at 2^22); ours is alive.
        let dead = plans.join(format!(".k.kiln.{}.0.tmp", u32::MAX - 1));
        let mine = plans.join(format!(".k.kiln.{}.0.tmp", std::process::id()));
        fs::write(&dead, b"half a plan").unwrap();
        fs::write(&mine, b"being written").unwrap();
        assert_eq!(tmp_owner(".k.kiln.42.7.tmp"), Some(42));
        assert_eq!(tmp_owner("k.kiln"), None);
        let cache = PlanCache::open(cache.dir()).unwrap();
        assert!(!dead.exists(), "a dead writer's file is removed");
        assert!(mine.exists(), "a live writer's file is kept");
        let _ = fs::remove_dir_all(cache.dir());
    }

    #[test]
    fn a_new_build_replaces_its_predecessors_plans_only() {
        let cache = temp_cache("supersede");
        let (graph, report) = compiled(&CompileOptions::default());
        let old = material("s");
        cache.store(&old, "m", &graph, &report).unwrap();
        let other_model = material("other");
        cache.store(&other_model, "m", &graph, &report).unwrap();
        let mut new = material("s");
        new.kiln_build = "newer".into();
        cache.store(&new, "m", &graph, &report).unwrap();
        assert!(
            matches!(cache.load(&old), Lookup::Miss),
            "the old build's plan is gone"
        );
        assert!(matches!(cache.load(&new), Lookup::Hit(_)));
        assert!(
            matches!(cache.load(&other_model), Lookup::Hit(_)),
            "other models stay"
        );
        let _ = fs::remove_dir_all(cache.dir());
    }

    #[test]
    fn concurrent_writers_of_one_key_leave_a_valid_entry() {
        let cache = temp_cache("race");
        let (graph, report) = compiled(&CompileOptions::default());
        let m = material("race");
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..5 {
                        cache.store(&m, "m", &graph, &report).unwrap();
                        // Readers racing the writers only ever see a whole entry.
                        match cache.load(&m) {
                            Lookup::Hit(p) => assert_eq!(run(&p.graph), run(&graph)),
                            Lookup::Miss => {}
                            Lookup::Rejected(why) => panic!("a reader saw a partial entry: {why}"),
                        }
                    }
                });
            }
        });
        assert!(matches!(cache.load(&m), Lookup::Hit(_)));
        let leftovers: Vec<_> = fs::read_dir(cache.dir().join("plans"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left behind");
        let _ = fs::remove_dir_all(cache.dir());
    }
}
