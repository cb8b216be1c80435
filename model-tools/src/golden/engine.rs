//! The in-process [`Engine`] as a [`GoldenTarget`]: every quantity, per-layer traces, KV states
//! and the capacity cases included.

use std::sync::Arc;

use moe_model::engine::{Engine, Greedy, LogitsWanted, SeqChunk};
use moe_model::router::{ExactRouting, RoutePolicy};
use moe_model::trace::Trace;

use super::target::{GoldenTarget, PrefillResult};
use crate::error::Result;

impl GoldenTarget for Engine {
    fn prefill(&mut self, prompt: &[u32]) -> Result<PrefillResult> {
        let seq = self.new_sequence();
        let chunk = SeqChunk {
            seq,
            tokens: prompt.to_vec(),
            logits: LogitsWanted::All,
        };
        let result = self.step(&[chunk], true).map(|mut out| {
            let config = self.config();
            let kv_states = (0..config.num_layers).map(|l| self.normalised_kv(seq, l)).collect();
            PrefillResult {
                logits: out.logits.remove(0),
                trace: out.trace,
                kv_states: Some(kv_states),
            }
        });
        self.release(seq);
        Ok(result?)
    }

    fn prefill_batch(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let chunks: Vec<SeqChunk> = prompts
            .iter()
            .map(|p| SeqChunk {
                seq: self.new_sequence(),
                tokens: p.clone(),
                logits: LogitsWanted::All,
            })
            .collect();
        let result = self.step(&chunks, false).map(|o| o.logits);
        for c in &chunks {
            self.release(c.seq);
        }
        Ok(result?)
    }

    fn greedy(&mut self, prompts: &[Vec<u32>], steps: usize) -> Result<Vec<Greedy>> {
        Ok(self.generate_greedy(prompts, steps, &[], true)?)
    }

    fn rope_inv_freq(&self) -> Option<Vec<f32>> {
        Some(self.model().rope().inv_freq().to_vec())
    }

    fn prefill_with_policy(
        &mut self,
        prompt: &[u32],
        policy: Arc<dyn RoutePolicy>,
    ) -> Result<Option<(Trace, Vec<f32>)>> {
        self.set_route_policy(policy);
        let seq = self.new_sequence();
        let chunk = SeqChunk {
            seq,
            tokens: prompt.to_vec(),
            logits: LogitsWanted::All,
        };
        let out = self.step(&[chunk], true);
        self.release(seq);
        self.set_route_policy(Arc::new(ExactRouting));
        let mut out = out?;
        Ok(Some((out.trace.take().unwrap_or_default(), out.logits.remove(0))))
    }
}
