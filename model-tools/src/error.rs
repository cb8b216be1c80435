//! The one error type of the tools crate.

use std::path::PathBuf;

/// Everything that can go wrong while checking a fixture or writing a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The fixture directory holds something the checker cannot use.
    #[error("fixture {path}: {reason}")]
    Fixture { path: PathBuf, reason: String },

    /// The model core refused (config, checkpoint, tensor, forward pass).
    #[error(transparent)]
    Model(#[from] moe_model::Error),

    /// The tokenizer of a generated model could not be written or read.
    #[error(transparent)]
    Text(#[from] moe_text::Error),

    /// The thing being checked failed (a cluster endpoint that cannot be reached or refuses);
    /// the message names it.
    #[error("{0}")]
    Target(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid input: {0}")]
    InvalidInput(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
