//! Causal GQA attention read straight from the paged KV cache: no copy of the context. A task
//! (some consecutive query rows of one sequence) walks the sequence's blocks once, widening each
//! into a block-sized buffer (and applying the key norm there when the cache holds pre-norm
//! keys), and keeps an online softmax per (row, head): a running max, a running sum and the
//! output accumulated unnormalised. Nothing it allocates grows with the context.

use crate::config::ModelConfig;
use crate::kernels::{axpy, dot, rms_norm_in_place};
use crate::kv_cache::{KvCache, SeqId};

/// Query rows of one sequence per task: enough that widening a block (once per task) is a small
/// share of the dot products, few enough that a long prefill still splits across threads.
pub const ROWS_PER_TASK: usize = 16;

/// Where a task's keys and values come from.
#[derive(Clone, Copy)]
pub struct PagedKv<'a> {
    pub cache: &'a KvCache,
    pub slot: usize,
    pub seq: SeqId,
    /// Applied to keys as they are read (`None` when the cache already holds normed keys or the
    /// model has no QK-norm).
    pub key_norm: Option<&'a [f32]>,
}

/// Attention of `q_rows` (`[rows, q_dim]`, positions `start_pos..start_pos + rows`) over
/// positions `0..=` each row's own of `kv`, into `out` (`[rows, q_dim]`). Equal, up to float
/// rounding, to [`crate::attention::attend`] over the gathered and normed context.
pub fn attend_paged(config: &ModelConfig, kv: PagedKv<'_>, start_pos: usize, q_rows: &[f32], out: &mut [f32]) {
    let (hd, heads, kv_heads) = (config.head_dim, config.num_heads, config.num_kv_heads);
    let (q_dim, kv_dim) = (config.q_dim(), config.kv_dim());
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let rows = q_rows.len() / q_dim;
    let block_values = kv.cache.block_size() * kv_dim;
    let (mut keys, mut values) = (vec![0.0f32; block_values], vec![0.0f32; block_values]);
    let mut scores = vec![0.0f32; kv.cache.block_size()];
    let mut running_max = vec![f32::NEG_INFINITY; rows * heads];
    let mut running_sum = vec![0.0f32; rows * heads];
    out.fill(0.0);

    for block in kv.cache.blocks(kv.slot, kv.seq, start_pos + rows) {
        let n = block.len * kv_dim;
        let (keys, values) = (&mut keys[..n], &mut values[..n]);
        block.keys.widen_into(keys);
        block.values.widen_into(values);
        if let Some(w) = kv.key_norm {
            rms_norm_in_place(keys, w, config.rms_norm_eps);
        }
        // Rows before the block's first position see none of it.
        let first_row = block.start.saturating_sub(start_pos);
        for i in first_row..rows {
            let visible = (start_pos + i + 1 - block.start).min(block.len);
            for h in 0..heads {
                let g = h / group;
                let qh = &q_rows[i * q_dim + h * hd..][..hd];
                let scores = &mut scores[..visible];
                let mut block_max = f32::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    *s = dot(qh, &keys[j * kv_dim + g * hd..][..hd]) * scale;
                    block_max = block_max.max(*s);
                }
                let k = i * heads + h;
                let oh = &mut out[i * q_dim + h * hd..][..hd];
                if block_max > running_max[k] {
                    // Rescale what was summed against the old max (exp(-inf) = 0 the first time).
                    let correction = (running_max[k] - block_max).exp();
                    running_sum[k] *= correction;
                    oh.iter_mut().for_each(|v| *v *= correction);
                    running_max[k] = block_max;
                }
                for (j, &s) in scores.iter().enumerate() {
                    let p = (s - running_max[k]).exp();
                    running_sum[k] += p;
                    axpy(p, &values[j * kv_dim + g * hd..][..hd], oh);
                }
            }
        }
    }
    for (k, oh) in out.chunks_mut(hd).enumerate() {
        let inv = 1.0 / running_sum[k];
        oh.iter_mut().for_each(|v| *v *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::attend;
    use crate::kv_cache::{KvCacheConfig, KvDtype, KvDtypeChoice};
    use crate::rng::SplitMix64;

    fn config() -> ModelConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hunyuan-tiny/config.json");
        ModelConfig::from_file(&path).unwrap()
    }

    fn random(n: usize, rng: &mut SplitMix64) -> Vec<f32> {
        (0..n).map(|_| (rng.unit() * 4.0 - 2.0) as f32).collect()
    }

    /// The old path: gather the context, norm every key, `attend`.
    fn reference(config: &ModelConfig, kv: PagedKv<'_>, start_pos: usize, q: &[f32]) -> Vec<f32> {
        let rows = q.len() / config.q_dim();
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        kv.cache
            .gather(kv.slot, kv.seq, start_pos + rows, &mut keys, &mut values);
        if let Some(w) = kv.key_norm {
            rms_norm_in_place(&mut keys, w, config.rms_norm_eps);
        }
        let mut out = vec![0.0; q.len()];
        attend(config, start_pos, q, &keys, &values, &mut out);
        out
    }

    fn max_rel_diff(want: &[f32], got: &[f32]) -> f32 {
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        want.iter().zip(got).fold(0.0f32, |m, (a, b)| m.max((a - b).abs())) / scale
    }

    /// Three sequences in a pool of 4-position blocks, their blocks interleaved: a 23-token
    /// prefill (two tasks' worth of rows, crossing six blocks) then a decode row each, with and
    /// without a key norm applied on read, against gather + `attend` on the same cache.
    #[test]
    fn reading_blocks_in_place_equals_gather_then_attend() {
        let config = config();
        let (q_dim, kv_dim) = (config.q_dim(), config.kv_dim());
        let mut rng = SplitMix64::new(5);
        let key_norm: Vec<f32> = (0..config.head_dim).map(|i| 0.5 + i as f32 / 16.0).collect();
        for dtype in [KvDtype::F32, KvDtype::Bf16] {
            let kv_config = KvCacheConfig {
                block_size: 4,
                num_blocks: 64,
                dtype: KvDtypeChoice::Is(dtype),
            };
            let mut cache = KvCache::new(&config, kv_config).unwrap();
            let lens = [23usize, 9, 17];
            for pos in 0..*lens.iter().max().unwrap() {
                for (seq, &len) in lens.iter().enumerate() {
                    if pos < len {
                        cache.reserve(seq as u64, pos + 1).unwrap();
                        let (k, v) = (random(kv_dim, &mut rng), random(kv_dim, &mut rng));
                        cache.write(0, seq as u64, pos, &k, &v);
                    }
                }
            }
            let mut worst = 0.0f32;
            for (seq, &len) in lens.iter().enumerate() {
                for norm in [None, Some(key_norm.as_slice())] {
                    let kv = PagedKv {
                        cache: &cache,
                        slot: 0,
                        seq: seq as u64,
                        key_norm: norm,
                    };
                    // Prefill of every position, split into tasks as the layer does; then the
                    // last position alone, as a decode step sees it.
                    let q = random(len * q_dim, &mut rng);
                    let want = reference(&config, kv, 0, &q);
                    let mut got = vec![f32::NAN; q.len()];
                    for (t, (q, out)) in q
                        .chunks(ROWS_PER_TASK * q_dim)
                        .zip(got.chunks_mut(ROWS_PER_TASK * q_dim))
                        .enumerate()
                    {
                        attend_paged(&config, kv, t * ROWS_PER_TASK, q, out);
                    }
                    worst = worst.max(max_rel_diff(&want, &got));
                    let q = &q[(len - 1) * q_dim..];
                    let want = reference(&config, kv, len - 1, q);
                    let mut got = vec![f32::NAN; q_dim];
                    attend_paged(&config, kv, len - 1, q, &mut got);
                    worst = worst.max(max_rel_diff(&want, &got));
                }
            }
            // Only the summation order differs (online softmax, blockwise): float rounding.
            assert!(worst < 1e-6, "{dtype}: max |diff| / max |out| = {worst:e}");
        }
    }
}
