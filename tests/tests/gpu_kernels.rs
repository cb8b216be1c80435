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

    /// A `[rows, cols]` FP8 weight: codes drawn from every e4m3fn code but the two NaNs
    /// (subnormals, zeros of both signs and ±448 included), with one scale per tensor or, when
    /// `blocks`, a different one per 128x128 block.
    pub fn fp8_matrix(rows: usize, cols: usize, seed: u64, blocks: bool) -> moe_model::weights::Matrix {
        use moe_model::fp8::{BLOCK, Fp8Data, Fp8Scale};
        use moe_model::weights::{Matrix, MatrixData};
        let codes = values(rows * cols, seed, 1.0)
            .into_iter()
            .map(|v| ((v + 1.0) * 127.5) as u8)
            .map(|c| if c & 0x7f == 0x7f { c ^ 1 } else { c })
            .collect();
        let scale = if blocks {
            let block_cols = cols.div_ceil(BLOCK);
            let scales = (0..rows.div_ceil(BLOCK) * block_cols)
                .map(|b| 1e-3 * (1.0 + b as f32 * 0.75))
                .collect();
            Fp8Scale::Blocks { block_cols, scales }
        } else {
            Fp8Scale::PerTensor(1.5e-3)
        };
        let data = Fp8Data {
            codes,
            scale,
            input_scale: None,
        };
        Matrix {
            rows,
            cols,
            data: MatrixData::F8E4M3(Box::new(data)),
        }
    }

    /// The FP8 weight `m` as the GPU's widening kernel must compute it: dequantised in f32 on
    /// the host (the CPU path's values), rounded once to bf16.
    pub fn widened_on_the_host(m: &moe_model::weights::Matrix) -> moe_model::weights::Matrix {
        use moe_model::weights::{Matrix, MatrixData};
        let mut wide = vec![0.0; m.rows * m.cols];
        m.rows_to_f32(0, m.rows, &mut wide);
        Matrix {
            rows: m.rows,
            cols: m.cols,
            data: MatrixData::BF16(wide.into_iter().map(f32_to_bf16).collect()),
        }
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

gpu_test!(fp8_linear_matches_the_cpu_fp8_path_and_the_bf16_upload_exactly, |gpu| {
    // An attention projection kept as FP8 on the device, widened before its GEMM. Shapes with
    // partial 128x128 blocks in both directions.
    let (rows, n, k) = (5, 200, 300);
    let x = values(rows * k, 42, 2.0);
    for blocks in [false, true] {
        let w = fp8_matrix(n, k, 43, blocks);
        let device = gpu.upload_matrix(&w).unwrap();
        let got = gpu.linear(&x, rows, &device).unwrap();
        // The widening kernel's weights are exactly the host's bf16 rounding of the dequantised
        // weight, so the same GEMM over that bf16 upload gives the same bits.
        let reference = gpu
            .linear(&x, rows, &gpu.upload_matrix(&widened_on_the_host(&w)).unwrap())
            .unwrap();
        assert_eq!(
            got, reference,
            "blocks {blocks}: FP8 widened on the device vs bf16 widened on the host"
        );
        // Against the CPU's FP8 product (f32 weights): the weights' bf16 rounding (2^-9
        // relative) adds to linear_matches_the_cpu's differences; the expert tests' 2e-2.
        let mut want = vec![0.0; rows * n];
        moe_model::kernels::linear(&x, rows, &w, &mut want);
        assert_close(&format!("FP8 linear, blocks {blocks}"), &want, &got, 2e-2);
    }
});

gpu_test!(fp8_experts_stay_fp8_and_match_the_cpu_fp8_path, |gpu| {
    use moe_model::DType;
    use moe_model::checkpoint::Checkpoint;
    use moe_model::cuda::ExpertGroup;
    use moe_model::experts::ExpertAssignment;
    use moe_model::mlp::SwiGlu;
    use moe_model::weights::{Matrix, MatrixData};
    use moe_model_tools::safetensors_writer::{TensorSpec, write_file};
    // Two experts with block-wise scales (partial blocks: inter 200 over 128) in one dispatch,
    // so the second expert's widened weights sit after the first's in the scratch buffer.
    let (hidden, inter, rows) = (256, 200, 9);
    let shapes = [
        ("gate_proj", inter, hidden),
        ("up_proj", inter, hidden),
        ("down_proj", hidden, inter),
    ];
    let weights: Vec<(String, Matrix)> = (0..2)
        .flat_map(|e| {
            shapes.iter().enumerate().map(move |(p, &(proj, r, c))| {
                (
                    format!("e{e}.{proj}.weight"),
                    fp8_matrix(r, c, 100 + 3 * e as u64 + p as u64, true),
                )
            })
        })
        .collect();
    // The FP8 checkpoint, and a bf16 one holding the host's widening of the same weights.
    let dir = tempfile::tempdir().unwrap();
    let write = |file: &str, widened: bool| {
        let mut specs = Vec::new();
        let mut bytes: Vec<Vec<u8>> = Vec::new();
        for (name, m) in &weights {
            let MatrixData::F8E4M3(d) = &m.data else { unreachable!() };
            let moe_model::fp8::Fp8Scale::Blocks { block_cols, scales } = &d.scale else {
                unreachable!()
            };
            if widened {
                let MatrixData::BF16(bits) = widened_on_the_host(m).data else {
                    unreachable!()
                };
                specs.push(TensorSpec {
                    name: name.clone(),
                    dtype: DType::BF16,
                    shape: vec![m.rows, m.cols],
                });
                bytes.push(bits.iter().flat_map(|b| b.to_le_bytes()).collect());
            } else {
                specs.push(TensorSpec {
                    name: name.clone(),
                    dtype: DType::F8E4M3,
                    shape: vec![m.rows, m.cols],
                });
                bytes.push(d.codes.clone());
                let shape = vec![scales.len() / block_cols, *block_cols];
                specs.push(TensorSpec {
                    name: format!("{name}_scale_inv"),
                    dtype: DType::F32,
                    shape,
                });
                bytes.push(scales.iter().flat_map(|s| s.to_le_bytes()).collect());
            }
        }
        let path = dir.path().join(file);
        let mut next = bytes.into_iter();
        write_file(&path, &specs, &mut |_, out| out.extend(next.next().unwrap())).unwrap();
        Checkpoint::open(&path).unwrap()
    };
    let (fp8, bf16) = (write("fp8.safetensors", false), write("bf16.safetensors", true));
    let name = |e: usize| move |proj: &str| format!("e{e}.{proj}.weight");
    let x = values(rows * hidden, 44, 1.0);
    // Every row to both experts, expert 1 first for odd rows (assignment order matters).
    let assignments: Vec<ExpertAssignment> = (0..rows as u32)
        .flat_map(|row| {
            let (a, b) = if row % 2 == 0 { (0, 1) } else { (1, 0) };
            [(a, 0.75), (b, 0.25)].map(|(expert, weight)| ExpertAssignment { row, expert, weight })
        })
        .collect();
    let members: Vec<Vec<usize>> = (0..2)
        .map(|e| (0..assignments.len()).filter(|&i| assignments[i].expert == e).collect())
        .collect();
    let on_gpu = |ckpt: &Checkpoint| {
        let experts: Vec<_> = (0..2)
            .map(|e| gpu.upload_expert(ckpt, name(e), hidden, inter).unwrap())
            .collect();
        let groups: Vec<ExpertGroup<'_>> = (0..2)
            .map(|e| ExpertGroup {
                weights: &experts[e],
                members: &members[e],
            })
            .collect();
        let sizes: Vec<usize> = experts.iter().map(|e| e.size_in_bytes()).collect();
        (
            gpu.experts_forward(&x, rows, hidden, &assignments, &groups).unwrap(),
            sizes,
        )
    };
    let (got, sizes) = on_gpu(&fp8);
    // One byte per weight plus 4 per block scale (2x2 blocks for each of the three weights).
    assert_eq!(
        sizes,
        vec![3 * hidden * inter + 3 * 4 * 4; 2],
        "FP8 experts' device bytes"
    );
    let (reference, bf16_sizes) = on_gpu(&bf16);
    assert_eq!(bf16_sizes, vec![3 * 2 * hidden * inter; 2]);
    assert_eq!(got, reference, "FP8 widened on the device vs bf16 widened on the host");
    // The CPU's FP8 path: f32 weights, f32 activations, the same assignment order.
    let cpu: Vec<Vec<f32>> = (0..2)
        .map(|e| SwiGlu::load(&fp8, name(e), hidden, inter).unwrap().forward(&x, rows))
        .collect();
    let mut want = vec![0.0f32; rows * hidden];
    for a in &assignments {
        let r = a.row as usize;
        for (o, y) in want[r * hidden..(r + 1) * hidden]
            .iter_mut()
            .zip(&cpu[a.expert as usize][r * hidden..])
        {
            *o += a.weight * y;
        }
    }
    // bf16 activations between the products: the tolerance of tests/gpu.rs's expert test.
    assert_close("FP8 experts", &want, &got, 2e-2);
});

gpu_test!(an_attention_layer_matches_the_cpu_over_prefill_then_decode, |gpu| {
    use moe_model::ModelConfig;
    use moe_model::attention::AttentionWeights;
    use moe_model::batch::BatchLayout;
    use moe_model::checkpoint::Checkpoint;
    use moe_model::cuda::DeviceAttention;
    use moe_model::kv_cache::{KvCache, KvCacheConfig, KvDtypeChoice};
    use moe_model::rope::Rope;
    let dir = moe_tests::fixtures_dir().join("hunyuan-tiny");
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let weights = AttentionWeights::load(&ckpt, &config, 0).unwrap();
    let rope = Rope::new(&config);
    let kv = KvCacheConfig {
        block_size: 4,
        num_blocks: 16,
        dtype: KvDtypeChoice::Auto,
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
