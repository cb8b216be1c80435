//! Start-up and the control loop of an attention worker.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use moe_model::ModelConfig;
use moe_model::capacity::{Capacity, CapacityRouting};
use moe_model::checkpoint::Checkpoint;
use moe_model::engine::{Engine, EngineOptions};
use moe_model::kv_cache::KvCacheConfig;
use moe_model::model::AttentionModel;
use moe_proto::tensor::WireDtype;
use moe_proto::v1::attention_server::AttentionServer;
use moe_proto::v1::{HeartbeatResponse, Role, WorkerStatus};
use moe_runtime::control::Membership;
use moe_runtime::net::MAX_MESSAGE_BYTES;
use moe_runtime::shutdown;
use moe_runtime::worker::{self, WorkerArgs};
use tonic::service::Routes;

use crate::dispatch::{DispatchConfig, RemoteExperts};
use crate::error::Result;
use crate::scheduler::{self, SchedulerConfig};
use crate::service::AttentionService;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub worker: WorkerArgs,
    /// KV cache size in blocks.
    #[arg(long, default_value = "1024")]
    pub kv_blocks: NonZeroUsize,
    /// Token positions per KV block.
    #[arg(long, default_value = "16")]
    pub block_size: NonZeroUsize,
    /// Token rows per step: decode rows first, then prefill chunks within what is left (so it
    /// also bounds how long an arriving prompt stalls the running sequences).
    #[arg(long, default_value_t = scheduler::DEFAULT_MAX_BATCH_TOKENS)]
    pub max_batch_tokens: NonZeroUsize,
    /// Requests running at once.
    #[arg(long, default_value = "64")]
    pub max_running: NonZeroUsize,
    /// What happens to routed assignments over an expert's capacity: `exact` (the default:
    /// no capacity, nothing is lost), `drop` (Tencent's release semantics: over-capacity
    /// assignments contribute nothing) or `recycle` (they move to a random expert with room).
    /// Lossy events are counted in the metrics.
    #[arg(long, value_enum, default_value_t = CapacityPolicy::Exact)]
    pub capacity_policy: CapacityPolicy,
    /// Capacity per expert as `ceil(tokens * factor / experts)`; default `max(k, k*tokens/experts)`.
    #[arg(long, value_parser = positive_finite)]
    pub capacity_factor: Option<f64>,
    /// Under `exact`: token rows per expert slot per micro-batch; rows over it go to another
    /// replica of the expert, else to a later micro-batch of the same step (nothing is
    /// dropped; outputs equal an unlimited run's). Default: unlimited.
    #[arg(long)]
    pub slot_capacity: Option<NonZeroUsize>,
    /// Element type of the token rows sent to expert workers and of their answers: `f32`
    /// (default, exact) or `bf16` (half the bytes; each value rounded to bf16, so logits move
    /// by bf16 rounding, which a GPU expert worker applies anyway).
    #[arg(long, default_value_t = WireDtype::F32)]
    pub wire_dtype: WireDtype,
    /// Where every layer's attention and the KV cache data run: `cpu`, or `cuda:N` in a build
    /// with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Seed of `recycle`'s random choices.
    #[arg(long, default_value_t = 0)]
    pub recycle_seed: u64,
    /// How long a layer dispatch that failed on the expert side waits for a new placement
    /// before its step's requests fail.
    #[arg(long, default_value_t = 120)]
    pub recover_timeout_s: u64,
}

/// A number above zero (and finite), for factors.
fn positive_finite(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if f.is_finite() && f > 0.0 => Ok(f),
        Ok(f) => Err(format!("{f} is not a positive number")),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapacityPolicy {
    Exact,
    Drop,
    Recycle,
}

pub async fn run(args: Args) -> Result<()> {
    args.worker.install_credentials()?;
    let nccl = args.worker.nccl_agent()?;
    // A GPU that cannot be used stops the worker before any weight is read.
    let device = moe_model::device::Device::open(&args.device)?;
    let config = ModelConfig::from_file(&args.worker.model.join("config.json"))?;
    let ckpt = Checkpoint::open(&args.worker.model)?;
    let model_id = moe_model::identity::model_identity(&args.worker.model, &ckpt)?;
    let load = args.worker.load_reporter();
    load.begin("attention weights");
    let model = AttentionModel::load_with(&ckpt, config.clone(), load.as_ref());
    load.finish(model.is_ok());
    let model = model?;
    drop(ckpt);
    let remote = Arc::new(RemoteExperts::new(
        tokio::runtime::Handle::current(),
        DispatchConfig {
            hidden: config.hidden_size,
            num_layers: config.num_layers,
            num_experts: config.num_experts,
            slot_capacity: args.slot_capacity.map(NonZeroUsize::get),
            wire: args.wire_dtype,
            recover_timeout: Duration::from_secs(args.recover_timeout_s),
            answer_timeout: DispatchConfig::ANSWER_TIMEOUT,
        },
        nccl.clone(),
    ));
    let engine = Engine::new(
        model,
        remote.clone(),
        EngineOptions {
            kv_cache: KvCacheConfig {
                block_size: args.block_size.get(),
                num_blocks: args.kv_blocks.get(),
            },
            attention_device: device,
            ..Default::default()
        },
    )?;
    let mut engine = engine;
    let capacity = match args.capacity_policy {
        CapacityPolicy::Exact => None,
        lossy => {
            let slots = args.capacity_factor.map_or(Capacity::TopK, Capacity::Factor);
            let seed = (lossy == CapacityPolicy::Recycle).then_some(args.recycle_seed);
            let policy = Arc::new(CapacityRouting::new(slots, seed));
            tracing::warn!(
                ?lossy,
                "lossy capacity policy: over-capacity assignments are dropped or moved"
            );
            engine.set_route_policy(policy.clone());
            Some(policy.stats.clone())
        }
    };
    let scheduler = scheduler::spawn(
        engine,
        SchedulerConfig {
            max_batch_tokens: args.max_batch_tokens.get(),
            max_running: args.max_running.get(),
        },
    );

    let (trigger, shutdown) = shutdown::channel();
    let (drain_trigger, drain) = shutdown::channel();
    trigger.on_signals_draining(args.worker.watch_stdin, Some(drain_trigger));
    let service = AttentionServer::new(AttentionService {
        scheduler: scheduler.clone(),
        config,
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let spec = args.worker.spec(
        "attention-worker",
        Role::Attention,
        model_id,
        Duration::from_secs(5),
        nccl,
        load,
    )?;
    let status = || {
        let s = &scheduler.stats;
        WorkerStatus {
            running: s.running.load(Ordering::Relaxed) as u32,
            waiting: s.waiting.load(Ordering::Relaxed) as u32,
            kv_blocks_used: s.kv_blocks_used.load(Ordering::Relaxed) as u32,
            kv_blocks_total: s.kv_blocks_total.load(Ordering::Relaxed) as u32,
            tokens_processed: s.tokens_processed.load(Ordering::Relaxed),
            dispatch_bytes: remote.stats.bytes.load(Ordering::Relaxed),
            placement_version: remote.placement_version(),
            dropped_assignments: capacity.as_ref().map_or(0, |c| c.dropped.load(Ordering::Relaxed)),
            rerouted_assignments: capacity.as_ref().map_or(0, |c| c.rerouted.load(Ordering::Relaxed)),
            expert_tokens: remote.stats.expert_tokens(),
            busiest_assignments: remote.stats.busiest_assignments.load(Ordering::Relaxed),
            mean_assignments_milli: remote.stats.mean_assignments_milli.load(Ordering::Relaxed),
            overflow_dispatches: remote.stats.overflow_dispatches.load(Ordering::Relaxed),
            layer_dispatches: remote.stats.layer_dispatches.load(Ordering::Relaxed),
            layer_dispatch_micros: remote.stats.layer_dispatch_micros.load(Ordering::Relaxed),
            layer_dispatch_buckets: remote.stats.layer_dispatch_buckets(),
            nccl_layer_dispatches: remote.stats.nccl_layer_dispatches.load(Ordering::Relaxed),
            ..Default::default()
        }
    };
    let on_answer = async |m: &mut Membership, answer: HeartbeatResponse| {
        for (worker, reason) in remote.take_suspects() {
            match m.report_failure(&worker, &reason).await {
                Ok(removed) => tracing::warn!(%worker, removed, "reported a failed expert worker"),
                Err(s) => tracing::warn!(%worker, status = %s, "reporting a failed expert worker failed"),
            }
        }
        if answer.placement_version != 0 && answer.placement_version != remote.placement_version() {
            match m.placement(false).await {
                Ok(p) => {
                    tracing::info!(version = p.version, "using expert placement");
                    remote.set_placement(p);
                }
                Err(s) => tracing::warn!(status = %s, "reading the placement failed"),
            }
        }
    };
    worker::run_worker(spec, Routes::new(service), shutdown, drain, status, on_answer).await?;
    Ok(())
}
