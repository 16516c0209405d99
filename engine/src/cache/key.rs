//! The plan-cache key: a hash of everything that decides what a compiled plan contains.
//!
//! The key material is a small JSON document — kiln's version and build, the IR and entry-format
//! versions, each model file's content hash, the options, and the device facts the backend
//! reports — hashed with xxh3-128. It is stored readable in the entry, so `kiln cache ls` can say
//! what an entry was built from.
//!
//! Hashing file contents is the expensive part (BERT-base's weights are 440 MB): each file's
//! hash is memoised in the cache folder by `(path, size, mtime, ctime, inode, device)`, so a warm
//! start only stats the files. Trade-off: a file rewritten in place with the same size inside one
//! timestamp tick, and with its ctime set back (which needs root and a clock change), would keep
//! its old hash. Every ordinary way of changing a file (an editor, `cp`, a download, `git
//! checkout`, even `touch -d` to fake the mtime) changes the ctime, which is in the memo key.
//! xxh3 is not a cryptographic hash: the cache is a per-user folder kiln trusts as it trusts its
//! model folders, and the key only has to tell honest changes apart (2^-128 collision odds).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{Xxh3, xxh3_128};

use super::{CacheError, write_atomic};

/// Bumped whenever a change to the IR, the passes or the kernels would make an old plan wrong.
pub const IR_VERSION: u32 = 1;

/// What a key is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyMaterial {
    pub kiln_version: String,
    /// A hash of the running executable: a rebuilt kiln never reuses an older build's plans,
    /// even when the version number did not change.
    pub kiln_build: String,
    pub ir_version: u32,
    pub entry_format: u32,
    /// `(file name, content hash)` of each model file that goes into the plan.
    pub model_files: Vec<(String, String)>,
    /// Options that change the plan (layout, head, passes, quantization, math mode, attention
    /// kernel override), as the caller names them.
    pub options: BTreeMap<String, String>,
    /// The backend's device facts (CPU features; GPU adapter and driver).
    pub device: Vec<(String, String)>,
}

impl KeyMaterial {
    /// The key: xxh3-128 of the material's JSON, in hex.
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("key material serialises");
        format!("{:032x}", xxh3_128(&json))
    }
}

/// xxh3-128 of a file's contents, streamed (the file is read once, in 1 MiB pieces).
pub fn hash_file(path: &Path) -> Result<String, CacheError> {
    use std::io::Read;
    let mut f = fs::File::open(path).map_err(|e| CacheError::io(path, e))?;
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| CacheError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:032x}", h.digest128()))
}

/// Whether `s` has the form [`hash_file`] writes: 32 lowercase hex digits.
fn is_file_hash(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    inode: u64,
    device: u64,
}

impl Stamp {
    fn of(path: &Path) -> Result<Self, CacheError> {
        let m = fs::metadata(path).map_err(|e| CacheError::io(path, e))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            Ok(Self {
                size: m.size(),
                mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
                ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
                inode: m.ino(),
                device: m.dev(),
            })
        }
        #[cfg(not(unix))]
        {
            let ns = |t: std::io::Result<std::time::SystemTime>| {
                t.ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos() as i128)
            };
            Ok(Self {
                size: m.len(),
                mtime_ns: ns(m.modified()),
                ctime_ns: ns(m.created()),
                inode: 0,
                device: 0,
            })
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MemoEntry {
    stamp: Stamp,
    hash: String,
}

/// The file-hash memo, `hashes.json` in the cache folder.
pub(crate) struct HashMemo {
    path: PathBuf,
}

impl HashMemo {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    fn read(&self) -> BTreeMap<String, MemoEntry> {
        // A missing or unreadable memo only costs re-hashing.
        // Entries whose hash is not a hash are dropped: the memo is only a shortcut.
        let mut memo: BTreeMap<String, MemoEntry> = fs::read(&self.path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        memo.retain(|_, e| is_file_hash(&e.hash));
        memo
    }

    /// Content hashes of `paths`, from the memo where the file is unchanged, else by reading
    /// the file (and then remembering it). Returns the hashes and how many files were read.
    pub fn hashes(&self, paths: &[PathBuf]) -> Result<(Vec<String>, usize), CacheError> {
        let mut memo = self.read();
        let mut out = Vec::with_capacity(paths.len());
        let mut hashed = 0;
        for p in paths {
            let abs = fs::canonicalize(p).map_err(|e| CacheError::io(p, e))?;
            let name = abs.to_string_lossy().into_owned();
            let stamp = Stamp::of(&abs)?;
            match memo.get(&name) {
                Some(e) if e.stamp == stamp => out.push(e.hash.clone()),
                _ => {
                    let hash = hash_file(&abs)?;
                    // The file must not have changed while it was read.
                    if Stamp::of(&abs)? == stamp {
                        memo.insert(
                            name,
                            MemoEntry {
                                stamp,
                                hash: hash.clone(),
                            },
                        );
                    }
                    hashed += 1;
                    out.push(hash);
                }
            }
        }
        if hashed > 0 {
            // Drop entries for files that are gone, then write (atomically: a concurrent writer
            // may win, which only costs it or us one re-hash later).
            memo.retain(|path, _| Path::new(path).exists());
            let bytes = serde_json::to_vec(&memo).expect("memo serialises");
            if let Err(e) = write_atomic(&self.path, |w| std::io::Write::write_all(w, &bytes)) {
                tracing::warn!(error = %e, "cannot update the plan cache's file-hash memo");
            }
        }
        Ok((out, hashed))
    }
}

/// A hash of the running executable (memoised like model files), or `unknown`.
pub(crate) fn build_hash(memo: &HashMemo) -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| memo.hashes(&[exe]).ok())
        .and_then(|(h, _)| h.into_iter().next())
        .and_then(|h| h.get(..16).map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn material() -> KeyMaterial {
        KeyMaterial {
            kiln_version: "0.1.0".into(),
            kiln_build: "b".into(),
            ir_version: IR_VERSION,
            entry_format: 1,
            model_files: vec![("model.safetensors".into(), "aa".into())],
            options: [("layout".to_string(), "packed".to_string())].into(),
            device: vec![("backend".into(), "cpu".into())],
        }
    }

    #[test]
    fn any_change_in_the_material_changes_the_key() {
        let base = material();
        let key = base.key();
        assert_eq!(key, material().key(), "deterministic");
        assert_eq!(key.len(), 32);
        let mut m = material();
        m.model_files[0].1 = "ab".into();
        assert_ne!(m.key(), key);
        let mut m = material();
        m.options.insert("passes".into(), "no-fuse".into());
        assert_ne!(m.key(), key);
        let mut m = material();
        m.device.push(("cpu_features".into(), "avx2".into()));
        assert_ne!(m.key(), key);
        let mut m = material();
        m.ir_version += 1;
        assert_ne!(m.key(), key);
    }

    #[test]
    fn the_memo_rehashes_only_changed_files() {
        let dir = std::env::temp_dir().join(format!("kiln-memo-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("weights.bin");
        fs::write(&file, b"one").unwrap();
        let memo = HashMemo::new(dir.join("hashes.json"));
        let (h1, read) = memo.hashes(std::slice::from_ref(&file)).unwrap();
        assert_eq!(read, 1);
        let (h2, read) = memo.hashes(std::slice::from_ref(&file)).unwrap();
        assert_eq!((h1.clone(), read), (h2, 0), "unchanged: from the memo");
        // Same size, new contents: the ctime (and mtime) move, so it is hashed again.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&file, b"two").unwrap();
        let (h3, read) = memo.hashes(std::slice::from_ref(&file)).unwrap();
        assert_eq!(read, 1);
        assert_ne!(h3, h1);
        assert_eq!(h3[0], hash_file(&file).unwrap());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_memo_costs_only_rehashing() {
        let dir = std::env::temp_dir().join(format!("kiln-memo-bad-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("weights.bin");
        fs::write(&file, b"one").unwrap();
        let memo = HashMemo::new(dir.join("hashes.json"));
        memo.hashes(std::slice::from_ref(&file)).unwrap();
        // The right stamp with a hash that is not one (short, non-ASCII): ignored, re-hashed.
        let text = fs::read_to_string(dir.join("hashes.json")).unwrap();
        let good = hash_file(&file).unwrap();
        for forged in ["", "é", "0123"] {
            fs::write(dir.join("hashes.json"), text.replace(&good, forged)).unwrap();
            let (h, read) = memo.hashes(std::slice::from_ref(&file)).unwrap();
            assert_eq!((h[0].as_str(), read), (good.as_str(), 1), "{forged:?}");
            fs::write(dir.join("hashes.json"), text.replace(&good, forged)).unwrap();
            assert_ne!(build_hash(&memo), "");
        }
        fs::write(dir.join("hashes.json"), b"{not json").unwrap();
        assert_eq!(memo.hashes(std::slice::from_ref(&file)).unwrap().1, 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
