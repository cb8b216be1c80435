//! Expert load over a moving window. Attention workers report cumulative tokens routed per
//! (layer, expert) in their heartbeats; the differences between reports are kept in one-second
//! buckets, and buckets older than the window are dropped, so the totals describe recent
//! traffic at a bounded memory cost (window seconds x layers x experts counters).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// A load report that does not fit the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expert_tokens has {got} counters, the model has {layers} layers x {experts} experts = {}", .layers * .experts)]
pub struct WrongSize {
    pub got: usize,
    pub layers: usize,
    pub experts: usize,
}

pub struct LoadWindow {
    window: Duration,
    /// Reports closer together than this share a bucket: one second, or a tenth of a short
    /// window.
    bucket: Duration,
    num_layers: usize,
    num_experts: usize,
    /// Last cumulative counters per attention worker.
    last: HashMap<String, Vec<u64>>,
    /// (bucket start, tokens routed in it), oldest first.
    buckets: VecDeque<(Instant, Vec<u64>)>,
}

impl LoadWindow {
    pub fn new(window: Duration, num_layers: usize, num_experts: usize) -> Self {
        LoadWindow {
            window,
            bucket: (window / 10).min(Duration::from_secs(1)),
            num_layers,
            num_experts,
            last: HashMap::new(),
            buckets: VecDeque::new(),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Takes in `worker`'s cumulative counters. A report of the wrong size is refused (it names
    /// the sizes); counters that went down (the worker restarted) count from zero.
    pub fn observe(&mut self, worker: &str, cumulative: &[u64]) -> Result<(), WrongSize> {
        let cells = self.num_layers * self.num_experts;
        if cumulative.is_empty() {
            return Ok(());
        }
        if cumulative.len() != cells {
            return Err(WrongSize {
                got: cumulative.len(),
                layers: self.num_layers,
                experts: self.num_experts,
            });
        }
        let delta: Vec<u64> = match self.last.get(worker) {
            Some(prev) => cumulative
                .iter()
                .zip(prev)
                .map(|(&now, &before)| if now >= before { now - before } else { now })
                .collect(),
            // The first report only sets the baseline: its counts may span any time.
            None => vec![0; cells],
        };
        self.last.insert(worker.to_owned(), cumulative.to_vec());
        self.add(Instant::now(), &delta);
        Ok(())
    }

    fn add(&mut self, now: Instant, delta: &[u64]) {
        if delta.iter().all(|&d| d == 0) {
            self.prune(now);
            return;
        }
        match self.buckets.back_mut() {
            Some((start, counts)) if now.duration_since(*start) < self.bucket => {
                for (c, d) in counts.iter_mut().zip(delta) {
                    *c += d;
                }
            }
            _ => self.buckets.push_back((now, delta.to_vec())),
        }
        self.prune(now);
    }

    fn prune(&mut self, now: Instant) {
        while self
            .buckets
            .front()
            .is_some_and(|(start, _)| now.duration_since(*start) > self.window)
        {
            self.buckets.pop_front();
        }
    }

    pub fn forget(&mut self, worker: &str) {
        self.last.remove(worker);
    }

    /// Tokens per `layer * num_experts + expert` over the window.
    pub fn totals(&self) -> Vec<u64> {
        let now = Instant::now();
        let mut out = vec![0u64; self.num_layers * self.num_experts];
        for (start, counts) in &self.buckets {
            if now.duration_since(*start) <= self.window {
                for (o, c) in out.iter_mut().zip(counts) {
                    *o += c;
                }
            }
        }
        out
    }

    /// The window's totals as `[layer][expert]`, the planner's input.
    pub fn matrix(&self) -> Vec<Vec<f64>> {
        self.totals()
            .chunks(self.num_experts.max(1))
            .map(|layer| layer.iter().map(|&x| x as f64).collect())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_between_reports_are_summed_over_workers() {
        let mut w = LoadWindow::new(Duration::from_secs(30), 2, 2);
        w.observe("a", &[10, 0, 0, 5]).unwrap(); // baseline
        w.observe("a", &[14, 1, 0, 5]).unwrap();
        w.observe("b", &[100, 100, 100, 100]).unwrap(); // baseline
        w.observe("b", &[101, 100, 102, 100]).unwrap();
        assert_eq!(w.totals(), [5, 1, 2, 0]);
        assert_eq!(w.matrix(), vec![vec![5.0, 1.0], vec![2.0, 0.0]]);
        // A restarted worker counts from zero again.
        w.observe("a", &[3, 0, 0, 0]).unwrap();
        assert_eq!(w.totals(), [8, 1, 2, 0]);
    }

    #[test]
    fn a_report_of_the_wrong_size_is_refused() {
        let mut w = LoadWindow::new(Duration::from_secs(30), 2, 4);
        let err = w.observe("a", &[1, 2, 3]).unwrap_err().to_string();
        assert!(
            err.contains("3 counters") && err.contains("2 layers x 4 experts = 8"),
            "{err}"
        );
        assert!(w.totals().iter().all(|&x| x == 0));
    }

    #[test]
    fn old_buckets_leave_the_window() {
        let mut w = LoadWindow::new(Duration::from_millis(50), 1, 1);
        w.add(Instant::now() - Duration::from_millis(200), &[7]);
        w.add(Instant::now(), &[1]);
        assert_eq!(w.totals(), [1]);
    }
}
