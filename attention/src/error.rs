use thiserror::Error;

/// Why an attention call could not run.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SdpaError {
    #[error("sdpa: {what} has {actual} elements, expected {expected} for shape {shape}")]
    Length {
        what: &'static str,
        actual: usize,
        expected: usize,
        shape: String,
    },
    #[error("sdpa: invalid shape: {0}")]
    Shape(String),
    #[error("sdpa: kernel {kernel} cannot run this input: {reason}")]
    Unsupported {
        kernel: &'static str,
        reason: String,
    },
}
