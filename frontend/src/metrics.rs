//! Prometheus text for `/metrics`: requests by endpoint and HTTP status, and histograms of
//! time to first token, inter-token latency and end-to-end latency (seconds).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency buckets: 1 ms to 2 min.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 120.0,
];

#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if let Some(i) = BUCKETS.iter().position(|&b| seconds <= b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in BUCKETS.iter().zip(self.counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(&'static str, u16), u64>,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    generated_tokens: u64,
    prompt_tokens: u64,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn request(&self, endpoint: &'static str, status: u16) {
        self.with(|m| *m.requests.entry((endpoint, status)).or_default() += 1);
    }

    pub fn first_token(&self, after: Duration) {
        self.with(|m| m.ttft.observe(after.as_secs_f64()));
    }

    pub fn next_token(&self, after: Duration) {
        self.with(|m| m.itl.observe(after.as_secs_f64()));
    }

    pub fn finished(&self, after: Duration, prompt_tokens: usize, generated: usize) {
        self.with(|m| {
            m.e2e.observe(after.as_secs_f64());
            m.prompt_tokens += prompt_tokens as u64;
            m.generated_tokens += generated as u64;
        });
    }

    pub fn render(&self) -> String {
        self.with(|m| {
            let mut out = String::new();
            out.push_str("# HELP moe_http_requests_total HTTP requests by endpoint and status.\n# TYPE moe_http_requests_total counter\n");
            for ((endpoint, status), n) in &m.requests {
                let _ = writeln!(out, "moe_http_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}");
            }
            m.ttft.render("moe_http_time_to_first_token_seconds", "Time from request to first generated token.", &mut out);
            m.itl.render("moe_http_inter_token_latency_seconds", "Time between consecutive tokens of a choice.", &mut out);
            m.e2e.render("moe_http_e2e_latency_seconds", "Time from request to its last token.", &mut out);
            let _ = writeln!(
                out,
                "# TYPE moe_http_prompt_tokens_total counter\nmoe_http_prompt_tokens_total {}\n# TYPE moe_http_generated_tokens_total counter\nmoe_http_generated_tokens_total {}",
                m.prompt_tokens, m.generated_tokens
            );
            out
        })
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
    }
}
