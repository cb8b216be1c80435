//! `moectl gen-model`: presets write loadable models; the real-size presets are sized and
//! refused where memory does not allow.

use std::path::Path;
use std::process::Command;

fn moectl() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_moectl"))
}

#[test]
fn real_size_presets_are_sized_and_refused_here() {
    for (preset, min_gb) in [("a13b", 150.0), ("large", 700.0)] {
        let out = Command::new(moectl())
            .args(["gen-model", "--preset", preset, "--dry-run", "--out", "/nonexistent"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let gb = v["bytes"].as_f64().unwrap() / 1e9;
        assert!(gb > min_gb, "{preset}: {gb} GB");

        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(moectl())
            .args(["gen-model", "--preset", preset, "--out"])
            .arg(dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // This machine (and CI's) has far less memory than the model needs.
        assert!(!out.status.success(), "{preset} was materialised");
        assert!(err.contains("refusing to materialise") && err.contains("GB"), "{err}");
        assert!(!dir.path().join("model.safetensors").exists());
    }
}

#[test]
fn a_bad_shape_is_refused_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(moectl())
        .args(["gen-model", "--preset", "tiny", "--topk", "65", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("topk 65 exceeds experts 64"));
}

/// The tokenizer a generated model carries: ranks + specials fill the vocabulary, text
/// round-trips, and the chat specials encode to ids the model has.
#[test]
fn generated_models_carry_a_working_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(moectl())
        .args(["gen-model", "--preset", "tiny", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t = moe_text::Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(t.vocab_size(), 512, "the tiny preset's vocabulary");
    let text = "<|startoftext|>Hello, 世界 😀<|extra_0|>";
    let ids = t.encode(text).unwrap();
    assert!(ids.iter().all(|&id| id < 512), "{ids:?}");
    assert_eq!(ids.first(), t.special_id("<|startoftext|>").as_ref());
    assert_eq!(t.decode(&ids, false).unwrap(), text);
    assert_eq!(t.decode(&ids, true).unwrap(), "Hello, 世界 😀");
    assert!(
        t.config().chat_template.as_deref().unwrap().contains("enable_thinking"),
        "A13B's template"
    );
}

#[test]
fn a_vocabulary_too_small_for_a_tokenizer_gets_none_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(moectl())
        .args(["gen-model", "--preset", "tiny", "--vocab", "256", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no tokenizer written"));
    assert!(!dir.path().join("hy.tiktoken").exists());
}

#[test]
fn tokenizer_flag_copies_a_real_one_that_fits() {
    let real = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hunyuan-a13b-release");
    // The tiny preset's 512 ids cannot hold 127,957 ranks: refused before any weight is written.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(moectl())
        .args(["gen-model", "--preset", "tiny", "--tokenizer"])
        .arg(&real)
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("127957 ranks plus 11 special tokens need a vocabulary of at least 127968; the model has 512"),
        "{err}"
    );
    assert!(!dir.path().join("model.safetensors").exists());
    // With Hunyuan's vocabulary (on a small model) the real tokenizer is copied and loads whole.
    let out = Command::new(moectl())
        .args([
            "gen-model",
            "--preset",
            "tiny",
            "--vocab",
            "128167",
            "--hidden",
            "16",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--head-dim",
            "8",
            "--experts",
            "4",
            "--topk",
            "2",
            "--intermediate",
            "8",
            "--tokenizer",
        ])
        .arg(&real)
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t = moe_text::Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(t.vocab_size(), 128_167);
    assert_eq!(t.encode("你好，世界").unwrap(), [109419, 3922, 100561]);
}
