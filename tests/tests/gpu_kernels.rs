//! Each CUDA kernel against the CPU function it mirrors (`model/src/cuda/kernels.cu`). They
//! need an NVIDIA GPU and a build with the `cuda` feature
//! (`cargo test -p moe-tests --features cuda --test gpu_kernels -- --ignored`, which
//! `scripts/gpu-check.sh` runs); elsewhere they are reported as ignored, never as passed.
//! Inputs are rounded to bf16 before the CPU reference sees them, so the tolerances below only
//! have to cover the GPU's bf16 outputs and its summation order.

/// A GPU test: ignored by default; run with `--ignored` in a `cuda` build on a GPU host. A run
/// with `--ignored` in a build without the feature fails and says why.
macro_rules! gpu_test {
    ($name:ident, |$gpu:ident| $body:block) => {
        #[test]
        #[ignore = "needs an NVIDIA GPU and --features cuda"]
        fn $name() {
            #[cfg(feature = "cuda")]
            {
                let $gpu = match moe_model::device::Device::open("cuda:0") {
                    Ok(moe_model::device::Device::Cuda(gpu)) => gpu,
                    Ok(other) => panic!("cuda:0 opened as {other:?}"),
                    Err(e) => panic!("this test needs a GPU: {e}"),
                };
                $body
            }
            #[cfg(not(feature = "cuda"))]
            panic!("built without --features cuda: nothing to test");
        }
    };
}

#[cfg(feature = "cuda")]
mod support {
    use moe_model::weights::{bf16_to_f32, f32_to_bf16};
    use moe_model_tools::golden::max_abs_diff;

    /// Deterministic values in [-scale, scale], already on the bf16 grid.
    pub fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let unit = (state >> 40) as f32 / (1u64 << 24) as f32;
                bf16_to_f32(f32_to_bf16((unit * 2.0 - 1.0) * scale))
            })
            .collect()
    }

    /// |gpu - cpu| within `rel` of the largest |cpu| value.
    pub fn assert_close(what: &str, cpu: &[f32], gpu: &[f32], rel: f32) {
        assert_eq!(cpu.len(), gpu.len(), "{what}: lengths");
        let scale = cpu.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        let diff = max_abs_diff(cpu, gpu) as f32;
        eprintln!("{what}: max |gpu - cpu| = {diff:.3e}, max |cpu| = {scale:.3e}");
        assert!(diff <= rel * scale, "{what}: {diff} > {rel} * {scale}");
    }
}
#[cfg(feature = "cuda")]
use support::*;

// bf16 keeps 8 significant bits: one rounding of an output is 2^-9 relative, 4e-3 covers it.
gpu_test!(rms_norm_matches_the_cpu, |gpu| {
    let (rows, cols) = (7, 96);
    let x = values(rows * cols, 1, 3.0);
    let w = values(cols, 2, 1.5);
    let mut want = vec![0.0; x.len()];
    moe_model::kernels::rms_norm(&x, &w, 1e-5, &mut want);
    assert_close("rms_norm", &want, &gpu.rms_norm(&x, &w, 1e-5).unwrap(), 4e-3);
});

gpu_test!(rope_then_qk_norm_matches_the_cpu, |gpu| {
    let (heads, hd) = (4, 16);
    let pos = [0u32, 7, 1000];
    let inv_freq: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
        .collect();
    let rope = |x: &mut [f32], p: u32| {
        let angles: Vec<f32> = inv_freq.iter().map(|f| p as f32 * f).collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        moe_model::rope::Rope::apply(x, hd, &cos, &sin);
    };
    let x = values(pos.len() * heads * hd, 3, 2.0);
    let norm = values(hd, 4, 1.0);
    for with_norm in [false, true] {
        let mut want = x.clone();
        for (row, &p) in want.chunks_mut(heads * hd).zip(&pos) {
            rope(row, p);
            if with_norm {
                moe_model::kernels::rms_norm_in_place(row, &norm, 1e-5);
            }
        }
        let got = gpu
            .rope_qk_norm(&x, hd, &pos, &inv_freq, with_norm.then_some(norm.as_slice()), 1e-5)
            .unwrap();
        assert_close(&format!("rope, norm {with_norm}"), &want, &got, 4e-3);
    }
});

gpu_test!(top_k_routing_matches_the_cpu, |gpu| {
    use moe_model::router::Router;
    use moe_model::weights::Matrix;
    let (rows, experts) = (33, 64);
    let logits = values(rows * experts, 5, 4.0);
    for (topk, renormalize) in [(8, true), (1, false)] {
        let router = Router {
            wg: Matrix::from_f32(experts, 1, vec![0.0; experts]),
            bias: None,
            topk,
            renormalize,
        };
        let want = router.route(&logits);
        let got = gpu.route(&logits, experts, topk, renormalize).unwrap();
        assert_eq!(want.experts, got.experts, "top-{topk} experts");
        assert_close(&format!("top-{topk} weights"), &want.weights, &got.weights, 1e-5);
    }
});

gpu_test!(paged_attention_matches_the_cpu_over_scattered_blocks, |gpu| {
    use moe_model::cuda::PagedRows;
    use moe_model::{DType, ModelConfig};
    let dir = tempfile::tempdir().unwrap();
    moe_tests::write_preset(dir.path(), "tiny", 1, DType::BF16, None);
    let config = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    let (hd, heads, kv_heads, kv_dim, q_dim) = (
        config.head_dim,
        config.num_heads,
        config.num_kv_heads,
        config.kv_dim(),
        config.q_dim(),
    );
    let block_size = 4;
    // Two sequences over non-contiguous blocks: A has 9 positions and queries at 6, 7, 8 (a
    // prefill chunk); B has 5 and queries at 4 (a decode step).
    let seqs: [(Vec<u32>, usize, usize); 2] = [(vec![5, 1, 3], 9, 6), (vec![0, 4], 5, 4)];
    let mut cache = gpu.kv_cache(6, block_size, kv_dim).unwrap();
    let k_norm = values(hd, 9, 1.0);
    let (mut table, mut table_start, mut pos, mut q) = (vec![], vec![], vec![], vec![]);
    let mut want = vec![];
    for (s, (blocks, len, first_query)) in seqs.iter().enumerate() {
        let keys = values(len * kv_dim, 10 + s as u64, 2.0);
        let vals = values(len * kv_dim, 20 + s as u64, 2.0);
        let slots: Vec<u32> = (0..*len)
            .map(|p| blocks[p / block_size] * block_size as u32 + (p % block_size) as u32)
            .collect();
        gpu.kv_write(&mut cache, &keys, &vals, &slots).unwrap();
        let queries = len - first_query;
        let q_rows = values(queries * q_dim, 30 + s as u64, 2.0);
        let mut normed = keys.clone();
        moe_model::kernels::rms_norm_in_place(&mut normed, &k_norm, config.rms_norm_eps);
        let mut out = vec![0.0; queries * q_dim];
        moe_model::attention::attend(&config, *first_query, &q_rows, &normed, &vals, &mut out);
        want.extend(out);
        let start = table.len() as u32;
        table.extend(blocks);
        for p in *first_query..*len {
            table_start.push(start);
            pos.push(p as u32);
        }
        q.extend(q_rows);
    }
    let rows = PagedRows {
        pos: &pos,
        table: &table,
        table_start: &table_start,
    };
    let got = gpu
        .paged_attention(&cache, &q, &rows, heads, kv_heads, Some(&k_norm), config.rms_norm_eps)
        .unwrap();
    assert_close("paged attention", &want, &got, 1e-2);
});

gpu_test!(linear_matches_the_cpu, |gpu| {
    use moe_model::weights::Matrix;
    let (rows, n, k) = (5, 48, 96);
    let w = Matrix::from_f32(n, k, values(n * k, 40, 0.5));
    let x = values(rows * k, 41, 2.0);
    let mut want = vec![0.0; rows * n];
    moe_model::kernels::linear(&x, rows, &w, &mut want);
    let got = gpu.linear(&x, rows, &gpu.upload_matrix(&w).unwrap()).unwrap();
    // f32 accumulation over 96 products, one bf16 rounding of the output.
    assert_close("linear", &want, &got, 8e-3);
});

gpu_test!(an_attention_layer_matches_the_cpu_over_prefill_then_decode, |gpu| {
    use moe_model::ModelConfig;
    use moe_model::attention::AttentionWeights;
    use moe_model::batch::BatchLayout;
    use moe_model::checkpoint::Checkpoint;
    use moe_model::cuda::DeviceAttention;
    use moe_model::kv_cache::{KvCache, KvCacheConfig};
    use moe_model::rope::Rope;
    let dir = moe_tests::fixtures_dir().join("hunyuan-tiny");
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let weights = AttentionWeights::load(&ckpt, &config, 0).unwrap();
    let rope = Rope::new(&config);
    let kv = KvCacheConfig {
        block_size: 4,
        num_blocks: 16,
    };
    // The CPU layer keeps its data in `cpu_cache`; the GPU layer its data on the device and
    // its block tables in `tables`, which sees the same reservations.
    let (mut cpu_cache, mut tables) = (KvCache::new(&config, kv).unwrap(), KvCache::new(&config, kv).unwrap());
    let mut device_cache = gpu.kv_cache(kv.num_blocks, kv.block_size, config.kv_dim()).unwrap();
    let layer = DeviceAttention::upload(&gpu, &weights).unwrap();
    // A prefill of two sequences (5 and 3 tokens), then a decode step of both.
    for (step, seqs) in [[(1u64, 5usize, 0usize), (2, 3, 0)], [(1, 1, 5), (2, 1, 3)]]
        .iter()
        .enumerate()
    {
        let mut batch = BatchLayout::new();
        for &(id, len, start) in seqs {
            batch.push(id, len, start);
            cpu_cache.reserve(id, start + len).unwrap();
            tables.reserve(id, start + len).unwrap();
        }
        let x = values(batch.num_rows() * config.hidden_size, 50 + step as u64, 1.0);
        let want = weights.forward(&config, 0, &rope, &batch, &x, &mut cpu_cache);
        let got = layer
            .forward(&gpu, &config, &rope, &batch, &x, &tables, &mut device_cache)
            .unwrap();
        // bf16 between the five operations of the layer.
        assert_close(&format!("attention layer, step {step}"), &want, &got, 3e-2);
    }
});

gpu_test!(zero_sized_inputs_return_at_once_without_a_launch, |gpu| {
    // Empty inputs used to launch empty grids and allocate zero bytes, which CUDA refuses.
    assert!(gpu.rms_norm(&[], &values(16, 60, 1.0), 1e-5).unwrap().is_empty());
    let routing = gpu.route(&[], 8, 2, true).unwrap();
    assert!(routing.experts.is_empty() && routing.weights.is_empty());
    let inv_freq = vec![1.0f32; 4];
    assert!(gpu.rope_qk_norm(&[], 8, &[], &inv_freq, None, 1e-5).unwrap().is_empty());
    // A dispatch with rows but no assignments answers zeros; one with no rows, nothing.
    assert_eq!(
        gpu.experts_forward(&values(3 * 16, 61, 1.0), 3, 16, &[], &[]).unwrap(),
        vec![0.0; 48]
    );
    assert!(gpu.experts_forward(&[], 0, 16, &[], &[]).unwrap().is_empty());
    // The device is still usable afterwards.
    let x = values(2 * 16, 62, 1.0);
    assert_eq!(gpu.rms_norm(&x, &values(16, 63, 1.0), 1e-5).unwrap().len(), 32);
});
