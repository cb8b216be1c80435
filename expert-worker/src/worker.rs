//! Start-up and the control loop of an expert worker.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use moe_model::ModelConfig;
use moe_model::checkpoint::Checkpoint;
use moe_proto::v1::expert_server::ExpertServer;
use moe_proto::v1::{HeartbeatResponse, Role, WorkerStatus};
use moe_runtime::control::Membership;
use moe_runtime::net::MAX_MESSAGE_BYTES;
use moe_runtime::shutdown;
use moe_runtime::worker::{self, WorkerArgs};
use tonic::service::Routes;

use crate::error::Result;
use crate::loader::{Job, Loader};
use crate::service::ExpertService;
use crate::state::ExpertState;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub worker: WorkerArgs,
    /// Expert slots per layer beyond an even share of the experts, for replicas of hot
    /// experts (each costs one expert's weights per layer in memory).
    #[arg(long, default_value_t = 0)]
    pub spare_slots: u32,
    /// Where the expert products run: `cpu`, or `cuda:N` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// For tests and demos: pause this long after reading each expert, so that a load of a
    /// small model lasts long enough to be watched (progress in `moectl status`, heartbeats
    /// going on meanwhile).
    #[arg(long, default_value_t = 0)]
    pub load_throttle_ms: u64,
}

pub async fn run(args: Args) -> Result<()> {
    args.worker.install_credentials()?;
    let nccl = args.worker.nccl_agent()?;
    let config = ModelConfig::from_file(&args.worker.model.join("config.json"))?;
    let ckpt = Checkpoint::open(&args.worker.model)?;
    let model_id = moe_model::identity::model_identity(&args.worker.model, &ckpt)?;
    let device = moe_model::device::Device::open(&args.device)?;
    tracing::info!(?device, "expert products on");
    let state = Arc::new(ExpertState::new(config, ckpt, device)?);
    let load = args.worker.load_reporter();

    let (trigger, shutdown) = shutdown::channel();
    let (drain_trigger, drain) = shutdown::channel();
    trigger.on_signals_draining(args.worker.watch_stdin, Some(drain_trigger));
    let service = ExpertServer::new(ExpertService {
        state: state.clone(),
        nccl: nccl.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Dispatch streams are long-lived; give in-flight messages a moment after shutdown.
    let spec = args.worker.spec(
        "expert-worker",
        Role::Expert,
        model_id,
        Duration::from_secs(2),
        nccl,
        load.clone(),
    )?;
    let status = || WorkerStatus {
        expert_slots: state.held_slots(),
        rows_served: state.rows_served.load(Ordering::Relaxed),
        busy_micros: state.busy_micros.load(Ordering::Relaxed),
        dispatches_served: state.dispatches.load(Ordering::Relaxed),
        spare_slots: args.spare_slots,
        placement_version: state.newest_version(),
        weight_bytes: state.weight_bytes(),
        ..Default::default()
    };
    // Loads run beside the heartbeats, which carry their progress (see `loader`).
    let loader = Loader::new(state.clone(), load, Duration::from_millis(args.load_throttle_ms));
    let on_answer = async |m: &mut Membership, answer: HeartbeatResponse| {
        if !answer.known {
            tracing::warn!("membership was lost; refusing dispatches until a new placement is loaded");
            loader.forget();
        }
        if loader.wants(answer.target_placement_version) {
            match target_job(m, answer.placement_version, state.membership()).await {
                Ok(job) => loader.submit(job),
                Err(e) => tracing::warn!(error = %e, "reading the target placement failed; will retry"),
            }
        }
    };
    worker::run_worker(spec, Routes::new(service), shutdown, drain, status, on_answer).await?;
    Ok(())
}

/// This worker's slots of the coordinator's target placement, `active` serving meanwhile;
/// `epoch` is the worker's membership (read before asking, so a loss meanwhile voids the job).
async fn target_job(membership: &mut Membership, active: u64, epoch: u64) -> Result<Job> {
    let target = membership.placement(true).await?;
    Ok(Job {
        version: target.version,
        slots: target.slots_of(membership.worker_id()),
        active,
        membership: epoch,
    })
}
