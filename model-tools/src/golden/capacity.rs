//! The capacity cases: the first-C-tokens drop reproduced choice by choice and through the
//! forward pass; the recorded `drop` / `reroute` assignments replayed.

use std::sync::Arc;

use moe_model::capacity::{Capacity, CapacityRouting, ReplayRouting, drop_over_capacity};
use moe_model::router::RoutePolicy;

use super::check::Checker;
use super::compare::{count_topk_mismatches, histogram};
use super::target::GoldenTarget;
use crate::error::Result;

impl Checker<'_> {
    /// The capacity cases: the first-C-tokens drop reproduced choice by choice and through the
    /// forward pass; the recorded `drop` / `reroute` assignments replayed.
    pub(super) fn capacity(&mut self, target: &mut dyn GoldenTarget) -> Result<()> {
        let tol = self.fixture.tolerances;
        let prompt = self.fixture.tokens("capacity.input_ids")?;
        self.compared.insert("capacity.input_ids".into());
        let c = self.expect_ids("capacity.capacity")?.first().copied().unwrap_or(0) as usize;
        let (layers, experts) = (self.fixture.config.num_layers, self.fixture.config.num_experts);
        for variant in ["drop_token_order", "drop", "reroute"] {
            let key = |q: &str| format!("capacity.{variant}.{q}");
            if !self.fixture.has(&key("prefill_logits")) {
                continue;
            }
            let policy: Arc<dyn RoutePolicy> = if variant == "drop_token_order" {
                Arc::new(CapacityRouting::new(Capacity::Fixed(c), None))
            } else {
                let finals = (0..layers)
                    .map(|l| self.expect_ids(&key(&format!("layer{l}.final_expert"))))
                    .collect::<Result<Vec<_>>>()?;
                Arc::new(ReplayRouting(finals))
            };
            let Some((trace, logits)) = target.prefill_with_policy(&prompt, policy)? else {
                return Ok(());
            };
            let case = format!("cap.{variant}");
            let d = self.diff(&key("prefill_logits"), &logits)?;
            self.push(&case, "prefill_logits", d, tol.logits, String::new());
            let (mut worst_hidden, mut worst_router, mut worst_weight, mut choice_misses) =
                (0.0f64, 0.0f64, 0.0f64, 0usize);
            for (l, lt) in trace.layers.iter().enumerate() {
                let layer = |q: &str| key(&format!("layer{l}.{q}"));
                worst_hidden = worst_hidden.max(self.diff(&layer("hidden_out"), &lt.hidden_out)?);
                worst_router = worst_router.max(self.diff(&layer("router_logits"), &lt.router_logits)?);
                let top1: Vec<i64> = lt
                    .routing
                    .experts
                    .iter()
                    .step_by(lt.routing.topk)
                    .map(|&e| e as i64)
                    .collect();
                choice_misses += count_topk_mismatches(&self.expect_ids(&layer("top1_idx"))?, &top1, 1);
                // Weights: the router probability of the final expert (0 when dropped), from
                // our own router logits.
                let finals = self.expect_ids(&layer("final_expert"))?;
                let mut probs = lt.router_logits.clone();
                probs.chunks_mut(experts).for_each(moe_model::kernels::softmax_in_place);
                let weights: Vec<f32> = finals
                    .iter()
                    .enumerate()
                    .map(|(t, &e)| if e < 0 { 0.0 } else { probs[t * experts + e as usize] })
                    .collect();
                worst_weight = worst_weight.max(self.diff(&layer("weight"), &weights)?);
                if variant != "drop_token_order" {
                    // The recorded bookkeeping must agree with our top-1 choices.
                    let kept: Vec<i64> = finals.iter().zip(&top1).map(|(f, t)| (f == t) as i64).collect();
                    choice_misses += count_topk_mismatches(&self.expect_ids(&layer("kept"))?, &kept, 1);
                    let routed = histogram(experts, top1.iter().copied());
                    let kept_counts = histogram(
                        experts,
                        top1.iter().zip(&kept).filter(|(_, k)| **k == 1).map(|(e, _)| *e),
                    );
                    let final_counts = histogram(experts, finals.iter().copied());
                    for (q, got) in [
                        ("counts_routed", routed),
                        ("counts_kept", kept_counts),
                        ("counts_final", final_counts),
                    ] {
                        choice_misses += count_topk_mismatches(&self.expect_ids(&layer(q))?, &got, 1);
                    }
                }
                if variant == "drop_token_order" {
                    // Our own choices must be the recorded ones.
                    let out = drop_over_capacity(&lt.routing, experts, c);
                    let kept: Vec<i64> = out.kept.iter().map(|&k| k as i64).collect();
                    let fin: Vec<i64> = out.final_expert.iter().map(|e| e.map_or(-1, |e| e as i64)).collect();
                    choice_misses += count_topk_mismatches(&self.expect_ids(&layer("kept"))?, &kept, 1);
                    choice_misses += count_topk_mismatches(&self.expect_ids(&layer("final_expert"))?, &fin, 1);
                    for (q, got) in [
                        ("counts_routed", &out.counts_routed),
                        ("counts_kept", &out.counts_kept),
                        ("counts_final", &out.counts_final),
                    ] {
                        let got: Vec<i64> = got.iter().map(|&v| v as i64).collect();
                        choice_misses += count_topk_mismatches(&self.expect_ids(&layer(q))?, &got, 1);
                    }
                }
            }
            self.push(&case, "layers.hidden_out", worst_hidden, tol.hidden, String::new());
            self.push(
                &case,
                "layers.router_logits",
                worst_router,
                tol.router_logits,
                String::new(),
            );
            self.push(&case, "layers.weight", worst_weight, tol.topk_weight, String::new());
            let what = if variant == "drop_token_order" {
                "(top-1, kept, final expert, counts)"
            } else {
                "(top-1, kept, counts; assignments replayed)"
            };
            self.push(&case, "layers.choices", choice_misses as f64, 0.0, what.into());
        }
        Ok(())
    }
}
