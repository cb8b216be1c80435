//! The worker side of the control plane: register with the coordinator, heartbeat, register
//! again when the coordinator forgot us, and read placements. Given several coordinators (one
//! leader, standbys), calls go to the one that answered last and move on to the next when it
//! is unreachable or a standby ([`failover::unreachable()`]): that is how workers follow a failover.

use std::time::{Duration, Instant};

use moe_proto::PROTOCOL_VERSION;
use moe_proto::v1::control_client::ControlClient;
use moe_proto::v1::{
    DrainRequest, GetPlacementRequest, HeartbeatRequest, HeartbeatResponse, PublishNcclIdRequest, RegisterRequest,
    ReportFailureRequest, WorkerStatus,
};
use tonic::Status;

use crate::failover::{self, Failover};
use crate::member::Member;
use crate::placement::PlacementView;

pub struct Membership {
    coordinators: Failover<ControlClient<crate::net::ClusterChannel>>,
    /// Who this worker is: its id (kept across registrations, so a coordinator that forgot it,
    /// or a new leader, knows it by the same id), role, address and incarnation.
    me: Member,
    /// This worker keeps its own record in etcd.
    recorded: bool,
}

impl Membership {
    /// Registers `me` (`recorded`: it keeps its own etcd record), retrying while the coordinator
    /// is not reachable yet or not ready to take it (up to `wait`). A refusal (a different
    /// model, a bad request, a missing credential) is returned at once.
    pub async fn register(coordinators: &[String], me: Member, recorded: bool, wait: Duration) -> Result<Self, Status> {
        let mut targets = Vec::new();
        for coordinator in coordinators {
            let channel = crate::net::channel(coordinator)
                .map_err(|e| Status::invalid_argument(format!("coordinator address {coordinator}: {e}")))?;
            let client = ControlClient::new(channel)
                .max_decoding_message_size(crate::net::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(crate::net::MAX_MESSAGE_BYTES);
            targets.push((coordinator.clone(), client));
        }
        let mut m = Membership {
            coordinators: Failover::new(targets)?,
            me,
            recorded,
        };
        let deadline = Instant::now() + wait;
        loop {
            match m.register_once().await {
                Ok(()) => return Ok(m),
                Err(s) if failover::unreachable(&s) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(s) => return Err(s),
            }
        }
    }

    async fn register_once(&mut self) -> Result<(), Status> {
        let request = RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            role: self.me.role as i32,
            address: self.me.address.clone(),
            model_id: self.me.model_id.clone(),
            nccl: self.me.nccl,
            worker_id: self.me.id.clone(),
            incarnation: self.me.incarnation,
            recorded: self.recorded,
        };
        let resp = self
            .coordinators
            .call(|mut c| {
                let r = request.clone();
                async move { c.register(r).await }
            })
            .await?;
        tracing::info!(worker_id = %resp.worker_id, role = ?self.me.role, "registered with the coordinator");
        self.me.id = resp.worker_id;
        Ok(())
    }

    pub fn worker_id(&self) -> &str {
        &self.me.id
    }

    /// One heartbeat; registers again if the coordinator no longer knows this worker.
    pub async fn heartbeat(&mut self, mut status: WorkerStatus) -> Result<HeartbeatResponse, Status> {
        status.worker_id = self.me.id.clone();
        status.role = self.me.role as i32;
        status.address = self.me.address.clone();
        let request = HeartbeatRequest {
            worker_id: self.me.id.clone(),
            status: Some(status),
        };
        let resp = self
            .coordinators
            .call(|mut c| {
                let r = request.clone();
                async move { c.heartbeat(r).await }
            })
            .await?;
        if !resp.known {
            tracing::warn!(worker_id = %self.me.id, "coordinator forgot this worker; registering again");
            self.register_once().await?;
        }
        Ok(resp)
    }

    /// The active placement, or the target one being prepared.
    pub async fn placement(&mut self, target: bool) -> Result<PlacementView, Status> {
        let p = self
            .coordinators
            .call(|mut c| async move { c.get_placement(GetPlacementRequest { target }).await })
            .await?;
        PlacementView::from_proto(&p).map_err(|e| Status::internal(e.to_string()))
    }

    /// Tells the coordinator that `worker` failed (as seen from here).
    pub async fn report_failure(&mut self, worker: &str, reason: &str) -> Result<bool, Status> {
        let request = ReportFailureRequest {
            reporter_id: self.me.id.clone(),
            worker_id: worker.to_owned(),
            reason: reason.to_owned(),
        };
        let resp = self
            .coordinators
            .call(|mut c| {
                let r = request.clone();
                async move { c.report_failure(r).await }
            })
            .await?;
        Ok(resp.removed)
    }

    /// As rank 0 of NCCL group `epoch`, hands the communicator's unique id to the coordinator.
    pub async fn publish_nccl_id(&mut self, epoch: u64, unique_id: Vec<u8>) -> Result<(), Status> {
        let request = PublishNcclIdRequest {
            worker_id: self.me.id.clone(),
            epoch,
            unique_id,
        };
        self.coordinators
            .call(|mut c| {
                let r = request.clone();
                async move { c.publish_nccl_id(r).await }
            })
            .await?;
        Ok(())
    }

    /// Asks the coordinator to drain this worker.
    pub async fn drain_self(&mut self) -> Result<String, Status> {
        let request = DrainRequest {
            worker_id: self.me.id.clone(),
        };
        let resp = self
            .coordinators
            .call(|mut c| {
                let r = request.clone();
                async move { c.drain(r).await }
            })
            .await?;
        Ok(resp.detail)
    }
}
