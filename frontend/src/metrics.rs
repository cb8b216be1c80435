//! Prometheus text for `/metrics`: requests by endpoint and HTTP status, and histograms of
//! time to first token, inter-token latency and end-to-end latency (seconds).
//!
//! With `n > 1` each choice is its own stream of tokens: time to first token and inter-token
//! latency are observed once per choice (n observations for one request), end-to-end latency
//! and the token counters once per request.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moe_runtime::histogram::{Histogram, render_counter};

/// Seconds from a request's arrival: 1 ms to 2 min.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 120.0,
];
/// Seconds between two tokens of one choice.
const TOKEN_GAP_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

pub struct Metrics {
    /// Keyed by fixed endpoint names and the statuses answered: a few series at most.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            ttft: Histogram::new(LATENCY_BUCKETS),
            itl: Histogram::new(TOKEN_GAP_BUCKETS),
            e2e: Histogram::new(LATENCY_BUCKETS),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn request(&self, endpoint: &'static str, status: u16) {
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *requests.entry((endpoint, status)).or_default() += 1;
    }

    /// A choice's first token (observed per choice).
    pub fn first_token(&self, after: Duration) {
        self.ttft.observe(after);
    }

    /// A choice's next token (observed per choice).
    pub fn next_token(&self, after: Duration) {
        self.itl.observe(after);
    }

    /// A request's end, all its choices together.
    pub fn finished(&self, after: Duration, prompt_tokens: usize, generated: usize) {
        self.e2e.observe(after);
        self.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        self.generated_tokens.fetch_add(generated as u64, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let name = "moe_http_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} HTTP requests by endpoint and status.\n# TYPE {name} counter"
        );
        for ((endpoint, status), n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "{name}{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}");
        }
        self.ttft.render(
            &mut out,
            "moe_http_time_to_first_token_seconds",
            "Time from request to a choice's first generated token (one observation per choice).",
        );
        self.itl.render(
            &mut out,
            "moe_http_inter_token_latency_seconds",
            "Time between consecutive tokens of a choice.",
        );
        self.e2e.render(
            &mut out,
            "moe_http_e2e_latency_seconds",
            "Time from request to its last token (all choices).",
        );
        render_counter(
            &mut out,
            "moe_http_prompt_tokens_total",
            "Prompt tokens of the generation requests answered.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        render_counter(
            &mut out,
            "moe_http_generated_tokens_total",
            "Tokens generated for the generation requests answered (all choices).",
            self.generated_tokens.load(Ordering::Relaxed),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_cumulative_buckets() {
        let m = Metrics::default();
        m.request("chat", 200);
        m.request("chat", 200);
        m.request("chat", 400);
        m.first_token(Duration::from_millis(3));
        m.first_token(Duration::from_millis(300));
        m.finished(Duration::from_millis(400), 5, 7);
        let text = m.render();
        assert!(
            text.contains("moe_http_requests_total{endpoint=\"chat\",status=\"200\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("moe_http_requests_total{endpoint=\"chat\",status=\"400\"} 1\n"));
        assert!(text.contains("moe_http_time_to_first_token_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(text.contains("moe_http_time_to_first_token_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("moe_http_time_to_first_token_seconds_bucket{le=\"0.5\"} 2\n"));
        assert!(text.contains("moe_http_time_to_first_token_seconds_count 2\n"));
        assert!(text.contains(
            "# HELP moe_http_prompt_tokens_total Prompt tokens of the generation requests answered.\n# TYPE moe_http_prompt_tokens_total counter\nmoe_http_prompt_tokens_total 5\n"
        ));
        assert!(text.contains("# HELP moe_http_generated_tokens_total "));
        assert!(text.contains("moe_http_generated_tokens_total 7\n"));
    }
}
