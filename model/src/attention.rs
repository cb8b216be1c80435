//! One layer's attention: q/k/v projections, RoPE then QK-norm, GQA causal attention over the
//! paged KV cache, o_proj. Under CLA a "cross" layer has no k/v projections and attends over the
//! cache slot written by its group's first layer, with its own key norm.

use rayon::prelude::*;

use crate::batch::BatchLayout;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kernels::{dot, linear, rms_norm_in_place};
use crate::kv_cache::KvCache;
use crate::names;
use crate::paged_attention::{PagedKv, ROWS_PER_TASK, attend_paged};
use crate::plan::Want;
use crate::rope::Rope;
use crate::weights::Matrix;

#[derive(Debug, Clone)]
pub struct AttentionWeights {
    pub q_proj: Matrix,
    /// `None` in CLA cross layers.
    pub kv_proj: Option<(Matrix, Matrix)>,
    pub o_proj: Matrix,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
}

impl AttentionWeights {
    /// Refuses K/V projections in a CLA cross layer (a checkpoint made for another sharing
    /// factor), which [`AttentionWeights::load`] would ignore. Reads only the header.
    pub fn check_unused(ckpt: &Checkpoint, config: &ModelConfig, l: usize) -> Result<()> {
        if config.layers[l].computes_kv(l) {
            return Ok(());
        }
        match [names::K_PROJ, names::V_PROJ]
            .map(|p| names::layer(l, p))
            .into_iter()
            .find(|name| ckpt.contains(name))
        {
            Some(name) => Err(ckpt.tensor_error(
                &name,
                format!(
                    "present, but with use_cla and cla_share_factor {} layer {l} is a cross layer that reuses layer {}'s K/V",
                    config.cla_share_factor, config.layers[l].kv_source_layer
                ),
            )),
            None => Ok(()),
        }
    }

    /// The tensors [`AttentionWeights::load`] reads for layer `l`.
    pub fn wants(config: &ModelConfig, l: usize) -> Vec<Want> {
        let (h, q, kv, hd) = (config.hidden_size, config.q_dim(), config.kv_dim(), config.head_dim);
        let mut wants = vec![
            Want::matrix(names::layer(l, names::Q_PROJ), q, h),
            Want::matrix(names::layer(l, names::O_PROJ), h, q),
        ];
        if config.layers[l].computes_kv(l) {
            wants.push(Want::matrix(names::layer(l, names::K_PROJ), kv, h));
            wants.push(Want::matrix(names::layer(l, names::V_PROJ), kv, h));
        }
        if config.use_qk_norm {
            wants.push(Want::vector(names::layer(l, names::Q_NORM), hd));
            wants.push(Want::vector(names::layer(l, names::K_NORM), hd));
        }
        wants
    }

    pub fn load(ckpt: &Checkpoint, config: &ModelConfig, l: usize) -> Result<Self> {
        let (h, q, kv, hd) = (config.hidden_size, config.q_dim(), config.kv_dim(), config.head_dim);
        let computes_kv = config.layers[l].computes_kv(l);
        let k_name = names::layer(l, names::K_PROJ);
        let kv_proj = if computes_kv {
            Some((
                ckpt.matrix(&k_name, kv, h)?,
                ckpt.matrix(&names::layer(l, names::V_PROJ), kv, h)?,
            ))
        } else {
            None
        };
        let (q_norm, k_norm) = if config.use_qk_norm {
            (
                Some(ckpt.vector(&names::layer(l, names::Q_NORM), hd)?),
                Some(ckpt.vector(&names::layer(l, names::K_NORM), hd)?),
            )
        } else {
            (None, None)
        };
        Ok(AttentionWeights {
            q_proj: ckpt.matrix(&names::layer(l, names::Q_PROJ), q, h)?,
            kv_proj,
            o_proj: ckpt.matrix(&names::layer(l, names::O_PROJ), h, q)?,
            q_norm,
            k_norm,
        })
    }

    pub fn size_in_bytes(&self) -> usize {
        self.q_proj.size_in_bytes()
            + self.o_proj.size_in_bytes()
            + self
                .kv_proj
                .as_ref()
                .map_or(0, |(k, v)| k.size_in_bytes() + v.size_in_bytes())
    }

    /// The key norm `layer` applies before caching its keys: its own, when no other layer reads
    /// its cache slot, so the norm runs once per token instead of once per token per step. A
    /// slot shared by a CLA group keeps pre-norm keys, since each layer reading it has its own
    /// norm.
    pub fn key_norm_on_write(&self, config: &ModelConfig, layer: usize) -> Option<&[f32]> {
        self.k_norm.as_deref().filter(|_| !slot_is_shared(config, layer))
    }

    /// The key norm `layer` applies to keys read from the cache (see `key_norm_on_write`).
    pub fn key_norm_on_read(&self, config: &ModelConfig, layer: usize) -> Option<&[f32]> {
        self.k_norm.as_deref().filter(|_| slot_is_shared(config, layer))
    }

    /// `x` is the normalised input `[N, hidden]`; returns the o_proj output `[N, hidden]`.
    /// Writes this layer's K/V for the batch positions when it computes K/V.
    pub fn forward(
        &self,
        config: &ModelConfig,
        layer: usize,
        rope: &Rope,
        batch: &BatchLayout,
        x: &[f32],
        cache: &mut KvCache,
    ) -> Vec<f32> {
        let n = batch.num_rows();
        let (hd, eps) = (config.head_dim, config.rms_norm_eps);
        let (q_dim, kv_dim) = (config.q_dim(), config.kv_dim());
        let slot = config.kv_cache_slot(layer);

        let mut q = vec![0.0; n * q_dim];
        linear(x, n, &self.q_proj, &mut q);
        let mut kv = None;
        if let Some((k_proj, v_proj)) = &self.kv_proj {
            let mut k = vec![0.0; n * kv_dim];
            let mut v = vec![0.0; n * kv_dim];
            linear(x, n, k_proj, &mut k);
            linear(x, n, v_proj, &mut v);
            kv = Some((k, v));
        }

        // RoPE on q (then QK-norm) and on k (its norm: see `key_norm_on_write`).
        let mut cos = vec![0.0; hd / 2];
        let mut sin = vec![0.0; hd / 2];
        for (row, pos) in batch.positions().enumerate() {
            rope.cos_sin(pos, &mut cos, &mut sin);
            let q_row = &mut q[row * q_dim..(row + 1) * q_dim];
            Rope::apply(q_row, hd, &cos, &sin);
            if let Some(w) = &self.q_norm {
                rms_norm_in_place(q_row, w, eps);
            }
            if let Some((k, _)) = &mut kv {
                Rope::apply(&mut k[row * kv_dim..(row + 1) * kv_dim], hd, &cos, &sin);
            }
        }
        if let Some((k, v)) = &mut kv {
            if let Some(w) = self.key_norm_on_write(config, layer) {
                rms_norm_in_place(k, w, eps);
            }
            for seq in batch.seqs() {
                let rows = seq.rows();
                cache.write(
                    slot,
                    seq.id,
                    seq.start_pos,
                    &k[rows.start * kv_dim..rows.end * kv_dim],
                    &v[rows.start * kv_dim..rows.end * kv_dim],
                );
            }
        }

        // Tasks of at most ROWS_PER_TASK rows of one sequence, each with its slice of `attn`
        // (sequences' rows are consecutive in the batch, in order).
        let mut attn = vec![0.0; n * q_dim];
        let kv_base = PagedKv {
            cache: &*cache,
            slot,
            seq: 0,
            key_norm: self.key_norm_on_read(config, layer),
        };
        let mut tasks = Vec::with_capacity(batch.seqs().len());
        let mut rest = attn.as_mut_slice();
        for seq in batch.seqs() {
            for first in (0..seq.len).step_by(ROWS_PER_TASK) {
                let rows = ROWS_PER_TASK.min(seq.len - first);
                let (head, tail) = rest.split_at_mut(rows * q_dim);
                let row = seq.start_row + first;
                let kv = PagedKv { seq: seq.id, ..kv_base };
                tasks.push((kv, seq.start_pos + first, &q[row * q_dim..(row + rows) * q_dim], head));
                rest = tail;
            }
        }
        tasks
            .into_par_iter()
            .for_each(|(kv, start_pos, q_rows, out)| attend_paged(config, kv, start_pos, q_rows, out));

        let mut o = vec![0.0; n * config.hidden_size];
        linear(&attn, n, &self.o_proj, &mut o);
        o
    }
}

/// Whether another layer reads `layer`'s KV-cache slot (a CLA group of more than one layer).
fn slot_is_shared(config: &ModelConfig, layer: usize) -> bool {
    let slot = config.kv_cache_slot(layer);
    (0..config.num_layers).any(|l| l != layer && config.kv_cache_slot(l) == slot)
}

/// Causal GQA attention of `q_rows` (positions `start_pos..`) over `keys`/`values`
/// (`[ctx, kv_heads, head_dim]`, already normalised), from contiguous buffers. Public as the
/// reference the GPU kernel and [`attend_paged`] (the CPU path) are tested against.
pub fn attend(config: &ModelConfig, start_pos: usize, q_rows: &[f32], keys: &[f32], values: &[f32], out: &mut [f32]) {
    let (hd, heads, kv_heads) = (config.head_dim, config.num_heads, config.num_kv_heads);
    let (q_dim, kv_dim) = (config.q_dim(), config.kv_dim());
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let per_row = |(i, out_row): (usize, &mut [f32])| {
        let visible = start_pos + i + 1;
        let mut scores = vec![0.0f32; visible];
        for h in 0..heads {
            let g = h / group;
            let qh = &q_rows[i * q_dim + h * hd..i * q_dim + (h + 1) * hd];
            for (j, s) in scores.iter_mut().enumerate() {
                *s = dot(qh, &keys[j * kv_dim + g * hd..j * kv_dim + (g + 1) * hd]) * scale;
            }
            crate::kernels::softmax_in_place(&mut scores);
            let oh = &mut out_row[h * hd..(h + 1) * hd];
            oh.fill(0.0);
            for (j, &p) in scores.iter().enumerate() {
                crate::kernels::axpy(p, &values[j * kv_dim + g * hd..j * kv_dim + (g + 1) * hd], oh);
            }
        }
    };
    if q_rows.len() / q_dim > 1 {
        out.par_chunks_mut(q_dim).enumerate().for_each(per_row);
    } else {
        out.chunks_mut(q_dim).enumerate().for_each(per_row);
    }
}
