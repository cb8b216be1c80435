//! The `Control` gRPC service: registration, heartbeats, placement. Refusals of the cluster
//! state become statuses here, through [`crate::codes`].

use moe_proto::v1::control_server::Control;
use moe_proto::v1::{
    DrainRequest, DrainResponse, GetPlacementRequest, HeartbeatRequest, HeartbeatResponse, Placement,
    PublishNcclIdRequest, PublishNcclIdResponse, RebalanceRequest, RebalanceResponse, RegisterRequest,
    RegisterResponse, ReportFailureRequest, ReportFailureResponse, Role,
};
use tonic::{Request, Response, Status};

use crate::placements::PlacementError;
use crate::registry::Member;
use crate::state::StateHandle;

pub struct ControlService {
    pub state: StateHandle,
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn rebalance(&self, request: Request<RebalanceRequest>) -> Result<Response<RebalanceResponse>, Status> {
        Ok(Response::new(self.state.rebalance(request.into_inner().force)?))
    }

    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        let req = request.into_inner();
        moe_runtime::convert::check_version(req.protocol_version)?;
        let role =
            Role::try_from(req.role).map_err(|_| Status::invalid_argument(format!("unknown role {}", req.role)))?;
        let worker_id = self.state.register(
            Member {
                id: req.worker_id,
                role,
                address: req.address,
                model_id: req.model_id,
                seq: 0,
                nccl: req.nccl,
                incarnation: req.incarnation,
            },
            req.recorded,
        )?;
        let placement = self.state.placement(false);
        Ok(Response::new(RegisterResponse { worker_id, placement }))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let req = request.into_inner();
        let status = req.status.unwrap_or_default();
        Ok(Response::new(self.state.heartbeat(&req.worker_id, status)))
    }

    async fn get_placement(&self, request: Request<GetPlacementRequest>) -> Result<Response<Placement>, Status> {
        match self.state.placement(request.into_inner().target) {
            Some(p) => Ok(Response::new(p)),
            None => Err(PlacementError::NoPlacement.into()),
        }
    }

    async fn report_failure(
        &self,
        request: Request<ReportFailureRequest>,
    ) -> Result<Response<ReportFailureResponse>, Status> {
        let req = request.into_inner();
        let removed = self.state.report_failure(&req.reporter_id, &req.worker_id, &req.reason);
        Ok(Response::new(ReportFailureResponse { removed }))
    }

    async fn drain(&self, request: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        let detail = self.state.drain(&request.into_inner().worker_id)?;
        Ok(Response::new(DrainResponse { detail }))
    }

    async fn publish_nccl_id(
        &self,
        request: Request<PublishNcclIdRequest>,
    ) -> Result<Response<PublishNcclIdResponse>, Status> {
        let req = request.into_inner();
        self.state.publish_nccl_id(&req.worker_id, req.epoch, req.unique_id)?;
        Ok(Response::new(PublishNcclIdResponse {}))
    }
}
