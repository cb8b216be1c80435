//! Log-probabilities of a sampled token and of its most likely alternatives.
//!
//! Computed only when a request asks (`SamplingParams::logprobs`), over the whole vocabulary of
//! the distribution the token was drawn from: `log_softmax(logits / temperature)` of the logits
//! after penalties (temperature 1 when greedy), before any top-k/top-p cut, as the proto says.
//! In f64 with the maximum subtracted, so neither large logits nor a low temperature overflow.

/// One alternative: an id and its log-probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopLogprob {
    pub id: u32,
    pub logprob: f32,
}

/// What a token carries when its request asked for log-probabilities.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenLogprobs {
    /// Of the chosen token.
    pub logprob: f32,
    /// The `top_logprobs` most likely ids (fewer when the vocabulary is smaller), most likely
    /// first; equal ones by lower id.
    pub top: Vec<TopLogprob>,
}

/// Log-probabilities of `chosen` and the `top_n` most likely ids under
/// `log_softmax(logits / temperature)` (`temperature` 0 reads as 1: greedy reports the plain
/// distribution).
pub fn token_logprobs(logits: &[f32], temperature: f32, chosen: u32, top_n: usize) -> TokenLogprobs {
    let t = if temperature == 0.0 { 1.0 } else { temperature as f64 };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| ((x as f64 - max) / t).exp()).sum();
    let log_z = sum.ln();
    let logprob = |x: f32| ((x as f64 - max) / t - log_z) as f32;
    TokenLogprobs {
        logprob: logprob(logits[chosen as usize]),
        top: top_ids(logits, top_n)
            .into_iter()
            .map(|id| TopLogprob {
                id,
                logprob: logprob(logits[id as usize]),
            })
            .collect(),
    }
}

/// The `n` ids with the largest logits, largest first, equal ones by lower id. One pass with a
/// small sorted list (n is at most 20): no sort or allocation over the vocabulary.
fn top_ids(logits: &[f32], n: usize) -> Vec<u32> {
    let mut top: Vec<(f32, u32)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return Vec::new();
    }
    for (i, &x) in logits.iter().enumerate() {
        if top.len() == n && x <= top[n - 1].0 {
            continue; // not better than the worst kept (an equal one has a lower id)
        }
        // After every kept entry that is at least as large: equal logits keep id order.
        let at = top.partition_point(|&(v, _)| v >= x);
        top.insert(at, (x, i as u32));
        top.truncate(n);
    }
    top.into_iter().map(|(_, id)| id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An independent log-softmax: f64 throughout, the sum taken as plain exp without the
    /// maximum subtracted (safe for the small logits used here).
    fn reference(logits: &[f32], t: f64) -> Vec<f64> {
        let z: f64 = logits.iter().map(|&x| (x as f64 / t).exp()).sum();
        logits.iter().map(|&x| x as f64 / t - z.ln()).collect()
    }

    #[test]
    fn logprobs_equal_an_independent_log_softmax() {
        let logits = [0.3f32, -2.0, 4.5, 4.5, 1.25, -0.75, 3.0];
        for (temperature, t) in [(0.0f32, 1.0f64), (1.0, 1.0), (0.7, 0.7), (2.5, 2.5)] {
            let want = reference(&logits, t);
            for chosen in 0..logits.len() {
                let got = token_logprobs(&logits, temperature, chosen as u32, logits.len());
                assert!(
                    (got.logprob as f64 - want[chosen]).abs() < 1e-6,
                    "T {temperature} id {chosen}: {} vs {}",
                    got.logprob,
                    want[chosen]
                );
                for e in &got.top {
                    assert!((e.logprob as f64 - want[e.id as usize]).abs() < 1e-6);
                }
                let total: f64 = got.top.iter().map(|e| (e.logprob as f64).exp()).sum();
                assert!((total - 1.0).abs() < 1e-6, "the whole vocabulary sums to 1: {total}");
            }
        }
    }

    #[test]
    fn large_logits_do_not_overflow() {
        let logits = [1000.0f32, 999.0, -1000.0];
        let got = token_logprobs(&logits, 0.01, 1, 2);
        // By hand: log_softmax([100000, 99900, ...]) = [-(ln(1 + e^-100)), -100 - ln(1 + e^-100)].
        assert!((got.logprob - -100.0).abs() < 1e-4, "{}", got.logprob);
        assert!(got.top[0].logprob.abs() < 1e-6);
    }

    #[test]
    fn top_list_is_most_likely_first_with_ties_by_lower_id() {
        let logits = [1.0f32, 5.0, 3.0, 5.0, -1.0, 3.0, 5.0, 0.0];
        assert_eq!(top_ids(&logits, 4), [1, 3, 6, 2]);
        assert_eq!(top_ids(&logits, 6), [1, 3, 6, 2, 5, 0]);
        assert_eq!(
            top_ids(&logits, 20),
            [1, 3, 6, 2, 5, 0, 7, 4],
            "n beyond the vocabulary: all of it"
        );
        assert!(top_ids(&logits, 0).is_empty());
        // Ascending input (every element displaces the tail) and all equal.
        let rising: Vec<f32> = (0..50).map(|i| i as f32 * 0.5).collect();
        assert_eq!(top_ids(&rising, 3), [49, 48, 47]);
        assert_eq!(top_ids(&[2.0f32; 9], 3), [0, 1, 2]);
        let got = token_logprobs(&logits, 1.0, 7, 3);
        let ids: Vec<u32> = got.top.iter().map(|e| e.id).collect();
        assert_eq!(ids, [1, 3, 6]);
        assert_eq!(
            got.top[0].logprob, got.top[2].logprob,
            "ties report equal log-probabilities"
        );
    }
}
