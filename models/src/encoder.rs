//! Encoders (BERT family): a Hugging Face folder in, an [`EncoderModel`] out. It reads
//! `config.json`, the weights in `model.safetensors` (memory-mapped, by Hugging Face parameter
//! names), `tokenizer.json` and the sentence-transformers files, and builds an engine graph
//! ([`bert::build`](crate::bert::build)) that the engine's loader compiles or reads from the plan
//! cache. What a caller gets back: text in, tokenization with kiln's truncation policy, batches
//! sorted by length and run padding-free (sequences packed back to back, attention by the varlen
//! kernels; the padded layout stays available for comparison), vectors out.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_engine::compile::CompileOptions;
use kiln_engine::ir::PoolMode;
use kiln_engine::{HostTensor, Runnable};

use crate::bert::{self, BatchLayout, Head, names};
use crate::config::{Architecture, BertConfig};
use crate::error::{ModelError, Result};
use crate::text::{Encoded, TextInput, TextTokenizer};
use crate::{
    DevicePlacement, LoadOptions, PlanInfo, quantize, require, resolve_device, st, weights,
};

/// What the model computes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelKind {
    Embedding { pooling: PoolMode, normalize: bool },
    Classifier { labels: Vec<String> },
}

/// Facts about a loaded model, for `/info`, logs and API answers.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub id: String,
    pub dir: PathBuf,
    pub architecture: String,
    pub kind: ModelKind,
    pub hidden_size: usize,
    /// An embedding model's vector width: `hidden_size`, or the last Dense module's output.
    pub embedding_size: usize,
    /// sentence-transformers prompts by name (`config_sentence_transformers.json`), prepended
    /// to texts on request, and the one used when a request names none.
    pub prompts: std::collections::BTreeMap<String, String>,
    pub default_prompt_name: Option<String>,
    pub num_layers: usize,
    /// Longest input in tokens (special tokens included); longer inputs are truncated or refused.
    pub max_input_tokens: usize,
    pub device: String,
    /// The resolved device, why, and the GPU adapter if any.
    pub placement: DevicePlacement,
    pub load_time: Duration,
    /// Time spent parsing `tokenizer.json` (part of every load, cached plan or not).
    pub tokenizer_time: Duration,
    /// How the compiled plan was obtained (compiled or read from the plan cache).
    pub plan: PlanInfo,
}

/// Per-request embedding options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EmbedOptions {
    /// Cut inputs longer than the model accepts instead of refusing them.
    pub truncate: bool,
    /// `None`: as the model folder says (sentence-transformers' Normalize module);
    /// `Some(true)`: always L2-normalise; `Some(false)`: the raw pooled vector.
    pub normalize: Option<bool>,
}

/// Embeddings for a list of texts, with the token count that produced them.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    /// Tokens run through the model, special tokens included (OpenAI's `usage.prompt_tokens`).
    pub tokens: usize,
}

/// One classified input.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    pub logits: Vec<f32>,
    pub probabilities: Vec<f32>,
}

/// A BERT-family encoder ready to run.
pub struct EncoderModel {
    info: ModelInfo,
    tokenizer: TextTokenizer,
    plan: Box<dyn Runnable>,
    pub(crate) max_batch: usize,
    layout: BatchLayout,
    /// Where position ids start (RoBERTa: `padding_idx + 1`).
    position_offset: i64,
    /// Whether the model has one token type only (RoBERTa): token type ids are fed as 0.
    single_token_type: bool,
}

impl std::fmt::Debug for EncoderModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncoderModel")
            .field("info", &self.info)
            .finish()
    }
}

/// The quantization options a load runs with: the calibrated scales of `int8-static` read from
/// `--quantize-scales` (default `<model>/kiln-quant.json`), and `int8-static`'s default deny
/// list (the feed-forward layers stay f32) unless layers were chosen; `--quantize-skip none`
/// asks for no deny list at all.
fn resolve_quantization(dir: &Path, opts: &LoadOptions) -> Result<kiln_engine::ExecOptions> {
    let mut exec = opts.exec.clone();
    if exec.quant.quantize == kiln_engine::Quantize::Int8Static && exec.quant.scales.is_none() {
        let path = opts
            .quantize_scales
            .clone()
            .unwrap_or_else(|| dir.join(quantize::SCALES_FILE));
        exec.quant.scales = Some(std::sync::Arc::new(quantize::read_scales(&path)?));
    }
    let skip_none = exec.quant.layers.deny.iter().any(|p| p == "none");
    exec.quant.layers.deny.retain(|p| p != "none");
    if exec.quant.quantize == kiln_engine::Quantize::Int8Static
        && exec.quant.layers.allow.is_empty()
        && exec.quant.layers.deny.is_empty()
        && !skip_none
    {
        exec.quant.layers.deny = bert::STATIC_INT8_DEFAULT_DENY
            .iter()
            .map(|p| p.to_string())
            .collect();
        tracing::info!(
            deny = ?exec.quant.layers.deny,
            "int8-static: keeping the feed-forward layers in f32 (the default deny list; \
             set --quantize-skip or --quantize-layers to choose)"
        );
    }
    Ok(exec)
}

impl EncoderModel {
    /// Loads a Hugging Face model folder.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        Ok(Self::load_inner(dir, opts, false)?.0)
    }

    /// Loads the model in f32 with one extra output per `Linear` input (for calibration): the
    /// model and, per `Linear` label, the output holding its input.
    pub(crate) fn load_for_calibration(
        dir: &Path,
        opts: &LoadOptions,
    ) -> Result<(Self, Vec<(String, String)>)> {
        Self::load_inner(dir, opts, true)
    }

    fn load_inner(
        dir: &Path,
        opts: &LoadOptions,
        calibrating: bool,
    ) -> Result<(Self, Vec<(String, String)>)> {
        let started = Instant::now();
        let (opts, placement) = resolve_device(opts)?;
        let opts = &opts;
        if !dir.is_dir() {
            return Err(ModelError::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found"),
            ));
        }
        let config_path = require(dir, "config.json")?;
        let cfg = BertConfig::load(&config_path)?;
        let weights_path = require(dir, "model.safetensors")?;
        let arch = cfg
            .architecture()
            .map_err(|m| ModelError::Unsupported(format!("{}: {m}", config_path.display())))?;
        let pipeline = st::Pipeline::load(dir)?;

        let (head, kind) = match arch {
            Architecture::Encoder => (
                Head::Embedding {
                    pooling: pipeline.pooling,
                    steps: pipeline.steps.clone(),
                    normalize: pipeline.normalize,
                },
                ModelKind::Embedding {
                    pooling: pipeline.pooling,
                    normalize: pipeline.normalize,
                },
            ),
            Architecture::SequenceClassification => {
                let n = cfg
                    .num_labels
                    .or_else(|| cfg.id2label.as_ref().map(|m| m.len()))
                    .unwrap_or(2);
                if n == 0 {
                    return Err(ModelError::file(
                        &config_path,
                        "a classifier needs at least one label",
                    ));
                }
                (
                    Head::Classifier { num_labels: n },
                    ModelKind::Classifier {
                        labels: cfg.labels(n),
                    },
                )
            }
        };

        let embedding_size = pipeline.output_width(cfg.hidden_size)?;
        let positions = cfg.max_tokens();
        let max_len = opts
            .max_seq_length
            .or(pipeline.max_seq_length)
            .unwrap_or(positions)
            .min(positions);
        if max_len < 2 {
            return Err(ModelError::Input(format!(
                "max_seq_length {max_len} leaves no room for text"
            )));
        }
        let tokenizing = Instant::now();
        let tokenizer = TextTokenizer::load(&require(dir, "tokenizer.json")?, max_len)?;
        let tokenizer_time = tokenizing.elapsed();
        let exec = resolve_quantization(dir, opts)?;
        // The plan is compiled and cached with the resolved quantization options (they are part
        // of the cache key). The calibration graph (one extra output per linear's input) runs as
        // built and is never cached.
        let load = LoadOptions {
            exec: exec.clone(),
            compile: if calibrating {
                CompileOptions::none()
            } else {
                opts.compile.clone()
            },
            cache_dir: if calibrating {
                None
            } else {
                opts.cache_dir.clone()
            },
            ..opts.clone()
        };
        // What shapes the graph besides the files: the head and the batch layout.
        let mut files = kiln_engine::load::existing_files(
            dir,
            &["config.json", "model.safetensors", "tokenizer.json"],
        );
        files.extend(pipeline.files.iter().filter(|p| p.is_file()).cloned());
        let spec = load.plan_spec(
            dir,
            files,
            [
                ("head".to_string(), format!("{head:?}")),
                ("layout".to_string(), format!("{:?}", opts.layout)),
            ],
        );
        let mut calibration = Vec::new();
        let (plan, plan_info) = kiln_engine::load::load(&spec, || -> Result<_> {
            // Only on a cache miss: the weights are read, decoded and built into a graph.
            let weights =
                weights::SafetensorsFile::open(&weights_path, "embeddings.word_embeddings.weight")?;
            let graph = bert::build(&cfg, &weights, head, opts.layout)?;
            if !calibrating {
                return Ok(graph);
            }
            let (graph, outputs) = kiln_engine::quantize::calibration_graph(graph);
            calibration = outputs;
            Ok(graph)
        })
        .map_err(|e| quantize::explain_load_error(e, &exec))?;
        quantize::log_formats(plan.linear_choices(), &exec);
        // Ask the engine which attention kernel runs at a short and at the longest length, log
        // it with the reason, and refuse a forced kernel that cannot run this model.
        for seq in [16.min(max_len), max_len] {
            let attention = plan.attention_plan(seq).map_err(|e| {
                ModelError::Unsupported(format!("sdpa_kernel = {}: {e}", opts.exec.sdpa_kernel))
            })?;
            for (node, kernel, reason) in attention {
                tracing::info!(seq, node = %node, kernel, reason = %reason, "attention kernel");
            }
        }
        let info = ModelInfo {
            id: dir
                .file_name()
                .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned()),
            dir: dir.to_path_buf(),
            architecture: cfg
                .architectures
                .first()
                .cloned()
                .unwrap_or_else(|| "BertModel".into()),
            kind,
            hidden_size: cfg.hidden_size,
            embedding_size,
            prompts: pipeline.prompts.clone(),
            default_prompt_name: pipeline.default_prompt_name.clone(),
            num_layers: cfg.num_hidden_layers,
            max_input_tokens: max_len,
            device: plan.backend_name(),
            placement,
            load_time: started.elapsed(),
            tokenizer_time,
            plan: plan_info,
        };
        tracing::info!(
            model = %info.id,
            architecture = %info.architecture,
            device = %info.device,
            max_input_tokens = info.max_input_tokens,
            sentence_transformers = pipeline.declared,
            plan_cache = info.plan.cache.as_str(),
            compile_ms = info.plan.compile_time.as_secs_f64() * 1e3,
            cache_load_ms = info.plan.cache_load_time.as_secs_f64() * 1e3,
            load_ms = info.load_time.as_millis() as u64,
            "model loaded"
        );
        info.plan.warn_on_trouble(&info.id);
        Ok((
            Self {
                info,
                tokenizer,
                plan,
                max_batch: opts.max_batch_sequences.max(1),
                layout: opts.layout,
                position_offset: cfg.position_offset() as i64,
                single_token_type: cfg.type_vocab_size == 1,
            },
            calibration,
        ))
    }

    /// Every `Linear` layer's weight format in the loaded plan.
    pub fn linear_formats(&self) -> &[kiln_engine::quantize::LinearChoice] {
        self.plan.linear_choices()
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// How batches are laid out: packed batches may mix lengths freely (a sequence's output
    /// is bit-identical in any packed batch); padded ones should group equal lengths.
    pub fn layout(&self) -> BatchLayout {
        self.layout
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Tokenizes inputs. With `truncate = false`, an input longer than the model accepts is an
    /// error naming its index and length.
    pub fn tokenize(&self, inputs: &[TextInput], truncate: bool) -> Result<Vec<Encoded>> {
        if inputs.is_empty() {
            return Err(ModelError::Input("input must not be empty".into()));
        }
        let encoded = self.tokenizer.encode(inputs)?;
        if !truncate && let Some((i, e)) = encoded.iter().enumerate().find(|(_, e)| e.truncated()) {
            return Err(ModelError::Input(format!(
                "input {i} has {} tokens; the model accepts at most {} (send truncate=true to cut it)",
                e.untruncated_len, self.info.max_input_tokens
            )));
        }
        Ok(encoded)
    }

    /// Runs one batch, in the given order. With the packed layout (the default) the sequences
    /// run back to back with no padding; with the padded one each is right-padded to the longest.
    /// Either way the outputs have the padded shapes (`last_hidden_state` is `[batch, seq,
    /// hidden]` with `seq` the longest sequence; in the packed layout its padding rows are zero).
    pub fn run_batch(&self, batch: &[Encoded]) -> Result<Vec<(String, HostTensor)>> {
        self.run(batch, true)
    }

    /// [`Self::run_batch`] for callers that read only the `[batch, width]` outputs (embeddings,
    /// logits): a packed batch's `last_hidden_state` stays packed `[1, tokens, hidden]` instead
    /// of being copied into the padded layout.
    pub fn run_batch_rows(&self, batch: &[Encoded]) -> Result<Vec<(String, HostTensor)>> {
        self.run(batch, false)
    }

    fn run(&self, batch: &[Encoded], pad_hidden: bool) -> Result<Vec<(String, HostTensor)>> {
        if batch.is_empty() || batch.iter().any(|e| e.is_empty()) {
            return Err(ModelError::Input(
                "a batch needs at least one non-empty sequence".into(),
            ));
        }
        let seq = batch.iter().map(Encoded::len).max().unwrap_or(0);
        if seq > self.info.max_input_tokens {
            return Err(ModelError::Input(format!(
                "a sequence has {seq} tokens; the model accepts at most {}",
                self.info.max_input_tokens
            )));
        }
        if let Some((r, e)) = batch
            .iter()
            .enumerate()
            .find(|(_, e)| e.type_ids.len() != e.ids.len())
        {
            return Err(ModelError::Input(format!(
                "sequence {r}: {} token type ids for {} ids",
                e.type_ids.len(),
                e.ids.len()
            )));
        }
        match self.layout {
            BatchLayout::Padded => self.run_padded(batch, seq),
            BatchLayout::Packed => self.run_packed(batch, seq, pad_hidden),
        }
    }

    fn run_padded(&self, batch: &[Encoded], seq: usize) -> Result<Vec<(String, HostTensor)>> {
        let b = batch.len();
        let mut ids = vec![0i64; b * seq];
        let mut types = vec![0i64; b * seq];
        let mut mask = vec![0i64; b * seq];
        let mut positions = vec![0i64; b * seq];
        for (r, e) in batch.iter().enumerate() {
            let row = r * seq;
            ids[row..row + e.len()].copy_from_slice(&e.ids);
            if !self.single_token_type {
                types[row..row + e.len()].copy_from_slice(&e.type_ids);
            }
            mask[row..row + e.len()].fill(1);
            for (p, slot) in positions[row..row + seq].iter_mut().enumerate() {
                *slot = self.position_offset + p as i64;
            }
        }
        let t = |v: Vec<i64>| HostTensor::i64(vec![b, seq], v);
        let feeds = vec![
            (names::INPUT_IDS.to_string(), t(ids)?),
            (names::TOKEN_TYPE_IDS.to_string(), t(types)?),
            (names::POSITION_IDS.to_string(), t(positions)?),
            (names::ATTENTION_MASK.to_string(), t(mask)?),
        ];
        Ok(self.plan.run(&feeds)?)
    }

    fn run_packed(
        &self,
        batch: &[Encoded],
        seq: usize,
        pad_hidden: bool,
    ) -> Result<Vec<(String, HostTensor)>> {
        let total: usize = batch.iter().map(Encoded::len).sum();
        let mut ids = Vec::with_capacity(total);
        let mut types = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        for e in batch {
            ids.extend_from_slice(&e.ids);
            if self.single_token_type {
                types.resize(types.len() + e.len(), 0);
            } else {
                types.extend_from_slice(&e.type_ids);
            }
            let start = self.position_offset;
            positions.extend(start..start + e.len() as i64);
        }
        let lengths: Vec<i64> = batch.iter().map(|e| e.len() as i64).collect();
        let t = |v: Vec<i64>| HostTensor::i64(vec![1, total], v);
        let feeds = vec![
            (names::INPUT_IDS.to_string(), t(ids)?),
            (names::TOKEN_TYPE_IDS.to_string(), t(types)?),
            (names::POSITION_IDS.to_string(), t(positions)?),
            (
                names::SEQUENCE_LENGTHS.to_string(),
                HostTensor::i64(vec![batch.len()], lengths)?,
            ),
        ];
        let mut outputs = self.plan.run(&feeds)?;
        if !pad_hidden {
            return Ok(outputs);
        }
        // Give last_hidden_state its padded shape so callers see one layout.
        if let Some((_, hidden)) = outputs
            .iter_mut()
            .find(|(n, _)| n == names::LAST_HIDDEN_STATE)
        {
            let h = *hidden.shape.last().unwrap_or(&0);
            let packed = hidden
                .as_f32()
                .filter(|p| p.len() == total * h)
                .ok_or_else(|| {
                    ModelError::Unsupported("last_hidden_state is not [1, tokens, h] F32".into())
                })?;
            let mut padded = vec![0.0f32; batch.len() * seq * h];
            let mut start = 0;
            for (r, e) in batch.iter().enumerate() {
                let n = e.len() * h;
                padded[r * seq * h..r * seq * h + n].copy_from_slice(&packed[start..start + n]);
                start += n;
            }
            *hidden = HostTensor::f32(vec![batch.len(), seq, h], padded)?;
        }
        Ok(outputs)
    }

    /// Runs every sequence, in sub-batches of similar length, and returns, for each requested
    /// `[batch, width]` output, row `i` for sequence `i`.
    fn rows_of<const N: usize>(
        &self,
        encoded: &[Encoded],
        wanted: [&str; N],
    ) -> Result<[Vec<Vec<f32>>; N]> {
        let mut order: Vec<usize> = (0..encoded.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].len()));
        let mut rows: [Vec<Vec<f32>>; N] = std::array::from_fn(|_| vec![Vec::new(); encoded.len()]);
        for chunk in order.chunks(self.max_batch) {
            let batch: Vec<Encoded> = chunk.iter().map(|&i| encoded[i].clone()).collect();
            let mut outputs = self.run(&batch, false)?;
            for (name, rows) in wanted.iter().zip(rows.iter_mut()) {
                let pos = outputs.iter().position(|(n, _)| n == name).ok_or_else(|| {
                    ModelError::Unsupported(format!("this model has no `{name}` output"))
                })?;
                let out = outputs.swap_remove(pos).1;
                let width = *out.shape.last().unwrap_or(&0);
                let data = out.into_f32().ok_or_else(|| {
                    ModelError::Unsupported(format!("output `{name}` is not F32"))
                })?;
                for (&i, row) in chunk.iter().zip(data.chunks(width.max(1))) {
                    rows[i] = row.to_vec();
                }
            }
        }
        Ok(rows)
    }

    /// One embedding per text.
    pub fn embed(&self, texts: &[String], opts: EmbedOptions) -> Result<Embeddings> {
        if !matches!(self.info.kind, ModelKind::Embedding { .. }) {
            return Err(ModelError::Input(format!(
                "model `{}` is a classifier; it does not produce embeddings",
                self.info.id
            )));
        }
        let inputs: Vec<TextInput> = texts.iter().map(|t| TextInput::Single(t.clone())).collect();
        let encoded = self.tokenize(&inputs, opts.truncate)?;
        let output = match opts.normalize {
            None => names::SENTENCE_EMBEDDING,
            Some(true) => names::NORMALIZED_EMBEDDING,
            Some(false) => names::POOLED_EMBEDDING,
        };
        let [vectors] = self.rows_of(&encoded, [output])?;
        Ok(Embeddings {
            vectors,
            tokens: encoded.iter().map(Encoded::len).sum(),
        })
    }

    /// Logits and probabilities per input (single texts or pairs).
    pub fn classify(&self, inputs: &[TextInput], truncate: bool) -> Result<Vec<Classification>> {
        if !matches!(self.info.kind, ModelKind::Classifier { .. }) {
            return Err(ModelError::Input(format!(
                "model `{}` is an embedding model; it has no classification head",
                self.info.id
            )));
        }
        let encoded = self.tokenize(inputs, truncate)?;
        let [logits, probabilities] =
            self.rows_of(&encoded, [names::LOGITS, names::PROBABILITIES])?;
        Ok(logits
            .into_iter()
            .zip(probabilities)
            .map(|(logits, probabilities)| Classification {
                logits,
                probabilities,
            })
            .collect())
    }

    /// Bytes of the weights the compiled plan holds (packed or quantized ones at their stored
    /// size); activations and, for a causal LM, the KV cache come on top.
    pub fn weight_bytes(&self) -> usize {
        self.plan.graph().constant_bytes()
    }

    /// Attention calls per kernel (`math`, `flash`, ... or `burn`) since the model was loaded.
    pub fn sdpa_kernel_counts(&self) -> Vec<(&'static str, u64)> {
        self.plan.sdpa_kernel_counts()
    }

    /// The labels of a classifier, in id order.
    pub fn labels(&self) -> &[String] {
        match &self.info.kind {
            ModelKind::Classifier { labels } => labels,
            ModelKind::Embedding { .. } => &[],
        }
    }
}
