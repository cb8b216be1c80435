//! The `Expert` gRPC service: one long-lived dispatch stream per attention worker. Each message
//! is validated on its own; a bad one is answered with a `DispatchError` and the stream goes on.

use std::pin::Pin;
use std::sync::Arc;

use moe_model::experts::{ExpertAssignment, ExpertCompute};
use moe_proto::tensor::{WireDtype, decode_matrix};
use moe_proto::v1::dispatch_response::Result as DispatchResult;
use moe_proto::v1::expert_server::Expert;
use moe_proto::v1::{DispatchError, DispatchRequest, DispatchResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::state::ExpertState;

pub struct ExpertService {
    pub state: Arc<ExpertState>,
}

type Refusal = (Code, String);

impl ExpertService {
    /// Runs one dispatch message: validation, then the grouped SwiGLU off the async threads.
    async fn handle(state: Arc<ExpertState>, req: DispatchRequest) -> Result<moe_proto::v1::Tensor, Refusal> {
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
        let rows = req
            .rows
            .as_ref()
            .ok_or((Code::InvalidArgument, "rows tensor missing".to_owned()))?;
        let (values, n) =
            decode_matrix(rows, config.hidden_size).map_err(|e| (Code::InvalidArgument, format!("rows: {e}")))?;
        // Answer in the dtype the rows came in (decoding succeeded, so it is a known one).
        let wire = WireDtype::of(rows).map_err(|e| (Code::InvalidArgument, format!("rows: {e}")))?;
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
        let out = tokio::task::spawn_blocking(move || experts.compute(layer, &values, n, &assignments))
            .await
            .map_err(|e| (Code::Internal, format!("expert task failed: {e}")))?
            .map_err(|e| {
                let s = moe_runtime::convert::status(&e);
                (s.code(), s.message().to_owned())
            })?;
        state.count_dispatch(n, started.elapsed());
        Ok(wire.encode(&out, &[n, config.hidden_size]))
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
                let result = match Self::handle(state.clone(), req).await {
                    Ok(t) => DispatchResult::Output(t),
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
