//! `moectl bench`: drives a cluster (`--endpoint`) or the in-process engine with a configured
//! load and prints one JSON object: throughput of each phase (`bench/phases.rs` says exactly
//! what is measured), time to first token and inter-token latency percentiles, failed requests,
//! attention<->expert bytes per token per layer, and the machine's measured limits with the
//! floors they imply. With `--batch-sizes` it runs the batch-size sweep of `bench/sweep.rs`
//! instead; `--json-out` also writes the JSON to a file, which `moectl bench-plot` draws.

mod floors;
mod memory;
mod phases;
pub mod plot;
mod sweep;

use floors::{ExpertLayer, ModelCosts};
use phases::{RequestTiming, latencies_ms, percentile, phase_rates, summary};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use moe_attention_worker::scheduler::{self, SchedulerHandle};
use moe_model::checkpoint::Checkpoint;
use moe_model::config::DType;
use moe_model::kv_cache::KvDtypeChoice;
use moe_model::sampling::{GenerationRequest, SamplingParams};
use moe_model::{Engine, EngineOptions, ModelConfig, names};
use moe_proto::v1::Role;
use moe_runtime::client::{ClusterClient, Generation};
use serde_json::json;
use tokio::sync::Mutex;

use crate::default_model::default_model_dir;

#[derive(clap::Args)]
pub struct Args {
    /// Benchmark a running cluster at this endpoint; without it the in-process engine runs.
    #[arg(long)]
    endpoint: Option<String>,
    /// Model directory: the in-process engine's model, and (with --endpoint) the source of the
    /// byte and FLOP floors. Default: the built-in `medium` model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8, value_parser = crate::flags::positive::<usize>())]
    concurrency: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 32, value_parser = crate::flags::positive::<usize>())]
    requests: usize,
    #[arg(long, default_value_t = 64, value_parser = crate::flags::positive::<usize>())]
    prompt_len: usize,
    #[arg(long, default_value_t = 32, value_parser = crate::flags::positive::<u32>())]
    gen_len: u32,
    /// Seed of the random prompts.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Skip measuring memory bandwidth and matmul peak.
    #[arg(long)]
    no_machine: bool,
    /// (In process only) Where the attention layers and the routed experts run: cpu, or
    /// cuda:N in a `cuda` build.
    #[arg(long, default_value = "cpu", conflicts_with = "endpoint")]
    device: String,
    /// (In process only) Element type of the KV cache: `bf16`, `f32` or `auto` (bf16 for a
    /// bfloat16/float16 checkpoint, f32 otherwise).
    #[arg(long, default_value_t = KvDtypeChoice::Auto, conflicts_with = "endpoint")]
    kv_cache_dtype: KvDtypeChoice,
    /// (Cluster only) Run the load, ask the coordinator to rebalance the expert placement for
    /// it, run the same load again, and report the expert-worker imbalance before and after.
    #[arg(long, requires = "endpoint")]
    rebalance: bool,
    /// Run the batch-size sweep instead of the load: for each size B (comma-separated), B
    /// requests of --prompt-len tokens start together and decode --gen-len tokens plus one per
    /// step the batch takes to prefill (so that all B decode together for --gen-len steps; each
    /// entry's `gen_len` says how many); the decode step while all B decode is reported beside
    /// its bandwidth and FLOP floors.
    #[arg(long, value_delimiter = ',', value_parser = crate::flags::positive::<usize>(), conflicts_with = "rebalance")]
    batch_sizes: Vec<usize>,
    /// Open loop: --concurrency requests start together, then one more every this many ms
    /// (until --requests are sent), whatever is still running: inter-token latency under
    /// arriving prompts.
    #[arg(long, value_parser = crate::flags::positive::<u64>(), conflicts_with = "batch_sizes")]
    arrival_interval_ms: Option<u64>,
    /// (In process only) Token rows per engine step, decode rows first, then prefill chunks.
    /// Default: the attention worker's default.
    #[arg(long, value_parser = crate::flags::positive::<usize>(), conflicts_with = "endpoint")]
    max_batch_tokens: Option<usize>,
    /// (In process only) Prefill rows a step may add, beyond one per decoding sequence, for
    /// prompts that arrive while others decode. Default: the attention worker's default.
    #[arg(long, value_parser = crate::flags::positive::<usize>(), conflicts_with = "endpoint")]
    prefill_rows_while_decoding: Option<usize>,
    /// Also write the JSON to this file (for `moectl bench-plot`).
    #[arg(long)]
    json_out: Option<PathBuf>,
}

enum Target {
    InProcess(SchedulerHandle),
    Cluster(ClusterClient),
}

impl Target {
    async fn run(&self, req: &GenerationRequest) -> Result<Generation, tonic::Status> {
        match self {
            Target::Cluster(c) => c.clone().generate(req).await,
            Target::InProcess(s) => s.run(req.clone()).await.map(|done| Generation {
                tokens: done.tokens,
                token_times: done.token_times,
                ..Default::default()
            }),
        }
    }
}

/// The in-process engine's KV cache: the default, or room for every request of the load (or of
/// the largest sweep batch) at its full length, so all of them run at once without preemption.
fn kv_cache_for(args: &Args) -> moe_model::kv_cache::KvCacheConfig {
    let default = EngineOptions::default().kv_cache;
    let blocks =
        |requests: usize, gen_len: u32| requests * (args.prompt_len + gen_len as usize).div_ceil(default.block_size);
    let step_rows = step_rows(args);
    let sweep = args
        .batch_sizes
        .iter()
        .map(|&b| blocks(b, sweep::gen_len_at(b, args.prompt_len, args.gen_len, step_rows)));
    let needed = sweep.fold(blocks(args.concurrency, args.gen_len), usize::max);
    moe_model::kv_cache::KvCacheConfig {
        num_blocks: default.num_blocks.max(needed),
        ..default
    }
}

/// Token rows per step of the target's scheduler: the flag in process, the attention worker's
/// default for a cluster (started with its own flags, which the bench cannot see).
fn step_rows(args: &Args) -> usize {
    args.max_batch_tokens
        .unwrap_or(scheduler::DEFAULT_MAX_BATCH_TOKENS.get())
}

/// Bytes of every tensor of the checkpoint, as stored.
fn checkpoint_bytes(dir: &std::path::Path) -> anyhow::Result<u64> {
    let ckpt = Checkpoint::open(dir)?;
    let mut bytes = 0u64;
    for name in ckpt.tensor_names() {
        let info = ckpt.info(name)?;
        bytes += (info.shape.iter().product::<usize>() * info.dtype.size_in_bytes()) as u64;
    }
    Ok(bytes)
}

/// The in-process engine's peak against the checkpoint, or each cluster worker's figures.
async fn memory_report(target: &Target, checkpoint_bytes: u64) -> serde_json::Value {
    match target {
        Target::InProcess(_) => memory::in_process(checkpoint_bytes),
        Target::Cluster(c) => match c.clone().status().await {
            Ok(s) => memory::cluster(&s),
            Err(e) => json!({ "error": e.message() }),
        },
    }
}

/// The model's per-step costs (`bench/floors.rs`) read from its checkpoint, with a KV cache of
/// `kv_elem_bytes` per value, and the storage type of its weights.
fn model_costs(
    dir: &std::path::Path,
    config: &ModelConfig,
    kv_elem_bytes: usize,
) -> anyhow::Result<(ModelCosts, DType)> {
    let ckpt = Checkpoint::open(dir)?;
    let embed = ckpt.info(names::EMBED)?;
    // Tied, the whole table is read as the LM head (counted below with the dense weights).
    let embed_row_bytes = match config.tie_word_embeddings {
        true => 0,
        false => embed.shape.iter().skip(1).product::<usize>() * embed.dtype.size_in_bytes(),
    };
    let (mut dense_bytes, mut dense_params) = (0usize, 0usize);
    for name in ckpt.tensor_names() {
        // A step reads only its tokens' embedding rows, unless the table is also the LM head.
        let embedding_only = name == names::EMBED && !config.tie_word_embeddings;
        if names::is_routed_expert(name) || embedding_only || (name == names::LM_HEAD && config.tie_word_embeddings) {
            continue;
        }
        let info = ckpt.info(name)?;
        let n: usize = info.shape.iter().product();
        dense_params += n;
        dense_bytes += n * info.dtype.size_in_bytes();
    }
    let mut layers = Vec::with_capacity(config.layers.len());
    for (l, lc) in config.layers.iter().enumerate() {
        let (mut bytes, mut params) = (0usize, 0usize);
        for p in ["gate_proj", "up_proj", "down_proj"] {
            let info = ckpt.info(&names::expert(l, 0, p))?;
            let n: usize = info.shape.iter().product();
            params += n;
            bytes += n * info.dtype.size_in_bytes();
        }
        layers.push(ExpertLayer {
            experts: config.num_experts,
            topk: lc.moe_topk,
            expert_bytes: bytes as f64,
            expert_params: params as f64,
        });
    }
    let costs = ModelCosts {
        dense_bytes: dense_bytes as f64,
        dense_params: dense_params as f64,
        embed_row_bytes: embed_row_bytes as f64,
        layers,
        kv_bytes_per_token: config.kv_bytes_per_token(kv_elem_bytes) as f64,
        attention_flops_per_position: (4 * config.num_heads * config.head_dim * config.num_layers) as f64,
    };
    let dtype = ckpt.info(&names::layer(0, names::Q_PROJ))?.dtype;
    Ok((costs, dtype))
}

fn prompts(n: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = moe_model::rng::SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            (0..len)
                .map(|_| (5 + rng.next_u64() % (vocab as u64 - 5)) as u32)
                .collect()
        })
        .collect()
}

/// Cumulative cluster counters, read from the coordinator's status.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    dispatch_bytes: u64,
    tokens: u64,
    busiest_assignments: u64,
    mean_assignments_milli: u64,
    layer_dispatches: u64,
    layer_dispatch_micros: u64,
    nccl_layer_dispatches: u64,
    /// Attention workers' steps, their time, those cut into two micro-batches, and the time
    /// one micro-batch computed while the other's experts were in flight.
    steps: u64,
    step_micros: u64,
    micro_batched_steps: u64,
    overlap_micros: u64,
    /// Expert workers' dispatch messages served and time computing them.
    expert_dispatches: u64,
    expert_busy_micros: u64,
    /// The coordinator's expected imbalance of the active placement over its load window.
    expected_imbalance: f64,
    placement_version: u64,
}

async fn counters(target: &Target) -> Counters {
    let Target::Cluster(c) = target else {
        return Counters::default();
    };
    // Workers report their counters with their heartbeats (every 200 ms by default): let one
    // pass so the snapshot covers what just ran.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let Ok(s) = c.clone().status().await else {
        return Counters::default();
    };
    let mut out = Counters {
        expected_imbalance: s.load_imbalance,
        placement_version: s.placement_version,
        ..Counters::default()
    };
    for w in s.workers.iter().filter(|w| w.role == Role::Attention as i32) {
        out.dispatch_bytes += w.dispatch_bytes;
        out.tokens += w.tokens_processed;
        out.busiest_assignments += w.busiest_assignments;
        out.mean_assignments_milli += w.mean_assignments_milli;
        out.layer_dispatches += w.layer_dispatches;
        out.layer_dispatch_micros += w.layer_dispatch_micros;
        out.nccl_layer_dispatches += w.nccl_layer_dispatches;
        out.steps += w.steps;
        out.step_micros += w.step_micros;
        out.micro_batched_steps += w.micro_batched_steps;
        out.overlap_micros += w.overlap_micros;
    }
    for w in s.workers.iter().filter(|w| w.role == Role::Expert as i32) {
        out.expert_dispatches += w.dispatches_served;
        out.expert_busy_micros += w.busy_micros;
    }
    out
}

/// One run of the configured load.
struct Phase {
    wall_s: f64,
    /// Each request: when it was sent (from the start of the run) and what came back.
    results: Vec<(Duration, Result<Generation, tonic::Status>)>,
    before: Counters,
    after: Counters,
}

impl Phase {
    async fn run(target: &Arc<Target>, args: &Args, vocab: usize) -> anyhow::Result<Phase> {
        let before = counters(target).await;
        let prompts = prompts(args.requests, args.prompt_len, vocab, args.seed);
        let started = Instant::now();
        let results = match args.arrival_interval_ms {
            None => closed_loop(target, prompts, args.concurrency, args.gen_len, started).await?,
            Some(ms) => {
                let interval = Duration::from_millis(ms);
                open_loop(target, prompts, args.concurrency, interval, args.gen_len, started).await?
            }
        };
        let wall_s = started.elapsed().as_secs_f64();
        Ok(Phase {
            wall_s,
            results,
            before,
            after: counters(target).await,
        })
    }

    /// The requests that succeeded, as times from the start of the run.
    fn timings(&self, prompt_len: usize) -> Vec<RequestTiming> {
        self.results
            .iter()
            .filter_map(|(sent, r)| {
                let g = r.as_ref().ok()?;
                Some(RequestTiming {
                    sent_s: sent.as_secs_f64(),
                    tokens_s: g.token_times.iter().map(|t| (*sent + *t).as_secs_f64()).collect(),
                    prompt_tokens: prompt_len,
                })
            })
            .collect()
    }

    fn failed(&self) -> usize {
        self.results.iter().filter(|(_, r)| r.is_err()).count()
    }

    /// Measured per-step imbalance over this phase: assignments to the busiest expert worker
    /// over the mean per worker, summed over every layer dispatch (bigger steps weigh more).
    fn step_imbalance(&self) -> Option<f64> {
        let busiest = self.after.busiest_assignments - self.before.busiest_assignments;
        let mean = (self.after.mean_assignments_milli - self.before.mean_assignments_milli) as f64 / 1000.0;
        (mean > 0.0).then(|| busiest as f64 / mean)
    }

    /// Per layer dispatch, as the attention workers see it: send to every answer held (ms),
    /// beside the expert workers' mean time per dispatch message (queueing included).
    fn dispatch(&self) -> serde_json::Value {
        let (a, b) = (&self.after, &self.before);
        let mean_ms = |micros: u64, n: u64| (n > 0).then(|| micros as f64 / 1e3 / n as f64);
        json!({
            "layer_round_trip_ms": mean_ms(a.layer_dispatch_micros - b.layer_dispatch_micros, a.layer_dispatches - b.layer_dispatches),
            "expert_ms_per_message": mean_ms(a.expert_busy_micros - b.expert_busy_micros, a.expert_dispatches - b.expert_dispatches),
            "layer_dispatches": a.layer_dispatches - b.layer_dispatches,
            "nccl_layer_dispatches": a.nccl_layer_dispatches - b.nccl_layer_dispatches,
            // Micro-batch overlap: per attention-worker step, the time one half computed while
            // the other's experts were in flight, and that as a fraction of the step.
            "steps": a.steps - b.steps,
            "micro_batched_steps": a.micro_batched_steps - b.micro_batched_steps,
            "step_ms": mean_ms(a.step_micros - b.step_micros, a.steps - b.steps),
            "overlap_ms_per_step": mean_ms(a.overlap_micros - b.overlap_micros, a.steps - b.steps),
            "overlap_fraction": (a.step_micros > b.step_micros)
                .then(|| (a.overlap_micros - b.overlap_micros) as f64 / (a.step_micros - b.step_micros) as f64),
        })
    }

    fn balance(&self, prompt_len: usize) -> serde_json::Value {
        json!({
            "placement_version": self.after.placement_version,
            "step_imbalance": self.step_imbalance(),
            "expected_imbalance": self.after.expected_imbalance,
            "decode_tokens_per_s": phase_rates(&self.timings(prompt_len)).decode_tokens_per_s(),
            "failed": self.failed(),
        })
    }
}

type Sent = (Duration, Result<Generation, tonic::Status>);

/// `concurrency` slots, each sending its next prompt when its last request finished.
async fn closed_loop(
    target: &Arc<Target>,
    prompts: Vec<Vec<u32>>,
    concurrency: usize,
    gen_len: u32,
    started: Instant,
) -> anyhow::Result<Vec<Sent>> {
    let slots = concurrency.min(prompts.len());
    let queue = Arc::new(Mutex::new(prompts));
    let mut workers = Vec::new();
    for _ in 0..slots {
        let (queue, target) = (queue.clone(), target.clone());
        workers.push(tokio::spawn(async move {
            let mut results = Vec::new();
            loop {
                let Some(prompt) = queue.lock().await.pop() else { break };
                let sent = started.elapsed();
                results.push((sent, target.run(&greedy(prompt, gen_len)).await));
            }
            results
        }));
    }
    let mut results = Vec::new();
    for w in workers {
        results.extend(w.await?);
    }
    Ok(results)
}

/// The first `concurrency` prompts at once, then one every `interval` whatever is running.
async fn open_loop(
    target: &Arc<Target>,
    prompts: Vec<Vec<u32>>,
    concurrency: usize,
    interval: Duration,
    gen_len: u32,
    started: Instant,
) -> anyhow::Result<Vec<Sent>> {
    let mut tasks = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.into_iter().enumerate() {
        if let Some(arrival) = (i + 1).checked_sub(concurrency).filter(|&a| a > 0) {
            tokio::time::sleep_until((started + interval * arrival as u32).into()).await;
        }
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let sent = started.elapsed();
            (sent, target.run(&greedy(prompt, gen_len)).await)
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(t.await?);
    }
    Ok(results)
}

fn greedy(prompt: Vec<u32>, gen_len: u32) -> GenerationRequest {
    GenerationRequest {
        prompt,
        sampling: SamplingParams::greedy(gen_len),
        return_prompt_logits: false,
        return_token_logits: false,
        resumed: 0,
    }
}

/// Asks the coordinator to rebalance and waits (bounded) until the new placement is active.
async fn rebalance(endpoint: &str) -> anyhow::Result<serde_json::Value> {
    let channel = moe_runtime::net::channel(endpoint)?;
    let mut control = moe_proto::v1::control_client::ControlClient::new(channel);
    let r = control
        .rebalance(moe_proto::v1::RebalanceRequest { force: false })
        .await?
        .into_inner();
    if r.target_version > 0 {
        let mut client = ClusterClient::new(endpoint)?;
        let deadline = Instant::now() + Duration::from_secs(300);
        while client.status().await?.placement_version < r.target_version {
            anyhow::ensure!(
                Instant::now() < deadline,
                "placement {} never became active",
                r.target_version
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(json!({
        "target_version": r.target_version, "imbalance_before": r.imbalance_before,
        "imbalance_after": r.imbalance_after, "detail": r.detail,
    }))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let dir = match &args.model {
        Some(d) => d.clone(),
        None => default_model_dir()?,
    };
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    // The cache's dtype as `auto` resolves it (a cluster's attention workers run `auto` unless
    // told otherwise; in process the flag decides).
    // On a GPU the device cache is f32 whatever the flag (docs/kv-cache.md).
    let kv_dtype = match args.device.as_str() {
        "cpu" => args.kv_cache_dtype.resolve(config.dtype),
        _ => moe_model::kv_cache::KvDtype::F32,
    };
    let (costs, dtype) = model_costs(&dir, &config, kv_dtype.size_in_bytes())?;
    let weight_bytes = checkpoint_bytes(&dir)?;
    let machine = (!args.no_machine).then(crate::machine::measure);
    // The probe's buffers are gone but would stay the process's peak: start the peak afresh.
    moe_runtime::memory::reset_peak();
    let mut gpu_bandwidth_gbps = None;
    let mut kv_cache = None;
    let target = match &args.endpoint {
        Some(ep) => {
            let mut c = ClusterClient::new(ep)?;
            c.wait_ready(Duration::from_secs(60)).await?;
            Target::Cluster(c)
        }
        None => {
            let device = moe_model::device::Device::open(&args.device)?;
            if let moe_model::device::Device::Cuda(gpu) = &device
                && !args.no_machine
            {
                // The decode step's floor on this device: its weight bytes at the GPU's own
                // measured bandwidth (256 MiB copies, best of 10).
                gpu_bandwidth_gbps = Some(gpu.measure_memory_gbps(256 << 20, 10)?);
            }
            let options = EngineOptions {
                expert_device: device.clone(),
                attention_device: device,
                kv_cache: kv_cache_for(&args).with_dtype(args.kv_cache_dtype),
            };
            let engine = Engine::load(&dir, options).with_context(|| format!("loading {}", dir.display()))?;
            let dtype = engine.cache().dtype();
            kv_cache = Some(json!({
                "dtype": dtype.name(),
                "bytes_per_token": config.kv_bytes_per_token(dtype.size_in_bytes()),
            }));
            let defaults = scheduler::SchedulerConfig::default();
            let config = scheduler::SchedulerConfig {
                max_batch_tokens: args.max_batch_tokens.unwrap_or(defaults.max_batch_tokens),
                prefill_while_decoding: args
                    .prefill_rows_while_decoding
                    .unwrap_or(defaults.prefill_while_decoding),
                // Every request of the largest sweep batch runs at once.
                max_running: defaults
                    .max_running
                    .max(args.batch_sizes.iter().copied().max().unwrap_or(0)),
            };
            Target::InProcess(scheduler::spawn(engine, config))
        }
    };
    let label = match &args.endpoint {
        Some(_) => "cluster",
        None => "in-process",
    };
    let target_name = match &args.endpoint {
        Some(ep) => format!("cluster {ep}"),
        None => format!("in-process engine, attention and experts on {}", args.device),
    };
    // Alone: prefill time (time to first token) and decode step time at batch 1.
    let probe_prompt = prompts(1, args.prompt_len, config.vocab_size, args.seed ^ 0xabc).remove(0);
    target
        .run(&greedy(probe_prompt.clone(), args.gen_len))
        .await
        .map_err(anyhow::Error::msg)?; // warm-up
    let probe = target
        .run(&greedy(probe_prompt, args.gen_len))
        .await
        .map_err(anyhow::Error::msg)?;
    let prefill_s = probe.token_times[0].as_secs_f64();
    let decode_step_s = if probe.token_times.len() > 1 {
        (probe.token_times.last().unwrap().as_secs_f64() - prefill_s) / (probe.token_times.len() - 1) as f64
    } else {
        f64::NAN
    };

    let target = Arc::new(target);
    // The sweep replaces the load; the probe above has warmed the target up for it.
    if !args.batch_sizes.is_empty() {
        let load = sweep::SweepLoad {
            batch_sizes: &args.batch_sizes,
            prompt_len: args.prompt_len,
            gen_len: args.gen_len,
            seed: args.seed,
            vocab: config.vocab_size,
            step_rows: step_rows(&args),
        };
        let entries = sweep::run(&target, &costs, machine.as_ref(), &load).await?;
        let out = json!({
            "target": target_name,
            "label": label,
            "model": dir.display().to_string(),
            "model_dtype": format!("{dtype:?}").to_lowercase(),
            "load": { "batch_sizes": args.batch_sizes, "prompt_len": args.prompt_len, "gen_len": args.gen_len },
            "step_ms_is": "p50 of the gaps between consecutive tokens while every request of the batch was past its first token and none had finished",
            "sweep": entries,
            "machine": machine,
        });
        return emit(&out, args.json_out.as_deref());
    }

    // Under load.
    let mut phase = Phase::run(&target, &args, config.vocab_size).await?;
    let balance = match (&args.endpoint, args.rebalance) {
        (Some(endpoint), true) => {
            let before = phase.balance(args.prompt_len);
            let rebalanced = rebalance(endpoint).await?;
            phase = Phase::run(&target, &args, config.vocab_size).await?;
            Some(json!({ "before": before, "rebalance": rebalanced, "after": phase.balance(args.prompt_len) }))
        }
        _ => None,
    };
    let (wall, failed, timings) = (phase.wall_s, phase.failed(), phase.timings(args.prompt_len));
    let rates = phase_rates(&timings);
    let (ttft, itl) = latencies_ms(&timings);
    let generated: usize = timings.iter().map(|t| t.tokens_s.len()).sum();
    let tokens = phase.after.tokens.saturating_sub(phase.before.tokens);
    let bytes_per_token_layer = if tokens > 0 {
        Some(
            (phase.after.dispatch_bytes - phase.before.dispatch_bytes) as f64
                / (tokens as f64 * config.num_layers as f64),
        )
    } else {
        None
    };

    let bw_floor_ms = machine
        .as_ref()
        .map(|m| costs.weight_bytes(1) / (m.memory_bandwidth_gbps * 1e9) * 1e3);
    let prefill_gflops = costs.flops_per_token() * args.prompt_len as f64 / prefill_s / 1e9;
    let out = json!({
        "target": target_name,
        "label": label,
        "model": dir.display().to_string(),
        "model_dtype": format!("{dtype:?}").to_lowercase(),
        "load": {
            "concurrency": args.concurrency, "requests": args.requests, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
            "arrival_interval_ms": args.arrival_interval_ms, "max_batch_tokens": args.max_batch_tokens,
            "prefill_rows_while_decoding": args.prefill_rows_while_decoding,
        },
        "kv_cache": kv_cache,
        "wall_s": wall,
        "failed": failed,
        // Each phase's rate over the time some request was in it (see `bench/phases.rs`).
        "prefill_tokens_per_s": rates.prefill_tokens_per_s(),
        "decode_tokens_per_s": rates.decode_tokens_per_s(),
        "phases": {
            "prefill": {
                "prompt_tokens": rates.prompt_tokens,
                "busy_s": rates.prefill_s,
                "measured_as": "prompt tokens / union over requests of [sent, first token]",
            },
            "decode": {
                "tokens": rates.decode_tokens,
                "busy_s": rates.decode_s,
                "measured_as": "tokens after each request's first / union over requests of [first token, last token]",
            },
        },
        // Every generated token over the whole run: what a user of the service gets end to end.
        "output_tokens_per_s": generated as f64 / wall,
        "ttft_ms": summary(&ttft),
        "itl_ms": summary(&itl),
        "itl_p99_over_p50": percentile(&itl, 0.99) / percentile(&itl, 0.5),
        "dispatch_bytes_per_token_per_layer": bytes_per_token_layer,
        "dispatch": args.endpoint.as_ref().map(|_| phase.dispatch()),
        "step_imbalance": phase.step_imbalance(),
        "expected_imbalance": args.endpoint.as_ref().map(|_| phase.after.expected_imbalance),
        "balance": balance,
        "alone": {
            "prefill_ms": prefill_s * 1e3,
            "prefill_gflops": prefill_gflops,
            "decode_step_ms": decode_step_s * 1e3,
        },
        "floors": {
            "decode_step_bytes": costs.weight_bytes(1),
            "decode_step_floor_ms": bw_floor_ms,
            "decode_step_over_floor": bw_floor_ms.map(|f| decode_step_s * 1e3 / f),
            "flops_per_token": costs.flops_per_token(),
            "prefill_over_matmul_peak": machine.as_ref().map(|m| prefill_gflops / m.matmul_f32_gflops),
        },
        "gpu": gpu_bandwidth_gbps.map(|gbps| {
            let floor_ms = costs.weight_bytes(1) / (gbps * 1e9) * 1e3;
            json!({
                "memory_bandwidth_gbps": gbps,
                "decode_step_floor_ms": floor_ms,
                "decode_step_over_floor": decode_step_s * 1e3 / floor_ms,
                // Embeddings, norms, router, shared expert and LM head stay on the host today,
                // so charging every byte at HBM speed makes this floor a lower bound.
                "floor_is": "every weight byte at the GPU's measured bandwidth: a lower bound while dense weights stay on the host",
            })
        }),
        "memory": memory_report(&target, weight_bytes).await,
        "machine": machine,
    });
    emit(&out, args.json_out.as_deref())
}

/// Prints the bench's JSON, and writes it to `json_out` too when given.
fn emit(out: &serde_json::Value, json_out: Option<&std::path::Path>) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(out)?;
    if let Some(path) = json_out {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{text}");
    Ok(())
}
