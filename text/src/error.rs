use std::path::PathBuf;

/// Everything that can go wrong in this crate; each variant names the file, line, token or
/// template at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// A line of a tiktoken ranks file that is not `base64 rank`, or repeats a token or rank.
    #[error("{}:{line}: {message}", path.display())]
    Ranks {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// `tokenizer_config.json` (or `config.json`) unreadable as JSON or inconsistent.
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error("token id {0} is outside the tokenizer's vocabulary")]
    UnknownId(u32),
    #[error("tokenizing: {0}")]
    Encode(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }
}
