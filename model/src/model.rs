//! The non-expert half of the model: embeddings, every layer's attention, norms, router and
//! shared expert, the final norm and the LM head. This is what an attention worker holds; the
//! routed experts are reached through [`ExpertCompute`].

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::attention::AttentionWeights;
use crate::batch::BatchLayout;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::cuda::DeviceAttentionStack;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::experts::{ExpertCompute, Pending};
use crate::kernels::{linear, rms_norm};
use crate::kv_cache::{KvCache, KvCacheConfig};
use crate::mlp::SwiGlu;
use crate::names;
use crate::overlap::{OverlapStats, Timeline};
use crate::plan::{LoadPlan, Want};
use crate::progress::{LoadProgress, NoProgress};
use crate::rope::Rope;
use crate::router::{RoutePolicy, Router, Routing};
use crate::trace::{LayerTrace, Trace};
use crate::weights::Matrix;

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_norm: Vec<f32>,
    pub attention: AttentionWeights,
    pub post_attention_norm: Vec<f32>,
    pub router: Router,
    pub shared: Option<SwiGlu>,
}

#[derive(Debug, Clone)]
pub struct AttentionModel {
    config: ModelConfig,
    rope: Rope,
    embed: Matrix,
    layers: Vec<DecoderLayer>,
    final_norm: Vec<f32>,
    /// `None` when tied to the embedding.
    lm_head: Option<Matrix>,
    /// Set by [`place_attention`](Self::place_attention) on a GPU: the layers' attention and
    /// the KV cache data live there (the host `KvCache` keeps the block tables).
    device: Option<Arc<DeviceAttentionStack>>,
    /// Micro-batches per forward pass (see [`set_micro_batches`](Self::set_micro_batches)).
    micro_batches: usize,
    /// The fewest rows a micro-batch may have (see
    /// [`set_micro_batch_min_rows`](Self::set_micro_batch_min_rows)).
    micro_batch_min_rows: usize,
    overlap: Arc<OverlapStats>,
}

impl AttentionModel {
    /// Reads `config.json` and the non-expert tensors of a model directory.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        Self::load(&ckpt, config)
    }

    pub fn load(ckpt: &Checkpoint, config: ModelConfig) -> Result<Self> {
        Self::load_with(ckpt, config, &NoProgress)
    }

    /// Like [`AttentionModel::load`], reporting to `progress`. Every tensor is checked first.
    pub fn load_with(ckpt: &Checkpoint, config: ModelConfig, progress: &dyn LoadProgress) -> Result<Self> {
        let plan = Self::plan(ckpt, &config)?;
        progress.planned(plan.total());
        Self::load_planned(ckpt, config, &plan, progress)
    }

    /// Checks, from the headers, everything [`AttentionModel::load`] reads: one unit per layer,
    /// then the embedding, final norm and LM head.
    pub fn plan(ckpt: &Checkpoint, config: &ModelConfig) -> Result<LoadPlan> {
        crate::quant::check_checkpoint(ckpt, config)?;
        let (h, v, e) = (config.hidden_size, config.vocab_size, config.num_experts);
        let mut units: Vec<Vec<Want>> = (0..config.num_layers)
            .map(|l| {
                AttentionWeights::check_unused(ckpt, config, l)?;
                let mut wants = AttentionWeights::wants(config, l);
                wants.push(Want::vector(names::layer(l, names::INPUT_NORM), h));
                wants.push(Want::vector(names::layer(l, names::POST_ATTN_NORM), h));
                wants.push(Want::matrix(names::layer(l, names::ROUTER), e, h));
                let bias = names::layer(l, names::ROUTER_BIAS);
                if ckpt.contains(&bias) {
                    wants.push(Want::vector(bias, e));
                }
                let inter = config.layers[l].shared_intermediate;
                if inter > 0 {
                    wants.extend(SwiGlu::wants(|p| names::shared(l, p), h, inter));
                }
                Ok(wants)
            })
            .collect::<Result<_>>()?;
        let mut head = vec![Want::matrix(names::EMBED, v, h), Want::vector(names::FINAL_NORM, h)];
        if !config.tie_word_embeddings {
            head.push(Want::matrix(names::LM_HEAD, v, h));
        }
        units.push(head);
        LoadPlan::check(ckpt, &units)
    }

    /// Loads what `plan` (from [`AttentionModel::plan`]) checked, one unit at a time.
    pub(crate) fn load_planned(
        ckpt: &Checkpoint,
        config: ModelConfig,
        plan: &LoadPlan,
        progress: &dyn LoadProgress,
    ) -> Result<Self> {
        let (h, v) = (config.hidden_size, config.vocab_size);
        let mut layers = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let lc = &config.layers[l];
            let shared = if lc.shared_intermediate > 0 {
                Some(SwiGlu::load(ckpt, |p| names::shared(l, p), h, lc.shared_intermediate)?)
            } else {
                None
            };
            layers.push(DecoderLayer {
                input_norm: ckpt.vector(&names::layer(l, names::INPUT_NORM), h)?,
                attention: AttentionWeights::load(ckpt, &config, l)?,
                post_attention_norm: ckpt.vector(&names::layer(l, names::POST_ATTN_NORM), h)?,
                router: Router {
                    wg: ckpt.matrix_f32(&names::layer(l, names::ROUTER), config.num_experts, h)?,
                    bias: {
                        let name = names::layer(l, names::ROUTER_BIAS);
                        match ckpt.contains(&name) {
                            true => Some(ckpt.vector(&name, config.num_experts)?),
                            false => None,
                        }
                    },
                    topk: lc.moe_topk,
                    renormalize: config.renormalize_topk,
                },
                shared,
            });
            progress.loaded(plan.units[l]);
        }
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(ckpt.matrix(names::LM_HEAD, v, h)?)
        };
        let model = AttentionModel {
            rope: Rope::new(&config),
            embed: ckpt.matrix(names::EMBED, v, h)?,
            final_norm: ckpt.vector(names::FINAL_NORM, h)?,
            layers,
            lm_head,
            config,
            device: None,
            micro_batches: 1,
            micro_batch_min_rows: DEFAULT_MICRO_BATCH_MIN_ROWS,
            overlap: Arc::default(),
        };
        progress.loaded(plan.units[model.config.num_layers]);
        Ok(model)
    }

    /// Runs every layer's attention on `device` from now on, with a device KV cache of `kv`'s
    /// size (the host cache passed to [`forward`](Self::forward) must have the same geometry).
    /// Norms, router, shared expert and LM head stay on the CPU.
    pub fn place_attention(&mut self, device: &Device, kv: KvCacheConfig) -> Result<()> {
        self.device = match device {
            Device::Cpu => None,
            Device::Cuda(gpu) => Some(Arc::new(DeviceAttentionStack::upload(
                gpu,
                &self.config,
                |l| &self.layers[l].attention,
                kv,
            )?)),
        };
        Ok(())
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    pub fn layer(&self, l: usize) -> &DecoderLayer {
        &self.layers[l]
    }

    /// Bytes of weights held (what a decode step reads at most, without experts).
    pub fn size_in_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.attention.size_in_bytes()
                    + l.router.wg.size_in_bytes()
                    + l.shared.as_ref().map_or(0, SwiGlu::size_in_bytes)
            })
            .sum();
        layers + self.embed.size_in_bytes() + self.lm_head.as_ref().map_or(0, Matrix::size_in_bytes)
    }

    pub fn lm_head(&self) -> &Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Checks that every token id is inside the vocabulary.
    pub fn validate_tokens(&self, tokens: &[u32]) -> Result<()> {
        match tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            Some(t) => Err(Error::InvalidInput(format!(
                "token id {t} is outside the vocabulary (vocab_size {})",
                self.config.vocab_size
            ))),
            None => Ok(()),
        }
    }

    /// Embedding rows `[tokens, hidden]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.validate_tokens(tokens)?;
        let h = self.config.hidden_size;
        let mut out = vec![0.0; tokens.len() * h];
        for (row, &t) in out.chunks_exact_mut(h).zip(tokens) {
            self.embed.row_to_f32(t as usize, row);
        }
        Ok(out)
    }

    /// Attention sub-block of layer `l`: input norm, attention, o_proj. Returns the o_proj
    /// output (the caller adds it to the residual).
    pub fn attention(&self, l: usize, batch: &BatchLayout, hidden: &[f32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let layer = &self.layers[l];
        let mut x = vec![0.0; hidden.len()];
        rms_norm(hidden, &layer.input_norm, self.config.rms_norm_eps, &mut x);
        match &self.device {
            Some(gpu) => gpu.forward(l, &self.config, &self.rope, batch, &x, cache),
            None => Ok(layer.attention.forward(&self.config, l, &self.rope, batch, &x, cache)),
        }
    }

    /// post_attention_layernorm of layer `l`: the MoE input.
    pub fn moe_input(&self, l: usize, hidden: &[f32]) -> Vec<f32> {
        let mut x = vec![0.0; hidden.len()];
        rms_norm(
            hidden,
            &self.layers[l].post_attention_norm,
            self.config.rms_norm_eps,
            &mut x,
        );
        x
    }

    /// Router logits and top-k decisions of layer `l`.
    pub fn route(&self, l: usize, x: &[f32]) -> (Vec<f32>, Routing) {
        let router = &self.layers[l].router;
        let logits = router.logits(x, x.len() / self.config.hidden_size);
        let routing = router.route(&logits);
        (logits, routing)
    }

    /// Shared-expert output, or zeros for a layer without one.
    pub fn shared_expert(&self, l: usize, x: &[f32]) -> Vec<f32> {
        match &self.layers[l].shared {
            Some(mlp) => mlp.forward(x, x.len() / self.config.hidden_size),
            None => vec![0.0; x.len()],
        }
    }

    pub fn final_norm(&self, hidden: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; hidden.len()];
        rms_norm(hidden, &self.final_norm, self.config.rms_norm_eps, &mut out);
        out
    }

    /// LM-head logits `[rows, vocab]` of already normalised rows.
    pub fn logits(&self, normed: &[f32]) -> Vec<f32> {
        let rows = normed.len() / self.config.hidden_size;
        let mut out = vec![0.0; rows * self.config.vocab_size];
        linear(normed, rows, self.lm_head(), &mut out);
        out
    }

    /// Up to `n` micro-batches per forward pass (1 or 2): with 2, a pass over two or more
    /// sequences (each half at least [`micro_batch_min_rows`](Self::micro_batch_min_rows)
    /// rows) is cut into two halves of whole sequences that take turns, so one half's
    /// attention runs while the other's routed experts are in flight (worth it when they run
    /// elsewhere; results equal the unsplit pass's up to the products' rounding over fewer
    /// rows).
    pub fn set_micro_batches(&mut self, n: usize) -> Result<()> {
        if !(1..=MAX_MICRO_BATCHES).contains(&n) {
            return Err(Error::InvalidInput(format!(
                "micro_batches must be 1 or {MAX_MICRO_BATCHES}, got {n}"
            )));
        }
        self.micro_batches = n;
        Ok(())
    }

    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// With two micro-batches, a pass is cut only when each half gets at least `rows` rows
    /// (default [`DEFAULT_MICRO_BATCH_MIN_ROWS`]); smaller passes run whole.
    pub fn set_micro_batch_min_rows(&mut self, rows: usize) -> Result<()> {
        if rows == 0 {
            return Err(Error::InvalidInput("micro_batch_min_rows must be at least 1".into()));
        }
        self.micro_batch_min_rows = rows;
        Ok(())
    }

    pub fn micro_batch_min_rows(&self) -> usize {
        self.micro_batch_min_rows
    }

    /// Forward passes, micro-batches and their overlap so far (shared with clones).
    pub fn overlap_stats(&self) -> Arc<OverlapStats> {
        self.overlap.clone()
    }

    /// The decoder stack for one batch: embeddings in, final residual stream out. K/V of the
    /// batch positions are written to `cache` (already reserved by the caller). Records a trace
    /// when `trace` is given (a trace covers the whole batch: such a pass is never split).
    pub fn forward(
        &self,
        experts: &dyn ExpertCompute,
        policy: &dyn RoutePolicy,
        batch: &BatchLayout,
        tokens: &[u32],
        cache: &mut KvCache,
        mut trace: Option<&mut Trace>,
    ) -> Result<Vec<f32>> {
        let started = Instant::now();
        debug_assert_eq!(tokens.len(), batch.num_rows());
        let hidden = self.embed(tokens)?;
        if let Some(t) = trace.as_deref_mut() {
            t.embeddings = hidden.clone();
        }
        let cut = match trace {
            None if self.micro_batches > 1 => batch.balanced_cut(self.micro_batch_min_rows),
            _ => None,
        };
        let mut parts = match cut {
            Some(k) => {
                let (a, b) = batch.split_at(k);
                let mut first = hidden;
                let second = first.split_off(a.num_rows() * self.config.hidden_size);
                vec![
                    MicroBatch::new(Cow::Owned(a), first),
                    MicroBatch::new(Cow::Owned(b), second),
                ]
            }
            None => vec![MicroBatch::new(Cow::Borrowed(batch), hidden)],
        };
        let mut timeline = Timeline::default();
        self.layers_over(experts, policy, &mut parts, cache, &mut timeline, trace.as_deref_mut())?;
        let split = parts.len() > 1;
        let mut parts = parts.into_iter();
        let mut hidden = parts.next().map(|p| p.hidden).unwrap_or_default();
        for p in parts {
            hidden.extend_from_slice(&p.hidden);
        }
        if let Some(t) = trace {
            t.final_norm = self.final_norm(&hidden);
        }
        self.overlap.record(started.elapsed(), split, timeline.overlap());
        Ok(hidden)
    }

    /// [`AttentionModel::layers_in_turn`], and when it fails, the wait for every micro-batch
    /// still in flight before the error returns: a dropped dispatch would leave its exchange
    /// running (on the NCCL data plane, with the plane already handed to the next step).
    fn layers_over(
        &self,
        experts: &dyn ExpertCompute,
        policy: &dyn RoutePolicy,
        parts: &mut [MicroBatch],
        cache: &mut KvCache,
        timeline: &mut Timeline,
        trace: Option<&mut Trace>,
    ) -> Result<()> {
        let result = self.layers_in_turn(experts, policy, parts, cache, timeline, trace);
        if result.is_err() {
            for f in parts.iter_mut().filter_map(|p| p.in_flight.take()) {
                // Its own outcome no longer matters: the pass has already failed.
                let _ = f.pending.wait();
            }
        }
        result
    }

    /// Every layer over the micro-batches in turn. Per micro-batch and layer: the previous
    /// layer's experts are combined (shared expert first, while they are in flight), then this
    /// layer's attention and router run and its routed experts are started, so they are in
    /// flight while the other micro-batch computes. With one micro-batch this is the plain
    /// order: attention, router, begin, shared expert, wait.
    fn layers_in_turn(
        &self,
        experts: &dyn ExpertCompute,
        policy: &dyn RoutePolicy,
        parts: &mut [MicroBatch],
        cache: &mut KvCache,
        timeline: &mut Timeline,
        mut trace: Option<&mut Trace>,
    ) -> Result<()> {
        for l in 0..self.config.num_layers {
            for (i, part) in parts.iter_mut().enumerate() {
                timeline.start(i);
                self.combine(i, part, timeline, trace.as_deref_mut())?;
                let attn_out = self.attention(l, &part.layout, &part.hidden, cache)?;
                add_in_place(&mut part.hidden, &attn_out);
                let x = self.moe_input(l, &part.hidden);
                let (router_logits, routing) = self.route(l, &x);
                // The routed experts may run elsewhere: start them now, combine them later.
                let assignments = policy.assign(l, &router_logits, &routing);
                let sent = Instant::now();
                let pending = experts.begin(l, &x, part.layout.num_rows(), &assignments)?;
                part.in_flight = Some(InFlight {
                    layer: l,
                    x,
                    pending,
                    sent,
                    traced: trace.is_some().then_some((attn_out, router_logits, routing)),
                });
            }
        }
        for (i, part) in parts.iter_mut().enumerate() {
            timeline.start(i);
            self.combine(i, part, timeline, trace.as_deref_mut())?;
        }
        timeline.stop();
        Ok(())
    }

    /// Finishes micro-batch `i`'s MoE block, if one is in flight: the shared expert, the wait
    /// for the routed experts (counted against the other micro-batches' computing), the
    /// residual add.
    fn combine(
        &self,
        i: usize,
        part: &mut MicroBatch,
        timeline: &mut Timeline,
        trace: Option<&mut Trace>,
    ) -> Result<()> {
        let Some(f) = part.in_flight.take() else {
            return Ok(());
        };
        let mut moe_out = self.shared_expert(f.layer, &f.x);
        timeline.stop();
        let (routed, arrived) = f.pending.wait_timed()?;
        timeline.in_flight(i, f.sent, arrived);
        timeline.start(i);
        add_in_place(&mut moe_out, &routed);
        add_in_place(&mut part.hidden, &moe_out);
        if let (Some(t), Some((attn_out, router_logits, routing))) = (trace, f.traced) {
            t.layers.push(LayerTrace {
                attn_out,
                moe_input: f.x,
                router_logits,
                routing,
                routed_out: routed,
                moe_out,
                hidden_out: part.hidden.clone(),
            });
        }
        Ok(())
    }
}

/// The most micro-batches a forward pass is cut into.
pub const MAX_MICRO_BATCHES: usize = 2;

/// The fewest rows per micro-batch by default. Every half reads all the dense weights (and its
/// own routed experts, many shared with the other half), so a cut pays about a step's weight
/// reads once more for what it overlaps; measured through a local 1+2 cluster (docs/perf.md),
/// a batch of 8 decode rows ran faster whole (0.90 of in process against 0.81 cut 4 | 4) and a
/// batch of 64 faster cut (0.87 against 0.84).
pub const DEFAULT_MICRO_BATCH_MIN_ROWS: usize = 16;

/// One micro-batch of a forward pass: its sequences, its residual stream, and its layer's
/// routed experts while they are in flight.
struct MicroBatch<'a> {
    layout: Cow<'a, BatchLayout>,
    hidden: Vec<f32>,
    in_flight: Option<InFlight>,
}

impl<'a> MicroBatch<'a> {
    fn new(layout: Cow<'a, BatchLayout>, hidden: Vec<f32>) -> Self {
        MicroBatch {
            layout,
            hidden,
            in_flight: None,
        }
    }
}

/// A layer's routed experts started for a micro-batch.
struct InFlight {
    layer: usize,
    /// The MoE input (the shared expert's too).
    x: Vec<f32>,
    pending: Pending,
    sent: Instant,
    /// Attention output, router logits and routing, kept for the trace when one is recorded.
    traced: Option<(Vec<f32>, Vec<f32>, Routing)>,
}

pub(crate) fn add_in_place(acc: &mut [f32], x: &[f32]) {
    for (a, &b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}
