//! Why a layer dispatch failed, and what the dispatch does about it.

use std::time::Duration;

use tonic::Code;

use super::link::LinkError;
use super::split::NotHeld;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DispatchError {
    #[error("no expert placement received yet")]
    NoPlacement,
    #[error(transparent)]
    NotHeld(#[from] NotHeld),
    #[error("expert worker {worker}: {error}")]
    Worker { worker: String, error: LinkError },
    #[error("the placement changed while waiting for expert worker {worker}")]
    PlacementChanged { worker: String },
    #[error("NCCL exchange: {0}")]
    Nccl(String),
    #[error("no new expert placement within {waited:?} after: {last}")]
    NoNewPlacement { waited: Duration, last: Box<DispatchError> },
    #[error("{attempts} attempts failed; the last: {last}")]
    Exhausted { attempts: usize, last: Box<DispatchError> },
}

impl DispatchError {
    /// The model crate's view: a placement that lacks an expert is the model's own error;
    /// anything else is the routed-expert unit failing.
    pub fn into_model(self) -> moe_model::Error {
        match self {
            DispatchError::NotHeld(NotHeld { layer, expert }) => moe_model::Error::ExpertNotHeld { layer, expert },
            other => moe_model::Error::Experts(Box::new(other)),
        }
    }
}

/// What a layer dispatch does after a failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Next {
    /// Fail the layer with the error.
    GiveUp,
    /// Send again now: over gRPC after NCCL failed, or on the placement that already replaced
    /// the failed one.
    AtOnce,
    /// Wait for the coordinator to publish a newer placement and send on it; report this
    /// worker and reason as failed first, when one is named.
    NewPlacement { suspect: Option<(String, String)> },
}

/// The retry rule. Transport failures and refusals about the placement can succeed on a new
/// placement; any failure over NCCL is retried at once over gRPC (its communicator is given
/// up); a malformed answer or another refusal over gRPC would fail again.
pub(crate) fn next_step(error: &DispatchError, over_nccl: bool, placement_moved: bool) -> Next {
    let on_new_placement = |suspect| match placement_moved {
        true => Next::AtOnce,
        false => Next::NewPlacement { suspect },
    };
    match error {
        DispatchError::NotHeld(_) | DispatchError::NoNewPlacement { .. } | DispatchError::Exhausted { .. } => {
            Next::GiveUp
        }
        _ if over_nccl => Next::AtOnce,
        DispatchError::NoPlacement => on_new_placement(None),
        DispatchError::PlacementChanged { .. } => Next::AtOnce,
        DispatchError::Worker { worker, error } => {
            let about_placement = matches!(error, LinkError::Refused { code, .. } if *code == Code::FailedPrecondition);
            if error.is_transport() || about_placement {
                on_new_placement(Some((worker.clone(), error.to_string())))
            } else {
                Next::GiveUp
            }
        }
        DispatchError::Nccl(_) => Next::GiveUp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(error: LinkError) -> DispatchError {
        DispatchError::Worker {
            worker: "w1".into(),
            error,
        }
    }

    #[test]
    fn transport_failures_report_the_worker_and_wait_for_a_new_placement() {
        for e in [
            LinkError::Unreachable("connection refused".into()),
            LinkError::Closed("dispatch stream ended".into()),
            LinkError::Timeout(Duration::from_secs(30)),
            LinkError::Refused {
                code: Code::FailedPrecondition,
                message: "placement version 3 is not served here".into(),
            },
        ] {
            let why = e.to_string();
            assert_eq!(
                next_step(&worker(e), false, false),
                Next::NewPlacement {
                    suspect: Some(("w1".into(), why))
                }
            );
        }
        // The placement already moved on since the failed send: the worker may be fine.
        assert_eq!(
            next_step(&worker(LinkError::Closed("x".into())), false, true),
            Next::AtOnce
        );
        assert_eq!(
            next_step(&DispatchError::NoPlacement, false, false),
            Next::NewPlacement { suspect: None }
        );
        assert_eq!(
            next_step(&DispatchError::PlacementChanged { worker: "w1".into() }, false, false),
            Next::AtOnce
        );
    }

    #[test]
    fn what_would_fail_again_is_not_retried_over_grpc_but_everything_is_over_nccl() {
        let bad = [
            worker(LinkError::Malformed("answered 3 rows for 2 sent".into())),
            worker(LinkError::Refused {
                code: Code::InvalidArgument,
                message: "layer 9 out of range".into(),
            }),
            DispatchError::Nccl("deadline".into()),
        ];
        for e in &bad {
            assert_eq!(next_step(e, false, false), Next::GiveUp, "{e}");
            assert_eq!(next_step(e, true, false), Next::AtOnce, "{e}");
        }
        let not_held = DispatchError::NotHeld(NotHeld { layer: 0, expert: 3 });
        assert_eq!(next_step(&not_held, true, true), Next::GiveUp);
        assert!(matches!(
            not_held.into_model(),
            moe_model::Error::ExpertNotHeld { layer: 0, expert: 3 }
        ));
        let exhausted = DispatchError::Exhausted {
            attempts: 9,
            last: Box::new(DispatchError::NoPlacement),
        };
        assert_eq!(next_step(&exhausted, false, true), Next::GiveUp);
        assert!(matches!(exhausted.into_model(), moe_model::Error::Experts(_)));
    }
}
