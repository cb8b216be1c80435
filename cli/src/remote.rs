//! `moectl generate --endpoint` and `moectl status`: talking to a running cluster.

use std::io::Write;
use std::time::Instant;

use moe_model::sampling::{GenerationRequest, SamplingParams};
use moe_proto::v1::Role;
use moe_runtime::client::{ClusterClient, Generation};
use tokio_stream::StreamExt;

/// Streams tokens of one request to stdout as they arrive.
pub async fn generate(endpoint: &str, prompt: Vec<u32>, sampling: SamplingParams) -> anyhow::Result<()> {
    let mut client = ClusterClient::new(endpoint)?;
    let req = GenerationRequest {
        prompt,
        sampling,
        return_prompt_logits: false,
        return_token_logits: false,
        resumed: 0,
    };
    let since = Instant::now();
    let mut stream = client.generate_stream(&req).await?;
    let mut g = Generation::default();
    let mut out = std::io::stdout().lock();
    let mut printed = 0;
    while let Some(event) = stream.next().await {
        g.absorb(event?, since)?;
        for t in &g.tokens[printed..] {
            if printed > 0 {
                write!(out, ",")?;
            }
            write!(out, "{t}")?;
            printed += 1;
        }
        out.flush()?;
    }
    writeln!(out)?;
    let n = g.tokens.len();
    eprintln!("{n} tokens in {:.3} s", since.elapsed().as_secs_f64());
    Ok(())
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
                })
            })
            .collect();
        let v = serde_json::json!({
            "model_id": s.model_id, "placement_version": s.placement_version,
            "running_requests": s.running_requests, "queued_requests": s.queued_requests, "workers": workers,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "model {}  placement v{}  requests: {} running, {} queued",
        s.model_id, s.placement_version, s.running_requests, s.queued_requests
    );
    println!(
        "{:<12} {:<10} {:<22} {:>8} {:>10} {:>12} {:>10}",
        "worker", "role", "address", "experts", "load", "kv blocks", "heartbeat"
    );
    for w in &s.workers {
        let role = Role::try_from(w.role).unwrap_or(Role::Unspecified);
        let (experts, load, kv) = match role {
            Role::Expert => (
                w.expert_slots.len().to_string(),
                format!("{} rows", w.rows_served),
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
            "{:<12} {:<10} {:<22} {:>8} {:>10} {:>12} {:>8}ms",
            w.worker_id, role, w.address, experts, load, kv, w.millis_since_heartbeat
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
