//! What the client-side timings of a bench run say about each phase: pure arithmetic, so it is
//! unit-tested apart from any clock.
//!
//! Prefill and decode share engine steps (continuous batching), so neither has a clock of its
//! own. Each phase's time is the union of the windows during which some request was in it, as
//! the client sees them:
//! * prefill: from a request's send to its first token; rate = prompt tokens / that union;
//! * decode: from a request's first token to its last; rate = tokens after each request's first
//!   / that union.
//!
//! The two unions overlap while requests in both phases run, so each rate is the phase's
//! throughput while it was in progress, steps shared with the other phase included: a lower
//! bound on what the phase would reach alone. A prefill window also holds any wait for
//! admission (the bench sends a request only when one of its `concurrency` slots frees, so that
//! wait is the scheduler's own queue).

/// One finished request, times in seconds from the start of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestTiming {
    pub sent_s: f64,
    /// When each generated token arrived.
    pub tokens_s: Vec<f64>,
    pub prompt_tokens: usize,
}

/// Tokens and busy time of each phase.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PhaseRates {
    pub prompt_tokens: usize,
    /// Union of [sent, first token].
    pub prefill_s: f64,
    /// Generated tokens after each request's first.
    pub decode_tokens: usize,
    /// Union of [first token, last token].
    pub decode_s: f64,
}

impl PhaseRates {
    /// Prompt tokens over time some request was waiting for its first token.
    pub fn prefill_tokens_per_s(&self) -> Option<f64> {
        (self.prefill_s > 0.0).then(|| self.prompt_tokens as f64 / self.prefill_s)
    }

    /// Tokens after the first over time some request was between its first and last token.
    pub fn decode_tokens_per_s(&self) -> Option<f64> {
        (self.decode_s > 0.0).then(|| self.decode_tokens as f64 / self.decode_s)
    }
}

/// Total length covered by `intervals` (start, end), overlaps counted once.
pub fn union_s(intervals: &mut [(f64, f64)]) -> f64 {
    intervals.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut total = 0.0;
    let mut current: Option<(f64, f64)> = None;
    for &(start, end) in intervals.iter() {
        match current {
            Some((s, e)) if start <= e => current = Some((s, e.max(end))),
            _ => {
                if let Some((s, e)) = current {
                    total += e - s;
                }
                current = Some((start, end));
            }
        }
    }
    total + current.map_or(0.0, |(s, e)| e - s)
}

/// The phase rates of `requests` (those without tokens count nowhere).
pub fn phase_rates(requests: &[RequestTiming]) -> PhaseRates {
    let answered: Vec<&RequestTiming> = requests.iter().filter(|r| !r.tokens_s.is_empty()).collect();
    let mut prefill: Vec<(f64, f64)> = answered.iter().map(|r| (r.sent_s, r.tokens_s[0])).collect();
    let mut decode: Vec<(f64, f64)> = answered
        .iter()
        .filter(|r| r.tokens_s.len() > 1)
        .map(|r| (r.tokens_s[0], *r.tokens_s.last().expect("non-empty")))
        .collect();
    PhaseRates {
        prompt_tokens: answered.iter().map(|r| r.prompt_tokens).sum(),
        prefill_s: union_s(&mut prefill),
        decode_tokens: answered.iter().map(|r| r.tokens_s.len() - 1).sum(),
        decode_s: union_s(&mut decode),
    }
}

/// Time to first token of each request and every gap between consecutive tokens, in ms, sorted.
pub fn latencies_ms(requests: &[RequestTiming]) -> (Vec<f64>, Vec<f64>) {
    let mut ttft: Vec<f64> = requests
        .iter()
        .filter_map(|r| r.tokens_s.first().map(|t| (t - r.sent_s) * 1e3))
        .collect();
    let mut itl: Vec<f64> = requests
        .iter()
        .flat_map(|r| r.tokens_s.windows(2).map(|w| (w[1] - w[0]) * 1e3))
        .collect();
    ttft.sort_by(f64::total_cmp);
    itl.sort_by(f64::total_cmp);
    (ttft, itl)
}

/// The nearest-rank `p` quantile of sorted values (NaN when there are none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// p50, p90, p99 and mean of sorted values.
pub fn summary(sorted: &[f64]) -> serde_json::Value {
    let mean = (!sorted.is_empty()).then(|| sorted.iter().sum::<f64>() / sorted.len() as f64);
    serde_json::json!({
        "p50": percentile(sorted, 0.5),
        "p90": percentile(sorted, 0.9),
        "p99": percentile(sorted, 0.99),
        "mean": mean,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn union_counts_overlaps_once() {
        assert_eq!(union_s(&mut []), 0.0);
        // Disjoint, overlapping, nested, touching, and out of order.
        let mut v = [(5.0, 6.0), (0.0, 2.0), (1.0, 3.0), (1.5, 2.5), (3.0, 4.0)];
        assert!(close(union_s(&mut v), 4.0 + 1.0)); // [0, 4] and [5, 6]
        let mut nested = [(0.0, 10.0), (2.0, 3.0)];
        assert!(close(union_s(&mut nested), 10.0));
    }

    #[test]
    fn phase_rates_use_each_phase_window_not_the_run() {
        // Two requests of 4 prompt tokens, overlapping prefills; the second decodes while a third
        // (sent at 5 s, answered with one token) prefills.
        let requests = [
            RequestTiming {
                sent_s: 0.0,
                tokens_s: vec![1.0, 1.5, 2.0],
                prompt_tokens: 4,
            },
            RequestTiming {
                sent_s: 0.5,
                tokens_s: vec![2.0, 3.0, 4.0, 6.0],
                prompt_tokens: 4,
            },
            RequestTiming {
                sent_s: 5.0,
                tokens_s: vec![5.5],
                prompt_tokens: 4,
            },
            // Failed before any token: counts nowhere.
            RequestTiming {
                sent_s: 0.0,
                tokens_s: vec![],
                prompt_tokens: 4,
            },
        ];
        let r = phase_rates(&requests);
        // Prefill windows [0, 1], [0.5, 2], [5, 5.5] -> 2.5 s for 12 prompt tokens.
        // Decode windows [1, 2], [2, 6] -> 5 s for 2 + 3 tokens after the first.
        assert_eq!(r.prompt_tokens, 12);
        assert!(close(r.prefill_s, 2.5));
        assert_eq!(r.decode_tokens, 5);
        assert!(close(r.decode_s, 5.0));
        assert!(close(r.prefill_tokens_per_s().unwrap(), 4.8));
        assert!(close(r.decode_tokens_per_s().unwrap(), 1.0));
        // Single-token requests have no decode window at all.
        let one = phase_rates(&requests[2..3]);
        assert_eq!((one.decode_tokens, one.decode_s), (0, 0.0));
        assert_eq!(one.decode_tokens_per_s(), None);

        let (ttft, itl) = latencies_ms(&requests);
        assert_eq!(ttft, [500.0, 1000.0, 1500.0]);
        assert_eq!(itl, [500.0, 500.0, 1000.0, 1000.0, 2000.0]);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=11).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 6.0);
        assert_eq!(percentile(&v, 0.9), 10.0);
        assert_eq!(percentile(&v, 0.99), 11.0);
        assert!(percentile(&[], 0.5).is_nan());
        let s = summary(&v);
        assert_eq!(s["mean"], 6.0);
        assert!(summary(&[])["mean"].is_null());
    }
}
