//! Generation requests as the engine sees them, their validation, and the token sampler.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kernels::argmax;
use crate::rng::SplitMix64;

/// Largest `max_tokens` a request may ask for, whatever the context allows.
pub const MAX_NEW_TOKENS: u32 = 1 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: u32,
    /// 0 or 1 = off.
    pub top_p: f32,
    pub seed: u64,
    pub stop_ids: Vec<u32>,
    pub max_tokens: u32,
}

impl SamplingParams {
    pub fn greedy(max_tokens: u32) -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 0.0,
            seed: 0,
            stop_ids: Vec::new(),
            max_tokens,
        }
    }
}

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub return_prompt_logits: bool,
    pub return_token_logits: bool,
}

impl GenerationRequest {
    /// Checks everything that can be checked against the model alone. Messages name the field.
    pub fn validate(&self, config: &ModelConfig) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidInput(m));
        let vocab = config.vocab_size;
        if self.prompt.is_empty() {
            return bad("prompt_ids is empty".into());
        }
        if let Some((i, t)) = self.prompt.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
            return bad(format!(
                "prompt_ids[{i}] = {t} is outside the vocabulary (vocab_size {vocab})"
            ));
        }
        let s = &self.sampling;
        if s.max_tokens == 0 {
            return bad("sampling.max_tokens must be at least 1".into());
        }
        if s.max_tokens > MAX_NEW_TOKENS {
            return bad(format!(
                "sampling.max_tokens = {} exceeds the limit {MAX_NEW_TOKENS}",
                s.max_tokens
            ));
        }
        let total = self.prompt.len() + s.max_tokens as usize;
        if total > config.max_position_embeddings {
            return bad(format!(
                "prompt ({} tokens) + max_tokens ({}) = {total} exceeds the context length {}",
                self.prompt.len(),
                s.max_tokens,
                config.max_position_embeddings
            ));
        }
        if !s.temperature.is_finite() || s.temperature < 0.0 || s.temperature > 100.0 {
            return bad(format!("sampling.temperature = {} must be in [0, 100]", s.temperature));
        }
        if !s.top_p.is_finite() || !(0.0..=1.0).contains(&s.top_p) {
            return bad(format!("sampling.top_p = {} must be in [0, 1]", s.top_p));
        }
        if s.top_k as usize > vocab {
            return bad(format!("sampling.top_k = {} exceeds vocab_size {vocab}", s.top_k));
        }
        if let Some(t) = s.stop_ids.iter().find(|t| **t as usize >= vocab) {
            return bad(format!(
                "sampling.stop_ids contains {t}, outside the vocabulary (vocab_size {vocab})"
            ));
        }
        Ok(())
    }
}

/// Picks tokens from logits. Per request and seeded, so the choice depends only on the request
/// and the logits, never on what else shares the batch.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = SplitMix64::new(params.seed);
        Sampler { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 {
            return argmax(logits) as u32;
        }
        // Candidates in descending logit order (ties: lower id first), cut by top-k.
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        ids.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        if p.top_k > 0 {
            ids.truncate(p.top_k as usize);
        }
        let max = logits[ids[0] as usize];
        let mut probs: Vec<f64> = ids
            .iter()
            .map(|&i| (((logits[i as usize] - max) / p.temperature) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|v| *v /= total);
        if p.top_p > 0.0 && p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&v| {
                    acc += v;
                    acc >= p.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            ids.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|v| *v /= total);
        }
        let mut u = self.rng.unit();
        for (&id, &pr) in ids.iter().zip(&probs) {
            if u <= pr {
                return id;
            }
            u -= pr;
        }
        *ids.last().expect("at least one candidate")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_sampling_is_seeded() {
        let logits = [0.1f32, 3.0, 2.9, -1.0];
        assert_eq!(Sampler::new(SamplingParams::greedy(1)).sample(&logits), 1);
        let params = SamplingParams {
            temperature: 1.0,
            seed: 42,
            ..SamplingParams::greedy(1)
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(params.clone());
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(params);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        assert!(
            a.contains(&1) && a.contains(&2),
            "temperature 1 mixes the two close logits: {a:?}"
        );
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = [5.0f32, 4.9, 0.0, -3.0, 4.8];
        let mut s = Sampler::new(SamplingParams {
            temperature: 2.0,
            top_k: 2,
            seed: 1,
            ..SamplingParams::greedy(1)
        });
        assert!((0..200).all(|_| matches!(s.sample(&logits), 0 | 1)));
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.3,
            seed: 1,
            ..SamplingParams::greedy(1)
        });
        assert!(
            (0..200).all(|_| s.sample(&logits) == 0),
            "top-p 0.3 keeps only the most likely id"
        );
    }
}
