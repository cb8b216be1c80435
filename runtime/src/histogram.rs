//! A Prometheus histogram over durations, counted with atomics (observed from many tasks
//! without a lock), and its text rendering. Every process with a `/metrics` page uses this one;
//! each metric keeps its own bucket bounds.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Cumulative counts per upper bound (seconds), their sum and count.
pub struct Histogram {
    bounds: &'static [f64],
    /// One per bound, then +Inf; each counts the observations at or below its bound only
    /// (made cumulative when rendered).
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// `bounds`: increasing upper bounds in seconds.
    pub fn new(bounds: &'static [f64]) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = crate::buckets::index(self.bounds, s);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        render_histogram(out, name, help, self.bounds, &counts, sum);
    }
}

/// Prometheus text for a histogram from per-bucket counts (`bounds.len() + 1` of them, the last
/// above every bound) and the sum of the observations.
pub fn render_histogram(out: &mut String, name: &str, help: &str, bounds: &[f64], counts: &[u64], sum: f64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (i, c) in counts.iter().enumerate() {
        cumulative += c;
        let le = bounds.get(i).map_or("+Inf".to_owned(), |b| b.to_string());
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
}

/// A Prometheus counter line with its HELP and TYPE.
pub fn render_counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_inclusive_and_the_sum_exact() {
        static BOUNDS: &[f64] = &[0.005, 0.01, 0.5];
        let h = Histogram::new(BOUNDS);
        for ms in [3, 5, 7, 400, 90_000] {
            h.observe(Duration::from_millis(ms));
        }
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "Help.");
        let want = "# HELP x_seconds Help.\n# TYPE x_seconds histogram\n\
            x_seconds_bucket{le=\"0.005\"} 2\nx_seconds_bucket{le=\"0.01\"} 3\n\
            x_seconds_bucket{le=\"0.5\"} 4\nx_seconds_bucket{le=\"+Inf\"} 5\n\
            x_seconds_sum 90.415\nx_seconds_count 5\n";
        assert_eq!(out, want);
    }
}
