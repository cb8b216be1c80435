//! The gRPC status each refusal of the cluster state becomes: the one place that picks codes,
//! so the state itself knows nothing of the wire. Messages are the errors' own.

use tonic::Status;

use crate::cluster::RegisterError;
use crate::members::DrainError;
use crate::nccl::PublishError;
use crate::placements::PlacementError;
use crate::requests::PickError;

impl From<RegisterError> for Status {
    fn from(e: RegisterError) -> Self {
        match e {
            RegisterError::OtherModel { .. } | RegisterError::NotRecorded => Status::failed_precondition(e.to_string()),
            RegisterError::IdInUse { .. } => Status::unavailable(e.to_string()),
            RegisterError::NoRole | RegisterError::Address(_) | RegisterError::Id(_) => {
                Status::invalid_argument(e.to_string())
            }
            RegisterError::Away(_) => Status::unavailable(e.to_string()),
        }
    }
}

impl From<DrainError> for Status {
    fn from(e: DrainError) -> Self {
        match e {
            DrainError::Unknown(_) => Status::not_found(e.to_string()),
            DrainError::Away(_) => Status::unavailable(e.to_string()),
            DrainError::LastWorker { .. } => Status::failed_precondition(e.to_string()),
        }
    }
}

impl From<PlacementError> for Status {
    fn from(e: PlacementError) -> Self {
        match e {
            // Passes by itself once expert workers have loaded a placement: retry later.
            PlacementError::NoPlacement | PlacementError::Away(_) => Status::unavailable(e.to_string()),
            PlacementError::StillLoading(_) | PlacementError::NoLoad(_) | PlacementError::Plan(_) => {
                Status::failed_precondition(e.to_string())
            }
        }
    }
}

impl From<PublishError> for Status {
    fn from(e: PublishError) -> Self {
        Status::failed_precondition(e.to_string())
    }
}

impl From<PickError> for Status {
    /// Only once the request's wait for a ready cluster is over.
    fn from(e: PickError) -> Self {
        Status::unavailable(format!("cluster not ready: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_proto::v1::Role;
    use tonic::Code;

    #[test]
    fn refusals_keep_their_codes_and_messages() {
        let cases: Vec<(Status, Code, &str)> = vec![
            (
                RegisterError::Address("nowhere".into()).into(),
                Code::InvalidArgument,
                "address `nowhere` is not host:port",
            ),
            (
                DrainError::Unknown("attn-9".into()).into(),
                Code::NotFound,
                "no worker `attn-9` in the cluster",
            ),
            (
                DrainError::LastWorker {
                    worker: "attn-1".into(),
                    role: Role::Attention,
                }
                .into(),
                Code::FailedPrecondition,
                "`attn-1` is the last attention worker; draining it would stop the cluster",
            ),
            (
                PlacementError::NoPlacement.into(),
                Code::Unavailable,
                "no placement yet: waiting for expert workers",
            ),
            (
                PlacementError::StillLoading(4).into(),
                Code::FailedPrecondition,
                "placement 4 is still loading; rebalance once it is active",
            ),
            (
                PublishError::WrongLength(12).into(),
                Code::FailedPrecondition,
                "an NCCL unique id has 128 bytes, got 12",
            ),
            (
                PickError::NoAttentionWorker.into(),
                Code::Unavailable,
                "cluster not ready: no attention worker has received the expert placement yet",
            ),
        ];
        for (status, code, message) in cases {
            assert_eq!((status.code(), status.message()), (code, message));
        }
    }
}
