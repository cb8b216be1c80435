//! Memory beside the weights: how much a process holds over the bytes of the weights it
//! serves. In process that is the bench's own peak; for a cluster each worker reports its own
//! with its heartbeats (`WorkerStatus.resident_bytes`, `peak_resident_bytes`, `weight_bytes`).

use moe_proto::v1::{ClusterStatusResponse, Role};
use moe_runtime::memory::ProcessMemory;
use serde_json::{Value, json};

/// The allowance for an expert worker: its experts' bytes x 1.15 plus 100 MiB.
const EXPERT_FACTOR: f64 = 1.15;
const EXPERT_SLACK_BYTES: f64 = (100u64 << 20) as f64;

/// Resident bytes over the weights' bytes; `None` when either is unknown (0).
fn ratio(resident: u64, weights: u64) -> Option<f64> {
    (resident > 0 && weights > 0).then(|| resident as f64 / weights as f64)
}

/// What an expert worker may hold for `weights` bytes of experts.
fn expert_allowance(weights: u64) -> f64 {
    weights as f64 * EXPERT_FACTOR + EXPERT_SLACK_BYTES
}

/// This process (the in-process engine holds every weight): its peak resident size against
/// the checkpoint's weight bytes.
pub fn in_process(weight_bytes: u64) -> Value {
    let m = ProcessMemory::read();
    json!({
        "peak_resident_bytes": m.peak_resident_bytes,
        "weight_bytes": weight_bytes,
        "peak_over_weights": ratio(m.peak_resident_bytes, weight_bytes),
    })
}

/// Each worker's figures from the coordinator's status, and for expert workers whether the
/// peak stays within the allowance.
pub fn cluster(status: &ClusterStatusResponse) -> Value {
    let workers: Vec<Value> = status
        .workers
        .iter()
        .map(|w| {
            let expert = w.role == Role::Expert as i32;
            json!({
                "worker_id": w.worker_id,
                "role": if expert { "expert" } else { "attention" },
                "resident_bytes": w.resident_bytes,
                "peak_resident_bytes": w.peak_resident_bytes,
                "weight_bytes": w.weight_bytes,
                "peak_over_weights": ratio(w.peak_resident_bytes, w.weight_bytes),
                "expert_allowance_bytes": expert.then(|| expert_allowance(w.weight_bytes)),
                "peak_over_allowance": expert.then(|| w.peak_resident_bytes as f64 / expert_allowance(w.weight_bytes)),
            })
        })
        .collect();
    json!({
        "allowance": format!("expert workers: {EXPERT_FACTOR} x their experts' bytes + 100 MiB"),
        "workers": workers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_proto::v1::WorkerStatus;

    #[test]
    fn allowance_and_ratios() {
        assert_eq!(expert_allowance(0), 100.0 * 1024.0 * 1024.0);
        assert_eq!(
            expert_allowance(1 << 30),
            1.15 * (1u64 << 30) as f64 + 100.0 * 1024.0 * 1024.0
        );
        assert_eq!(ratio(300, 200), Some(1.5));
        assert_eq!(ratio(0, 200), None);
        assert_eq!(ratio(300, 0), None);
    }

    #[test]
    fn cluster_report_per_worker() {
        let status = ClusterStatusResponse {
            workers: vec![
                WorkerStatus {
                    worker_id: "e0".into(),
                    role: Role::Expert as i32,
                    peak_resident_bytes: 1_258_291_200,
                    weight_bytes: 1 << 30,
                    ..Default::default()
                },
                WorkerStatus {
                    worker_id: "a0".into(),
                    role: Role::Attention as i32,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let v = cluster(&status);
        let e = &v["workers"][0];
        assert_eq!(e["role"], "expert");
        assert_eq!(e["peak_over_weights"], 1_258_291_200.0 / (1u64 << 30) as f64);
        let allowance = 1.15 * (1u64 << 30) as f64 + (100u64 << 20) as f64;
        assert_eq!(e["peak_over_allowance"], 1_258_291_200.0 / allowance);
        let a = &v["workers"][1];
        assert_eq!(a["role"], "attention");
        assert!(a["peak_over_weights"].is_null() && a["expert_allowance_bytes"].is_null());
    }
}
