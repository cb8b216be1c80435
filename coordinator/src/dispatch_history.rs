//! Keeps the layer dispatch round-trip histogram monotonic. The coordinator sums the attention
//! workers' own counters, which leave with the worker (or restart from zero with its process);
//! without a base for what departed workers had counted, the sum would fall and Prometheus
//! would read every departure as a counter reset (losing the interval's observations).

use std::collections::HashMap;

use moe_proto::v1::WorkerStatus;

/// Per-bucket counts (bounds, then +Inf) and the sum of the round trips in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DispatchCounts {
    pub buckets: Vec<u64>,
    pub sum_micros: u64,
}

impl DispatchCounts {
    fn add(&mut self, other: &DispatchCounts) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.sum_micros += other.sum_micros;
    }

    /// Whether `self` could have grown into `later` (no bucket fell).
    fn precedes(&self, later: &DispatchCounts) -> bool {
        self.buckets.len() == later.buckets.len()
            && self.buckets.iter().zip(&later.buckets).all(|(a, b)| a <= b)
            && self.sum_micros <= later.sum_micros
    }
}

/// The last counts seen per worker, and the total of those no longer counting.
#[derive(Default)]
pub struct DispatchHistory {
    last: HashMap<String, DispatchCounts>,
    departed: DispatchCounts,
}

impl DispatchHistory {
    /// The cluster-wide counts: `workers`' current counts (those with `buckets` buckets; a
    /// worker counting others runs another version and is left out) plus every departed
    /// worker's last counts. A worker whose counts fell restarted: its earlier counts join the
    /// departed.
    pub fn totals(&mut self, workers: &[&WorkerStatus], buckets: usize) -> DispatchCounts {
        let mut current = HashMap::new();
        for w in workers.iter().filter(|w| w.layer_dispatch_buckets.len() == buckets) {
            let counts = DispatchCounts {
                buckets: w.layer_dispatch_buckets.clone(),
                sum_micros: w.layer_dispatch_micros,
            };
            if let Some(before) = self.last.get(&w.worker_id)
                && !before.precedes(&counts)
            {
                self.departed.add(before);
            }
            current.insert(w.worker_id.clone(), counts);
        }
        for (id, before) in &self.last {
            if !current.contains_key(id) {
                self.departed.add(before);
            }
        }
        self.last = current;
        let mut total = DispatchCounts {
            buckets: vec![0; buckets],
            sum_micros: 0,
        };
        if self.departed.buckets.len() == buckets || self.departed.buckets.is_empty() {
            total.add(&self.departed);
        }
        for counts in self.last.values() {
            total.add(counts);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str, buckets: &[u64], sum: u64) -> WorkerStatus {
        WorkerStatus {
            worker_id: id.into(),
            layer_dispatch_buckets: buckets.to_vec(),
            layer_dispatch_micros: sum,
            ..Default::default()
        }
    }

    #[test]
    fn counts_never_fall_when_workers_leave_or_restart() {
        let mut h = DispatchHistory::default();
        let (a, b) = (worker("a", &[1, 2, 0], 30), worker("b", &[0, 5, 1], 70));
        assert_eq!(h.totals(&[&a, &b], 3).buckets, vec![1, 7, 1]);
        // b leaves: its counts stay in the total.
        let a = worker("a", &[2, 2, 0], 40);
        let t = h.totals(&[&a], 3);
        assert_eq!((t.buckets, t.sum_micros), (vec![2, 7, 1], 110));
        // a restarts (its counts fall to 1 observation): the earlier ones stay.
        let a = worker("a", &[0, 1, 0], 5);
        let t = h.totals(&[&a], 3);
        assert_eq!((t.buckets, t.sum_micros), (vec![2, 8, 1], 115));
        // A worker with another bucket layout is left out, and nobody: the base remains.
        let odd = worker("c", &[9, 9], 9);
        let t = h.totals(&[&odd], 3);
        assert_eq!((t.buckets, t.sum_micros), (vec![2, 8, 1], 115));
    }
}
