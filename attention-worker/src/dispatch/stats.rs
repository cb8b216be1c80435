//! Traffic counters of the dispatch path, read by heartbeats, `moectl status` and the bench.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moe_model::experts::ExpertAssignment;
use moe_runtime::buckets::{self, LAYER_DISPATCH_MICROS};

use super::split::WorkerBatch;

#[derive(Debug, Default)]
pub struct DispatchStats {
    /// Bytes of dispatch messages and answers (and of rows over NCCL), both ways.
    pub bytes: AtomicU64,
    /// Tokens routed to each `layer * num_experts + expert` since start: the coordinator's
    /// load statistics.
    pub expert_tokens: Vec<AtomicU64>,
    /// Per layer dispatch: assignments to the busiest expert worker, and the mean over the
    /// placement's workers (x1000), summed; their ratio is the measured per-step imbalance.
    pub busiest_assignments: AtomicU64,
    pub mean_assignments_milli: AtomicU64,
    /// Dispatch messages sent as later micro-batches because a slot was full.
    pub overflow_dispatches: AtomicU64,
    /// Layer dispatches answered, and their round trips (first send to every answer held,
    /// retries included), summed.
    pub layer_dispatches: AtomicU64,
    pub layer_dispatch_micros: AtomicU64,
    /// The same round trips counted per bucket of `buckets::LAYER_DISPATCH_MICROS` (+Inf last).
    pub layer_dispatch_buckets: Vec<AtomicU64>,
    /// Layer dispatches whose rows went over NCCL.
    pub nccl_layer_dispatches: AtomicU64,
    /// Layer dispatches sent again after a failure (on a new placement, or over gRPC after
    /// NCCL failed).
    pub retried_dispatches: AtomicU64,
}

impl DispatchStats {
    pub fn new(num_layers: usize, num_experts: usize) -> Self {
        DispatchStats {
            expert_tokens: (0..num_layers * num_experts).map(|_| AtomicU64::new(0)).collect(),
            layer_dispatch_buckets: (0..=LAYER_DISPATCH_MICROS.len()).map(|_| AtomicU64::new(0)).collect(),
            ..Default::default()
        }
    }

    pub fn layer_dispatch_buckets(&self) -> Vec<u64> {
        self.layer_dispatch_buckets
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    pub fn expert_tokens(&self) -> Vec<u64> {
        self.expert_tokens.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    /// Records what one layer's split sends: tokens per expert, the busiest worker against
    /// the mean over `num_workers`, micro-batches over a slot's capacity.
    pub(crate) fn record_split(
        &self,
        layer: usize,
        num_experts: usize,
        assignments: &[ExpertAssignment],
        batches: &[WorkerBatch],
        num_workers: usize,
    ) {
        for a in assignments {
            if let Some(c) = self.expert_tokens.get(layer * num_experts + a.expert as usize) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        let workers = num_workers.max(1);
        let mut per_worker = vec![0usize; workers];
        for b in batches {
            if let Some(n) = per_worker.get_mut(b.worker) {
                *n += b.assignments.len();
            }
        }
        let busiest = per_worker.into_iter().max().unwrap_or(0);
        self.busiest_assignments.fetch_add(busiest as u64, Ordering::Relaxed);
        self.mean_assignments_milli
            .fetch_add((assignments.len() * 1000 / workers) as u64, Ordering::Relaxed);
        let overflow = batches.iter().filter(|b| b.round > 0).count();
        self.overflow_dispatches.fetch_add(overflow as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_bytes(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// One layer dispatch answered in full after `elapsed`.
    pub(crate) fn record_answered(&self, elapsed: Duration, over_nccl: bool) {
        let micros = elapsed.as_micros() as u64;
        self.layer_dispatches.fetch_add(1, Ordering::Relaxed);
        self.layer_dispatch_micros.fetch_add(micros, Ordering::Relaxed);
        if let Some(c) = self
            .layer_dispatch_buckets
            .get(buckets::index(LAYER_DISPATCH_MICROS, micros))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if over_nccl {
            self.nccl_layer_dispatches.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn record_retry(&self) {
        self.retried_dispatches.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_is_recorded_in_one_call() {
        let stats = DispatchStats::new(2, 4);
        let a = |row, expert| ExpertAssignment {
            row,
            expert,
            weight: 1.0,
        };
        let assignments = [a(0, 1), a(1, 1), a(1, 3)];
        let batch = |worker, round, n| WorkerBatch {
            worker,
            round,
            rows: vec![],
            assignments: vec![a(0, 1); n],
        };
        // Worker 0 takes two assignments (one of them a second micro-batch), worker 1 one.
        stats.record_split(1, 4, &assignments, &[batch(0, 0, 1), batch(1, 0, 1), batch(0, 1, 1)], 2);
        assert_eq!(stats.expert_tokens(), [0, 0, 0, 0, 0, 2, 0, 1]);
        assert_eq!(stats.busiest_assignments.load(Ordering::Relaxed), 2);
        assert_eq!(stats.mean_assignments_milli.load(Ordering::Relaxed), 1500);
        assert_eq!(stats.overflow_dispatches.load(Ordering::Relaxed), 1);
    }
}
