//! One layer's attention on the GPU, composed from the device operations exactly as
//! `attention::AttentionWeights::forward` composes the CPU ones: q/k/v projections, RoPE then
//! QK-norm on q, RoPE on k (cached before its norm), the paged KV write, attention over the
//! cache with the key norm applied as keys are read, o_proj. Block tables come from the host
//! `KvCache`, which keeps doing the bookkeeping (reserve, release) while the device cache holds
//! the data, block for block.
//!
//! A simple correct first version: every operation takes and returns host values, so the
//! activations cross PCIe between operations. Keeping them on the device is the next step.

use super::CudaDevice;
use super::ops::{DeviceKvCache, DeviceMatrix, PagedRows};
use crate::Result;
use crate::attention::AttentionWeights;
use crate::batch::BatchLayout;
use crate::config::ModelConfig;
use crate::kv_cache::KvCache;
use crate::rope::Rope;

pub struct DeviceAttention {
    q_proj: DeviceMatrix,
    /// `None` in CLA cross layers.
    kv_proj: Option<(DeviceMatrix, DeviceMatrix)>,
    o_proj: DeviceMatrix,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
}

impl DeviceAttention {
    pub fn upload(gpu: &CudaDevice, w: &AttentionWeights) -> Result<DeviceAttention> {
        Ok(DeviceAttention {
            q_proj: gpu.upload_matrix(&w.q_proj)?,
            kv_proj: w
                .kv_proj
                .as_ref()
                .map(|(k, v)| Ok::<_, crate::Error>((gpu.upload_matrix(k)?, gpu.upload_matrix(v)?)))
                .transpose()?,
            o_proj: gpu.upload_matrix(&w.o_proj)?,
            q_norm: w.q_norm.clone(),
            k_norm: w.k_norm.clone(),
        })
    }

    /// `x` is the normalised input `[N, hidden]`; returns the o_proj output. The batch's
    /// positions must be reserved in `tables`; this layer's K/V go to `cache` (its slot).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        gpu: &CudaDevice,
        config: &ModelConfig,
        rope: &Rope,
        batch: &BatchLayout,
        x: &[f32],
        tables: &KvCache,
        cache: &mut DeviceKvCache,
    ) -> Result<Vec<f32>> {
        let (n, hd, eps) = (batch.num_rows(), config.head_dim, config.rms_norm_eps);
        if n == 0 {
            return Ok(Vec::new());
        }
        let pos: Vec<u32> = batch.positions().map(|p| p as u32).collect();
        let q = gpu.linear(x, n, &self.q_proj)?;
        let q = gpu.rope_qk_norm(&q, hd, &pos, rope.inv_freq(), self.q_norm.as_deref(), eps)?;
        let block_size = tables.block_size();
        if let Some((k_proj, v_proj)) = &self.kv_proj {
            let k = gpu.linear(x, n, k_proj)?;
            let k = gpu.rope_qk_norm(&k, hd, &pos, rope.inv_freq(), None, eps)?;
            let v = gpu.linear(x, n, v_proj)?;
            let mut slots = Vec::with_capacity(n);
            for seq in batch.seqs() {
                let blocks = tables.block_table(seq.id);
                for p in seq.start_pos..seq.start_pos + seq.len {
                    let block = blocks.get(p / block_size).ok_or_else(|| {
                        crate::Error::InvalidInput(format!("sequence {}: position {p} is not reserved", seq.id))
                    })?;
                    slots.push(block * block_size as u32 + (p % block_size) as u32);
                }
            }
            gpu.kv_write(cache, &k, &v, &slots)?;
        }
        let (mut table, mut table_start) = (Vec::new(), Vec::with_capacity(n));
        for seq in batch.seqs() {
            let start = table.len() as u32;
            table.extend_from_slice(tables.block_table(seq.id));
            table_start.extend(std::iter::repeat_n(start, seq.len));
        }
        let rows = PagedRows {
            pos: &pos,
            table: &table,
            table_start: &table_start,
        };
        let attn = gpu.paged_attention(
            cache,
            &q,
            &rows,
            config.num_heads,
            config.num_kv_heads,
            self.k_norm.as_deref(),
            eps,
        )?;
        gpu.linear(&attn, n, &self.o_proj)
    }
}

/// Every layer's attention on one GPU with its KV cache (one device cache per cache slot, the
/// same blocks as the host `KvCache`, which keeps the block tables): what an attention worker
/// places on `--device cuda:N`.
pub struct DeviceAttentionStack {
    gpu: CudaDevice,
    layers: Vec<DeviceAttention>,
    /// Per cache slot; one layer's forward at a time.
    caches: std::sync::Mutex<Vec<DeviceKvCache>>,
}

impl std::fmt::Debug for DeviceAttentionStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceAttentionStack(cuda:{}, {} layers)",
            self.gpu.ordinal(),
            self.layers.len()
        )
    }
}

impl DeviceAttentionStack {
    /// Uploads every layer's attention weights (`layer(l)`) and allocates the device cache.
    pub fn upload<'a>(
        gpu: &CudaDevice,
        config: &ModelConfig,
        layer: impl Fn(usize) -> &'a AttentionWeights,
        kv: crate::kv_cache::KvCacheConfig,
    ) -> Result<DeviceAttentionStack> {
        let layers = (0..config.num_layers)
            .map(|l| DeviceAttention::upload(gpu, layer(l)))
            .collect::<Result<Vec<_>>>()?;
        let caches = (0..config.num_kv_cache_slots())
            .map(|_| gpu.kv_cache(kv.num_blocks, kv.block_size, config.kv_dim()))
            .collect::<Result<Vec<_>>>()?;
        Ok(DeviceAttentionStack {
            gpu: gpu.clone(),
            layers,
            caches: std::sync::Mutex::new(caches),
        })
    }

    /// Layer `l`'s attention of the normalised input `x`, as `AttentionWeights::forward`.
    pub fn forward(
        &self,
        l: usize,
        config: &ModelConfig,
        rope: &Rope,
        batch: &BatchLayout,
        x: &[f32],
        tables: &KvCache,
    ) -> Result<Vec<f32>> {
        let mut caches = self.caches.lock().expect("device KV cache lock");
        let cache = &mut caches[config.kv_cache_slot(l)];
        let (blocks, block_size) = cache.geometry();
        if tables.block_size() != block_size || tables.num_blocks() > blocks {
            return Err(crate::Error::InvalidInput(format!(
                "host KV tables ({} blocks of {}) do not match the device cache ({blocks} blocks of {block_size})",
                tables.num_blocks(),
                tables.block_size()
            )));
        }
        self.layers[l].forward(&self.gpu, config, rope, batch, x, tables, cache)
    }
}
