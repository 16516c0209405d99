use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why a model could not be loaded or could not run an input.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A model file is present but malformed or inconsistent (config, weights, tokenizer).
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// The model folder describes something kiln cannot run.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// The caller's input cannot be run (too long, empty, ...). Maps to a 4xx.
    #[error("{0}")]
    Input(String),
    /// Tokenization failed on an input.
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    #[error(transparent)]
    Engine(#[from] kiln_engine::EngineError),
}

impl ModelError {
    pub(crate) fn file(path: &Path, msg: impl Into<String>) -> Self {
        ModelError::File {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Reads and parses a JSON file, naming the file in every error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| ModelError::file(path, format!("invalid JSON: {e}")))
}
