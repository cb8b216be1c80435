//! The cluster status report (`moectl status`, the metrics, the health probe): every member's
//! last status plus what only the leader knows (its slots and expected share of the load under
//! the active placement, the load window, the expected imbalance).

use std::time::Instant;

use moe_proto::v1::{ClusterStatusResponse, Role};

use super::Cluster;
use crate::planner;

impl Cluster {
    pub fn status(&self) -> ClusterStatusResponse {
        let now = Instant::now();
        let active = self.placements.active();
        let load = self.load.matrix();
        let shares = active.map(|p| planner::load_shares(p, &load)).unwrap_or_default();
        let e = self.config.model.num_experts;
        let workers = self
            .members
            .iter()
            .map(|w| {
                let mut s = w.status.clone();
                s.worker_id = w.id.clone();
                s.role = w.role as i32;
                s.address = w.address.clone();
                s.millis_since_heartbeat = now.duration_since(w.last_seen).as_millis() as u64;
                if w.role == Role::Expert
                    && let Some(p) = active
                {
                    s.expert_slots = p.slots_of(&w.id).into_iter().map(|(l, x)| (l * e + x) as u32).collect();
                    s.load_share = p
                        .workers
                        .iter()
                        .position(|x| x.id == w.id)
                        .and_then(|i| shares.get(i).copied())
                        .unwrap_or(0.0);
                }
                s
            })
            .collect::<Vec<_>>();
        let running = workers.iter().map(|w| w.running).sum();
        let queued = workers.iter().map(|w| w.waiting).sum();
        ClusterStatusResponse {
            expert_load: self.load.totals(),
            num_layers: self.config.model.num_layers as u32,
            num_experts: e as u32,
            load_window_s: self.load.window().as_secs_f64(),
            load_imbalance: self.placements.imbalance(&load),
            model_id: self.config.model_id.clone(),
            placement_version: active.map_or(0, |p| p.version),
            workers,
            queued_requests: queued,
            running_requests: running,
        }
    }
}
