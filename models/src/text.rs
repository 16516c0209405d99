//! Text to token ids, through the `tokenizers` crate and the model's `tokenizer.json`.

use std::path::Path;

use tokenizers::{
    EncodeInput, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::error::{ModelError, Result};

/// One input: a text, or a pair (`[CLS] a [SEP] b [SEP]`, segment ids 0 then 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextInput {
    Single(String),
    Pair(String, String),
}

/// The ids of one sequence, ready for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<i64>,
    pub type_ids: Vec<i64>,
    /// Tokens the text had before truncation (equal to `ids.len()` when not truncated).
    pub untruncated_len: usize,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn truncated(&self) -> bool {
        self.untruncated_len > self.ids.len()
    }
}

/// A tokenizer with kiln's padding and truncation policy applied.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    max_len: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TextTokenizer(max_len {})", self.max_len)
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` and replaces whatever padding and truncation it embeds: kiln pads
    /// per batch itself, and truncates at `max_len` (all-MiniLM-L6-v2's file says 128 while the
    /// model is meant to run at 256).
    pub fn load(path: &Path, max_len: usize) -> Result<Self> {
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| ModelError::file(path, format!("cannot load tokenizer: {e}")))?;
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| ModelError::file(path, format!("cannot set truncation: {e}")))?;
        Ok(Self { inner, max_len })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Tokenizes a batch. Every input is truncated to `max_len` tokens; `untruncated_len` tells
    /// the caller whether that happened, so it can refuse instead.
    pub fn encode(&self, inputs: &[TextInput]) -> Result<Vec<Encoded>> {
        let batch: Vec<EncodeInput> = inputs
            .iter()
            .map(|i| match i {
                TextInput::Single(a) => EncodeInput::Single(a.as_str().into()),
                TextInput::Pair(a, b) => EncodeInput::Dual(a.as_str().into(), b.as_str().into()),
            })
            .collect();
        let encodings = if batch.len() > 1 {
            self.inner.encode_batch(batch, true)
        } else {
            batch
                .into_iter()
                .map(|b| self.inner.encode(b, true))
                .collect()
        }
        .map_err(|e| ModelError::Tokenize(e.to_string()))?;
        Ok(encodings
            .into_iter()
            .map(|e| {
                let ids: Vec<i64> = e.get_ids().iter().map(|&x| i64::from(x)).collect();
                let type_ids = e.get_type_ids().iter().map(|&x| i64::from(x)).collect();
                // Each overflow window repeats the special tokens ([CLS] .. [SEP]) around the
                // content that did not fit; count only that content.
                let specials = e
                    .get_special_tokens_mask()
                    .iter()
                    .filter(|&&m| m == 1)
                    .count();
                let overflow: usize = e
                    .get_overflowing()
                    .iter()
                    .map(|o| o.get_ids().len().saturating_sub(specials))
                    .sum();
                let untruncated_len = ids.len() + overflow;
                Encoded {
                    ids,
                    type_ids,
                    untruncated_len,
                }
            })
            .collect())
    }

    /// Token strings for ids (for `/tokenize`-style answers and debugging).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The vocabulary's size, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The text of `ids` (TEI's `/decode`); ids outside the vocabulary are an input error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let vocab = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary ({vocab} tokens)"
            )));
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelError::Input(format!("cannot decode: {e}")))
    }
}
