//! The `Expert` gRPC service: one long-lived dispatch stream per attention worker. Each message
//! is validated on its own; a bad one is answered with a `DispatchError` and the stream goes on.

use std::pin::Pin;
use std::sync::Arc;

use moe_model::cuda::NcclComm;
use moe_model::experts::{ExpertAssignment, ExpertCompute};
use moe_proto::tensor::{WireDtype, decode_matrix};
use moe_proto::v1::dispatch_response::Result as DispatchResult;
use moe_proto::v1::expert_server::Expert;
use moe_proto::v1::{DispatchError, DispatchRequest, DispatchResponse, NcclRows};
use moe_runtime::nccl::{NcclAgent, STEP_TIMEOUT};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::state::ExpertState;

pub struct ExpertService {
    pub state: Arc<ExpertState>,
    /// This worker's place on the NCCL data plane (`--nccl-device`), if any.
    pub nccl: Option<NcclAgent>,
}

type Refusal = (Code, String);

/// Where a message's rows are and where its answer goes.
enum Rows {
    /// In the message, `[rows, hidden]` in this dtype; the answer goes back the same way.
    Inline(Vec<f32>, usize, WireDtype),
    /// Arriving over NCCL from `sender`; the answer goes back over NCCL.
    Nccl {
        comm: Arc<NcclComm>,
        sender: usize,
        rows: usize,
    },
}

/// The NCCL side of a message whose rows travel over the data plane: checks this worker holds
/// the communicator the sender used, and that the sender is another rank of it.
fn nccl_rows(agent: Option<&NcclAgent>, header: &NcclRows) -> Result<Rows, Refusal> {
    let refuse = |m: String| (Code::FailedPrecondition, m);
    let agent = agent.ok_or_else(|| refuse("rows over NCCL, but this worker is not on the NCCL data plane".into()))?;
    // Any epoch this worker holds a communicator for: the sender learns that the group is
    // ready a heartbeat before this worker may.
    let comm = agent.communicator(header.epoch).ok_or_else(|| {
        refuse(format!(
            "rows over NCCL epoch {}, but this worker holds {}",
            header.epoch,
            match agent.ready_epoch() {
                0 => "no communicator".to_owned(),
                e => format!("epoch {e}"),
            }
        ))
    })?;
    let sender = header.sender_rank as usize;
    if sender >= comm.world_size() || sender == comm.rank() {
        return Err((
            Code::InvalidArgument,
            format!(
                "NCCL sender rank {sender}: this is rank {} of {}",
                comm.rank(),
                comm.world_size()
            ),
        ));
    }
    Ok(Rows::Nccl {
        comm,
        sender,
        rows: header.rows as usize,
    })
}

impl ExpertService {
    /// Runs one dispatch message: validation, then the grouped SwiGLU off the async threads
    /// (with the NCCL receive and send around it when the rows travel over NCCL).
    async fn handle(
        state: Arc<ExpertState>,
        nccl: Option<NcclAgent>,
        req: DispatchRequest,
    ) -> Result<DispatchResult, Refusal> {
        moe_runtime::convert::check_version(req.protocol_version).map_err(|s| (s.code(), s.message().to_owned()))?;
        let experts = state.serving(req.placement_version).map_err(|served| {
            (
                Code::FailedPrecondition,
                format!(
                    "placement version {} is not served here (serving {served:?})",
                    req.placement_version
                ),
            )
        })?;
        let config = &state.config;
        let layer = req.layer as usize;
        if layer >= config.num_layers {
            return Err((
                Code::InvalidArgument,
                format!("layer {layer} out of range (model has {})", config.num_layers),
            ));
        }
        let rows = match (&req.rows, &req.nccl) {
            (Some(_), Some(_)) => {
                return Err((
                    Code::InvalidArgument,
                    "rows both in the message and over NCCL".to_owned(),
                ));
            }
            (None, None) => return Err((Code::InvalidArgument, "rows tensor missing".to_owned())),
            (Some(rows), None) => {
                let (values, n) = decode_matrix(rows, config.hidden_size)
                    .map_err(|e| (Code::InvalidArgument, format!("rows: {e}")))?;
                // Answer in the dtype the rows came in (decoding succeeded: a known one).
                let wire = WireDtype::of(rows).map_err(|e| (Code::InvalidArgument, format!("rows: {e}")))?;
                Rows::Inline(values, n, wire)
            }
            (None, Some(header)) => nccl_rows(nccl.as_ref(), header)?,
        };
        let n = match &rows {
            Rows::Inline(_, n, _) => *n,
            Rows::Nccl { rows, .. } => *rows,
        };
        // An NCCL header names a row count without carrying the rows: bound it by what one
        // message could carry inline, before anything is allocated for it.
        let max_rows = moe_runtime::net::MAX_MESSAGE_BYTES / (4 * config.hidden_size);
        if n > max_rows {
            return Err((
                Code::InvalidArgument,
                format!("{n} rows in one message (at most {max_rows})"),
            ));
        }
        let k = req.assignment_rows.len();
        if req.assignment_experts.len() != k || req.assignment_weights.len() != k {
            return Err((
                Code::InvalidArgument,
                format!(
                    "assignment arrays differ in length: rows {k}, experts {}, weights {}",
                    req.assignment_experts.len(),
                    req.assignment_weights.len()
                ),
            ));
        }
        let mut assignments = Vec::with_capacity(k);
        for i in 0..k {
            let expert = req.assignment_experts[i];
            if expert as usize >= config.num_experts {
                return Err((
                    Code::InvalidArgument,
                    format!("expert {expert} out of range (model has {})", config.num_experts),
                ));
            }
            assignments.push(ExpertAssignment {
                row: req.assignment_rows[i],
                expert,
                weight: req.assignment_weights[i],
            });
        }
        let started = std::time::Instant::now();
        let h = config.hidden_size;
        let as_refusal = |e: moe_model::Error| {
            let s = moe_runtime::convert::status(&e);
            (s.code(), s.message().to_owned())
        };
        let result = tokio::task::spawn_blocking(move || match rows {
            Rows::Inline(values, n, wire) => {
                let out = experts.compute(layer, &values, n, &assignments).map_err(as_refusal)?;
                Ok(DispatchResult::Output(wire.encode(&out, &[n, h])))
            }
            Rows::Nccl { comm, sender, rows: n } => {
                let unavailable = |e: moe_model::Error| (Code::Unavailable, e.to_string());
                let values = comm
                    .exchange(&[], &[(sender, n * h)], STEP_TIMEOUT)
                    .map_err(unavailable)?
                    .remove(0);
                let out = experts.compute(layer, &values, n, &assignments).map_err(as_refusal)?;
                comm.exchange(&[(sender, &out)], &[], STEP_TIMEOUT)
                    .map_err(unavailable)?;
                Ok(DispatchResult::NcclRows(n as u32))
            }
        })
        .await
        .map_err(|e| (Code::Internal, format!("expert task failed: {e}")))??;
        state.count_dispatch(n, started.elapsed());
        Ok(result)
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
        tokio::spawn(async move {
            // Messages of one stream are answered in order: the sender waits for each layer.
            while let Some(msg) = incoming.next().await {
                let req = match msg {
                    Ok(r) => r,
                    Err(status) => {
                        tracing::debug!(%status, "dispatch stream ended");
                        break;
                    }
                };
                let request_id = req.request_id;
                let result = match Self::handle(state.clone(), nccl.clone(), req).await {
                    Ok(result) => result,
                    Err((code, message)) => {
                        tracing::warn!(?code, %message, "dispatch refused");
                        DispatchResult::Error(DispatchError {
                            code: code as i32,
                            message,
                        })
                    }
                };
                let resp = DispatchResponse {
                    request_id,
                    result: Some(result),
                };
                if tx.send(Ok(resp)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
