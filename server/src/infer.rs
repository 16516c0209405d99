//! What handlers call: admission, tokenization, the batch queue and the request timeout, with
//! their metrics. Every API family (OpenAI, KServe, native) goes through here, so they batch
//! together and share the limits.

use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use kiln_models::bert::names;
use kiln_models::{Encoded, EncoderModel, ModelKind, TextInput};

use crate::admission::Aborted;
use crate::admission::{Admission, Gate};
use crate::batcher::{BatchLimits, Batcher};
use crate::config::{ModelConfig, ServeConfig};
use crate::error::AppError;
use crate::metrics::ModelMetrics;
use crate::supervise::Workers;

/// Which embedding the caller wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingKind {
    /// As the model folder says (sentence-transformers' Normalize module or not).
    Model,
    Normalized,
    Pooled,
}

impl EmbeddingKind {
    pub fn from_normalize(normalize: Option<bool>) -> Self {
        match normalize {
            None => Self::Model,
            Some(true) => Self::Normalized,
            Some(false) => Self::Pooled,
        }
    }

    fn output(self) -> &'static str {
        match self {
            Self::Model => names::SENTENCE_EMBEDDING,
            Self::Normalized => names::NORMALIZED_EMBEDDING,
            Self::Pooled => names::POOLED_EMBEDDING,
        }
    }
}

pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    /// Tokens run, special tokens included.
    pub tokens: usize,
}

pub struct Classified {
    pub logits: Vec<Vec<f32>>,
    pub probabilities: Vec<Vec<f32>>,
    pub tokens: usize,
}

#[derive(Clone)]
pub struct Infer {
    model: Arc<EncoderModel>,
    batcher: Batcher,
    gate: Gate,
    metrics: ModelMetrics,
    model_config: Arc<ModelConfig>,
    config: Arc<ServeConfig>,
    aborted: Aborted,
}

impl Infer {
    /// Starts the batcher for a loaded model. Must run inside the tokio runtime.
    pub fn start(
        model: Arc<EncoderModel>,
        model_config: Arc<ModelConfig>,
        gate: Gate,
        config: Arc<ServeConfig>,
        metrics: ModelMetrics,
        workers: &Workers,
        aborted: Aborted,
    ) -> std::io::Result<Self> {
        let limits = BatchLimits {
            max_batch_tokens: config.max_batch_tokens,
            max_batch_requests: config.max_batch_requests,
            max_batch_sequences: model_config.max_batch_sequences,
            max_queue_delay: config.max_queue_delay,
        };
        let admitted = {
            let gate = gate.clone();
            Box::new(move || gate.in_flight())
        };
        let batcher = Batcher::spawn(
            model.clone(),
            limits,
            metrics.clone(),
            admitted,
            workers,
            &model_config.id,
        )?;
        Ok(Self {
            model,
            model_config,
            batcher,
            gate,
            metrics,
            config,
            aborted,
        })
    }

    pub fn model(&self) -> &EncoderModel {
        &self.model
    }

    /// Requests admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.gate.in_flight()
    }

    /// The model, shared with the backend thread.
    pub fn model_arc(&self) -> &Arc<EncoderModel> {
        &self.model
    }

    /// A slot for one request, or 429 at once when `--max-concurrent-requests` are in progress.
    pub fn admit(&self) -> Result<Admission, AppError> {
        self.gate.admit()
    }

    /// Tokenizes on the blocking pool (tokenization is CPU work; the async workers must stay
    /// free to accept and answer).
    pub async fn tokenize(
        &self,
        inputs: Vec<TextInput>,
        truncate: Option<bool>,
    ) -> Result<Vec<Encoded>, AppError> {
        let truncate = truncate.unwrap_or(self.config.auto_truncate);
        let model = self.model.clone();
        let started = Instant::now();
        let encoded = tokio::task::spawn_blocking(move || model.tokenize(&inputs, truncate))
            .await
            .map_err(|_| AppError::internal())??;
        self.metrics
            .tokenization_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(encoded)
    }

    /// Runs token ids through the batch queue, within the request timeout.
    pub async fn run(
        &self,
        seqs: Vec<Encoded>,
        outputs: Vec<&'static str>,
    ) -> Result<Vec<Vec<Vec<f32>>>, AppError> {
        for s in &seqs {
            self.metrics.input_tokens.observe(s.len() as f64);
        }
        let timeout = self.config.request_timeout;
        let run = tokio::time::timeout(timeout, self.batcher.run(seqs, outputs));
        let outcome = tokio::select! {
            r = run => r,
            () = self.aborted.wait() => return Err(AppError::shutting_down()),
        };
        match outcome {
            Ok(result) => result.map(|o| o.rows),
            Err(_) => Err(AppError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!(
                    "the request was not answered within the request timeout ({timeout:?}); its work was dropped"
                ),
            )),
        }
    }

    pub fn is_embedding(&self) -> bool {
        matches!(self.model.info().kind, ModelKind::Embedding { .. })
    }

    fn require_embedding(&self) -> Result<(), AppError> {
        if self.is_embedding() {
            Ok(())
        } else {
            Err(AppError::validation(format!(
                "model `{}` is a classifier; it does not produce embeddings (use /predict)",
                self.model_config.id
            )))
        }
    }

    fn require_classifier(&self) -> Result<(), AppError> {
        if self.is_embedding() {
            Err(AppError::validation(format!(
                "model `{}` is an embedding model; this route needs a sequence classifier",
                self.model_config.id
            )))
        } else {
            Ok(())
        }
    }

    /// Checks a request's Matryoshka `dimensions` against the model's width: 422 unless
    /// `1 <= d <= width`.
    pub fn check_dimensions(&self, dimensions: Option<u64>) -> Result<Option<usize>, AppError> {
        let Some(d) = dimensions else {
            return Ok(None);
        };
        let width = self.model.info().embedding_size;
        if d == 0 || d > width as u64 {
            return Err(AppError::validation(format!(
                "model `{}` produces {width}-dimensional embeddings: dimensions must be between 1 and {width} (got {d})",
                self.model_config.id
            )));
        }
        Ok(Some(d as usize))
    }

    /// The prompt to prepend to a request's texts: its `prompt`, or the model's prompt named
    /// `prompt_name`, or the default (`--default-prompt-name`, else the folder's); 422 for both
    /// at once or an unknown name.
    pub fn prompt(
        &self,
        prompt_name: Option<&str>,
        prompt: Option<&str>,
    ) -> Result<Option<String>, AppError> {
        let info = self.model.info();
        let by_name = |name: &str| {
            info.prompts.get(name).cloned().ok_or_else(|| {
                let known: Vec<&str> = info.prompts.keys().map(String::as_str).collect();
                AppError::validation(format!(
                    "model `{}` has no prompt named `{name}` (its prompts: {})",
                    self.model_config.id,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            })
        };
        let chosen = match (prompt_name, prompt) {
            (Some(_), Some(_)) => {
                return Err(AppError::validation(
                    "give `prompt` or `prompt_name`, not both",
                ));
            }
            (None, Some(p)) => p.to_string(),
            (Some(name), None) => by_name(name)?,
            (None, None) => match self
                .model_config
                .default_prompt_name
                .as_deref()
                .or(info.default_prompt_name.as_deref())
            {
                Some(name) => by_name(name)?,
                None => return Ok(None),
            },
        };
        Ok((!chosen.is_empty()).then_some(chosen))
    }

    /// Whether `kind` of this model's embeddings is L2-normalised.
    pub fn is_normalized(&self, kind: EmbeddingKind) -> bool {
        match kind {
            EmbeddingKind::Normalized => true,
            EmbeddingKind::Pooled => false,
            EmbeddingKind::Model => matches!(
                self.model.info().kind,
                ModelKind::Embedding {
                    normalize: true,
                    ..
                }
            ),
        }
    }

    /// Embeddings of already tokenized sequences.
    pub async fn embed_ids(
        &self,
        seqs: Vec<Encoded>,
        kind: EmbeddingKind,
    ) -> Result<Embedded, AppError> {
        self.require_embedding()?;
        let tokens = seqs.iter().map(Encoded::len).sum();
        let mut rows = self.run(seqs, vec![kind.output()]).await?;
        Ok(Embedded {
            vectors: rows.swap_remove(0),
            tokens,
        })
    }

    pub async fn embed(
        &self,
        texts: Vec<String>,
        truncate: Option<bool>,
        kind: EmbeddingKind,
    ) -> Result<Embedded, AppError> {
        self.require_embedding()?;
        let inputs = texts.into_iter().map(TextInput::Single).collect();
        let seqs = self.tokenize(inputs, truncate).await?;
        self.embed_ids(seqs, kind).await
    }

    pub async fn classify_ids(&self, seqs: Vec<Encoded>) -> Result<Classified, AppError> {
        self.require_classifier()?;
        let tokens = seqs.iter().map(Encoded::len).sum();
        let mut rows = self
            .run(seqs, vec![names::LOGITS, names::PROBABILITIES])
            .await?;
        let probabilities = rows.pop().unwrap_or_default();
        let logits = rows.pop().unwrap_or_default();
        Ok(Classified {
            logits,
            probabilities,
            tokens,
        })
    }

    pub async fn classify(
        &self,
        inputs: Vec<TextInput>,
        truncate: Option<bool>,
    ) -> Result<Classified, AppError> {
        self.require_classifier()?;
        let seqs = self.tokenize(inputs, truncate).await?;
        self.classify_ids(seqs).await
    }
}

/// `prompt` before every text (sentence-transformers' prompts: the prompt is part of the text
/// the model reads).
pub fn with_prompt(texts: Vec<String>, prompt: Option<&str>) -> Vec<String> {
    match prompt {
        Some(p) => texts.into_iter().map(|t| format!("{p}{t}")).collect(),
        None => texts,
    }
}

/// Matryoshka truncation: keeps each vector's first `d` values and, when the vectors were
/// normalised, normalises them again (as TEI and OpenAI's `dimensions` do).
pub fn truncate_dimensions(vectors: &mut [Vec<f32>], d: usize, renormalize: bool) {
    for v in vectors {
        v.truncate(d);
        if renormalize {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm > 0.0 {
                v.iter_mut().for_each(|x| *x /= norm);
            }
        }
    }
}

#[cfg(test)]
mod matryoshka_tests {
    use super::truncate_dimensions;

    #[test]
    fn truncated_vectors_are_renormalised_when_they_were_normalised() {
        let mut v = vec![vec![0.6, 0.0, 0.8], vec![0.0, 0.0, 1.0]];
        truncate_dimensions(&mut v, 2, true);
        assert_eq!(v[0], [1.0, 0.0]);
        assert_eq!(v[1], [0.0, 0.0], "a zero vector stays zero");
        let mut v = vec![vec![3.0, 4.0, 5.0]];
        truncate_dimensions(&mut v, 2, false);
        assert_eq!(v[0], [3.0, 4.0]);
    }
}
