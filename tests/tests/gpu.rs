//! The CUDA backend (experts, and the whole engine) against the CPU one. These need an NVIDIA GPU and a build with the
//! `cuda` feature (`cargo test -p moe-tests --features cuda --test gpu -- --ignored`);
//! elsewhere they are reported as ignored, never as passed. What runs everywhere: asking for a
//! GPU that is not there is a clear error (see `moe_model::device` tests).

use moe_model::checkpoint::Checkpoint;
use moe_model::device::Device;
use moe_model::experts::{ExpertAssignment, ExpertCompute, ExpertSelection, LocalExperts};
use moe_model::{DType, ModelConfig};
use moe_model_tools::golden::max_abs_diff;
use moe_tests::write_preset;

#[test]
#[ignore = "needs an NVIDIA GPU and --features cuda"]
fn gpu_experts_match_the_cpu_within_bf16_tolerance() {
    gpu_experts_match_the_cpu(DType::BF16);
}

#[test]
#[ignore = "needs an NVIDIA GPU and --features cuda"]
fn gpu_fp8_experts_stay_fp8_and_match_the_cpu_fp8_path() {
    // FP8 experts (per-tensor scales, as `gen-model --dtype fp8` writes them) are kept as FP8 on
    // the device and widened per dispatch; the CPU computes them with f32 weights.
    gpu_experts_match_the_cpu(DType::F8E4M3);
}

/// The tiny preset's experts in `dtype`, every layer, on the GPU and on the CPU.
fn gpu_experts_match_the_cpu(dtype: DType) {
    let dir = tempfile::tempdir().unwrap();
    write_preset(dir.path(), "tiny", 5, dtype, None);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let config = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    let gpu = Device::open("cuda:0").expect("a GPU (this test is run with --ignored on GPU hosts)");
    let cpu_experts = LocalExperts::load(&ckpt, &config, &ExpertSelection::All).unwrap();
    let gpu_experts = LocalExperts::load_on(&ckpt, &config, &ExpertSelection::All, gpu).unwrap();
    // The device holds the weights as stored: for FP8, one byte per weight and a 4-byte scale,
    // the bytes the CPU holds.
    assert_eq!(
        gpu_experts.size_in_bytes(),
        cpu_experts.size_in_bytes(),
        "{dtype:?} experts' bytes"
    );
    let h = config.hidden_size;
    let rows = 37;
    let x: Vec<f32> = (0..rows * h)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.5)
        .collect();
    let assignments: Vec<ExpertAssignment> = (0..rows as u32)
        .flat_map(|r| {
            (0..4u32).map(move |k| ExpertAssignment {
                row: r,
                expert: (r * 5 + k * 11) % config.num_experts as u32,
                weight: 0.25,
            })
        })
        .collect();
    for layer in 0..config.num_layers {
        let want = cpu_experts.compute(layer, &x, rows, &assignments).unwrap();
        let got = gpu_experts.compute(layer, &x, rows, &assignments).unwrap();
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(&want, &got) as f32;
        eprintln!("layer {layer}: max |gpu - cpu| = {diff:.3e} (max |cpu| {scale:.3e})");
        // bf16 activations between the products: ~3 significant digits.
        assert!(diff <= 2e-2 * scale.max(1e-3), "layer {layer}: {diff} vs scale {scale}");
    }
}

/// Greedy generations of a golden model's engine (`fixture`) on the CPU and with `options`:
/// two prompts, a prefill and 16 decode steps each, logits kept.
fn cpu_and_engine_with(
    fixture: &str,
    options: moe_model::EngineOptions,
) -> (Vec<moe_model::engine::Greedy>, Vec<moe_model::engine::Greedy>) {
    use moe_model::{Engine, EngineOptions};
    let dir = moe_tests::fixtures_dir().join(fixture);
    let mut other = Engine::load(&dir, options).unwrap();
    let mut cpu = Engine::load(&dir, EngineOptions::default()).unwrap();
    let prompts: Vec<Vec<u32>> = vec![(5..40).collect(), vec![7, 99, 3, 250, 17]];
    (
        cpu.generate_greedy(&prompts, 16, &[], true).unwrap(),
        other.generate_greedy(&prompts, 16, &[], true).unwrap(),
    )
}

#[test]
#[ignore = "needs an NVIDIA GPU and --features cuda"]
fn the_engine_with_gpu_experts_matches_the_cpu_engine_on_the_golden_model() {
    let (want, got) = cpu_and_engine_with(
        "hunyuan-tiny",
        moe_model::EngineOptions {
            expert_device: Device::open("cuda:0").expect("a GPU"),
            ..Default::default()
        },
    );
    for (w, g) in want.iter().zip(&got) {
        // First-step logits: bf16 expert activations put differences near 1e-2 of the scale.
        let scale = w.step_logits[0].iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(&w.step_logits[0], &g.step_logits[0]) as f32;
        eprintln!("first-step logits: max |gpu - cpu| = {diff:.3e} of scale {scale:.3e}");
        assert!(diff <= 5e-2 * scale, "{diff} vs {scale}");
        assert_eq!(w.tokens[0], g.tokens[0], "first greedy token");
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU and --features cuda"]
fn the_engine_wholly_on_the_gpu_matches_the_cpu_engine_within_bf16_tolerance() {
    the_engine_wholly_on_the_gpu_matches_the_cpu_engine("hunyuan-tiny");
}

#[test]
#[ignore = "needs an NVIDIA GPU and --features cuda"]
fn the_fp8_engine_wholly_on_the_gpu_matches_the_cpu_fp8_engine_within_bf16_tolerance() {
    // The FP8 fixture: attention projections and experts kept as FP8 on the device.
    the_engine_wholly_on_the_gpu_matches_the_cpu_engine("hunyuan-tiny-fp8");
}

fn the_engine_wholly_on_the_gpu_matches_the_cpu_engine(fixture: &str) {
    // Attention layers, KV cache and routed experts on the GPU (what `--device cuda:N` does to
    // an attention worker plus an expert worker), over a prefill and 16 decode steps.
    let gpu = Device::open("cuda:0").expect("a GPU");
    let (want, got) = cpu_and_engine_with(
        fixture,
        moe_model::EngineOptions {
            expert_device: gpu.clone(),
            attention_device: gpu,
            ..Default::default()
        },
    );
    for (w, g) in want.iter().zip(&got) {
        // Every step whose tokens so far agree: bf16 activations put differences near 1e-2 of
        // the logits' scale.
        for (step, (wl, gl)) in w.step_logits.iter().zip(&g.step_logits).enumerate() {
            let scale = wl.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(wl, gl) as f32;
            eprintln!("step {step}: max |gpu - cpu| = {diff:.3e} of scale {scale:.3e}");
            assert!(diff <= 5e-2 * scale, "step {step}: {diff} vs {scale}");
            if w.tokens[step] != g.tokens[step] {
                eprintln!(
                    "step {step}: tokens part ({} vs {}); later steps not compared",
                    w.tokens[step], g.tokens[step]
                );
                break;
            }
        }
        assert_eq!(w.tokens[0], g.tokens[0], "first greedy token");
    }
}
