//! `moectl bench`: drives a cluster (`--endpoint`) or the in-process engine with a configured
//! load and prints one JSON object: throughput, time to first token and inter-token latency
//! percentiles, failed requests, attention<->expert bytes per token per layer, and the machine's
//! measured limits with the floors they imply.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use moe_attention_worker::scheduler::{self, SchedulerHandle};
use moe_model::checkpoint::Checkpoint;
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
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 32)]
    requests: usize,
    #[arg(long, default_value_t = 64)]
    prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    gen_len: u32,
    /// Seed of the random prompts.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Skip measuring memory bandwidth and matmul peak.
    #[arg(long)]
    no_machine: bool,
}

enum Target {
    InProcess(SchedulerHandle),
    Cluster(ClusterClient),
}

impl Target {
    async fn run(&self, req: &GenerationRequest) -> Result<Generation, String> {
        match self {
            Target::Cluster(c) => c.clone().generate(req).await.map_err(|s| s.to_string()),
            Target::InProcess(s) => s.run(req.clone()).await.map(|done| Generation {
                tokens: done.tokens,
                token_times: done.token_times,
                ..Default::default()
            }),
        }
    }
}

/// Bytes a batch-1 decode step must read, and FLOPs per token (2 x active parameters).
struct Floors {
    decode_bytes: f64,
    flops_per_token: f64,
}

fn floors(dir: &std::path::Path, config: &ModelConfig) -> anyhow::Result<Floors> {
    let ckpt = Checkpoint::open(dir)?;
    let (mut non_expert_bytes, mut non_expert_params) = (0usize, 0usize);
    for name in ckpt.tensor_names() {
        if names::is_routed_expert(name) || (name == names::LM_HEAD && config.tie_word_embeddings) {
            continue;
        }
        let info = ckpt.info(name)?;
        let n: usize = info.shape.iter().product();
        non_expert_params += n;
        non_expert_bytes += n * info.dtype.size_in_bytes();
    }
    let (mut expert_bytes, mut expert_params) = (0usize, 0usize);
    for (l, lc) in config.layers.iter().enumerate() {
        for p in ["gate_proj", "up_proj", "down_proj"] {
            let info = ckpt.info(&names::expert(l, 0, p))?;
            let n: usize = info.shape.iter().product();
            expert_params += n * lc.moe_topk;
            expert_bytes += n * info.dtype.size_in_bytes() * lc.moe_topk;
        }
    }
    Ok(Floors {
        decode_bytes: (non_expert_bytes + expert_bytes) as f64,
        flops_per_token: 2.0 * (non_expert_params + expert_params) as f64,
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
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

async fn dispatch_counters(target: &Target) -> (u64, u64) {
    let Target::Cluster(c) = target else { return (0, 0) };
    // Workers report their counters with their heartbeats (every 200 ms by default): let one
    // pass so the snapshot covers what just ran.
    tokio::time::sleep(Duration::from_millis(600)).await;
    match c.clone().status().await {
        Ok(s) => s
            .workers
            .iter()
            .filter(|w| w.role == Role::Attention as i32)
            .fold((0, 0), |(b, t), w| (b + w.dispatch_bytes, t + w.tokens_processed)),
        Err(_) => (0, 0),
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.concurrency == 0 || args.requests == 0 || args.prompt_len == 0 || args.gen_len == 0 {
        anyhow::bail!("--concurrency, --requests, --prompt-len and --gen-len must be positive");
    }
    let dir = match &args.model {
        Some(d) => d.clone(),
        None => default_model_dir()?,
    };
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let floors = floors(&dir, &config)?;
    let machine = (!args.no_machine).then(crate::machine::measure);
    let target = match &args.endpoint {
        Some(ep) => {
            let mut c = ClusterClient::new(ep)?;
            c.wait_ready(Duration::from_secs(60)).await?;
            Target::Cluster(c)
        }
        None => {
            let engine =
                Engine::load(&dir, EngineOptions::default()).with_context(|| format!("loading {}", dir.display()))?;
            Target::InProcess(scheduler::spawn(engine, Default::default()))
        }
    };
    let request = |prompt: Vec<u32>| GenerationRequest {
        prompt,
        sampling: SamplingParams::greedy(args.gen_len),
        return_prompt_logits: false,
        return_token_logits: false,
        resumed: 0,
    };

    // Alone: prefill time (time to first token) and decode step time at batch 1.
    let probe_prompt = prompts(1, args.prompt_len, config.vocab_size, args.seed ^ 0xabc).remove(0);
    target
        .run(&request(probe_prompt.clone()))
        .await
        .map_err(anyhow::Error::msg)?; // warm-up
    let probe = target.run(&request(probe_prompt)).await.map_err(anyhow::Error::msg)?;
    let prefill_s = probe.token_times[0].as_secs_f64();
    let decode_step_s = if probe.token_times.len() > 1 {
        (probe.token_times.last().unwrap().as_secs_f64() - prefill_s) / (probe.token_times.len() - 1) as f64
    } else {
        f64::NAN
    };

    // Under load.
    let (bytes0, tokens0) = dispatch_counters(&target).await;
    let queue = Arc::new(Mutex::new(prompts(
        args.requests,
        args.prompt_len,
        config.vocab_size,
        args.seed,
    )));
    let target = Arc::new(target);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.min(args.requests) {
        let (queue, target) = (queue.clone(), target.clone());
        let gen_len = args.gen_len;
        workers.push(tokio::spawn(async move {
            let mut results = Vec::new();
            loop {
                let Some(prompt) = queue.lock().await.pop() else { break };
                let req = GenerationRequest {
                    prompt,
                    sampling: SamplingParams::greedy(gen_len),
                    return_prompt_logits: false,
                    return_token_logits: false,
                    resumed: 0,
                };
                results.push(target.run(&req).await);
            }
            results
        }));
    }
    let mut results = Vec::new();
    for w in workers {
        results.extend(w.await?);
    }
    let wall = started.elapsed().as_secs_f64();
    let (bytes1, tokens1) = dispatch_counters(&target).await;

    let failed = results.iter().filter(|r| r.is_err()).count();
    let ok: Vec<&Generation> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let mut ttft: Vec<f64> = ok
        .iter()
        .filter_map(|g| g.token_times.first())
        .map(|t| t.as_secs_f64() * 1e3)
        .collect();
    let mut itl: Vec<f64> = ok
        .iter()
        .flat_map(|g| g.token_times.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3))
        .collect();
    ttft.sort_by(f64::total_cmp);
    itl.sort_by(f64::total_cmp);
    let generated: usize = ok.iter().map(|g| g.tokens.len()).sum();
    let prompt_tokens = ok.len() * args.prompt_len;
    let tokens = tokens1.saturating_sub(tokens0);
    let bytes_per_token_layer = if tokens > 0 {
        Some((bytes1 - bytes0) as f64 / (tokens as f64 * config.num_layers as f64))
    } else {
        None
    };

    let bw_floor_ms = machine
        .as_ref()
        .map(|m| floors.decode_bytes / (m.memory_bandwidth_gbps * 1e9) * 1e3);
    let prefill_gflops = floors.flops_per_token * args.prompt_len as f64 / prefill_s / 1e9;
    let out = json!({
        "target": match &args.endpoint { Some(ep) => format!("cluster {ep}"), None => "in-process engine".into() },
        "model": dir.display().to_string(),
        "load": { "concurrency": args.concurrency, "requests": args.requests, "prompt_len": args.prompt_len, "gen_len": args.gen_len },
        "wall_s": wall,
        "failed": failed,
        "prefill_tokens_per_s": prompt_tokens as f64 / wall,
        "decode_tokens_per_s": generated as f64 / wall,
        "ttft_ms": { "p50": percentile(&ttft, 0.5), "p99": percentile(&ttft, 0.99) },
        "itl_ms": { "p50": percentile(&itl, 0.5), "p99": percentile(&itl, 0.99) },
        "dispatch_bytes_per_token_per_layer": bytes_per_token_layer,
        "alone": {
            "prefill_ms": prefill_s * 1e3,
            "prefill_gflops": prefill_gflops,
            "decode_step_ms": decode_step_s * 1e3,
        },
        "floors": {
            "decode_step_bytes": floors.decode_bytes,
            "decode_step_floor_ms": bw_floor_ms,
            "decode_step_over_floor": bw_floor_ms.map(|f| decode_step_s * 1e3 / f),
            "flops_per_token": floors.flops_per_token,
            "prefill_over_matmul_peak": machine.as_ref().map(|m| prefill_gflops / m.matmul_f32_gflops),
        },
        "machine": machine,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
