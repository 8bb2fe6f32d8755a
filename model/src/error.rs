//! The crate's one error type.
//!
//! Every variant that concerns a file names the file, and every variant that concerns a
//! tensor names the tensor, so that a user handed a broken checkpoint can tell which piece is
//! broken without a debugger.

use std::path::PathBuf;

/// Errors from loading, splitting and running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    /// (The I/O error is part of the message rather than a `source`, so that error chains do
    /// not print it twice.)
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A file exists but its contents are not what its format requires (truncated, corrupt).
    #[error("{path}: not a valid {format} file: {reason}")]
    Format {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    /// The model configuration is missing a field or holds an impossible value.
    #[error("{path}: invalid model configuration: {reason}")]
    Config { path: PathBuf, reason: String },
    /// The checkpoint describes a model family that Tandem does not implement.
    #[error("{path}: unsupported architecture `{arch}` (Tandem runs the `llama` architecture)")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    /// A tensor the model needs is absent from the checkpoint.
    #[error("{path}: missing tensor `{tensor}`")]
    MissingTensor { path: PathBuf, tensor: String },
    /// A tensor is present but has the wrong shape.
    #[error("{path}: tensor `{tensor}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    /// A tensor is stored in a dtype Tandem cannot load.
    #[error("{path}: tensor `{tensor}` has unsupported dtype {dtype}")]
    TensorDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    /// The tokenizer could not be built, loaded or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be compiled or rendered.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A split part's manifest is unreadable, or the edge and cloud parts do not belong together.
    #[error("manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    /// The requested split point is impossible for this model.
    #[error("invalid split: {0}")]
    Split(String),
    /// A caller passed an input the model cannot take (wrong hidden size, out-of-range token id, …).
    #[error("invalid input: {0}")]
    Input(String),
    /// The KV cache could not hold or serve the batch (out of blocks, bad block table, …).
    #[error("KV cache: {0}")]
    Cache(String),
    /// An error inside a tensor operation.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            error,
        }
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
