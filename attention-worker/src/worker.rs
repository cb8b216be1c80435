//! Start-up and the control loop of an attention worker.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use moe_model::ModelConfig;
use moe_model::capacity::{Capacity, CapacityRouting};
use moe_model::checkpoint::Checkpoint;
use moe_model::engine::{Engine, EngineOptions};
use moe_model::kv_cache::{KvCacheConfig, KvDtypeChoice};
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
use crate::error::{Error, Result};
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
    /// Element type of the KV cache: `bf16` (2 bytes a value, rounded to nearest even), `f32`
    /// (4 bytes, exact) or `auto` (bf16 for a bfloat16/float16 checkpoint, f32 otherwise; by the
    /// config's `torch_dtype`).
    #[arg(long, default_value_t = KvDtypeChoice::Auto)]
    pub kv_cache_dtype: KvDtypeChoice,
    /// Token rows per step: decode rows first, then prefill chunks within what is left (so it
    /// also bounds how long an arriving prompt stalls the running sequences).
    #[arg(long, default_value_t = scheduler::DEFAULT_MAX_BATCH_TOKENS)]
    pub max_batch_tokens: NonZeroUsize,
    /// Prefill rows a step may add, beyond one per decoding sequence, for a prompt that arrived
    /// while others were decoding, so their inter-token gap stays near one decode step
    /// (prompts arriving together prefill up to `--max-batch-tokens` a step).
    #[arg(long, default_value_t = crate::step_plan::DEFAULT_PREFILL_WHILE_DECODING)]
    pub prefill_rows_while_decoding: NonZeroUsize,
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
    /// Micro-batches per step, 1 or 2. With 2 (the default under the exact policy), a step of
    /// two or more sequences whose halves each get `--micro-batch-min-rows` rows is cut into
    /// two halves of whole sequences that take turns, so one
    /// half's attention runs while the other's experts compute on the expert workers; a step
    /// of one sequence runs whole. Lossy capacity policies count capacity per step, so they
    /// take 1 (the default there; 2 is refused). With `--nccl-device` the default is 1: the
    /// data plane carries one exchange at a time, so a second half's rows would go over gRPC.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub micro_batches: Option<u8>,
    /// With 2 micro-batches, the fewest rows each half must get for a step to be cut; smaller
    /// steps run whole (each half reads every dense weight, so small halves cost more than
    /// they overlap). No effect with one micro-batch.
    #[arg(long, default_value_t = NonZeroUsize::new(moe_model::model::DEFAULT_MICRO_BATCH_MIN_ROWS).expect("the default is at least 1"))]
    pub micro_batch_min_rows: NonZeroUsize,
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

/// Micro-batches per step: 2 unless a lossy capacity policy is on (its capacity is per step;
/// two halves would each get a step's capacity) or the worker is on the NCCL data plane (it
/// carries one exchange at a time, so the second half's rows would always go over gRPC).
fn micro_batches(asked: Option<u8>, policy: CapacityPolicy, nccl: bool) -> Result<usize> {
    match (asked, policy) {
        (Some(2), CapacityPolicy::Drop | CapacityPolicy::Recycle) => Err(Error::Flags(format!(
            "--micro-batches 2 needs --capacity-policy exact (got {policy:?}: capacity is counted per step)"
        ))),
        (Some(n), _) => Ok(n.into()),
        (None, CapacityPolicy::Exact) if !nccl => Ok(moe_model::model::MAX_MICRO_BATCHES),
        (None, _) => Ok(1),
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapacityPolicy {
    Exact,
    Drop,
    Recycle,
}

pub async fn run(args: Args) -> Result<()> {
    // Flags that cannot go together stop the worker before any weight is read.
    let micro_batches = micro_batches(
        args.micro_batches,
        args.capacity_policy,
        args.worker.nccl_device.is_some(),
    )?;
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
    let mut model = model?;
    let weight_bytes = model.size_in_bytes() as u64;
    drop(ckpt);
    model.set_micro_batches(micro_batches)?;
    model.set_micro_batch_min_rows(args.micro_batch_min_rows.get())?;
    let forward_stats = model.overlap_stats();
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
                dtype: args.kv_cache_dtype,
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
            prefill_while_decoding: args.prefill_rows_while_decoding.get(),
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
            weight_bytes,
            steps: forward_stats.steps.load(Ordering::Relaxed),
            step_micros: forward_stats.step_micros.load(Ordering::Relaxed),
            micro_batched_steps: forward_stats.split_steps.load(Ordering::Relaxed),
            overlap_micros: forward_stats.overlap_micros.load(Ordering::Relaxed),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_default_to_two_under_the_exact_policy_only() {
        assert_eq!(micro_batches(None, CapacityPolicy::Exact, false).unwrap(), 2);
        assert_eq!(micro_batches(None, CapacityPolicy::Drop, false).unwrap(), 1);
        assert_eq!(micro_batches(Some(1), CapacityPolicy::Exact, false).unwrap(), 1);
        assert_eq!(micro_batches(Some(1), CapacityPolicy::Recycle, false).unwrap(), 1);
        // On the NCCL data plane one micro-batch unless asked (the second half would go over
        // gRPC: the plane carries one exchange at a time).
        assert_eq!(micro_batches(None, CapacityPolicy::Exact, true).unwrap(), 1);
        assert_eq!(micro_batches(Some(2), CapacityPolicy::Exact, true).unwrap(), 2);
        let e = micro_batches(Some(2), CapacityPolicy::Drop, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--micro-batches 2 needs --capacity-policy exact"), "{e}");
    }
}
