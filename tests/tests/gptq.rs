//! GPTQ-Int4 checkpoints: the loader's dequantisation against GPTQModel's own (the fixture
//! tests/fixtures/hunyuan-tiny-gptq, made by tests/reference/make_gptq_fixture.py), a forward
//! pass on that model, and every setting or tensor the loader refuses, by name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use moe_model::checkpoint::Checkpoint;
use moe_model::weights::MatrixData;
use moe_model::{Engine, EngineOptions, ModelConfig};
use moe_tests::progress::refused_before_reading;
use safetensors::tensor::{Dtype, TensorView};

fn fixture() -> PathBuf {
    moe_tests::fixtures_dir().join("hunyuan-tiny-gptq")
}

#[test]
fn dequantised_weights_equal_gptqmodels_bit_for_bit() {
    let dir = fixture();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let expected = Checkpoint::open(&dir.join("dequantized.safetensors")).unwrap();
    let mut names: Vec<&str> = expected.tensor_names().collect();
    names.sort_unstable();
    // Every non-expert projection of both layers and 8 experts' three: 2 * (4 + 3 + 8 * 3).
    assert_eq!(names.len(), 62, "{names:?}");
    for name in names {
        let info = expected.info(name).unwrap();
        let (rows, cols) = (info.shape[0], info.shape[1]);
        let m = ckpt.matrix(name, rows, cols).unwrap();
        assert!(matches!(m.data, MatrixData::F16(_)), "{name} is held as f16");
        let mut ours = vec![0.0; rows * cols];
        m.rows_to_f32(0, rows, &mut ours);
        // f16 widens to f32 exactly and one to one: equal f32 values are equal f16 bits.
        let want = expected.f32_tensor(name, &[rows, cols]).unwrap();
        let differ = ours.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ,
            0,
            "{name}: {differ} of {} weights differ from GPTQModel's",
            rows * cols
        );
    }
}

#[test]
fn the_gptq_model_runs_a_forward_pass() {
    let mut engine = Engine::load(&fixture(), EngineOptions::default()).unwrap();
    let greedy = engine
        .generate_greedy(&[vec![5, 9, 200, 31]], 6, &[], true)
        .unwrap()
        .remove(0);
    assert_eq!(greedy.tokens.len(), 6);
    assert!(greedy.step_logits.iter().flatten().all(|v| v.is_finite()));
    let config = ModelConfig::from_file(&fixture().join("config.json")).unwrap();
    let gptq = config.gptq.expect("quantization_config parsed as GPTQ");
    assert_eq!((gptq.group_size, gptq.desc_act, gptq.sym), (Some(32), true, false));
}

type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// A copy of the fixture with its config and tensors edited.
fn variant(edit_config: impl Fn(&mut serde_json::Value), edit: impl Fn(&mut Tensors)) -> tempfile::TempDir {
    let (src, dst) = (fixture(), tempfile::tempdir().unwrap());
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit_config(&mut config);
    std::fs::write(dst.path().join("config.json"), config.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Tensors = file
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dst.path().join("model.safetensors")).unwrap();
    dst
}

fn refused(dir: &Path, wanted: &[&str]) {
    let err = refused_before_reading(dir);
    for w in wanted {
        assert!(err.contains(w), "`{w}` not in: {err}");
    }
}

const LAST: &str = "model.layers.1.mlp.experts.63.up_proj";

#[test]
fn unsupported_settings_are_refused_by_name() {
    for (key, value, field) in [
        ("bits", serde_json::json!(8), "quantization_config.bits"),
        ("bits", serde_json::Value::Null, "quantization_config.bits"),
        (
            "checkpoint_format",
            serde_json::json!("gptq_v2"),
            "quantization_config.checkpoint_format",
        ),
        (
            "checkpoint_format",
            serde_json::json!("marlin"),
            "quantization_config.checkpoint_format",
        ),
        // GPTQModel's own name for the layout: v2 zero points read as v1 would be one step off.
        ("format", serde_json::json!("gptq_v2"), "quantization_config.format"),
        (
            "dynamic",
            serde_json::json!({"-:.*experts.0.*": {}}),
            "quantization_config.dynamic",
        ),
        (
            "is_marlin_format",
            serde_json::json!(true),
            "quantization_config.is_marlin_format",
        ),
        ("group_size", serde_json::json!(0), "quantization_config.group_size"),
        ("desc_act", serde_json::json!("yes"), "quantization_config.desc_act"),
        ("sym", serde_json::json!(1), "quantization_config.sym"),
    ] {
        let dir = variant(|c| c["quantization_config"][key] = value.clone(), |_| {});
        refused(dir.path(), &[field]);
    }
    // A group size the tensors do not have: the scales are named.
    let dir = variant(
        |c| c["quantization_config"]["group_size"] = serde_json::json!(64),
        |_| {},
    );
    refused(dir.path(), &[".scales", "group_size 64"]);
    // GPTQ tensors without a GPTQ config.
    let dir = variant(
        |c| {
            c.as_object_mut()
                .unwrap()
                .remove("quantization_config")
                .map(drop)
                .unwrap()
        },
        |_| {},
    );
    refused(dir.path(), &[".qweight", "quant_method \"gptq\""]);
}

#[test]
fn missing_and_mis_shaped_tensors_are_refused_by_name_before_reading() {
    // The last projection a load reads, so the refusal proves the check came first.
    for part in ["qzeros", "scales", "g_idx"] {
        let dir = variant(|_| {}, |t| drop(t.remove(&format!("{LAST}.{part}")).unwrap()));
        refused(dir.path(), &[&format!("{LAST}.{part}"), "missing"]);
    }
    let reshape = |part: &'static str, shape: Vec<usize>, dtype: Dtype| {
        variant(
            |_| {},
            move |t| {
                let n: usize = shape.iter().product();
                t.insert(
                    format!("{LAST}.{part}"),
                    (dtype, shape.clone(), vec![0; n * dtype.bitsize() / 8]),
                );
            },
        )
    };
    // up_proj is [32, 64]: qweight [64 / 8, 32], qzeros [2 groups, 32 / 8], scales [2, 32].
    let dir = reshape("qweight", vec![4, 32], Dtype::I32);
    refused(dir.path(), &[&format!("{LAST}.qweight"), "[4, 32]", "[8, 32]"]);
    let dir = reshape("qzeros", vec![2, 8], Dtype::I32);
    refused(dir.path(), &[&format!("{LAST}.qzeros"), "[2, 8]", "[2, 4]"]);
    let dir = reshape("g_idx", vec![63], Dtype::I32);
    refused(dir.path(), &[&format!("{LAST}.g_idx"), "[63]"]);
    let dir = reshape("scales", vec![2, 32], Dtype::BF16);
    refused(dir.path(), &[&format!("{LAST}.scales"), "BF16", "F16"]);
    // A GPTQ router: only projections may be quantised.
    let dir = variant(
        |_| {},
        |t| {
            t.remove("model.layers.0.mlp.gate.wg.weight").unwrap();
            t.insert(
                "model.layers.0.mlp.gate.wg.qweight".into(),
                (Dtype::I32, vec![8, 64], vec![0; 2048]),
            );
        },
    );
    refused(dir.path(), &["model.layers.0.mlp.gate.wg.qweight", "projections"]);
    // A weight stored both ways.
    let dir = reshape("weight", vec![32, 64], Dtype::F16);
    refused(dir.path(), &[&format!("{LAST}.qweight"), "present too"]);
}

#[test]
fn a_group_index_out_of_range_is_refused_by_name() {
    let dir = variant(
        |_| {},
        |t| {
            let (_, _, g_idx) = t.get_mut(&format!("{LAST}.g_idx")).unwrap();
            g_idx[..4].copy_from_slice(&7i32.to_le_bytes());
        },
    );
    let err = match Engine::load(dir.path(), EngineOptions::default()) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&format!("{LAST}.g_idx")) && err.contains("group 7"),
        "{err}"
    );
}
