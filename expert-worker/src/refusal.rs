//! Why an expert worker did not compute a dispatch message. The refusal is the answer to that
//! message; the stream and every other message go on.

use moe_runtime::dispatch::DecodeError;
use tonic::Code;

#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Malformed(#[from] DecodeError),
    #[error("placement version {version} is not served here (serving {served:?})")]
    Version { version: u64, served: Vec<u64> },
    #[error("rows over NCCL, but this worker is not on the NCCL data plane")]
    NotOnNccl,
    #[error("rows over NCCL epoch {epoch}, but this worker holds {held}")]
    NcclEpoch { epoch: u64, held: String },
    #[error("NCCL sender rank {sender}: this is rank {rank} of {world}")]
    NcclSender { sender: usize, rank: usize, world: usize },
    /// The products themselves failed (an expert not held, bad rows).
    #[error("{0}")]
    Compute(moe_model::Error),
    /// Receiving the rows or sending the answer over NCCL failed.
    #[error("{0}")]
    Nccl(moe_model::Error),
    #[error("expert task failed: {0}")]
    Task(String),
}

impl Refusal {
    pub fn code(&self) -> Code {
        match self {
            Refusal::Malformed(e) => e.code(),
            Refusal::Version { .. } | Refusal::NotOnNccl | Refusal::NcclEpoch { .. } => Code::FailedPrecondition,
            Refusal::NcclSender { .. } => Code::InvalidArgument,
            Refusal::Compute(e) => moe_runtime::convert::status(e).code(),
            Refusal::Nccl(_) => Code::Unavailable,
            Refusal::Task(_) => Code::Internal,
        }
    }
}
