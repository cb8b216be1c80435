//! How much two micro-batches overlapped: the time the attention half computed one
//! micro-batch while the other's routed experts were in flight (sent, not yet answered).
//! Counted per forward pass into [`OverlapStats`], which an attention worker reports.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Cumulative counters of [`AttentionModel::forward`](crate::model::AttentionModel::forward).
#[derive(Debug, Default)]
pub struct OverlapStats {
    /// Forward passes, and their wall time summed (µs).
    pub steps: AtomicU64,
    pub step_micros: AtomicU64,
    /// Forward passes cut into two micro-batches.
    pub split_steps: AtomicU64,
    /// Time one micro-batch computed while the other's experts were in flight, summed (µs).
    pub overlap_micros: AtomicU64,
}

impl OverlapStats {
    pub(crate) fn record(&self, step: Duration, split: bool, overlap: Duration) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.step_micros.fetch_add(step.as_micros() as u64, Ordering::Relaxed);
        self.split_steps.fetch_add(u64::from(split), Ordering::Relaxed);
        self.overlap_micros
            .fetch_add(overlap.as_micros() as u64, Ordering::Relaxed);
    }
}

/// One forward pass's record: when each micro-batch was being computed.
#[derive(Debug, Default)]
pub(crate) struct Timeline {
    /// `(micro-batch, from, to)`, in time order (one thread computes them in turn).
    busy: Vec<(usize, Instant, Instant)>,
    open: Option<(usize, Instant)>,
    overlap: Duration,
}

impl Timeline {
    /// Micro-batch `half` starts computing (closing whatever was open).
    pub fn start(&mut self, half: usize) {
        self.start_at(half, Instant::now());
    }

    /// Nothing computes (a wait begins).
    pub fn stop(&mut self) {
        self.stop_at(Instant::now());
    }

    /// `half`'s experts were in flight from `sent` to `arrived`: counts the other
    /// micro-batches' computing in that window. Each half has one dispatch in flight at a time,
    /// so no stretch is counted twice.
    pub fn in_flight(&mut self, half: usize, sent: Instant, arrived: Instant) {
        self.overlap += self
            .busy
            .iter()
            .filter(|(h, ..)| *h != half)
            .map(|&(_, from, to)| to.min(arrived).saturating_duration_since(from.max(sent)))
            .sum::<Duration>();
    }

    pub fn overlap(&self) -> Duration {
        self.overlap
    }

    fn start_at(&mut self, half: usize, at: Instant) {
        self.stop_at(at);
        self.open = Some((half, at));
    }

    fn stop_at(&mut self, at: Instant) {
        if let Some((h, from)) = self.open.take() {
            self.busy.push((h, from, at));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_other_halfs_computing_inside_the_window_counts() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut t = Timeline::default();
        // A computes 0-10, B 10-25 (B's start closes A), nothing 25-30, A 30-40.
        t.start_at(0, ms(0));
        t.start_at(1, ms(10));
        t.stop_at(ms(25));
        t.start_at(0, ms(30));
        t.stop_at(ms(40));
        // A's experts in flight 8-28: B's 10-25 counts, A's own 8-10 does not.
        t.in_flight(0, ms(8), ms(28));
        assert_eq!(t.overlap(), Duration::from_millis(15));
        // B's in flight 20-35: A's 30-35.
        t.in_flight(1, ms(20), ms(35));
        assert_eq!(t.overlap(), Duration::from_millis(20));
        // Answered before the other half started: nothing.
        t.in_flight(1, ms(26), ms(29));
        assert_eq!(t.overlap(), Duration::from_millis(20));
    }

    #[test]
    fn a_step_is_recorded_in_one_call() {
        let s = OverlapStats::default();
        s.record(Duration::from_micros(900), true, Duration::from_micros(300));
        s.record(Duration::from_micros(100), false, Duration::ZERO);
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(
            [
                get(&s.steps),
                get(&s.step_micros),
                get(&s.split_steps),
                get(&s.overlap_micros)
            ],
            [2, 1000, 1, 300]
        );
    }
}
