//! Start-up and the control loop of an expert worker.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use moe_model::ModelConfig;
use moe_model::checkpoint::Checkpoint;
use moe_proto::v1::expert_server::ExpertServer;
use moe_proto::v1::{Role, WorkerStatus};
use moe_runtime::control::Membership;
use moe_runtime::net::{self, MAX_MESSAGE_BYTES};
use moe_runtime::shutdown::{self, Shutdown};

use crate::error::{Error, Result};
use crate::service::ExpertService;
use crate::state::ExpertState;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Model directory (config.json + safetensors). Only this worker's experts are read.
    #[arg(long)]
    pub model: PathBuf,
    /// Address to serve dispatch streams on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Address other components reach this worker at (default: the bound listen address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Coordinator control-plane address (host:port).
    #[arg(long)]
    pub coordinator: String,
    #[arg(long, default_value_t = 200)]
    pub heartbeat_ms: u64,
    /// Exit when stdin closes (set by `moectl up`, so no worker outlives its cluster).
    #[arg(long)]
    pub watch_stdin: bool,
}

pub async fn run(args: Args) -> Result<()> {
    let config = ModelConfig::from_file(&args.model.join("config.json"))?;
    let model_id = moe_model::identity::model_identity(&args.model)?;
    let ckpt = Checkpoint::open(&args.model)?;
    let state = Arc::new(ExpertState::new(config, ckpt)?);

    let (incoming, local) = net::bind(args.listen).await.map_err(|source| Error::Io {
        context: format!("binding {}", args.listen),
        source,
    })?;
    let address = args.advertise.clone().unwrap_or_else(|| local.to_string());
    let (trigger, shutdown) = shutdown::channel();
    trigger.on_signals(args.watch_stdin);

    let service = ExpertServer::new(ExpertService { state: state.clone() })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let server_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, server_shutdown.wait())
            .await
    });
    net::announce("expert-worker", local);

    let membership = Membership::register(
        &args.coordinator,
        Role::Expert,
        address,
        model_id,
        Duration::from_secs(30),
    )
    .await?;
    let control = control_loop(
        membership,
        state,
        Duration::from_millis(args.heartbeat_ms),
        shutdown.clone(),
    );
    tokio::select! {
        r = control => r?,
        _ = shutdown.clone().wait() => {}
    }
    // Dispatch streams are long-lived; give in-flight messages a moment, then stop.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    tracing::info!("expert worker stopped");
    Ok(())
}

/// Heartbeats; loads the target placement when it changes. Returns only on shutdown or when
/// the coordinator refuses this worker.
async fn control_loop(
    mut membership: Membership,
    state: Arc<ExpertState>,
    period: Duration,
    shutdown: Shutdown,
) -> Result<()> {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !shutdown.is_triggered() {
        ticker.tick().await;
        let status = WorkerStatus {
            expert_slots: state.held_slots(),
            rows_served: state.rows_served.load(Ordering::Relaxed),
            placement_version: state.newest_version(),
            ..Default::default()
        };
        let resp = match membership.heartbeat(status).await {
            Ok(r) => r,
            Err(s) if s.code() == tonic::Code::FailedPrecondition || s.code() == tonic::Code::InvalidArgument => {
                return Err(s.into());
            }
            Err(s) => {
                tracing::warn!(status = %s, "heartbeat failed; retrying");
                continue;
            }
        };
        if resp.target_placement_version > state.newest_version() {
            let target = match membership.placement(true).await {
                Ok(p) => p,
                Err(s) => {
                    tracing::warn!(status = %s, "reading the target placement failed");
                    continue;
                }
            };
            let slots = target.slots_of(membership.worker_id());
            let (st, version, active) = (state.clone(), target.version, resp.placement_version);
            tokio::task::spawn_blocking(move || st.load_version(version, slots, active))
                .await
                .map_err(|e| Error::Placement(format!("loading task failed: {e}")))??;
        }
    }
    Ok(())
}
