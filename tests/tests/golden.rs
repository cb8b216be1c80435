//! Golden parity: every fixture under tests/fixtures, run on the single-process engine, within
//! the tolerances its cases.json states (5e-4 on logits and hidden states, 1e-4 on router
//! weights, exact ids).

use moe_model::{Engine, EngineOptions};
use moe_model_tools::golden::Fixture;
use moe_tests::{golden_fixtures, run_fixture_on_engine};

#[test]
fn every_fixture_passes_on_the_engine() {
    let fixtures = golden_fixtures();
    assert!(fixtures.len() >= 5, "expected at least 5 fixtures, found {fixtures:?}");
    let mut failed = Vec::new();
    for dir in fixtures {
        // Every kind of check must actually have run.
        let report = run_fixture_on_engine(
            &dir,
            &[
                "prefill_logits",
                "decode_logits",
                "gen_ids",
                "layers.topk_idx",
                "layers.moe_out",
                "final_norm",
            ],
        );
        if !report.passed() {
            failed.push(dir);
        }
    }
    assert!(failed.is_empty(), "fixtures failed: {failed:?}");
}

#[test]
fn cla_fixture_checks_kv_states() {
    let dir = moe_tests::fixtures_dir().join("hunyuan-large-tiny");
    let fixture = Fixture::open(&dir).unwrap();
    let mut engine = Engine::load(&dir, EngineOptions::default()).unwrap();
    let report = fixture.check(&mut engine).unwrap();
    let kv: Vec<_> = report
        .rows
        .iter()
        .filter(|r| r.quantity == "layers.kv_states")
        .collect();
    assert_eq!(kv.len(), 3, "one KV-state check per prompt");
    assert!(kv.iter().all(|r| r.passed && r.max_abs_diff < 5e-4));
    // The capacity cases ran too (three variants x five quantities), and nothing was skipped.
    let cap: Vec<_> = report.rows.iter().filter(|r| r.case.starts_with("cap.")).collect();
    assert_eq!(cap.len(), 15, "{}", report.render());
    assert!(cap.iter().all(|r| r.passed));
    assert!(report.not_checked.is_empty(), "{:?}", report.not_checked);
}

#[test]
fn a_wrong_model_fails_the_check() {
    // The checker must be able to fail: run the tiny fixture's expectations against a model
    // with other weights (same shapes, another seed).
    let tmp = tempfile::tempdir().unwrap();
    moe_tests::write_preset(tmp.path(), "tiny", 99, moe_model::DType::F32, None);
    let fixture = Fixture::open(&moe_tests::fixtures_dir().join("hunyuan-tiny")).unwrap();
    let mut engine = Engine::load(tmp.path(), EngineOptions::default()).unwrap();
    let report = fixture.check(&mut engine).unwrap();
    assert!(!report.passed());
    assert!(report.failures() > 10, "{}", report.render());
}
