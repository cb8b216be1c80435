//! The single-process engine: the attention half, an expert unit and a KV cache in one place.
//! It is the reference arrangement the cluster must reproduce token for token.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use crate::batch::BatchLayout;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::experts::{ExpertCompute, ExpertSelection, LocalExperts};
use crate::kernels::argmax;
use crate::kv_cache::{KvCache, KvCacheConfig, SeqId};
use crate::model::AttentionModel;
use crate::progress::{LoadProgress, NoProgress};
use crate::router::{ExactRouting, RoutePolicy};
use crate::trace::Trace;

/// Which logits a sequence wants back from a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    None,
    Last,
    All,
}

/// New tokens of one sequence for one step. The first one takes the position after what the
/// cache already holds for `seq`.
#[derive(Debug, Clone)]
pub struct SeqChunk {
    pub seq: SeqId,
    pub tokens: Vec<u32>,
    pub logits: LogitsWanted,
}

#[derive(Debug, Clone)]
pub struct StepOutput {
    /// Per input chunk, in order: `[rows, vocab]` logits as asked (empty for `None`).
    pub logits: Vec<Vec<f32>>,
    pub trace: Option<Trace>,
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Capacity and element type of the KV cache (`auto` by default: see
    /// [`crate::kv_cache::KvDtypeChoice`]).
    pub kv_cache: KvCacheConfig,
    /// Where [`Engine::load`] puts the routed experts.
    pub expert_device: Device,
    /// Where every layer's attention and the KV cache data run (norms, router, shared expert
    /// and LM head stay on the CPU).
    pub attention_device: Device,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            kv_cache: KvCacheConfig::for_tokens(16 * 1024, 16),
            expert_device: Device::Cpu,
            attention_device: Device::Cpu,
        }
    }
}

/// Result of greedy generation for one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Greedy {
    pub tokens: Vec<u32>,
    /// Row t produced `tokens[t]`; empty unless asked for.
    pub step_logits: Vec<Vec<f32>>,
}

pub struct Engine {
    model: AttentionModel,
    experts: Arc<dyn ExpertCompute>,
    policy: Arc<dyn RoutePolicy>,
    cache: KvCache,
    next_seq: SeqId,
}

impl Engine {
    /// Loads a whole model directory (config, non-expert and all expert tensors).
    pub fn load(dir: &Path, options: EngineOptions) -> Result<Self> {
        Self::load_with(dir, options, &NoProgress)
    }

    /// Like [`Engine::load`], reporting to `progress`. Every tensor of both halves is checked
    /// before the first is read.
    pub fn load_with(dir: &Path, options: EngineOptions, progress: &dyn LoadProgress) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        let attention = AttentionModel::plan(&ckpt, &config)?;
        let empty = LocalExperts::empty(&ckpt, &config, options.expert_device.clone())?;
        let (all, experts) = empty.plan(&ckpt, &config, &ExpertSelection::All.pairs(&config))?;
        progress.planned(experts.total() + attention.total());
        let experts = empty.with_planned(&ckpt, &config, &all, &experts, &[], progress)?;
        let model = AttentionModel::load_planned(&ckpt, config, &attention, progress)?;
        Self::new(model, Arc::new(experts), options)
    }

    pub fn new(mut model: AttentionModel, experts: Arc<dyn ExpertCompute>, options: EngineOptions) -> Result<Self> {
        let cache = KvCache::new(model.config(), options.kv_cache)?;
        model.place_attention(&options.attention_device, options.kv_cache)?;
        Ok(Engine {
            model,
            experts,
            policy: Arc::new(ExactRouting),
            cache,
            next_seq: 1,
        })
    }

    /// Replaces the routing policy (exact by default).
    pub fn set_route_policy(&mut self, policy: Arc<dyn RoutePolicy>) {
        self.policy = policy;
    }

    pub fn model(&self) -> &AttentionModel {
        &self.model
    }

    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    pub fn experts(&self) -> &dyn ExpertCompute {
        self.experts.as_ref()
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// A fresh sequence id.
    pub fn new_sequence(&mut self) -> SeqId {
        let id = self.next_seq;
        self.next_seq += 1;
        id
    }

    pub fn release(&mut self, seq: SeqId) {
        self.cache.release(seq);
    }

    /// The logits each chunk asks for, split per chunk, from one LM-head product over every
    /// wanted row of the batch: the head (the largest single weight; 262 MB in bf16 with a
    /// 128k vocabulary) is read once per step, not once per sequence.
    fn wanted_logits(&self, chunks: &[SeqChunk], batch: &BatchLayout, hidden: &[f32]) -> Vec<Vec<f32>> {
        let (h, vocab) = (self.config().hidden_size, self.config().vocab_size);
        let wanted: Vec<std::ops::Range<usize>> = chunks
            .iter()
            .zip(batch.seqs())
            .map(|(chunk, span)| match chunk.logits {
                LogitsWanted::None => span.rows().end..span.rows().end,
                LogitsWanted::Last => span.rows().end - 1..span.rows().end,
                LogitsWanted::All => span.rows(),
            })
            .collect();
        let mut rows = Vec::with_capacity(wanted.iter().map(|r| r.len()).sum::<usize>() * h);
        for r in &wanted {
            rows.extend_from_slice(&hidden[r.start * h..r.end * h]);
        }
        let mut all = self.model.logits(&self.model.final_norm(&rows));
        // One chunk wanting logits (batch 1, or a lone prefill) takes the product as it is;
        // several get their own copies.
        let askers = wanted.iter().filter(|r| !r.is_empty()).count();
        let mut at = 0;
        wanted
            .iter()
            .map(|r| {
                let out = if r.is_empty() {
                    Vec::new()
                } else if askers == 1 {
                    std::mem::take(&mut all)
                } else {
                    all[at * vocab..(at + r.len()) * vocab].to_vec()
                };
                at += r.len();
                out
            })
            .collect()
    }

    /// Runs one forward pass over several sequences' new tokens. All or nothing: on an error no
    /// KV-cache state changes.
    pub fn step(&mut self, chunks: &[SeqChunk], trace: bool) -> Result<StepOutput> {
        self.validate(chunks)?;
        let mut batch = BatchLayout::new();
        let mut tokens = Vec::new();
        let mut reserved: Vec<(SeqId, usize)> = Vec::new();
        for chunk in chunks {
            let start = self.cache.seq_len(chunk.seq);
            if let Err(e) = self.cache.reserve(chunk.seq, start + chunk.tokens.len()) {
                self.undo(&reserved);
                return Err(e);
            }
            reserved.push((chunk.seq, start));
            batch.push(chunk.seq, chunk.tokens.len(), start);
            tokens.extend_from_slice(&chunk.tokens);
        }
        let _span = tracing::debug_span!("engine_step", seqs = chunks.len(), rows = tokens.len()).entered();
        let mut recorded = trace.then(Trace::default);
        let hidden = match self.model.forward(
            self.experts.as_ref(),
            self.policy.as_ref(),
            &batch,
            &tokens,
            &mut self.cache,
            recorded.as_mut(),
        ) {
            Ok(h) => h,
            Err(e) => {
                self.undo(&reserved);
                return Err(e);
            }
        };

        let logits = self.wanted_logits(chunks, &batch, &hidden);
        Ok(StepOutput {
            logits,
            trace: recorded,
        })
    }

    /// K/V of `seq` as `layer` sees them after the cached positions: keys after the layer's
    /// key norm, `[len, kv_dim]` each. Under CLA the layers of a group share V and raw K.
    pub fn normalised_kv(&self, seq: SeqId, layer: usize) -> (Vec<f32>, Vec<f32>) {
        let config = self.config();
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        let len = self.cache.seq_len(seq);
        self.cache
            .gather(config.kv_cache_slot(layer), seq, len, &mut keys, &mut values);
        if let Some(w) = self.model.layer(layer).attention.key_norm_on_read(config, layer) {
            crate::kernels::rms_norm_in_place(&mut keys, w, config.rms_norm_eps);
        }
        (keys, values)
    }

    fn undo(&mut self, reserved: &[(SeqId, usize)]) {
        for &(seq, len) in reserved {
            if len == 0 {
                self.cache.release(seq);
            } else {
                self.cache.truncate(seq, len);
            }
        }
    }

    fn validate(&self, chunks: &[SeqChunk]) -> Result<()> {
        let mut seen = HashSet::new();
        for chunk in chunks {
            if chunk.tokens.is_empty() {
                return Err(Error::InvalidInput(format!(
                    "sequence {} has no tokens in this step",
                    chunk.seq
                )));
            }
            if !seen.insert(chunk.seq) {
                return Err(Error::InvalidInput(format!(
                    "sequence {} appears twice in one step",
                    chunk.seq
                )));
            }
            self.model.validate_tokens(&chunk.tokens)?;
            let end = self.cache.seq_len(chunk.seq) + chunk.tokens.len();
            let max = self.config().max_position_embeddings;
            if end > max {
                return Err(Error::InvalidInput(format!(
                    "sequence {} would reach {end} positions, beyond max_position_embeddings {max}",
                    chunk.seq
                )));
            }
        }
        Ok(())
    }

    /// Greedy decoding of several prompts as one batch (prefill together, then one decode row
    /// per prompt per step). Stops at `max_new_tokens` or, per prompt, on a stop token.
    pub fn generate_greedy(
        &mut self,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
        stop: &[u32],
        keep_logits: bool,
    ) -> Result<Vec<Greedy>> {
        let seqs: Vec<SeqId> = prompts.iter().map(|_| self.new_sequence()).collect();
        let result = self.greedy_loop(&seqs, prompts, max_new_tokens, stop, keep_logits);
        for &s in &seqs {
            self.release(s);
        }
        result
    }

    fn greedy_loop(
        &mut self,
        seqs: &[SeqId],
        prompts: &[Vec<u32>],
        max_new: usize,
        stop: &[u32],
        keep_logits: bool,
    ) -> Result<Vec<Greedy>> {
        let mut out: Vec<Greedy> = prompts
            .iter()
            .map(|_| Greedy {
                tokens: Vec::new(),
                step_logits: Vec::new(),
            })
            .collect();
        if max_new == 0 {
            return Ok(out);
        }
        let mut pending: Vec<SeqChunk> = seqs
            .iter()
            .zip(prompts)
            .map(|(&seq, p)| SeqChunk {
                seq,
                tokens: p.clone(),
                logits: LogitsWanted::Last,
            })
            .collect();
        let mut active: Vec<usize> = (0..prompts.len()).collect();
        while !active.is_empty() {
            let step = self.step(&pending, false)?;
            let mut next_active = Vec::new();
            let mut next_pending = Vec::new();
            for (&i, logits) in active.iter().zip(step.logits) {
                let token = argmax(&logits) as u32;
                out[i].tokens.push(token);
                if keep_logits {
                    out[i].step_logits.push(logits);
                }
                if out[i].tokens.len() < max_new && !stop.contains(&token) {
                    next_active.push(i);
                    next_pending.push(SeqChunk {
                        seq: seqs[i],
                        tokens: vec![token],
                        logits: LogitsWanted::Last,
                    });
                }
            }
            active = next_active;
            pending = next_pending;
        }
        Ok(out)
    }
}
