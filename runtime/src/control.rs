//! The worker side of the control plane: register with the coordinator, heartbeat, register
//! again when the coordinator forgot us, and read placements.

use std::time::{Duration, Instant};

use moe_proto::PROTOCOL_VERSION;
use moe_proto::v1::control_client::ControlClient;
use moe_proto::v1::{
    DrainRequest, GetPlacementRequest, HeartbeatRequest, HeartbeatResponse, RegisterRequest, ReportFailureRequest,
    Role, WorkerStatus,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::placement::PlacementView;

pub struct Membership {
    client: ControlClient<Channel>,
    role: Role,
    address: String,
    model_id: String,
    worker_id: String,
}

impl Membership {
    /// Registers, retrying while the coordinator is not reachable yet (up to `wait`). A refusal
    /// (a different model, a bad request) is returned at once.
    pub async fn register(
        coordinator: &str,
        role: Role,
        address: String,
        model_id: String,
        wait: Duration,
    ) -> Result<Self, Status> {
        let channel = crate::net::channel(coordinator)
            .map_err(|e| Status::invalid_argument(format!("coordinator address {coordinator}: {e}")))?;
        let client = ControlClient::new(channel)
            .max_decoding_message_size(crate::net::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::net::MAX_MESSAGE_BYTES);
        let mut m = Membership {
            client,
            role,
            address,
            model_id,
            worker_id: String::new(),
        };
        let deadline = Instant::now() + wait;
        loop {
            match m.register_once().await {
                Ok(()) => return Ok(m),
                Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(s) => return Err(s),
            }
        }
    }

    async fn register_once(&mut self) -> Result<(), Status> {
        let resp = self
            .client
            .register(RegisterRequest {
                protocol_version: PROTOCOL_VERSION,
                role: self.role as i32,
                address: self.address.clone(),
                model_id: self.model_id.clone(),
            })
            .await?
            .into_inner();
        tracing::info!(worker_id = %resp.worker_id, role = ?self.role, "registered with the coordinator");
        self.worker_id = resp.worker_id;
        Ok(())
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// One heartbeat; registers again if the coordinator no longer knows this worker.
    pub async fn heartbeat(&mut self, mut status: WorkerStatus) -> Result<HeartbeatResponse, Status> {
        status.worker_id = self.worker_id.clone();
        status.role = self.role as i32;
        status.address = self.address.clone();
        let resp = self
            .client
            .heartbeat(HeartbeatRequest {
                worker_id: self.worker_id.clone(),
                status: Some(status),
            })
            .await?
            .into_inner();
        if !resp.known {
            tracing::warn!(worker_id = %self.worker_id, "coordinator forgot this worker; registering again");
            self.register_once().await?;
        }
        Ok(resp)
    }

    /// The active placement, or the target one being prepared.
    pub async fn placement(&mut self, target: bool) -> Result<PlacementView, Status> {
        let p = self
            .client
            .get_placement(GetPlacementRequest { target })
            .await?
            .into_inner();
        PlacementView::from_proto(&p).map_err(Status::internal)
    }

    /// Tells the coordinator that `worker` failed (as seen from here).
    pub async fn report_failure(&mut self, worker: &str, reason: &str) -> Result<bool, Status> {
        let resp = self
            .client
            .report_failure(ReportFailureRequest {
                reporter_id: self.worker_id.clone(),
                worker_id: worker.to_owned(),
                reason: reason.to_owned(),
            })
            .await?;
        Ok(resp.into_inner().removed)
    }

    /// Asks the coordinator to drain this worker.
    pub async fn drain_self(&mut self) -> Result<String, Status> {
        let resp = self
            .client
            .drain(DrainRequest {
                worker_id: self.worker_id.clone(),
            })
            .await?;
        Ok(resp.into_inner().detail)
    }
}
