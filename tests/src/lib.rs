//! Helpers shared by the integration tests: fixture paths, small generated models, and a
//! local cluster harness.

pub mod cluster;
pub mod etcd;
pub mod progress;
pub mod scripted;

use std::path::{Path, PathBuf};

use moe_model::DType;
use moe_model::checkpoint::Checkpoint;
use moe_model_tools::safetensors_writer::{TensorSpec, write_file};
use moe_model_tools::synthetic::{ModelShape, SynthOptions, write_random_model};

/// `tests/fixtures` of this repository, or `MOE_FIXTURES_DIR` when set (test binaries built on
/// one machine and run on another, as `scripts/gpu-check.sh` does on a GPU host).
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("MOE_FIXTURES_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"),
    }
}

/// Every fixture directory that holds expected values.
pub fn golden_fixtures() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .expect("tests/fixtures exists")
        .map(|e| e.expect("readable").path())
        .filter(|p| p.join("expected.safetensors").exists())
        .collect();
    dirs.sort();
    dirs
}

/// Writes a seeded random model of a preset into `dir`.
pub fn write_preset(dir: &Path, preset: &str, seed: u64, dtype: DType, shard_bytes: Option<usize>) {
    let shape = ModelShape::preset(preset).expect("known preset");
    let options = SynthOptions {
        seed,
        dtype,
        shard_bytes,
        max_bytes: None,
    };
    write_random_model(&shape, &options, dir).expect("model written");
}

/// Runs the golden fixture in `dir` on the single-process engine, prints its report, and checks
/// that each of `quantities` was actually compared (a fixture that skipped one would pass
/// vacuously). Whether it passed is the caller's to assert. The KV cache is f32 whatever the
/// checkpoint's dtype: the expectations are f32 arithmetic on the stored weights, and bf16 KV
/// misses them by more than their tolerances (tests/tests/kv_dtype.rs bounds bf16 KV apart, per
/// attention layer, against the rounding it introduces).
pub fn run_fixture_on_engine(dir: &Path, quantities: &[&str]) -> moe_model_tools::golden::Report {
    use moe_model::kv_cache::{KvDtype, KvDtypeChoice};
    let fixture = moe_model_tools::golden::Fixture::open(dir).expect("fixture opens");
    let defaults = moe_model::EngineOptions::default();
    let options = moe_model::EngineOptions {
        kv_cache: defaults.kv_cache.with_dtype(KvDtypeChoice::Is(KvDtype::F32)),
        ..defaults
    };
    let mut engine = moe_model::Engine::load(dir, options).expect("model loads");
    let report = fixture.check(&mut engine).expect("fixture runs");
    println!("{}", report.render());
    for quantity in quantities {
        assert!(
            report.rows.iter().any(|r| r.quantity == *quantity),
            "{}: no {quantity} check ran",
            dir.display()
        );
    }
    report
}

/// Rewrites `src`'s checkpoint into `dst` as one `model.safetensors` with `edit` applied to its
/// tensor list (names, dtypes, shapes) and every value zero (a valid weight and scale in every
/// dtype), beside `src`'s config.json. For checkpoints broken in one named way.
pub fn rewrite_zeroed(src: &Path, dst: &Path, edit: impl Fn(&mut Vec<TensorSpec>)) {
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(src).unwrap();
    let mut specs: Vec<TensorSpec> = ckpt
        .tensor_names()
        .map(|n| {
            let info = ckpt.info(n).unwrap();
            TensorSpec {
                name: n.to_owned(),
                dtype: info.dtype,
                shape: info.shape,
            }
        })
        .collect();
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    edit(&mut specs);
    write_file(&dst.join("model.safetensors"), &specs, &mut |s, buf| {
        buf.extend(std::iter::repeat_n(0u8, s.size_in_bytes()));
    })
    .unwrap();
}
