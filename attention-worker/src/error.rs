#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] moe_model::Error),
    #[error(transparent)]
    Worker(#[from] moe_runtime::worker::WorkerError),
    /// Flags that cannot go together.
    #[error("{0}")]
    Flags(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
