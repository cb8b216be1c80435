//! The attention half's operations on the GPU: RMSNorm, RoPE + QK-norm, the paged KV cache and
//! attention over it, softmax + top-k routing. Inputs and outputs are host f32 (narrowed to bf16
//! on the way in), so each is directly comparable with its CPU function; the KV cache stays on
//! the device.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::fp8::DeviceWeight;
use super::{CudaDevice, err};
use crate::router::Routing;
use crate::weights::{Matrix, MatrixData};
use crate::{Error, Result};

fn narrow(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// A weight as bf16: bf16 bits as they are, f32 and f16 rounded.
pub(super) fn to_bf16(m: &Matrix) -> Vec<bf16> {
    match &m.data {
        // Dequantised, then rounded to bf16: what the GPU's widening kernel computes for an FP8
        // weight kept as FP8 (`gpu::fp8`); callers upload FP8 as FP8 instead.
        MatrixData::F8E4M3(_) => {
            let mut wide = vec![0.0; m.rows * m.cols];
            m.rows_to_f32(0, m.rows, &mut wide);
            narrow(&wide)
        }
        MatrixData::BF16(bits) => bits.iter().map(|&b| bf16::from_bits(b)).collect(),
        MatrixData::F32(v) => narrow(v),
        MatrixData::F16(bits) => bits
            .iter()
            .map(|&b| bf16::from_f32(half::f16::from_bits(b).to_f32()))
            .collect(),
    }
}

fn blocks(n: usize, threads: u32, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes,
    }
}

fn check_len(what: &str, len: usize, expected: usize) -> Result<()> {
    if len != expected {
        return Err(Error::InvalidInput(format!(
            "{what} has {len} values, expected {expected}"
        )));
    }
    Ok(())
}

/// A `[rows, cols]` weight on the device, row-major as the checkpoint stores it: bf16, or FP8
/// widened into the scratch buffer for each product.
pub struct DeviceMatrix {
    data: DeviceWeight,
    rows: usize,
    cols: usize,
}

/// The paged KV cache of one slot on the device: `[num_blocks * block_size, kv_dim]` bf16 for K
/// and for V. Block tables stay on the host (the attention worker's `KvCache` owns them) and
/// travel with each call.
pub struct DeviceKvCache {
    keys: CudaSlice<bf16>,
    values: CudaSlice<bf16>,
    block_size: usize,
    kv_dim: usize,
}

impl DeviceKvCache {
    /// `(num_blocks, block_size)`.
    pub(super) fn geometry(&self) -> (usize, usize) {
        (self.keys.len() / (self.block_size * self.kv_dim), self.block_size)
    }
}

/// Where each query row reads the cache: its position and its sequence's block table.
pub struct PagedRows<'a> {
    /// Absolute position of each row; row r sees positions `0..=pos[r]`.
    pub pos: &'a [u32],
    /// Every sequence's block ids, concatenated.
    pub table: &'a [u32],
    /// Per row, where its sequence's blocks start in `table`.
    pub table_start: &'a [u32],
}

impl CudaDevice {
    /// Uploads a weight: FP8 as FP8, bf16 as it is, f32 and f16 narrowed to bf16.
    pub fn upload_matrix(&self, m: &Matrix) -> Result<DeviceMatrix> {
        Ok(DeviceMatrix {
            data: self.upload_weight(m)?,
            rows: m.rows,
            cols: m.cols,
        })
    }

    /// `y[rows, w.rows] = x[rows, w.cols] w^T` through cuBLAS (bf16 in and out, f32
    /// accumulation): `kernels::linear` on the device.
    pub fn linear(&self, x: &[f32], rows: usize, w: &DeviceMatrix) -> Result<Vec<f32>> {
        check_len("linear input", x.len(), rows * w.cols)?;
        if rows == 0 || w.rows == 0 {
            return Ok(Vec::new());
        }
        let s = self.stream();
        let x_d = s.clone_htod(&narrow(x)).map_err(err("uploading"))?;
        let mut y = s.alloc_zeros::<bf16>(rows * w.rows).map_err(err("allocating"))?;
        // Row-major Y = X W^T is, column-major, Y^T[n, rows] = W[n, k] X^T[k, rows] with W read
        // through its transpose view.
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: w.rows as i32,
            n: rows as i32,
            k: w.cols as i32,
            alpha: bf16::ONE,
            lda: w.cols as i32,
            ldb: w.cols as i32,
            beta: bf16::ZERO,
            ldc: w.rows as i32,
        };
        {
            // An FP8 weight is widened into the scratch buffer, held until the GEMM is queued
            // (later users of the buffer queue behind it on the stream).
            let mut guard = self.scratch(w.data.widened_len().unwrap_or(0))?;
            let scratch = guard.as_mut().expect("scratch() allocates");
            let weight = self.bf16_view(&w.data, w.rows, w.cols, scratch)?;
            // SAFETY: x is [rows, cols], w [n, cols], y [rows, n], as allocated above.
            unsafe { self.blas().gemm(cfg, &weight, &x_d, &mut y) }.map_err(err("linear"))?;
        }
        self.download(&y)
    }

    /// `kernels::rms_norm` on the device.
    pub fn rms_norm(&self, x: &[f32], w: &[f32], eps: f32) -> Result<Vec<f32>> {
        let cols = w.len();
        if cols == 0 || !x.len().is_multiple_of(cols) {
            return Err(Error::InvalidInput(format!(
                "rms_norm: {} values are not rows of {cols}",
                x.len()
            )));
        }
        // No rows: nothing to launch (an empty grid and zero-byte buffers are errors in CUDA).
        if x.is_empty() {
            return Ok(Vec::new());
        }
        let s = self.stream();
        let x_d = s.clone_htod(&narrow(x)).map_err(err("uploading"))?;
        let w_d = s.clone_htod(w).map_err(err("uploading"))?;
        let mut out = s.alloc_zeros::<bf16>(x.len()).map_err(err("allocating"))?;
        let cols = cols as u32;
        let mut launch = s.launch_builder(self.kernel("rms_norm"));
        launch.arg(&x_d).arg(&w_d).arg(&mut out).arg(&cols).arg(&eps);
        // SAFETY: one block per row of `cols` values, in and out.
        unsafe { launch.launch(blocks(x.len() / cols as usize, 256, 0)) }.map_err(err("rms_norm kernel"))?;
        self.download(&out)
    }

    /// RoPE at `pos[row]` on every head of `x` (`[rows, heads * head_dim]`), then the per-head
    /// RMS norm `norm` when given: the q (and k) path of `attention`.
    pub fn rope_qk_norm(
        &self,
        x: &[f32],
        head_dim: usize,
        pos: &[u32],
        inv_freq: &[f32],
        norm: Option<&[f32]>,
        eps: f32,
    ) -> Result<Vec<f32>> {
        check_len("inverse frequencies", inv_freq.len(), head_dim / 2)?;
        if x.is_empty() {
            return Ok(Vec::new());
        }
        if head_dim == 0
            || !head_dim.is_multiple_of(2)
            || pos.is_empty()
            || !x.len().is_multiple_of(pos.len() * head_dim)
        {
            return Err(Error::InvalidInput(format!(
                "rope: {} values are not {} rows of whole heads of {head_dim}",
                x.len(),
                pos.len()
            )));
        }
        if let Some(w) = norm {
            check_len("QK-norm weight", w.len(), head_dim)?;
        }
        let heads = x.len() / (pos.len() * head_dim);
        let s = self.stream();
        let mut x_d = s.clone_htod(&narrow(x)).map_err(err("uploading"))?;
        let pos_d = s.clone_htod(pos).map_err(err("uploading"))?;
        let freq_d = s.clone_htod(inv_freq).map_err(err("uploading"))?;
        let norm_d = norm.map(|w| s.clone_htod(w)).transpose().map_err(err("uploading"))?;
        let null: u64 = 0;
        let (heads_u, hd) = (heads as u32, head_dim as u32);
        let mut launch = s.launch_builder(self.kernel("rope_qk_norm"));
        launch.arg(&mut x_d).arg(&pos_d).arg(&freq_d);
        match &norm_d {
            Some(w) => launch.arg(w),
            None => launch.arg(&null),
        };
        launch.arg(&heads_u).arg(&hd).arg(&eps);
        // SAFETY: one block per (row, head), head_dim f32 of shared memory each.
        unsafe { launch.launch(blocks(pos.len() * heads, 64, 4 * hd)) }.map_err(err("rope kernel"))?;
        self.download(&x_d)
    }

    /// Softmax over all experts, top-k, optionally renormalised: `Router::route` on the device.
    pub fn route(&self, logits: &[f32], num_experts: usize, topk: usize, renormalize: bool) -> Result<Routing> {
        if num_experts == 0 || topk == 0 || topk > num_experts || !logits.len().is_multiple_of(num_experts) {
            return Err(Error::InvalidInput(format!(
                "route: {} logits, {num_experts} experts, top {topk}",
                logits.len()
            )));
        }
        let rows = logits.len() / num_experts;
        if rows == 0 {
            return Ok(Routing {
                topk,
                experts: Vec::new(),
                weights: Vec::new(),
            });
        }
        let s = self.stream();
        let logits_d = s.clone_htod(logits).map_err(err("uploading"))?;
        let mut experts = s.alloc_zeros::<u32>(rows * topk).map_err(err("allocating"))?;
        let mut weights = s.alloc_zeros::<f32>(rows * topk).map_err(err("allocating"))?;
        let (rows_u, e, k, renorm) = (rows as u32, num_experts as u32, topk as u32, renormalize as u32);
        let mut launch = s.launch_builder(self.kernel("router_topk"));
        launch
            .arg(&logits_d)
            .arg(&mut experts)
            .arg(&mut weights)
            .arg(&rows_u)
            .arg(&e)
            .arg(&k)
            .arg(&renorm);
        // SAFETY: one thread per row; each writes its k experts and weights.
        unsafe { launch.launch(LaunchConfig::for_num_elems(rows_u)) }.map_err(err("router kernel"))?;
        Ok(Routing {
            topk,
            experts: s.clone_dtoh(&experts).map_err(err("downloading"))?,
            weights: s.clone_dtoh(&weights).map_err(err("downloading"))?,
        })
    }

    /// A zeroed device KV cache of `num_blocks` blocks of `block_size` positions.
    pub fn kv_cache(&self, num_blocks: usize, block_size: usize, kv_dim: usize) -> Result<DeviceKvCache> {
        let s = self.stream();
        let len = num_blocks * block_size * kv_dim;
        if len == 0 {
            return Err(Error::InvalidInput(format!(
                "a KV cache of {num_blocks} blocks of {block_size} positions of {kv_dim} values holds nothing"
            )));
        }
        Ok(DeviceKvCache {
            keys: s.alloc_zeros::<bf16>(len).map_err(err("allocating the KV cache"))?,
            values: s.alloc_zeros::<bf16>(len).map_err(err("allocating the KV cache"))?,
            block_size,
            kv_dim,
        })
    }

    /// Writes K (post-RoPE, pre-norm) and V rows to physical positions `slots`
    /// (`block * block_size + offset`): `KvCache::write`.
    pub fn kv_write(&self, cache: &mut DeviceKvCache, keys: &[f32], values: &[f32], slots: &[u32]) -> Result<()> {
        let d = cache.kv_dim;
        check_len("keys", keys.len(), slots.len() * d)?;
        check_len("values", values.len(), slots.len() * d)?;
        let capacity = cache.keys.len() / d;
        if let Some(bad) = slots.iter().find(|&&p| p as usize >= capacity) {
            return Err(Error::InvalidInput(format!(
                "KV position {bad} outside a cache of {capacity}"
            )));
        }
        if slots.is_empty() {
            return Ok(());
        }
        let s = self.stream();
        let k_d = s.clone_htod(&narrow(keys)).map_err(err("uploading"))?;
        let v_d = s.clone_htod(&narrow(values)).map_err(err("uploading"))?;
        let slots_d = s.clone_htod(slots).map_err(err("uploading"))?;
        let kv_dim = d as u32;
        let mut launch = s.launch_builder(self.kernel("kv_write"));
        launch
            .arg(&k_d)
            .arg(&v_d)
            .arg(&slots_d)
            .arg(&mut cache.keys)
            .arg(&mut cache.values)
            .arg(&kv_dim);
        // SAFETY: one block per row; every slot was checked against the cache size.
        unsafe { launch.launch(blocks(slots.len(), 128, 0)) }
            .map(drop)
            .map_err(err("kv_write kernel"))
    }

    /// Causal GQA attention of `q` (`[rows, heads * head_dim]`, after RoPE and QK-norm) over
    /// the cache, applying `k_norm` to keys as they are read: `attention::attend`.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention(
        &self,
        cache: &DeviceKvCache,
        q: &[f32],
        rows: &PagedRows<'_>,
        heads: usize,
        kv_heads: usize,
        k_norm: Option<&[f32]>,
        eps: f32,
    ) -> Result<Vec<f32>> {
        let n = rows.pos.len();
        let head_dim = cache.kv_dim / kv_heads.max(1);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) || head_dim * kv_heads != cache.kv_dim || head_dim > 1024 {
            return Err(Error::InvalidInput(format!(
                "attention: {heads} heads over {kv_heads} KV heads with a cache row of {}",
                cache.kv_dim
            )));
        }
        check_len("queries", q.len(), n * heads * head_dim)?;
        check_len("row table starts", rows.table_start.len(), n)?;
        if let Some(w) = k_norm {
            check_len("key norm weight", w.len(), head_dim)?;
        }
        let num_blocks = (cache.keys.len() / cache.kv_dim / cache.block_size) as u32;
        for r in 0..n {
            let start = rows.table_start[r] as usize;
            let needed = rows.pos[r] as usize / cache.block_size + 1;
            match rows.table.get(start..start + needed) {
                Some(ids) if ids.iter().all(|&b| b < num_blocks) => {}
                _ => {
                    return Err(Error::InvalidInput(format!(
                        "attention row {r}: the block table does not cover position {}",
                        rows.pos[r]
                    )));
                }
            }
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let s = self.stream();
        let q_d = s.clone_htod(&narrow(q)).map_err(err("uploading"))?;
        let table_d = s.clone_htod(rows.table).map_err(err("uploading"))?;
        let start_d = s.clone_htod(rows.table_start).map_err(err("uploading"))?;
        let pos_d = s.clone_htod(rows.pos).map_err(err("uploading"))?;
        let norm_d = k_norm.map(|w| s.clone_htod(w)).transpose().map_err(err("uploading"))?;
        let mut out = s.alloc_zeros::<bf16>(q.len()).map_err(err("allocating"))?;
        let null: u64 = 0;
        let (h, kvh, hd, bs) = (heads as u32, kv_heads as u32, head_dim as u32, cache.block_size as u32);
        let mut launch = s.launch_builder(self.kernel("paged_attention"));
        launch
            .arg(&q_d)
            .arg(&cache.keys)
            .arg(&cache.values)
            .arg(&table_d)
            .arg(&start_d)
            .arg(&pos_d);
        match &norm_d {
            Some(w) => launch.arg(w),
            None => launch.arg(&null),
        };
        launch.arg(&mut out).arg(&h).arg(&kvh).arg(&hd).arg(&bs).arg(&eps);
        let threads = hd.div_ceil(32) * 32;
        // SAFETY: one block per (row, head); the block tables were checked to cover every
        // visible position and to name existing blocks.
        unsafe { launch.launch(blocks(n * heads, threads, 0)) }.map_err(err("attention kernel"))?;
        self.download(&out)
    }

    fn download(&self, x: &CudaSlice<bf16>) -> Result<Vec<f32>> {
        let host = self.stream().clone_dtoh(x).map_err(err("downloading"))?;
        Ok(host.into_iter().map(bf16::to_f32).collect())
    }
}
