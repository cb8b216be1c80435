//! Start-up and the control loop of an expert worker.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use moe_model::ModelConfig;
use moe_model::checkpoint::Checkpoint;
use moe_proto::v1::expert_server::ExpertServer;
use moe_proto::v1::{HeartbeatResponse, Role, WorkerStatus};
use moe_runtime::control::Membership;
use moe_runtime::load_progress::LoadReporter;
use moe_runtime::net::MAX_MESSAGE_BYTES;
use moe_runtime::shutdown;
use moe_runtime::worker::{self, WorkerArgs};
use tonic::service::Routes;

use crate::error::{Error, Result};
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
        ..Default::default()
    };
    let on_answer = async |m: &mut Membership, answer: HeartbeatResponse| {
        if !answer.known {
            tracing::warn!("membership was lost; refusing dispatches until a new placement is loaded");
            state.forget_versions();
        }
        if answer.target_placement_version > state.newest_version()
            && let Err(e) = load_target(m, &state, answer.placement_version, &load).await
        {
            tracing::warn!(error = %e, "loading the target placement failed; will retry");
        }
    };
    worker::run_worker(spec, Routes::new(service), shutdown, drain, status, on_answer).await?;
    Ok(())
}

/// Reads the target placement and loads this worker's slots for it (off the async threads),
/// reporting to `load`.
async fn load_target(
    membership: &mut Membership,
    state: &Arc<ExpertState>,
    active: u64,
    load: &Arc<LoadReporter>,
) -> Result<()> {
    let target = membership.placement(true).await?;
    let slots = target.slots_of(membership.worker_id());
    let (st, version, load) = (state.clone(), target.version, load.clone());
    tokio::task::spawn_blocking(move || {
        load.begin(format!("placement v{version} ({} expert slots)", slots.len()));
        let loaded = st.load_version(version, slots, active, load.as_ref());
        load.finish(loaded.is_ok());
        loaded
    })
    .await
    .map_err(|e| Error::Placement(format!("loading task failed: {e}")))?
}
