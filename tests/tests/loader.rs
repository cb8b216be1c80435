//! Checkpoint loading: sharded index, dtypes, subsets, and clear errors for broken checkpoints.

use std::path::Path;

use moe_model::checkpoint::Checkpoint;
use moe_model::engine::LogitsWanted;
use moe_model::experts::{ExpertSelection, LocalExperts};
use moe_model::model::AttentionModel;
use moe_model::{DType, Engine, EngineOptions, ModelConfig, SeqChunk};
use moe_model_tools::safetensors_writer::TensorSpec;
use moe_tests::{rewrite_zeroed, write_preset};

fn prefill_logits(dir: &Path, prompt: &[u32]) -> Vec<f32> {
    let mut engine = Engine::load(dir, EngineOptions::default()).unwrap();
    let seq = engine.new_sequence();
    let out = engine
        .step(
            &[SeqChunk {
                seq,
                tokens: prompt.to_vec(),
                logits: LogitsWanted::All,
            }],
            false,
        )
        .unwrap();
    out.logits.into_iter().next().unwrap()
}

#[test]
fn sharded_checkpoint_gives_the_same_logits_as_one_file() {
    let (one, sharded) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_preset(one.path(), "tiny", 5, DType::F32, None);
    write_preset(sharded.path(), "tiny", 5, DType::F32, Some(256 * 1024));
    let shards = std::fs::read_dir(sharded.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("model-"))
        .count();
    assert!(shards > 5, "expected many shards, got {shards}");
    assert!(sharded.path().join("model.safetensors.index.json").exists());
    let a = prefill_logits(one.path(), &[5, 9, 200, 31]);
    let b = prefill_logits(sharded.path(), &[5, 9, 200, 31]);
    assert_eq!(a, b, "same weights, same arithmetic: bit-identical");
}

#[test]
fn bf16_weights_stay_bf16_and_the_router_stays_f32() {
    let dir = tempfile::tempdir().unwrap();
    write_preset(dir.path(), "tiny", 5, DType::BF16, None);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let config = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    let model = AttentionModel::load(&ckpt, config.clone()).unwrap();
    assert_eq!(model.layer(0).attention.q_proj.dtype(), DType::BF16);
    assert_eq!(model.layer(0).router.wg.dtype(), DType::F32);
    let q = &model.layer(0).attention.q_proj;
    assert_eq!(q.size_in_bytes(), q.rows * q.cols * 2);
    // And it runs: finite logits.
    assert!(prefill_logits(dir.path(), &[7, 8]).iter().all(|v| v.is_finite()));
}

#[test]
fn subsets_load_only_what_they_name() {
    let dir = tempfile::tempdir().unwrap();
    write_preset(dir.path(), "tiny", 5, DType::F32, None);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let config = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    let all = LocalExperts::load(&ckpt, &config, &ExpertSelection::All).unwrap();
    let some = LocalExperts::load(&ckpt, &config, &ExpertSelection::Only(vec![(0, 3), (1, 60)])).unwrap();
    assert_eq!(some.held(), vec![(0, 3), (1, 60)]);
    assert!(some.holds(1, 60) && !some.holds(1, 3));
    assert_eq!(some.size_in_bytes() * 64, all.size_in_bytes());
    let err = LocalExperts::load(&ckpt, &config, &ExpertSelection::Only(vec![(2, 0)])).unwrap_err();
    assert!(err.to_string().contains("(2, 0)"), "{err}");
}

/// Every refusal below comes from checking the headers, before any weight is read.
fn load_error(dir: &Path) -> String {
    moe_tests::progress::refused_before_reading(dir)
}

#[test]
fn missing_tensor_is_named() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_preset(src.path(), "tiny", 5, DType::F32, None);
    rewrite_zeroed(src.path(), dst.path(), |s| {
        s.retain(|t| t.name != "model.layers.1.self_attn.o_proj.weight")
    });
    let err = load_error(dst.path());
    assert!(
        err.contains("model.layers.1.self_attn.o_proj.weight") && err.contains("missing"),
        "{err}"
    );
    assert!(err.contains("model.safetensors"), "names the file: {err}");
}

#[test]
fn wrong_shape_is_named() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_preset(src.path(), "tiny", 5, DType::F32, None);
    rewrite_zeroed(src.path(), dst.path(), |s| {
        let t = s
            .iter_mut()
            .find(|t| t.name == "model.layers.0.mlp.experts.7.up_proj.weight")
            .unwrap();
        t.shape = vec![33, 64];
    });
    let err = load_error(dst.path());
    assert!(
        err.contains("model.layers.0.mlp.experts.7.up_proj.weight")
            && err.contains("[33, 64]")
            && err.contains("[32, 64]"),
        "{err}"
    );
}

#[test]
fn truncated_file_is_refused_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    write_preset(dir.path(), "tiny", 5, DType::F32, None);
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 1000).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
}

#[test]
fn index_naming_a_missing_shard_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_preset(dir.path(), "tiny", 5, DType::F32, Some(512 * 1024));
    let shard = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("model-00002"))
        .unwrap();
    std::fs::remove_file(&shard).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains(&*shard.file_name().unwrap().to_string_lossy()), "{err}");
    assert!(
        err.contains("lists for `model."),
        "names a tensor it should hold: {err}"
    );
}

#[test]
fn cla_checkpoint_with_kv_in_a_cross_layer_is_refused() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_preset(src.path(), "tiny-large", 5, DType::F32, None);
    rewrite_zeroed(src.path(), dst.path(), |s| {
        s.push(TensorSpec {
            name: "model.layers.1.self_attn.k_proj.weight".into(),
            dtype: DType::F32,
            shape: vec![16, 64],
        });
        s.sort_by(|a, b| a.name.cmp(&b.name));
    });
    let err = load_error(dst.path());
    assert!(
        err.contains("model.layers.1.self_attn.k_proj.weight") && err.contains("cross layer"),
        "{err}"
    );
}

#[test]
fn missing_directory_contents_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        moe_tests::fixtures_dir().join("hunyuan-tiny/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("model.safetensors") && err.contains("index"), "{err}");
}
