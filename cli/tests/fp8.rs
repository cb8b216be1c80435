//! `moectl` with FP8 checkpoints: `check-golden` in process on the FP8 fixture, and
//! `gen-model --dtype fp8` writing a static-FP8 checkpoint that loads as FP8.

use std::path::Path;
use std::process::Command;

use moe_model::checkpoint::Checkpoint;
use moe_model::{DType, Engine, EngineOptions, names};

fn moectl() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_moectl"))
}

#[test]
fn check_golden_passes_the_fp8_fixture_in_process() {
    let fixture = moe_tests::fixtures_dir().join("hunyuan-tiny-fp8");
    let out = Command::new(moectl())
        .args(["check-golden", "--fixture"])
        .arg(&fixture)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("0 failed: PASS"), "{text}");
    for q in [
        "prefill_logits",
        "decode_logits",
        "gen_ids",
        "layers.moe_out",
        "layers.topk_idx",
    ] {
        assert!(text.contains(q), "no {q} check ran:\n{text}");
    }
}

fn gen_model(dtype: &str, dir: &Path, dry_run: bool) -> std::process::Output {
    let mut cmd = Command::new(moectl());
    cmd.args([
        "gen-model",
        "--preset",
        "tiny",
        "--seed",
        "3",
        "--dtype",
        dtype,
        "--out",
    ])
    .arg(dir);
    if dry_run {
        cmd.arg("--dry-run");
    }
    cmd.output().unwrap()
}

#[test]
fn gen_model_fp8_writes_a_static_fp8_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = gen_model("fp8", dir.path(), false);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization_config"]["quant_method"], "fp8");
    assert_eq!(config["quantization_config"]["activation_scheme"], "static");
    assert_eq!(config["torch_dtype"], "bfloat16");

    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let expert = names::expert(1, 17, "gate_proj");
    assert_eq!(ckpt.info(&expert).unwrap().dtype, DType::F8E4M3);
    let module = expert.strip_suffix(".weight").unwrap();
    for scale in ["weight_scale", "input_scale"] {
        let info = ckpt.info(&format!("{module}.{scale}")).unwrap();
        assert_eq!((info.dtype, info.shape), (DType::F32, vec![]));
    }
    assert_eq!(ckpt.f32_tensor(&format!("{module}.input_scale"), &[]).unwrap(), [1.0]);
    // The projections are FP8 in memory once loaded, and the model runs.
    let mut engine = Engine::load(dir.path(), EngineOptions::default()).unwrap();
    assert_eq!(engine.model().layer(0).attention.q_proj.dtype(), DType::F8E4M3);
    let got = engine
        .generate_greedy(&[vec![5, 6, 7]], 3, &[], true)
        .unwrap()
        .remove(0);
    assert_eq!(got.tokens.len(), 3);
    assert!(got.step_logits.iter().flatten().all(|v| v.is_finite()));

    // Sizes: FP8 projections are half of bf16 ones; the checkpoint is correspondingly smaller.
    let bytes = |dtype: &str| {
        let out = gen_model(dtype, Path::new("/nonexistent"), true);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["bytes"].as_f64().unwrap()
    };
    let (bf16, fp8) = (bytes("bf16"), bytes("fp8"));
    assert!(fp8 < 0.6 * bf16 && fp8 > 0.5 * bf16, "fp8 {fp8} bytes vs bf16 {bf16}");
}
