//! Prometheus text metrics (and a plain health probe) over a minimal HTTP/1.1 listener: the
//! signals operators and autoscalers act on. Label cardinality stays bounded: per worker at
//! most, never per (layer, expert, worker).

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use moe_proto::v1::{ClusterStatusResponse, Role};
use moe_runtime::net::{HANDSHAKE_DEADLINE, Incoming, ListenConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio_stream::StreamExt;

use crate::state::StateHandle;

/// What the metrics need besides the cluster status.
#[derive(Clone)]
pub struct MetricsSource {
    pub state: StateHandle,
    pub admission: Arc<Semaphore>,
    pub max_in_flight: usize,
    /// Whether this coordinator leads (standbys report 0 and are not healthy).
    pub serving: crate::leader::Serving,
    /// Latency histograms and token counters of the requests this coordinator relayed.
    pub requests: Arc<crate::latency::RequestMetrics>,
    /// What departed attention workers had counted of layer dispatches.
    pub dispatch_history: Arc<std::sync::Mutex<crate::dispatch_history::DispatchHistory>>,
}

/// A scrape endpoint needs few connections; the same handshake deadline (a request head of 24
/// bytes or more, then the answer) closes sockets that never send one.
const LISTEN: ListenConfig = ListenConfig {
    max_connections: 64,
    handshake_deadline: HANDSHAKE_DEADLINE,
    handshake_exchanges: 1,
};

/// The probes' answers (status line, body), `None` for other paths.
/// - `/livez`: the process answers, leader or standby. What Kubernetes' readiness asks: workers
///   reach the coordinators before any placement exists, so readiness cannot wait for one
///   (deploy/k8s/base/coordinator.yaml).
/// - `/healthz`: this coordinator serves requests: it leads and a placement is active.
fn probe(path: &str, leading: bool, placement_active: bool) -> Option<(&'static str, &'static str)> {
    const UNAVAILABLE: &str = "503 Service Unavailable";
    Some(match path {
        "/livez" if leading => ("200 OK", "alive: leading\n"),
        "/livez" => ("200 OK", "alive: standby\n"),
        "/healthz" if !leading => (UNAVAILABLE, "standby: not the leader\n"),
        "/healthz" if placement_active => ("200 OK", "serving\n"),
        "/healthz" => (UNAVAILABLE, "no active placement\n"),
        _ => return None,
    })
}

/// Serves `/metrics`, `/livez` and `/healthz` on `incoming` until the task is dropped.
pub async fn serve(mut incoming: Incoming, source: MetricsSource) {
    while let Some(connection) = incoming.next().await {
        let Ok(mut socket) = connection else {
            continue;
        };
        let source = source.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut read = 0;
            // Read the request head (bounded); only the request line matters.
            while read < buf.len() {
                match socket.read(&mut buf[read..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => read += n,
                }
                if buf[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..read]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let leading = *source.serving.borrow();
            let s = source.state.status();
            let (status, body) = match probe(path, leading, s.placement_version > 0) {
                Some((status, body)) => (status, body.to_owned()),
                None if path == "/metrics" => ("200 OK", render(&s, &source)),
                None => ("404 Not Found", "try /metrics, /livez or /healthz\n".into()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}

/// Binds `addr` for metrics; returns the bound address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(Incoming, SocketAddr)> {
    moe_runtime::net::bind_with(addr, LISTEN).await
}

fn render(s: &ClusterStatusResponse, source: &MetricsSource) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let attention: Vec<_> = s.workers.iter().filter(|w| w.role == Role::Attention as i32).collect();
    let experts: Vec<_> = s.workers.iter().filter(|w| w.role == Role::Expert as i32).collect();
    let one = |v: f64| vec![(String::new(), v)];
    let per = |ws: &[&moe_proto::v1::WorkerStatus], f: &dyn Fn(&moe_proto::v1::WorkerStatus) -> f64| {
        ws.iter()
            .map(|w| (format!("{{worker=\"{}\"}}", w.worker_id), f(w)))
            .collect::<Vec<_>>()
    };
    let in_flight = source.max_in_flight - source.admission.available_permits();
    metric(
        "moe_coordinator_leader",
        "gauge",
        "1 while this coordinator leads the cluster, 0 while it stands by.",
        &one(if *source.serving.borrow() { 1.0 } else { 0.0 }),
    );
    metric(
        "moe_requests_in_flight",
        "gauge",
        "Requests admitted by the coordinator and not finished.",
        &one(in_flight as f64),
    );
    metric(
        "moe_requests_in_flight_limit",
        "gauge",
        "Admission limit (--max-in-flight).",
        &one(source.max_in_flight as f64),
    );
    metric(
        "moe_requests_queued",
        "gauge",
        "Requests waiting in attention workers' schedulers.",
        &one(s.queued_requests as f64),
    );
    metric(
        "moe_requests_running",
        "gauge",
        "Requests running on attention workers.",
        &one(s.running_requests as f64),
    );
    let (used, total) = attention.iter().fold((0u64, 0u64), |(u, t), w| {
        (u + w.kv_blocks_used as u64, t + w.kv_blocks_total as u64)
    });
    metric(
        "moe_kv_utilization",
        "gauge",
        "KV blocks in use over all attention workers, 0..1.",
        &one(if total > 0 { used as f64 / total as f64 } else { 0.0 }),
    );
    metric(
        "moe_kv_blocks_used",
        "gauge",
        "KV blocks in use per attention worker.",
        &per(&attention, &|w| w.kv_blocks_used as f64),
    );
    metric(
        "moe_tokens_processed_total",
        "counter",
        "Token rows run through the model (prefill and decode) per attention worker.",
        &per(&attention, &|w| w.tokens_processed as f64),
    );
    metric(
        "moe_dispatch_bytes_total",
        "counter",
        "Bytes between each attention worker and the expert workers.",
        &per(&attention, &|w| w.dispatch_bytes as f64),
    );
    metric(
        "moe_expert_rows_served_total",
        "counter",
        "Token rows served per expert worker.",
        &per(&experts, &|w| w.rows_served as f64),
    );
    metric(
        "moe_expert_slots",
        "gauge",
        "(layer, expert) slots held per expert worker.",
        &per(&experts, &|w| w.expert_slots.len() as f64),
    );
    metric(
        "moe_dropped_assignments_total",
        "counter",
        "Routed assignments dropped by a lossy capacity policy, per attention worker.",
        &per(&attention, &|w| w.dropped_assignments as f64),
    );
    metric(
        "moe_rerouted_assignments_total",
        "counter",
        "Routed assignments moved to another expert by `recycle`, per attention worker.",
        &per(&attention, &|w| w.rerouted_assignments as f64),
    );
    metric(
        "moe_overflow_dispatches_total",
        "counter",
        "Dispatches sent as a later micro-batch because an expert slot was full (--slot-capacity), per attention worker.",
        &per(&attention, &|w| w.overflow_dispatches as f64),
    );
    metric(
        "moe_expert_busy_seconds_total",
        "counter",
        "Time spent computing dispatches per expert worker (busy time; over dispatches: per step).",
        &per(&experts, &|w| w.busy_micros as f64 / 1e6),
    );
    metric(
        "moe_expert_dispatches_total",
        "counter",
        "Dispatch messages served per expert worker.",
        &per(&experts, &|w| w.dispatches_served as f64),
    );
    metric(
        "moe_expert_load_share",
        "gauge",
        "Share of the window's expert load each expert worker is expected to serve (balanced: 1/workers).",
        &per(&experts, &|w| w.load_share),
    );
    metric(
        "moe_expert_load_imbalance",
        "gauge",
        "Expected max/mean expert-worker load of the active placement over the load window, worst layer (0: no load yet).",
        &one(s.load_imbalance),
    );
    metric(
        "moe_expert_tokens_window",
        "gauge",
        "Tokens routed to experts over the load window (per layer and expert: moectl status --json).",
        &one(s.expert_load.iter().sum::<u64>() as f64),
    );
    let all: Vec<_> = s.workers.iter().collect();
    metric(
        "moe_worker_load_bytes",
        "gauge",
        "Checkpoint bytes read by each worker's load under way, or its last one (expert workers load per placement).",
        &per(&all, &|w| w.load_bytes_done as f64),
    );
    metric(
        "moe_worker_load_size_bytes",
        "gauge",
        "Checkpoint bytes that load reads in all, known before its first weight is read.",
        &per(&all, &|w| w.load_bytes_total as f64),
    );
    metric(
        "moe_worker_load_state",
        "gauge",
        "Each worker's loading: 0 nothing loaded yet, 1 loading, 2 loaded, 3 the last load failed.",
        &per(&all, &|w| w.load_state as f64),
    );
    metric(
        "moe_worker_resident_bytes",
        "gauge",
        "Each worker process's resident memory (VmRSS; 0 where the platform does not tell).",
        &per(&all, &|w| w.resident_bytes as f64),
    );
    metric(
        "moe_worker_peak_resident_bytes",
        "gauge",
        "Each worker process's largest resident memory since it started (VmHWM).",
        &per(&all, &|w| w.peak_resident_bytes as f64),
    );
    metric(
        "moe_worker_weight_bytes",
        "gauge",
        "Bytes of model weights each worker holds (expert workers: their experts; attention workers: the dense weights).",
        &per(&all, &|w| w.weight_bytes as f64),
    );
    metric(
        "moe_workers",
        "gauge",
        "Live workers by role.",
        &[
            ("{role=\"attention\"}".into(), attention.len() as f64),
            ("{role=\"expert\"}".into(), experts.len() as f64),
        ],
    );
    metric(
        "moe_placement_version",
        "gauge",
        "Active expert placement version.",
        &one(s.placement_version as f64),
    );
    metric(
        "moe_expert_placement_loaded_version",
        "gauge",
        "Newest placement whose slots each expert worker has loaded (above moe_placement_version: a new placement is loading).",
        &per(&experts, &|w| w.placement_version as f64),
    );
    metric(
        "moe_layer_dispatches_total",
        "counter",
        "Layer dispatches sent per attention worker (each to one or more expert workers).",
        &per(&attention, &|w| w.layer_dispatches as f64),
    );
    metric(
        "moe_layer_dispatch_seconds_total",
        "counter",
        "Time from sending a layer dispatch to holding every answer, summed per attention worker (over moe_layer_dispatches_total: the mean round trip).",
        &per(&attention, &|w| w.layer_dispatch_micros as f64 / 1e6),
    );
    metric(
        "moe_worker_heartbeat_age_seconds",
        "gauge",
        "Time since each worker's last heartbeat.",
        &per(&all, &|w| w.millis_since_heartbeat as f64 / 1e3),
    );
    layer_dispatch_histogram(&mut out, &attention, source);
    source.state.departures().render(&mut out);
    source.requests.render(&mut out);
    out
}

/// The attention workers' layer dispatch round trips, all workers together (one series per
/// bucket, whatever the number of workers), departed workers' counts included so the counts
/// never fall (dispatch_history.rs).
fn layer_dispatch_histogram(out: &mut String, attention: &[&moe_proto::v1::WorkerStatus], source: &MetricsSource) {
    let bounds = moe_runtime::buckets::LAYER_DISPATCH_MICROS;
    let totals = source
        .dispatch_history
        .lock()
        .expect("dispatch history lock")
        .totals(attention, bounds.len() + 1);
    let seconds: Vec<f64> = bounds.iter().map(|&b| b as f64 / 1e6).collect();
    moe_runtime::histogram::render_histogram(
        out,
        "moe_layer_dispatch_round_trip_seconds",
        "Layer dispatch round trips of the attention workers: from sending a layer's rows to holding every expert worker's answer (retries included).",
        &seconds,
        &totals.buckets,
        totals.sum_micros as f64 / 1e6,
    );
}

#[cfg(test)]
mod tests {
    use super::probe;

    #[test]
    fn livez_answers_before_a_placement_and_on_a_standby_healthz_does_not() {
        for leading in [true, false] {
            for placement in [true, false] {
                let (status, _) = probe("/livez", leading, placement).unwrap();
                assert_eq!(status, "200 OK", "livez leading={leading} placement={placement}");
                let (status, body) = probe("/healthz", leading, placement).unwrap();
                let serving = leading && placement;
                assert_eq!(
                    status.starts_with("200"),
                    serving,
                    "healthz {leading} {placement}: {body}"
                );
            }
        }
        assert_eq!(probe("/livez", false, false).unwrap().1, "alive: standby\n");
        assert!(probe("/metrics", true, true).is_none());
        assert!(probe("/other", true, true).is_none());
    }
}
