//! Causal language models (GPT-2, Llama): loading, one engine step over a paged KV cache, and
//! text in and out (tokenizer with its byte-level decoder, chat templates).

pub mod chat;
pub mod config;
pub mod graph;
pub mod rope;
pub mod shards;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kiln_engine::{HostTensor, KvCache, KvCacheSpec, PagedBatch, Runnable};
use tokenizers::Tokenizer;

pub use config::{
    DecoderArch, DecoderConfig, GenerationDefaults, RopeConfig, RopeScaling, is_causal_lm,
};
pub use graph::{GraphMode, names};

use crate::error::{ModelError, Result};
use crate::{LoadOptions, PlanInfo, require};

/// Facts about a loaded decoder, for `/info`, logs and API answers.
#[derive(Debug, Clone)]
pub struct DecoderInfo {
    pub id: String,
    pub dir: PathBuf,
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    /// Longest context (prompt + generated tokens).
    pub max_context: usize,
    pub device: String,
    /// The resolved device, why, and the GPU adapter if any.
    pub placement: crate::DevicePlacement,
    pub load_time: Duration,
    /// How the paged plan came to be (compiled, or read from the plan cache).
    pub plan: PlanInfo,
}

/// One sequence's part of a step: the tokens it adds, where they start, and its blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSequence {
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]` (the number of tokens already in the cache).
    pub start: usize,
    pub block_table: Vec<u32>,
}

/// A decoder ready to run.
pub struct CausalLm {
    info: DecoderInfo,
    config: DecoderConfig,
    defaults: GenerationDefaults,
    tokenizer: Tokenizer,
    chat: Option<chat::ChatTemplate>,
    plan: Box<dyn Runnable>,
    /// The cache-free graph for [`CausalLm::full_logits`], built on first use.
    full: OnceLock<Box<dyn Runnable>>,
    options: LoadOptions,
}

impl std::fmt::Debug for CausalLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CausalLm")
            .field("info", &self.info)
            .finish()
    }
}

impl CausalLm {
    /// Loads a Hugging Face causal LM folder. `chat_template` overrides the folder's template
    /// (a Jinja file's text).
    pub fn load(dir: &Path, opts: &LoadOptions, chat_template: Option<String>) -> Result<Self> {
        let started = Instant::now();
        let (opts, placement) = crate::resolve_device(opts)?;
        let opts = &opts;
        let config_path = require(dir, "config.json")?;
        let config = DecoderConfig::load(&config_path)?;
        let defaults = GenerationDefaults::load(dir)?;
        let tok_path = require(dir, "tokenizer.json")?;
        let mut tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| ModelError::file(&tok_path, format!("cannot load tokenizer: {e}")))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| ModelError::file(&tok_path, format!("cannot clear truncation: {e}")))?;
        let chat = chat::ChatTemplate::load(dir, chat_template)?;
        let (plan, plan_info) = load_plan(dir, &config, opts, GraphMode::Paged)?;
        for seq in [
            16.min(config.max_position_embeddings),
            config.max_position_embeddings,
        ] {
            let attention = plan.attention_plan(seq).map_err(|e| {
                ModelError::Unsupported(format!("sdpa_kernel = {}: {e}", opts.exec.sdpa_kernel))
            })?;
            if let Some((node, kernel, reason)) = attention.first() {
                tracing::info!(seq, node = %node, kernel, reason = %reason, "attention kernel");
            }
        }
        let info = DecoderInfo {
            id: dir
                .file_name()
                .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned()),
            dir: dir.to_path_buf(),
            architecture: config.architecture.clone(),
            vocab_size: config.vocab_size,
            hidden_size: config.hidden_size,
            num_layers: config.num_layers,
            max_context: config.max_position_embeddings,
            device: plan.backend_name(),
            placement,
            load_time: started.elapsed(),
            plan: plan_info,
        };
        tracing::info!(
            model = %info.id,
            architecture = %info.architecture,
            device = %info.device,
            max_context = info.max_context,
            chat_template = chat.is_some(),
            plan_cache = info.plan.cache.as_str(),
            compile_ms = info.plan.compile_time.as_secs_f64() * 1e3,
            cache_load_ms = info.plan.cache_load_time.as_secs_f64() * 1e3,
            load_ms = info.load_time.as_millis() as u64,
            "causal LM loaded"
        );
        info.plan.warn_on_trouble(&info.id);
        Ok(Self {
            info,
            config,
            defaults,
            tokenizer,
            chat,
            plan,
            full: OnceLock::new(),
            options: opts.clone(),
        })
    }

    pub fn info(&self) -> &DecoderInfo {
        &self.info
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    pub fn generation_defaults(&self) -> &GenerationDefaults {
        &self.defaults
    }

    pub fn chat_template(&self) -> Option<&chat::ChatTemplate> {
        self.chat.as_ref()
    }

    /// End-of-sequence ids: `generation_config.json`'s, else `config.json`'s.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        if self.defaults.eos_token_ids.is_empty() {
            self.config.eos_token_ids.clone()
        } else {
            self.defaults.eos_token_ids.clone()
        }
    }

    /// Token ids of a text, with whatever special tokens the tokenizer's post-processor adds.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let e = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| ModelError::Tokenize(e.to_string()))?;
        Ok(e.get_ids().to_vec())
    }

    /// Text of token ids, special tokens skipped; invalid UTF-8 from byte-level tokens becomes
    /// U+FFFD, as `tokenizers` decodes it.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenize(e.to_string()))
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// The KV cache spec for `num_blocks` blocks of `block_size` tokens.
    pub fn kv_spec(&self, num_blocks: usize, block_size: usize) -> KvCacheSpec {
        KvCacheSpec {
            layers: self.config.num_layers,
            kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
            block_size,
            num_blocks,
        }
    }

    pub fn new_kv_cache(&self, num_blocks: usize, block_size: usize) -> Result<KvCache> {
        Ok(self
            .plan
            .new_kv_cache(self.kv_spec(num_blocks, block_size))?)
    }

    /// Bytes of the weights the compiled plan holds (packed or quantized ones at their stored
    /// size); activations and, for a causal LM, the KV cache come on top.
    pub fn weight_bytes(&self) -> usize {
        self.plan.graph().constant_bytes()
    }

    /// Attention calls per kernel since the model was loaded.
    pub fn sdpa_kernel_counts(&self) -> Vec<(&'static str, u64)> {
        self.plan.sdpa_kernel_counts()
    }

    /// Position inputs for sequences of `(start, count)` tokens: `position_ids` for GPT-2, RoPE
    /// tables for Llama (each sequence's own dynamic-RoPE length).
    fn position_feeds(&self, spans: &[(usize, usize)]) -> Result<Vec<(String, HostTensor)>> {
        let total: usize = spans.iter().map(|s| s.1).sum();
        match &self.config.rope {
            None => {
                let pos: Vec<i64> = spans
                    .iter()
                    .flat_map(|&(start, n)| (start..start + n).map(|p| p as i64))
                    .collect();
                Ok(vec![(
                    names::POSITION_IDS.into(),
                    HostTensor::i64(vec![1, total], pos)?,
                )])
            }
            Some(rope) => {
                let half = rope.rotary_dim / 2;
                let (mut cos, mut sin) = (
                    Vec::with_capacity(total * half),
                    Vec::with_capacity(total * half),
                );
                for &(start, n) in spans {
                    let freqs = rope.frequencies(start + n);
                    rope.extend_tables(&freqs, start..start + n, &mut cos, &mut sin);
                }
                Ok(vec![
                    (
                        names::ROPE_COS.into(),
                        HostTensor::f32(vec![1, total, half], cos)?,
                    ),
                    (
                        names::ROPE_SIN.into(),
                        HostTensor::f32(vec![1, total, half], sin)?,
                    ),
                ])
            }
        }
    }

    fn token_feeds(
        &self,
        seqs: impl Iterator<Item = (usize, Vec<u32>)> + Clone,
    ) -> Result<Vec<(String, HostTensor)>> {
        let ids: Vec<i64> = seqs
            .clone()
            .flat_map(|(_, t)| t.into_iter().map(i64::from))
            .collect();
        let spans: Vec<(usize, usize)> = seqs.map(|(start, t)| (start, t.len())).collect();
        let total = ids.len();
        let lengths: Vec<i64> = spans.iter().map(|s| s.1 as i64).collect();
        let mut feeds = vec![
            (
                names::INPUT_IDS.into(),
                HostTensor::i64(vec![1, total], ids)?,
            ),
            (
                names::SEQUENCE_LENGTHS.into(),
                HostTensor::i64(vec![spans.len()], lengths)?,
            ),
        ];
        feeds.extend(self.position_feeds(&spans)?);
        Ok(feeds)
    }

    fn check_context(&self, end: usize) -> Result<()> {
        if end > self.info.max_context {
            return Err(ModelError::Input(format!(
                "a sequence reaches {end} tokens; the model's context is {}",
                self.info.max_context
            )));
        }
        Ok(())
    }

    /// One engine step: every sequence's new tokens run through the model, their keys and
    /// values land in `cache`, and the logits of each sequence's last token come back.
    pub fn step(&self, cache: &mut KvCache, seqs: &[StepSequence]) -> Result<Vec<Vec<f32>>> {
        if seqs.is_empty() || seqs.iter().any(|s| s.tokens.is_empty()) {
            return Err(ModelError::Input(
                "a step needs at least one sequence, each with a token".into(),
            ));
        }
        for s in seqs {
            self.check_context(s.start + s.tokens.len())?;
        }
        let feeds = self.token_feeds(seqs.iter().map(|s| (s.start, s.tokens.clone())))?;
        let batch = PagedBatch {
            q_lens: seqs.iter().map(|s| s.tokens.len()).collect(),
            context_lens: seqs.iter().map(|s| s.start + s.tokens.len()).collect(),
            block_tables: seqs.iter().map(|s| s.block_table.clone()).collect(),
        };
        let out = self.plan.run_paged(&feeds, cache, &batch)?;
        rows(out, seqs.len(), self.config.vocab_size)
    }

    /// Logits at every position of whole sequences, without a cache (the `Full` graph, built
    /// on first use): what the fixture tests compare against PyTorch.
    pub fn full_logits(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<Vec<f32>>>> {
        if seqs.is_empty() || seqs.iter().any(Vec::is_empty) {
            return Err(ModelError::Input("every sequence needs a token".into()));
        }
        for s in seqs {
            self.check_context(s.len())?;
        }
        let plan = match self.full.get() {
            Some(p) => p,
            None => {
                let (plan, info) =
                    load_plan(&self.info.dir, &self.config, &self.options, GraphMode::Full)?;
                info.warn_on_trouble(&self.info.id);
                self.full.get_or_init(|| plan)
            }
        };
        let feeds = self.token_feeds(seqs.iter().map(|s| (0, s.clone())))?;
        let out = plan.run(&feeds)?;
        let total: usize = seqs.iter().map(Vec::len).sum();
        let flat = rows(out, total, self.config.vocab_size)?;
        let mut it = flat.into_iter();
        Ok(seqs
            .iter()
            .map(|s| it.by_ref().take(s.len()).collect())
            .collect())
    }
}

/// The plan of one graph mode of the decoder in `dir`: read from the plan cache, or built from
/// the weights and compiled with the compiler's passes, as every encoder load does
/// (`opts.compile` turns them off the same way): the MLP's activation becomes its first GEMM's
/// epilogue, the q/k/v projections one GEMM read by head. The weights are opened only when the
/// cache has no entry.
fn load_plan(
    dir: &Path,
    config: &DecoderConfig,
    opts: &LoadOptions,
    mode: GraphMode,
) -> Result<(Box<dyn Runnable>, PlanInfo)> {
    let mut files = kiln_engine::load::existing_files(dir, &["config.json"]);
    files.extend(shards::Weights::files(dir)?);
    let options = [
        (
            "graph".to_string(),
            format!("decoder {}", config.architecture),
        ),
        ("mode".to_string(), format!("{mode:?}")),
    ];
    let spec = opts.plan_spec(dir, files, options);
    kiln_engine::load::load(&spec, || {
        let weights = shards::Weights::open(dir)?;
        graph::build(config, &weights, mode)
    })
}

/// Rows of the `logits` output.
fn rows(out: Vec<(String, HostTensor)>, n: usize, vocab: usize) -> Result<Vec<Vec<f32>>> {
    let logits = out
        .into_iter()
        .find(|(name, _)| name == names::LOGITS)
        .and_then(|(_, t)| t.into_f32())
        .filter(|v| v.len() == n * vocab)
        .ok_or_else(|| ModelError::Unsupported("the graph returned no [n, vocab] logits".into()))?;
    Ok(logits.chunks(vocab).map(<[f32]>::to_vec).collect())
}
