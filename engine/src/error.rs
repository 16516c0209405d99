use thiserror::Error;

/// Errors from building, checking or running a graph.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The graph itself is malformed (a model-builder bug or a bad weight file).
    #[error("graph: {0}")]
    Graph(String),
    /// A run-time input does not fit the graph's declared inputs.
    #[error("input `{name}`: {reason}")]
    Input { name: String, reason: String },
    #[error(transparent)]
    Attention(#[from] kiln_attention::SdpaError),
    /// The backend failed or cannot run an op.
    #[error("backend {backend}: {reason}")]
    Backend { backend: String, reason: String },
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

pub(crate) fn graph_err(msg: impl Into<String>) -> EngineError {
    EngineError::Graph(msg.into())
}
