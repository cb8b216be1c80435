//! `moectl bench --batch-sizes`: for each batch size B, B greedy requests start together and the
//! decode step is timed while all B decode, beside its bandwidth and FLOP floors.
//!
//! The step time is read from the client's token times: only gaps between consecutive tokens
//! that lie inside the window where every request is past its first token and none has finished
//! count, so prefill steps and the ragged tail are left out.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};

use moe_attention_worker::step_plan::{StepBudget, steps_to_prefill};

use super::floors::{ModelCosts, expected_distinct_experts};
use super::phases::{percentile, summary};
use super::{Target, greedy, prompts};
use crate::machine::MachineLimits;

/// What the sweep runs: batch sizes and each request's shape.
pub struct SweepLoad<'a> {
    pub batch_sizes: &'a [usize],
    pub prompt_len: usize,
    pub gen_len: u32,
    pub seed: u64,
    pub vocab: usize,
    /// Token rows per step of the target's scheduler (`--max-batch-tokens`): how many steps
    /// the batch's prompts take to prefill.
    pub step_rows: usize,
}

impl SweepLoad<'_> {
    pub fn gen_len_at(&self, b: usize) -> u32 {
        gen_len_at(b, self.prompt_len, self.gen_len, self.step_rows)
    }
}

/// New tokens per request at batch size `b`: `gen_len` for the all-decoding window, plus one
/// per step the batch's prompts take to prefill when they arrive together at `step_rows` rows
/// a step, decode rows first (`step_plan::steps_to_prefill`: 37 steps for 128 x 128 tokens at
/// 512 rows). The first requests decode while the last still prefill; without the extra
/// tokens they could finish before the last one's first token. Where decode rows would fill
/// every step (B over the step budget), no extra tokens: the batch never decodes all at once
/// and the sweep says so.
pub fn gen_len_at(b: usize, prompt_len: usize, gen_len: u32, step_rows: usize) -> u32 {
    let budget = StepBudget {
        max_rows: step_rows,
        // Arriving together, the prompts are never throttled: this does not count.
        prefill_while_decoding: 0,
    };
    let prefill_steps = steps_to_prefill(b, prompt_len, &budget).unwrap_or(0);
    gen_len.saturating_add(u32::try_from(prefill_steps).unwrap_or(u32::MAX))
}

/// Gaps (ms, sorted) between consecutive tokens of `requests` (each its token times, in
/// seconds) inside the window [latest first token, earliest last token]: the steps in which
/// every request was decoding.
pub fn all_decoding_gaps_ms(requests: &[Vec<f64>]) -> Vec<f64> {
    let Some(start) = requests
        .iter()
        .map(|t| t.first().copied())
        .try_fold(f64::MIN, |m, t| t.map(|t| m.max(t)))
    else {
        return Vec::new();
    };
    let end = requests
        .iter()
        .filter_map(|t| t.last().copied())
        .fold(f64::MAX, f64::min);
    let mut gaps: Vec<f64> = requests
        .iter()
        .flat_map(|t| t.windows(2))
        .filter(|w| w[0] >= start && w[1] <= end)
        .map(|w| (w[1] - w[0]) * 1e3)
        .collect();
    gaps.sort_by(f64::total_cmp);
    gaps
}

/// Runs every batch size of `load` on `target`; one JSON object per batch size.
pub async fn run(
    target: &Arc<Target>,
    costs: &ModelCosts,
    machine: Option<&MachineLimits>,
    load: &SweepLoad<'_>,
) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for &b in load.batch_sizes {
        let gen_len = load.gen_len_at(b);
        let started = Instant::now();
        let tasks: Vec<_> = prompts(b, load.prompt_len, load.vocab, load.seed ^ b as u64)
            .into_iter()
            .map(|p| {
                let (target, request) = (target.clone(), greedy(p, gen_len));
                // Token times count from each request's own send: shift them onto one clock.
                tokio::spawn(async move {
                    let sent = started.elapsed().as_secs_f64();
                    (sent, target.run(&request).await)
                })
            })
            .collect();
        let mut results = Vec::with_capacity(b);
        for t in tasks {
            results.push(t.await?);
        }
        let wall_s = started.elapsed().as_secs_f64();
        let failed = results.iter().filter(|(_, r)| r.is_err()).count();
        let times: Vec<Vec<f64>> = results
            .into_iter()
            .filter_map(|(sent, r)| r.ok().map(|g| (sent, g)))
            .map(|(sent, g)| g.token_times.iter().map(|t| sent + t.as_secs_f64()).collect())
            .collect();
        let gaps = all_decoding_gaps_ms(&times);
        if gaps.len() < times.len() {
            eprintln!(
                "batch {b}: the {} requests never all decoded at once (KV cache or --max-running too small?): no step time",
                times.len()
            );
        }
        // Positions cached at the middle decode step: the prompt and half the new tokens.
        let context = load.prompt_len + gen_len as usize / 2;
        let mut e = entry(b, &gaps, failed, wall_s, context, costs, machine);
        e["gen_len"] = json!(gen_len);
        out.push(e);
    }
    Ok(out)
}

fn entry(
    b: usize,
    gaps: &[f64],
    failed: usize,
    wall_s: f64,
    context: usize,
    costs: &ModelCosts,
    machine: Option<&MachineLimits>,
) -> Value {
    let step_ms = (!gaps.is_empty()).then(|| percentile(gaps, 0.5));
    let floors = machine.map(|m| costs.step_floors(b, context, m.memory_bandwidth_gbps, m.matmul_f32_gflops));
    let ratio = |floor_ms: Option<f64>| step_ms.zip(floor_ms).map(|(s, f)| s / f);
    let distinct: Vec<f64> = costs
        .layers
        .iter()
        .map(|l| expected_distinct_experts(l.experts, l.topk, b))
        .collect();
    json!({
        "batch_size": b,
        "failed": failed,
        "wall_s": wall_s,
        // Every request's gaps inside the all-decoding window: about B per step.
        "gaps_measured": gaps.len(),
        "step_ms": summary(gaps),
        // The requests that ran (a failed one decoded nothing).
        "decode_tokens_per_s": step_ms.map(|s| (b - failed) as f64 * 1e3 / s),
        "kv_context_tokens": context,
        "floors": {
            "bandwidth": {
                "weight_bytes": costs.weight_bytes(b),
                "kv_bytes": costs.kv_bytes(b, context),
                "routed_experts_per_layer": distinct,
                "routed_experts_are": "estimate: E*(1-(1-k/E)^B) per layer, the expectation under uniform top-k routing",
                "ms": floors.map(|f| f.bandwidth_ms),
            },
            "flop": {
                "flops": costs.step_flops(b, context),
                "ms": floors.map(|f| f.flop_ms),
            },
        },
        "step_over_bandwidth_floor": ratio(floors.map(|f| f.bandwidth_ms)),
        "step_over_flop_floor": ratio(floors.map(|f| f.flop_ms)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_request_outlasts_the_batch_prefill() {
        let load = SweepLoad {
            batch_sizes: &[],
            prompt_len: 128,
            gen_len: 32,
            seed: 0,
            vocab: 100,
            step_rows: 512,
        };
        assert_eq!(load.gen_len_at(1), 33);
        // Eight 128-token prompts: 512 rows, then 508 beside four decode rows, then the last
        // prompt's 4 rows: three steps.
        assert_eq!(load.gen_len_at(8), 35);
        assert_eq!(load.gen_len_at(128), 32 + 37);
    }

    #[test]
    fn only_gaps_while_every_request_decodes_count() {
        // Request a: tokens at 1, 2, 3, 4, 5; request b (later prompt): 2.5, 3.5, 4.5, 6.
        // Window [2.5, 5]: a's 3->4, 4->5 and b's 2.5->3.5, 3.5->4.5.
        let requests = vec![vec![1.0, 2.0, 3.0, 4.0, 5.0], vec![2.5, 3.5, 4.5, 6.0]];
        assert_eq!(all_decoding_gaps_ms(&requests), [1000.0; 4]);
        // A request without tokens: no window.
        assert!(all_decoding_gaps_ms(&[vec![1.0, 2.0], vec![]]).is_empty());
        // No overlap: nothing.
        assert!(all_decoding_gaps_ms(&[vec![1.0, 2.0], vec![3.0, 4.0]]).is_empty());
        assert!(all_decoding_gaps_ms(&[]).is_empty());
    }

    #[test]
    fn entry_rates_and_ratios_follow_the_step() {
        let costs = ModelCosts {
            dense_bytes: 1e6,
            dense_params: 1e5,
            embed_row_bytes: 0.0,
            layers: vec![],
            kv_bytes_per_token: 0.0,
            attention_flops_per_position: 0.0,
        };
        let machine = MachineLimits {
            memory_bandwidth_gbps: 1.0,
            matmul_f32_gflops: 1.0,
            threads: 1,
        };
        // Step 4 ms at B = 2: 500 tokens/s; floors 1 ms (1 MB at 1 GB/s) and 0.4 ms (4e5 FLOPs).
        let e = entry(2, &[4.0, 4.0, 4.0], 0, 1.0, 10, &costs, Some(&machine));
        assert_eq!(e["decode_tokens_per_s"], 500.0);
        let close = |v: &Value, want: f64| (v.as_f64().unwrap() - want).abs() < 1e-9;
        assert!(close(&e["floors"]["bandwidth"]["ms"], 1.0));
        assert!(close(&e["floors"]["flop"]["ms"], 0.4));
        assert!(close(&e["step_over_bandwidth_floor"], 4.0));
        assert!(close(&e["step_over_flop_floor"], 10.0));
        // No steps with every request decoding: no rate, no ratio.
        let none = entry(2, &[], 0, 1.0, 10, &costs, Some(&machine));
        assert!(none["decode_tokens_per_s"].is_null() && none["step_over_bandwidth_floor"].is_null());
    }
}
