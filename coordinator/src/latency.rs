//! Request latency histograms and token counters, as the coordinator sees each request it
//! relays: time to first token, inter-token latency, end-to-end latency and the wait before an
//! attention worker takes the request; prompt and generated tokens; outcomes. Fixed buckets and
//! fixed label values, so the series count never grows with traffic.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use moe_runtime::histogram::{Histogram, render_counter};

/// Seconds, from a few milliseconds (a warm decode step) to a minute (a long request).
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Seconds between two tokens of one stream.
const TOKEN_GAP_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// How a relayed request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Its Finished event reached the client.
    Finished,
    /// An error status reached the client.
    Failed,
    /// The client went away first.
    Cancelled,
    /// Refused before it started: invalid (INVALID_ARGUMENT) or over the admission bound
    /// (RESOURCE_EXHAUSTED). Counted by [`RequestMetrics::reject`], never timed.
    Rejected,
}

/// The coordinator's request metrics, shared by the client API and the metrics endpoint.
pub struct RequestMetrics {
    pub time_to_first_token: Histogram,
    pub inter_token: Histogram,
    pub end_to_end: Histogram,
    pub queue_wait: Histogram,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    /// Indexed by `Outcome as usize`.
    outcomes: [AtomicU64; 4],
}

impl Default for RequestMetrics {
    fn default() -> Self {
        RequestMetrics {
            time_to_first_token: Histogram::new(LATENCY_BUCKETS),
            inter_token: Histogram::new(TOKEN_GAP_BUCKETS),
            end_to_end: Histogram::new(LATENCY_BUCKETS),
            queue_wait: Histogram::new(LATENCY_BUCKETS),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            outcomes: Default::default(),
        }
    }
}

impl RequestMetrics {
    pub fn render(&self, out: &mut String) {
        self.time_to_first_token.render(
            out,
            "moe_time_to_first_token_seconds",
            "From a request's arrival at the coordinator to its first generated token reaching the client.",
        );
        self.inter_token.render(
            out,
            "moe_inter_token_latency_seconds",
            "Between two consecutive generated tokens of one request.",
        );
        self.end_to_end.render(
            out,
            "moe_request_duration_seconds",
            "From a request's arrival to its last event (finished, failed or cancelled).",
        );
        self.queue_wait.render(
            out,
            "moe_request_queue_wait_seconds",
            "From a request's arrival until an attention worker accepted it (waiting for a ready placement included; the worker's own scheduler wait is part of time to first token).",
        );
        render_counter(
            out,
            "moe_prompt_tokens_total",
            "Prompt tokens of the requests the coordinator relayed.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        render_counter(
            out,
            "moe_generation_tokens_total",
            "Generated tokens relayed to clients.",
            self.generated_tokens.load(Ordering::Relaxed),
        );
        let name = "moe_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} Requests received, by how they ended (rejected: refused at validation or admission).\n# TYPE {name} counter"
        );
        for (outcome, label) in [
            (Outcome::Finished, "finished"),
            (Outcome::Failed, "failed"),
            (Outcome::Cancelled, "cancelled"),
            (Outcome::Rejected, "rejected"),
        ] {
            let v = self.outcomes[outcome as usize].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{outcome=\"{label}\"}} {v}");
        }
    }
}

impl RequestMetrics {
    /// `n` requests refused before they started (a batch counts each of its requests).
    pub fn reject(&self, n: u64) {
        self.outcomes[Outcome::Rejected as usize].fetch_add(n, Ordering::Relaxed);
    }
}

/// One request's clock: observes into the shared metrics as its events pass.
pub struct RequestTimer<'a> {
    metrics: &'a RequestMetrics,
    arrived: Instant,
    last_token: Option<Instant>,
}

impl<'a> RequestTimer<'a> {
    pub fn start(metrics: &'a RequestMetrics, arrived: Instant, prompt_tokens: usize) -> Self {
        metrics.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        RequestTimer {
            metrics,
            arrived,
            last_token: None,
        }
    }

    /// The first attention worker accepted the request.
    pub fn accepted(&self) {
        self.metrics.queue_wait.observe(self.arrived.elapsed());
    }

    /// A generated token was passed to the client.
    pub fn token(&mut self) {
        let now = Instant::now();
        match self.last_token {
            None => self.metrics.time_to_first_token.observe(now - self.arrived),
            Some(previous) => self.metrics.inter_token.observe(now - previous),
        }
        self.last_token = Some(now);
        self.metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
    }

    pub fn end(self, outcome: Outcome) {
        self.metrics.end_to_end.observe(self.arrived.elapsed());
        self.metrics.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn sample(text: &str, series: &str) -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '));
        line.unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn buckets_are_cumulative_and_sum_is_exact() {
        let m = RequestMetrics::default();
        for ms in [3, 7, 7, 400, 90_000] {
            m.end_to_end.observe(Duration::from_millis(ms));
        }
        let mut out = String::new();
        m.render(&mut out);
        let b = |le: &str| sample(&out, &format!("moe_request_duration_seconds_bucket{{le=\"{le}\"}}"));
        assert_eq!(b("0.005"), 1.0);
        assert_eq!(b("0.01"), 3.0);
        assert_eq!(b("0.25"), 3.0);
        assert_eq!(b("0.5"), 4.0);
        assert_eq!(b("60"), 4.0);
        assert_eq!(b("+Inf"), 5.0);
        assert_eq!(sample(&out, "moe_request_duration_seconds_count"), 5.0);
        assert!((sample(&out, "moe_request_duration_seconds_sum") - 90.417).abs() < 1e-9);
    }

    #[test]
    fn a_timer_counts_tokens_gaps_and_outcome() {
        let m = RequestMetrics::default();
        let arrived = Instant::now() - Duration::from_millis(20);
        let mut t = RequestTimer::start(&m, arrived, 7);
        t.accepted();
        for _ in 0..4 {
            t.token();
        }
        t.end(Outcome::Finished);
        RequestTimer::start(&m, Instant::now(), 3).end(Outcome::Failed);
        let mut out = String::new();
        m.render(&mut out);
        assert_eq!(sample(&out, "moe_prompt_tokens_total"), 10.0);
        assert_eq!(sample(&out, "moe_generation_tokens_total"), 4.0);
        assert_eq!(sample(&out, "moe_time_to_first_token_seconds_count"), 1.0);
        // The first token is 20 ms or more after arrival: not in the 10 ms bucket.
        assert_eq!(sample(&out, "moe_time_to_first_token_seconds_bucket{le=\"0.01\"}"), 0.0);
        assert_eq!(sample(&out, "moe_inter_token_latency_seconds_count"), 3.0);
        assert_eq!(sample(&out, "moe_request_queue_wait_seconds_count"), 1.0);
        assert_eq!(sample(&out, "moe_request_duration_seconds_count"), 2.0);
        assert_eq!(sample(&out, "moe_requests_total{outcome=\"finished\"}"), 1.0);
        assert_eq!(sample(&out, "moe_requests_total{outcome=\"failed\"}"), 1.0);
        assert_eq!(sample(&out, "moe_requests_total{outcome=\"cancelled\"}"), 0.0);
        assert_eq!(sample(&out, "moe_requests_total{outcome=\"rejected\"}"), 0.0);
        m.reject(3);
        let mut out = String::new();
        m.render(&mut out);
        assert_eq!(sample(&out, "moe_requests_total{outcome=\"rejected\"}"), 3.0);
        // Rejections are not timed: no latency observation came with them.
        assert_eq!(sample(&out, "moe_request_duration_seconds_count"), 2.0);
    }
}
