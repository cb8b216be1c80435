#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] moe_model::Error),
    #[error(transparent)]
    Worker(#[from] moe_runtime::worker::WorkerError),
    #[error("coordinator: {0}")]
    Coordinator(#[from] tonic::Status),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
