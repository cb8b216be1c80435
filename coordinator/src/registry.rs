//! Membership: who is in the cluster and when they were last heard from. One trait, so the
//! coordinator's logic does not care where membership is stored; the in-memory backend is the
//! embedded default (a single command starts a cluster with nothing else installed).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use moe_proto::v1::{Role, WorkerStatus};

#[derive(Debug, Clone)]
pub struct WorkerRecord {
    pub id: String,
    pub role: Role,
    pub address: String,
    pub model_id: String,
    pub last_seen: Instant,
    pub status: WorkerStatus,
}

pub trait Registry: Send {
    /// Adds a worker; returns its id.
    fn register(&mut self, role: Role, address: String, model_id: String) -> String;
    /// Records a heartbeat; false when the worker is unknown (expired or never registered).
    fn heartbeat(&mut self, id: &str, status: WorkerStatus) -> bool;
    fn remove(&mut self, id: &str) -> Option<WorkerRecord>;
    /// Drops workers not heard from within `timeout`; returns them.
    fn expire(&mut self, timeout: Duration) -> Vec<WorkerRecord>;
    /// Live workers in registration order.
    fn workers(&self) -> Vec<&WorkerRecord>;
}

#[derive(Debug, Default)]
pub struct InMemoryRegistry {
    workers: BTreeMap<u64, WorkerRecord>,
    next: u64,
}

fn role_prefix(role: Role) -> &'static str {
    match role {
        Role::Attention => "attn",
        Role::Expert => "expert",
        Role::Unspecified => "worker",
    }
}

impl Registry for InMemoryRegistry {
    fn register(&mut self, role: Role, address: String, model_id: String) -> String {
        self.next += 1;
        let id = format!("{}-{}", role_prefix(role), self.next);
        self.workers.insert(
            self.next,
            WorkerRecord {
                id: id.clone(),
                role,
                address,
                model_id,
                last_seen: Instant::now(),
                status: WorkerStatus::default(),
            },
        );
        id
    }

    fn heartbeat(&mut self, id: &str, status: WorkerStatus) -> bool {
        match self.workers.values_mut().find(|w| w.id == id) {
            Some(w) => {
                w.last_seen = Instant::now();
                w.status = status;
                true
            }
            None => false,
        }
    }

    fn remove(&mut self, id: &str) -> Option<WorkerRecord> {
        let key = *self.workers.iter().find(|(_, w)| w.id == id)?.0;
        self.workers.remove(&key)
    }

    fn expire(&mut self, timeout: Duration) -> Vec<WorkerRecord> {
        let now = Instant::now();
        let dead: Vec<u64> = self
            .workers
            .iter()
            .filter(|(_, w)| now.duration_since(w.last_seen) > timeout)
            .map(|(&k, _)| k)
            .collect();
        dead.into_iter().filter_map(|k| self.workers.remove(&k)).collect()
    }

    fn workers(&self) -> Vec<&WorkerRecord> {
        self.workers.values().collect()
    }
}
