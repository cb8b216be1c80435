//! What the checker runs a fixture on: [`GoldenTarget`] and the prefill result it returns.

use std::sync::Arc;

use moe_model::engine::Greedy;
use moe_model::router::RoutePolicy;
use moe_model::trace::Trace;

use crate::error::Result;

/// What a prefill of one prompt gives back.
#[derive(Debug, Clone)]
pub struct PrefillResult {
    /// `[prompt_len, vocab]`.
    pub logits: Vec<f32>,
    /// Per-layer intermediate values, where the target can expose them.
    pub trace: Option<Trace>,
    /// Per layer: `(keys, values)` of the KV cache after the prefill, `[prompt_len, kv_dim]`,
    /// keys after that layer's key norm.
    pub kv_states: Option<Vec<(Vec<f32>, Vec<f32>)>>,
}

/// A model the fixture can be run on.
pub trait GoldenTarget {
    /// One forward pass over a whole prompt (a fresh sequence).
    fn prefill(&mut self, prompt: &[u32]) -> Result<PrefillResult>;
    /// Prefill of several prompts in one batch; per prompt `[len, vocab]` logits.
    fn prefill_batch(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>>;
    /// Greedy decoding of the prompts as one batch, `steps` tokens each, with step logits.
    fn greedy(&mut self, prompts: &[Vec<u32>], steps: usize) -> Result<Vec<Greedy>>;
    /// A prefill of a fresh sequence under another routing policy, with its trace (the
    /// capacity cases), where the target can run one; `None` otherwise.
    fn prefill_with_policy(
        &mut self,
        _prompt: &[u32],
        _policy: Arc<dyn RoutePolicy>,
    ) -> Result<Option<(Trace, Vec<f32>)>> {
        Ok(None)
    }

    /// RoPE inverse frequencies, where the target exposes them.
    fn rope_inv_freq(&self) -> Option<Vec<f32>> {
        None
    }
}
