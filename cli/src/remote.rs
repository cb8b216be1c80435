//! `moectl generate --endpoint` and `moectl status`: talking to a running cluster.

use std::time::Instant;

use moe_model::sampling::GenerationRequest;
use moe_proto::v1::{ClusterStatusResponse, LoadState, Role, WorkerStatus};
use moe_runtime::client::{ClusterClient, Generation};
use tokio_stream::StreamExt;

/// Streams tokens of one request to stdout as they arrive (with a tokenizer: as text).
pub async fn generate(
    endpoint: &str,
    req: GenerationRequest,
    tokenizer: Option<&moe_text::Tokenizer>,
) -> anyhow::Result<()> {
    let mut client = ClusterClient::new(endpoint)?;
    let since = Instant::now();
    let mut stream = client.generate_stream(&req).await?;
    let mut g = Generation::for_request(&req);
    let mut out = std::io::stdout().lock();
    let mut printer = crate::generate::TokenPrinter::new(req.sampling.logprobs, tokenizer);
    while let Some(event) = stream.next().await {
        g.absorb(event?, since)?;
        printer.print_new(&mut out, &g.tokens, &g.token_logprobs)?;
    }
    printer.finish(&mut out)?;
    let n = g.tokens.len();
    eprintln!("{n} tokens in {:.3} s", since.elapsed().as_secs_f64());
    Ok(())
}

/// The `n` (layer, expert) cells with the most tokens in the window, with their share.
fn hottest(s: &ClusterStatusResponse, n: usize) -> Vec<(usize, usize, f64)> {
    let total: u64 = s.expert_load.iter().sum();
    let e = s.num_experts.max(1) as usize;
    let mut cells: Vec<(usize, u64)> = s.expert_load.iter().copied().enumerate().collect();
    cells.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    cells
        .into_iter()
        .take_while(|&(_, t)| t > 0)
        .take(n)
        .map(|(i, t)| (i / e, i % e, t as f64 / total as f64))
        .collect()
}

fn busy_ms_per_dispatch(w: &moe_proto::v1::WorkerStatus) -> f64 {
    if w.dispatches_served == 0 {
        0.0
    } else {
        w.busy_micros as f64 / 1000.0 / w.dispatches_served as f64
    }
}

fn load_state(w: &WorkerStatus) -> &'static str {
    match LoadState::try_from(w.load_state) {
        Ok(LoadState::None) => "none",
        Ok(LoadState::Loading) => "loading",
        Ok(LoadState::Loaded) => "loaded",
        Ok(LoadState::Failed) => "failed",
        Err(_) => "?",
    }
}

/// `bytes` in MiB below a GiB, else in GiB.
fn human_bytes(bytes: u64) -> String {
    match bytes as f64 / (1u64 << 30) as f64 {
        gib if gib >= 1.0 => format!("{gib:.2} GiB"),
        gib => format!("{:.1} MiB", gib * 1024.0),
    }
}

/// A worker's loading in a few words: `loading 40% of 12.00 GiB (310/780 tensors)`.
fn weights(w: &WorkerStatus) -> String {
    let percent = 100.0 * w.load_bytes_done as f64 / w.load_bytes_total.max(1) as f64;
    match LoadState::try_from(w.load_state) {
        Ok(LoadState::None) => "none yet".into(),
        Ok(LoadState::Loaded) => format!("loaded {}", human_bytes(w.load_bytes_total)),
        _ => format!(
            "{} {percent:.0}% of {} ({}/{} tensors)",
            load_state(w),
            human_bytes(w.load_bytes_total),
            w.load_tensors_done,
            w.load_tensors_total
        ),
    }
}

pub async fn status(endpoint: &str, json: bool) -> anyhow::Result<()> {
    let mut client = ClusterClient::new(endpoint)?;
    let s = client.status().await?;
    if json {
        let workers: Vec<serde_json::Value> = s
            .workers
            .iter()
            .map(|w| {
                serde_json::json!({
                    "worker_id": w.worker_id, "role": Role::try_from(w.role).map(|r| r.as_str_name()).unwrap_or("?"),
                    "address": w.address, "experts": w.expert_slots.len(), "running": w.running, "waiting": w.waiting,
                    "kv_blocks_used": w.kv_blocks_used, "kv_blocks_total": w.kv_blocks_total, "rows_served": w.rows_served,
                    "tokens_processed": w.tokens_processed, "dispatch_bytes": w.dispatch_bytes,
                    "placement_version": w.placement_version, "millis_since_heartbeat": w.millis_since_heartbeat,
                    "expected_load_share": (w.role == Role::Expert as i32).then_some(w.load_share), "busy_ms_per_dispatch": busy_ms_per_dispatch(w),
                    "spare_slots": w.spare_slots,
                    "load": {
                        "state": load_state(w), "bytes_done": w.load_bytes_done, "bytes_total": w.load_bytes_total,
                        "tensors_done": w.load_tensors_done, "tensors_total": w.load_tensors_total,
                    },
                    "memory": {
                        "resident_bytes": w.resident_bytes, "peak_resident_bytes": w.peak_resident_bytes,
                        "weight_bytes": w.weight_bytes,
                    },
                })
            })
            .collect();
        let v = serde_json::json!({
            "model_id": s.model_id, "placement_version": s.placement_version,
            "running_requests": s.running_requests, "queued_requests": s.queued_requests, "workers": workers,
            "expert_load": {
                "window_s": s.load_window_s, "tokens": s.expert_load.iter().sum::<u64>(),
                "imbalance": s.load_imbalance,
                "per_layer": s.expert_load.chunks(s.num_experts.max(1) as usize).collect::<Vec<_>>(),
            },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "model {}  placement v{}  requests: {} running, {} queued",
        s.model_id, s.placement_version, s.running_requests, s.queued_requests
    );
    let tokens: u64 = s.expert_load.iter().sum();
    if tokens > 0 {
        let hot: Vec<String> = hottest(&s, 5)
            .into_iter()
            .map(|(l, e, f)| format!("L{l}/E{e} {:.1}%", f * 100.0))
            .collect();
        println!(
            "expert load, last {:.0} s: {tokens} tokens; expected imbalance {:.3} (max/mean worker); hottest: {}",
            s.load_window_s,
            s.load_imbalance,
            hot.join(", ")
        );
    }
    println!(
        "{:<12} {:<10} {:<22} {:>8} {:>10} {:>12} {:>10} {:>21}  weights",
        "worker", "role", "address", "experts", "load", "kv blocks", "heartbeat", "resident / weights"
    );
    for w in &s.workers {
        let role = Role::try_from(w.role).unwrap_or(Role::Unspecified);
        let (experts, load, kv) = match role {
            Role::Expert => (
                w.expert_slots.len().to_string(),
                if s.expert_load.iter().any(|&t| t > 0) {
                    format!("{:.1}%", w.load_share * 100.0)
                } else {
                    format!("{} rows", w.rows_served)
                },
                "-".to_owned(),
            ),
            _ => (
                "-".into(),
                format!("{}+{} req", w.running, w.waiting),
                format!("{}/{}", w.kv_blocks_used, w.kv_blocks_total),
            ),
        };
        let role = match role {
            Role::Expert => "expert",
            Role::Attention => "attention",
            Role::Unspecified => "?",
        };
        println!(
            "{:<12} {:<10} {:<22} {:>8} {:>10} {:>12} {:>8}ms {:>21}  {}",
            w.worker_id,
            role,
            w.address,
            experts,
            load,
            kv,
            w.millis_since_heartbeat,
            format!("{} / {}", human_bytes(w.resident_bytes), human_bytes(w.weight_bytes)),
            weights(w)
        );
    }
    Ok(())
}

/// Drains a worker; with `wait`, until it has left the cluster.
pub async fn drain(endpoint: &str, worker: &str, wait: Option<std::time::Duration>) -> anyhow::Result<()> {
    let channel = moe_runtime::net::channel(endpoint)?;
    let mut control = moe_proto::v1::control_client::ControlClient::new(channel);
    let detail = control
        .drain(moe_proto::v1::DrainRequest {
            worker_id: worker.to_owned(),
        })
        .await?
        .into_inner()
        .detail;
    eprintln!("{detail}");
    let Some(wait) = wait else { return Ok(()) };
    let mut client = ClusterClient::new(endpoint)?;
    let deadline = Instant::now() + wait;
    loop {
        if !client.status().await?.workers.iter().any(|w| w.worker_id == worker) {
            println!("{worker} drained");
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("{worker} still in the cluster after {wait:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Asks the coordinator for a placement fitted to the recent expert load; with `wait`, until the
/// new placement is active.
pub async fn rebalance(endpoint: &str, force: bool, wait: Option<std::time::Duration>) -> anyhow::Result<()> {
    let channel = moe_runtime::net::channel(endpoint)?;
    let mut control = moe_proto::v1::control_client::ControlClient::new(channel);
    let r = control
        .rebalance(moe_proto::v1::RebalanceRequest { force })
        .await?
        .into_inner();
    println!(
        "{}",
        serde_json::json!({
            "target_version": r.target_version, "imbalance_before": r.imbalance_before,
            "imbalance_after": r.imbalance_after, "detail": r.detail,
        })
    );
    let Some(wait) = wait.filter(|_| r.target_version > 0) else {
        return Ok(());
    };
    let mut client = ClusterClient::new(endpoint)?;
    let deadline = Instant::now() + wait;
    while client.status().await?.placement_version < r.target_version {
        if Instant::now() >= deadline {
            anyhow::bail!("placement {} not active after {wait:?}", r.target_version);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    eprintln!("placement {} active", r.target_version);
    Ok(())
}
