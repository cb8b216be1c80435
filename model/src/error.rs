//! The one error type of the model crate.

use std::path::PathBuf;

/// Everything that can go wrong while configuring, loading or running a model.
///
/// Variants carry the name of the offending thing (config field, tensor, file) so a message can
/// be acted on without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {path}: {message}")]
    ConfigParse { path: PathBuf, message: String },

    #[error("config field `{field}` = {value}: {reason}")]
    ConfigField {
        field: &'static str,
        value: String,
        reason: String,
    },

    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    #[error("tensor `{tensor}` in {file}: {reason}")]
    Tensor {
        tensor: String,
        file: PathBuf,
        reason: String,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid input: {0}")]
    InvalidInput(String),

    #[error("KV cache full: sequence {seq} needs {needed} more blocks, {free} free")]
    KvCacheFull { seq: u64, needed: usize, free: usize },

    #[error("expert ({layer}, {expert}) is not held here")]
    ExpertNotHeld { layer: usize, expert: usize },

    /// The routed-expert unit could not compute a layer. Units that run elsewhere say why in
    /// their own error (the source); another attempt later may succeed.
    #[error("routed experts: {0}")]
    Experts(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// The compute device cannot be used (no GPU support built in, no driver, no such GPU, or
    /// a CUDA call failed).
    #[error("device: {0}")]
    Device(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn field(field: &'static str, value: impl std::fmt::Debug, reason: impl Into<String>) -> Self {
        Error::ConfigField {
            field,
            value: format!("{value:?}"),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
