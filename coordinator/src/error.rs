#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] moe_model::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("placement: {0}")]
    Plan(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
