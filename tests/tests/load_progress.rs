//! Loading progress and early refusal: the loader announces what it will read once every
//! tensor has been checked, reports each unit as it reads it, ends at the announced total, and
//! refuses a broken checkpoint (by tensor and file) before reading any weight.

use std::path::Path;

use moe_model::checkpoint::Checkpoint;
use moe_model::experts::{ExpertSelection, LocalExperts};
use moe_model::progress::LoadSize;
use moe_model::{DType, Engine, EngineOptions, ModelConfig};
use moe_tests::progress::{Recorder, checkpoint_size, refused_before_reading};
use moe_tests::{rewrite_zeroed, write_preset};

#[test]
fn a_whole_model_load_reports_every_tensor_once_ending_at_the_total() {
    // bf16, and FP8 (whose scales are read beside their weights and counted with them).
    for dtype in [DType::BF16, DType::F8E4M3] {
        let dir = tempfile::tempdir().unwrap();
        write_preset(dir.path(), "tiny", 5, dtype, Some(256 * 1024));
        let recorder = Recorder::default();
        Engine::load_with(dir.path(), EngineOptions::default(), &recorder).unwrap();
        let total = recorder.finished_load();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(total, checkpoint_size(&ckpt, |_| true), "{dtype:?}");
        let config = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
        // One unit per expert, per layer, and the head.
        let units = recorder.events().len() - 1;
        assert_eq!(units, config.num_layers * config.num_experts + config.num_layers + 1);
    }
}

#[test]
fn an_expert_holder_reports_only_the_experts_it_loads() {
    let dir = tempfile::tempdir().unwrap();
    write_preset(dir.path(), "tiny", 5, DType::F32, None);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let config = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    let prefixes = |pairs: &'static [(usize, usize)]| {
        move |n: &str| {
            pairs
                .iter()
                .any(|&(l, e)| n.starts_with(&format!("model.layers.{l}.mlp.experts.{e}.")))
        }
    };
    let empty = LocalExperts::load(&ckpt, &config, &ExpertSelection::Only(vec![])).unwrap();
    let first = Recorder::default();
    // A repeat is loaded once.
    let held = empty
        .with_progress(&ckpt, &config, &[(0, 3), (1, 60), (0, 3)], &[], &first)
        .unwrap();
    let total = first.finished_load();
    assert_eq!(total, checkpoint_size(&ckpt, prefixes(&[(0, 3), (1, 60)])));
    assert_eq!(total.tensors, 6);
    // A new placement (a rebalance): only the expert not held yet is read and reported.
    let second = Recorder::default();
    held.with_progress(&ckpt, &config, &[(1, 60), (1, 7)], &[(0, 3)], &second)
        .unwrap();
    assert_eq!(second.finished_load(), checkpoint_size(&ckpt, prefixes(&[(1, 7)])));
    // Nothing new: an empty plan, no units.
    let third = Recorder::default();
    held.with_progress(&ckpt, &config, &[(0, 3)], &[], &third).unwrap();
    assert_eq!(third.finished_load(), LoadSize::default());
}

/// `src` (a tiny f32 model) with the header's dtype of `tensor` replaced by `dtype`, a dtype of
/// the same width as F32, so the file stays a valid safetensors file.
fn with_header_dtype(src: &Path, dst: &Path, tensor: &str, dtype: &str) {
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let mut bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + header_len].to_vec()).unwrap();
    let at = header.find(&format!("\"{tensor}\"")).expect("tensor in the header");
    let field = at + header[at..].find("\"dtype\":\"F32\"").expect("an F32 tensor") + "\"dtype\":\"".len();
    assert_eq!(dtype.len(), 3, "same header length");
    bytes[8 + field..8 + field + 3].copy_from_slice(dtype.as_bytes());
    std::fs::write(dst.join("model.safetensors"), bytes).unwrap();
}

#[test]
fn an_unsupported_dtype_in_a_header_is_refused_by_name_before_reading() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_preset(src.path(), "tiny", 5, DType::F32, None);
    // The last tensor a load reads: refused before the first.
    let tensor = "model.layers.1.mlp.experts.63.down_proj.weight";
    with_header_dtype(src.path(), dst.path(), tensor, "I32");
    let err = refused_before_reading(dst.path());
    assert!(
        err.contains(tensor)
            && err.contains("I32")
            && err.contains("not supported")
            && err.contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn an_fp8_weight_without_its_scale_is_refused_by_name_before_reading() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_preset(src.path(), "tiny", 5, DType::F8E4M3, None);
    let scale = "model.layers.1.mlp.experts.63.up_proj.weight_scale";
    rewrite_zeroed(src.path(), dst.path(), |specs| specs.retain(|s| s.name != scale));
    let err = refused_before_reading(dst.path());
    assert!(
        err.contains("model.layers.1.mlp.experts.63.up_proj.weight") && err.contains("without a scale"),
        "{err}"
    );
}

#[test]
fn a_wrong_shape_in_the_last_layer_is_refused_before_reading() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_preset(src.path(), "tiny", 5, DType::F32, None);
    // The attention half is read after every expert: still refused first.
    let tensor = "model.layers.1.self_attn.key_layernorm.weight";
    rewrite_zeroed(src.path(), dst.path(), |specs| {
        specs.iter_mut().find(|s| s.name == tensor).unwrap().shape = vec![15];
    });
    let err = refused_before_reading(dst.path());
    assert!(err.contains(tensor) && err.contains("[15]"), "{err}");
}
