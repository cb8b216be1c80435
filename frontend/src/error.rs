use std::path::PathBuf;

/// Why the front end could not start; each names the file or address at fault. Errors of a
/// request are [`crate::api_error::ApiError`], which become HTTP answers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Text(#[from] moe_text::Error),
    #[error("{}: {message}", path.display())]
    Model { path: PathBuf, message: String },
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("--coordinator {endpoints}: {status}")]
    Client { endpoints: String, status: tonic::Status },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn model(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Model {
            path: path.into(),
            message: message.into(),
        }
    }
}
