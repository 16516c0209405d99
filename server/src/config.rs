//! Resolved, validated serving configuration (the second stage after raw CLI flags and env vars).

use std::path::PathBuf;

use kiln_engine::{DeviceKind, SdpaKernelChoice};
use kiln_models::BatchLayout;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model_dir: PathBuf,
    /// The name clients see in `/v1/models`, responses and `/info`.
    pub model_id: String,
    pub device: DeviceKind,
    pub sdpa_kernel: SdpaKernelChoice,
    /// Packed (padding-free) or padded engine batches.
    pub batch_layout: BatchLayout,
    /// Most sequences one engine call runs; bigger requests are split.
    pub max_batch_sequences: usize,
    /// Most inputs one request may carry (413 beyond).
    pub max_client_batch_size: usize,
    /// Requests waiting for the backend beyond this are refused with 503 at once.
    pub max_queued_requests: usize,
    /// Largest request body in bytes (413 beyond).
    pub payload_limit: usize,
    /// Cut inputs longer than the model accepts (sentence-transformers' behaviour) unless a
    /// request says `truncate: false`.
    pub auto_truncate: bool,
    pub max_seq_length: Option<usize>,
}

impl ServeConfig {
    /// Checks the cross-field rules that flags alone cannot express.
    pub fn validate(self) -> Result<Self, String> {
        for (name, v) in [
            ("max-batch-sequences", self.max_batch_sequences),
            ("max-client-batch-size", self.max_client_batch_size),
            ("max-queued-requests", self.max_queued_requests),
            ("payload-limit", self.payload_limit),
        ] {
            if v == 0 {
                return Err(format!("--{name} must be at least 1"));
            }
        }
        if self.max_seq_length.is_some_and(|n| n < 2) {
            return Err("--max-seq-length must be at least 2 (room for [CLS] and [SEP])".into());
        }
        if self.model_id.trim().is_empty() {
            return Err("--model-id must not be empty".into());
        }
        Ok(self)
    }

    /// A config for tests: the given model folder with every default.
    pub fn for_model(model_dir: PathBuf) -> Self {
        let model_id = model_dir
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
        Self {
            model_dir,
            model_id,
            device: DeviceKind::Cpu,
            sdpa_kernel: SdpaKernelChoice::Auto,
            batch_layout: BatchLayout::Packed,
            max_batch_sequences: 32,
            max_client_batch_size: 256,
            max_queued_requests: 512,
            payload_limit: 2 * 1024 * 1024,
            auto_truncate: true,
            max_seq_length: None,
        }
    }
}
