//! What a model will hold in memory once loaded, estimated from its folder before loading it
//! (for a server's memory budget): its weights as f32 (what the plan keeps unless quantized;
//! a quantized plan holds less) and, for a causal LM, a KV cache of a given number of tokens.
//! Activations are not counted.

use std::path::Path;

use crate::decoder::{DecoderConfig, is_causal_lm, shards};
use crate::error::{ModelError, Result};
use crate::weights::SafetensorsFile;

/// Bytes the model in `dir` will hold: its weights as f32, and for a causal LM a KV cache of
/// `kv_tokens` tokens (f32 keys and values in every layer).
pub fn estimate_bytes(dir: &Path, kv_tokens: usize) -> Result<u64> {
    let mut elements: u64 = 0;
    for file in shards::Weights::files(dir)? {
        if file.extension().is_some_and(|e| e == "json") {
            continue;
        }
        let f = SafetensorsFile::open_plain(&file)?;
        for name in f.names() {
            let shape = f.shape(&name).unwrap_or_default();
            let n = shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
                .ok_or_else(|| ModelError::file(&file, format!("`{name}`: shape overflows")))?;
            elements = elements.saturating_add(n);
        }
    }
    let mut bytes = elements.saturating_mul(4);
    let config = dir.join("config.json");
    if is_causal_lm(&config)? {
        let c = DecoderConfig::load(&config)?;
        let per_token = [2, c.num_layers, c.num_kv_heads, c.head_dim, 4]
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .unwrap_or(u64::MAX);
        bytes = bytes.saturating_add(per_token.saturating_mul(kv_tokens as u64));
    }
    Ok(bytes)
}
