//! The `Expert` gRPC service: one long-lived dispatch stream per attention worker. Each message
//! is decoded and checked on its own (`moe_runtime::dispatch`); a bad one is answered with a
//! refusal and the stream goes on.

use std::pin::Pin;
use std::sync::Arc;

use moe_model::cuda::NcclComm;
use moe_model::experts::ExpertCompute;
use moe_proto::v1::expert_server::Expert;
use moe_proto::v1::{DispatchRequest, DispatchResponse};
use moe_runtime::dispatch::{Answer, Dispatch, DispatchLimits, Rows};
use moe_runtime::nccl::{NcclAgent, STEP_TIMEOUT};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::refusal::Refusal;
use crate::state::ExpertState;

pub struct ExpertService {
    pub state: Arc<ExpertState>,
    /// This worker's place on the NCCL data plane (`--nccl-device`), if any.
    pub nccl: Option<NcclAgent>,
}

/// The communicator a message's rows arrive on: this worker must hold the epoch the sender
/// used, and the sender must be another rank of it.
fn nccl_peer(agent: Option<&NcclAgent>, epoch: u64, sender: usize) -> Result<Arc<NcclComm>, Refusal> {
    let agent = agent.ok_or(Refusal::NotOnNccl)?;
    // Any epoch this worker holds a communicator for: the sender learns that the group is
    // ready a heartbeat before this worker may.
    let comm = agent.communicator(epoch).ok_or_else(|| Refusal::NcclEpoch {
        epoch,
        held: match agent.ready_epoch() {
            0 => "no communicator".to_owned(),
            e => format!("epoch {e}"),
        },
    })?;
    if sender >= comm.world_size() || sender == comm.rank() {
        return Err(Refusal::NcclSender {
            sender,
            rank: comm.rank(),
            world: comm.world_size(),
        });
    }
    Ok(comm)
}

/// Where a message's rows are: in it, or arriving over NCCL from `sender` of `comm` (and the
/// answer goes back the same way).
enum Source {
    Inline(Vec<f32>, moe_proto::tensor::WireDtype),
    Nccl { comm: Arc<NcclComm>, sender: usize },
}

impl ExpertService {
    /// Runs one dispatch message: decoding, then the grouped SwiGLU off the async threads
    /// (with the NCCL receive and send around it when the rows travel over NCCL).
    async fn handle(
        state: Arc<ExpertState>,
        nccl: Option<NcclAgent>,
        req: &DispatchRequest,
    ) -> Result<Answer, Refusal> {
        let config = &state.config;
        // Protocol, then placement version (a stale sender is told so, and retries on the new
        // placement), then the rest, before any compute.
        Dispatch::check_protocol(req)?;
        let experts = state
            .serving(req.placement_version)
            .map_err(|served| Refusal::Version {
                version: req.placement_version,
                served,
            })?;
        let dispatch = Dispatch::decode(req, &DispatchLimits::for_model(config))?;
        let source = match dispatch.rows {
            Rows::Inline { values, dtype } => Source::Inline(values, dtype),
            Rows::Nccl { epoch, sender_rank } => Source::Nccl {
                comm: nccl_peer(nccl.as_ref(), epoch, sender_rank)?,
                sender: sender_rank,
            },
        };
        let started = std::time::Instant::now();
        let (h, n, layer, assignments) = (
            config.hidden_size,
            dispatch.num_rows,
            dispatch.layer,
            dispatch.assignments,
        );
        let answer = tokio::task::spawn_blocking(move || -> Result<Answer, Refusal> {
            match source {
                Source::Inline(values, dtype) => {
                    let values = experts
                        .compute(layer, &values, n, &assignments)
                        .map_err(Refusal::Compute)?;
                    // Answered in the dtype the rows came in.
                    Ok(Answer::Inline { values, dtype })
                }
                Source::Nccl { comm, sender } => {
                    let values = comm
                        .exchange(&[], &[(sender, n * h)], STEP_TIMEOUT)
                        .map_err(Refusal::Nccl)?
                        .remove(0);
                    let out = experts
                        .compute(layer, &values, n, &assignments)
                        .map_err(Refusal::Compute)?;
                    comm.exchange(&[(sender, &out)], &[], STEP_TIMEOUT)
                        .map_err(Refusal::Nccl)?;
                    Ok(Answer::Nccl { rows: n })
                }
            }
        })
        .await
        .map_err(|e| Refusal::Task(e.to_string()))??;
        state.count_dispatch(n, started.elapsed());
        Ok(answer)
    }
}

#[tonic::async_trait]
impl Expert for ExpertService {
    type DispatchStream = Pin<Box<dyn Stream<Item = Result<DispatchResponse, Status>> + Send>>;

    async fn dispatch(
        &self,
        request: Request<Streaming<DispatchRequest>>,
    ) -> Result<Response<Self::DispatchStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let state = self.state.clone();
        let nccl = self.nccl.clone();
        let hidden = state.config.hidden_size;
        tokio::spawn(async move {
            // Messages of one stream are answered in order: the sender matches answers to
            // requests by position.
            while let Some(msg) = incoming.next().await {
                let req = match msg {
                    Ok(r) => r,
                    Err(status) => {
                        tracing::debug!(%status, "dispatch stream ended");
                        break;
                    }
                };
                let answer = Self::handle(state.clone(), nccl.clone(), &req)
                    .await
                    .unwrap_or_else(|refusal| {
                        tracing::warn!(code = ?refusal.code(), %refusal, "dispatch refused");
                        Answer::Refused {
                            code: refusal.code(),
                            message: refusal.to_string(),
                        }
                    });
                if tx.send(Ok(answer.encode(req.request_id, hidden))).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
