//! A decoder's weights: one `model.safetensors`, or the shards a
//! `model.safetensors.index.json` names (`weight_map`: parameter name → shard file).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use kiln_engine::HostTensor;
use serde::Deserialize;

use crate::error::{ModelError, Result, read_json};
use crate::weights::SafetensorsFile;

#[derive(Deserialize)]
struct Index {
    weight_map: HashMap<String, String>,
}

/// Every weight of a model folder, by parameter name, across shards.
pub struct Weights {
    files: Vec<SafetensorsFile>,
    /// Parameter name → index into `files`.
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Weights({} files)", self.files.len())
    }
}

impl Weights {
    /// Opens `model.safetensors`, or else the shards of `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let mut files = Vec::new();
        let mut by_name = HashMap::new();
        if single.is_file() {
            let f = SafetensorsFile::open_plain(&single)?;
            for n in f.names() {
                by_name.insert(n, 0);
            }
            files.push(f);
        } else if index.is_file() {
            let idx: Index = read_json(&index)?;
            let mut shard_of: HashMap<&str, usize> = HashMap::new();
            let mut names: Vec<(&String, &String)> = idx.weight_map.iter().collect();
            names.sort();
            for (name, shard) in names {
                if shard.contains('/') || shard.contains("..") {
                    return Err(ModelError::file(
                        &index,
                        format!("shard `{shard}` must be a file name in the model folder"),
                    ));
                }
                let i = match shard_of.get(shard.as_str()) {
                    Some(&i) => i,
                    None => {
                        files.push(SafetensorsFile::open_plain(&dir.join(shard))?);
                        shard_of.insert(shard, files.len() - 1);
                        files.len() - 1
                    }
                };
                if !files[i].names().iter().any(|n| n == name) {
                    return Err(ModelError::file(
                        files[i].path(),
                        format!("the index puts tensor `{name}` here, but the shard lacks it"),
                    ));
                }
                by_name.insert(name.clone(), i);
            }
        } else {
            return Err(ModelError::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors and no model.safetensors.index.json",
                ),
            ));
        }
        Ok(Self { files, by_name })
    }

    /// The weight files `open` would read: `model.safetensors`, or the index and every shard
    /// it names (sorted). For the plan-cache key, so reads only the index.
    pub fn files(dir: &Path) -> Result<Vec<PathBuf>> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.is_file() || !index.is_file() {
            return Ok(vec![single]);
        }
        let idx: Index = read_json(&index)?;
        let shards: BTreeSet<&String> = idx.weight_map.values().collect();
        let mut files = vec![index.clone()];
        for shard in shards {
            if shard.contains('/') || shard.contains("..") {
                return Err(ModelError::file(
                    &index,
                    format!("shard `{shard}` must be a file name in the model folder"),
                ));
            }
            files.push(dir.join(shard));
        }
        Ok(files)
    }

    pub fn has(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The first of `prefixes` under which `probe` exists (e.g. `transformer.` or ``).
    pub fn prefix_of<'a>(&self, probe: &str, prefixes: &[&'a str]) -> Option<&'a str> {
        prefixes
            .iter()
            .find(|p| self.has(&format!("{p}{probe}")))
            .copied()
    }

    /// A parameter as f32, checked against `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        match self.by_name.get(name) {
            Some(&i) => self.files[i].tensor(name, shape),
            None => Err(ModelError::file(
                self.files[0].path(),
                format!("missing tensor `{name}`"),
            )),
        }
    }

    pub fn first_path(&self) -> &Path {
        self.files[0].path()
    }
}
