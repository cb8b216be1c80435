//! FP8 checkpoints: the golden FP8 fixture with its weights held as FP8, `gen-model`'s FP8
//! models against the f32 values they quantise, block-wise scales, and every refusal (with the
//! tensor or config field named).

use std::path::{Path, PathBuf};

use moe_model::checkpoint::Checkpoint;
use moe_model::experts::{ExpertSelection, LocalExperts};
use moe_model::fp8::{Fp8Scale, e4m3_to_f32, quantize_per_tensor};
use moe_model::model::AttentionModel;
use moe_model::names;
use moe_model::weights::MatrixData;
use moe_model::{DType, Engine, EngineOptions, ModelConfig};
use moe_model_tools::golden::Fixture;
use moe_model_tools::safetensors_writer::{TensorSpec, write_file};
use moe_tests::{fixtures_dir, run_fixture_on_engine, write_preset};

fn fp8_fixture() -> PathBuf {
    fixtures_dir().join("hunyuan-tiny-fp8")
}

#[test]
fn fp8_fixture_passes_with_its_weights_held_as_fp8() {
    let dir = fp8_fixture();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let q = config.quantization.as_ref().expect("quantization_config parsed");
    assert_eq!(q.activation_scheme, moe_model::quant::ActivationScheme::Static);
    assert_eq!(q.ignored_layers, ["lm_head", "mlp.gate.wg"]);

    // One byte per weight plus a 4-byte scale, on the attention side and the expert side.
    let model = AttentionModel::load(&ckpt, config.clone()).unwrap();
    let layer = model.layer(0);
    for m in [
        &layer.attention.q_proj,
        &layer.attention.o_proj,
        &layer.shared.as_ref().unwrap().down,
    ] {
        assert_eq!(m.dtype(), DType::F8E4M3);
        assert_eq!(m.size_in_bytes(), m.rows * m.cols + 4);
        let MatrixData::F8E4M3(d) = &m.data else { unreachable!() };
        assert_eq!(d.input_scale, Some(1.0));
    }
    assert_eq!(layer.router.wg.dtype(), DType::F32, "the router stays f32");
    let experts = LocalExperts::load(&ckpt, &config, &ExpertSelection::All).unwrap();
    assert_eq!(experts.size_in_bytes(), 2 * 64 * 3 * (32 * 64 + 4));

    let report = run_fixture_on_engine(
        &dir,
        &[
            "prefill_logits",
            "decode_logits",
            "gen_ids",
            "layers.topk_idx",
            "layers.moe_out",
        ],
    );
    assert!(report.passed(), "{}", report.render());
}

#[test]
fn the_fp8_fixture_fails_against_the_unquantised_expectations() {
    // The check can fail: the f32 model's expected values differ from the FP8 model's by more
    // than the tolerance (quantisation error), so the FP8 weights are really what is computed.
    let fixture = Fixture::open(&fixtures_dir().join("hunyuan-tiny")).unwrap();
    let mut engine = Engine::load(&fp8_fixture(), EngineOptions::default()).unwrap();
    assert!(!fixture.check(&mut engine).unwrap().passed());
}

#[test]
fn gen_model_fp8_is_the_f32_model_quantised_per_tensor() {
    let (f32_dir, fp8_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_preset(f32_dir.path(), "tiny", 7, DType::F32, None);
    write_preset(fp8_dir.path(), "tiny", 7, DType::F8E4M3, None);
    let (wide, narrow) = (
        Checkpoint::open(f32_dir.path()).unwrap(),
        Checkpoint::open(fp8_dir.path()).unwrap(),
    );
    let config = ModelConfig::from_file(&fp8_dir.path().join("config.json")).unwrap();
    assert!(config.quantization.is_some());
    assert_eq!(
        config.dtype,
        Some(DType::BF16),
        "torch_dtype names the unquantised tensors"
    );

    let projections = [
        (names::layer(1, names::Q_PROJ), 64, 64),
        (names::layer(0, names::O_PROJ), 64, 64),
        (names::shared(0, "up_proj"), 32, 64),
        (names::expert(1, 63, "down_proj"), 64, 32),
    ];
    for (name, rows, cols) in projections {
        let w = wide.f32_tensor(&name, &[rows, cols]).unwrap();
        let m = narrow.matrix(&name, rows, cols).unwrap();
        let MatrixData::F8E4M3(d) = &m.data else {
            panic!("{name} is {:?}, not FP8", m.dtype())
        };
        // Exactly the per-tensor quantisation of the f32 values...
        let (codes, scale) = quantize_per_tensor(&w);
        assert_eq!(d.scale, Fp8Scale::PerTensor(scale), "{name}");
        assert_eq!(d.codes, codes, "{name}");
        assert_eq!(d.input_scale, Some(1.0));
        let amax = w.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        assert_eq!(scale, amax / 448.0);
        // ...which dequantises to within half a unit in the last place of e4m3.
        let mut deq = vec![0.0; rows * cols];
        m.rows_to_f32(0, rows, &mut deq);
        for (i, (&got, &want)) in deq.iter().zip(&w).enumerate() {
            assert_eq!(got, e4m3_to_f32(codes[i]) * scale);
            let half_ulp = (want.abs() / 16.0).max(scale / 1024.0);
            assert!((got - want).abs() <= half_ulp * 1.001, "{name}[{i}]: {got} vs {want}");
        }
    }
    // Not quantised: the router (f32) and the embedding and norms (bf16).
    assert_eq!(narrow.info(&names::layer(0, names::ROUTER)).unwrap().dtype, DType::F32);
    assert_eq!(narrow.info(names::EMBED).unwrap().dtype, DType::BF16);
    assert_eq!(
        narrow.info(&names::layer(0, names::INPUT_NORM)).unwrap().dtype,
        DType::BF16
    );

    // And the model runs, close to the f32 one (quantisation error, not a wrong model): the
    // same greedy tokens for a short continuation is not guaranteed, so compare logits loosely.
    let logits = |dir: &Path| {
        let mut e = Engine::load(dir, EngineOptions::default()).unwrap();
        e.generate_greedy(&[vec![5, 6, 7, 300]], 1, &[], true)
            .unwrap()
            .remove(0)
            .step_logits
            .remove(0)
    };
    let (a, b) = (logits(f32_dir.path()), logits(fp8_dir.path()));
    let diff = moe_model_tools::golden::max_abs_diff(&a, &b);
    let spread = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(
        diff > 0.0 && diff < 0.25 * spread as f64,
        "fp8 vs f32 logits: max diff {diff}, max |logit| {spread}"
    );
}

/// A tensor written by hand: name, safetensors dtype, shape, bytes.
type RawTensor<'a> = (&'a str, &'a str, Vec<usize>, Vec<u8>);

/// A safetensors file of `tensors`, written by hand so that dtypes this project does not write
/// (F8_E5M2) can be tested too.
fn raw_file(dir: &Path, tensors: &[RawTensor<'_>]) -> PathBuf {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()] }),
        );
        offset += bytes.len();
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    tensors.iter().for_each(|t| out.extend(&t.3));
    let path = dir.join("model.safetensors");
    std::fs::write(&path, out).unwrap();
    path
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `m.weight` as F8 `[4, 8]` (all codes 0x38 = 1.0) plus `extra` tensors.
fn fp8_weight_with(dir: &Path, extra: &[RawTensor<'_>]) -> Checkpoint {
    let mut tensors = vec![("m.weight", "F8_E4M3", vec![4, 8], vec![0x38u8; 32])];
    tensors.extend(extra.iter().cloned());
    Checkpoint::open(&raw_file(dir, &tensors)).unwrap()
}

fn matrix_error(ckpt: &Checkpoint) -> String {
    ckpt.matrix("m.weight", 4, 8).unwrap_err().to_string()
}

#[test]
fn block_scales_are_read_per_128x128_block() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, cols) = (130, 200);
    let tensors = [
        ("w.weight", "F8_E4M3", vec![rows, cols], vec![0x40u8; rows * cols]), // 2.0
        ("w.weight_scale_inv", "F32", vec![2, 2], f32s(&[1.0, 0.5, 0.25, 4.0])),
    ];
    let ckpt = Checkpoint::open(&raw_file(dir.path(), &tensors)).unwrap();
    let m = ckpt.matrix("w.weight", rows, cols).unwrap();
    assert_eq!(m.size_in_bytes(), rows * cols + 16);
    let mut row = vec![0.0; cols];
    m.row_to_f32(127, &mut row);
    assert_eq!((row[127], row[128]), (2.0, 1.0));
    m.row_to_f32(128, &mut row);
    assert_eq!((row[0], row[199]), (0.5, 8.0));
    // The product applies each block's scale to its columns only.
    let mut y = vec![0.0; rows];
    moe_model::kernels::linear(&vec![1.0; cols], 1, &m, &mut y);
    assert_eq!((y[0], y[129]), (2.0 * 128.0 + 1.0 * 72.0, 0.5 * 128.0 + 8.0 * 72.0));
}

#[test]
fn an_fp8_weight_without_a_usable_scale_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<RawTensor<'_>>, &str)> = vec![
        (vec![], "without a scale: expected `m.weight_scale`"),
        (
            vec![("m.weight_scale", "F32", vec![4], f32s(&[1.0; 4]))],
            "per-channel scales are not supported",
        ),
        (
            vec![("m.weight_scale_inv", "F32", vec![1, 2], f32s(&[1.0; 2]))],
            "shape [1, 2], expected [1, 1]",
        ),
        (
            vec![
                ("m.weight_scale", "F32", vec![], f32s(&[1.0])),
                ("m.weight_scale_inv", "F32", vec![1, 1], f32s(&[1.0])),
            ],
            "an FP8 weight has one scale",
        ),
        (
            vec![("m.weight_scale", "F32", vec![], f32s(&[f32::NAN]))],
            "a scale must be finite",
        ),
        (
            vec![("m.weight_scale_inv", "F32", vec![1, 1], f32s(&[-1.0]))],
            "a scale must be finite and >= 0",
        ),
        (
            vec![
                ("m.weight_scale", "F32", vec![], f32s(&[1.0])),
                ("m.input_scale", "F32", vec![2], f32s(&[1.0; 2])),
            ],
            "`m.input_scale` in",
        ),
    ];
    for (extra, want) in cases {
        let err = matrix_error(&fp8_weight_with(dir.path(), &extra));
        assert!(err.contains(want), "{err}\nwanted: {want}");
        assert!(err.contains("model.safetensors"), "names the file: {err}");
    }
    // A NaN code in the weight itself.
    let mut codes = vec![0x38u8; 32];
    codes[13] = 0xff;
    let ckpt = Checkpoint::open(&raw_file(
        dir.path(),
        &[
            ("m.weight", "F8_E4M3", vec![4, 8], codes),
            ("m.weight_scale", "F32", vec![], f32s(&[1.0])),
        ],
    ))
    .unwrap();
    let err = matrix_error(&ckpt);
    assert!(
        err.contains("`m.weight`") && err.contains("NaN code 0xff at row 1, column 5"),
        "{err}"
    );
    // The control: with a valid scale it loads, and the scale is applied.
    let ckpt = fp8_weight_with(dir.path(), &[("m.weight_scale", "F32", vec![], f32s(&[0.5]))]);
    let mut row = vec![0.0; 8];
    ckpt.matrix("m.weight", 4, 8).unwrap().row_to_f32(3, &mut row);
    assert_eq!(row, [0.5; 8]);
}

#[test]
fn other_fp8_formats_are_refused_not_misread() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in ["F8_E5M2", "F8_E4M3FNUZ"] {
        let ckpt = Checkpoint::open(&raw_file(
            dir.path(),
            &[
                ("m.weight", dtype, vec![4, 8], vec![0x38u8; 32]),
                ("m.weight_scale", "F32", vec![], f32s(&[1.0])),
            ],
        ))
        .unwrap();
        let err = matrix_error(&ckpt);
        assert!(
            err.contains("`m.weight`") && err.contains(dtype) && err.contains("must be F8_E4M3"),
            "{err}"
        );
    }
    // An FP8 tensor that is not a `.weight` has no defined scale.
    let ckpt = Checkpoint::open(&raw_file(dir.path(), &[("m.bias", "F8_E4M3", vec![2, 2], vec![0; 4])])).unwrap();
    let err = ckpt.matrix("m.bias", 2, 2).unwrap_err().to_string();
    assert!(err.contains("only `<module>.weight` tensors may be FP8"), "{err}");
}

fn tiny_config_with(quantization: serde_json::Value) -> Result<ModelConfig, moe_model::Error> {
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fp8_fixture().join("config.json")).unwrap()).unwrap();
    config["quantization_config"] = quantization;
    ModelConfig::from_json_str(&config.to_string())
}

#[test]
fn quantization_configs_other_than_fp8_e4m3_or_gptq_are_refused_by_field() {
    let cases = [
        (
            serde_json::json!({ "quant_method": "awq", "bits": 4 }),
            "quantization_config.quant_method",
        ),
        (serde_json::json!({ "bits": 4 }), "quantization_config.quant_method"),
        (
            serde_json::json!({ "quant_method": "fp8", "activation_scheme": "per-token" }),
            "quantization_config.activation_scheme",
        ),
        (
            serde_json::json!({ "quant_method": "fp8", "weight_block_size": [64, 64] }),
            "quantization_config.weight_block_size",
        ),
        (
            serde_json::json!({ "quant_method": "fp8", "fmt": "e5m2" }),
            "quantization_config.fmt",
        ),
    ];
    for (q, field) in cases {
        let err = tiny_config_with(q.clone()).unwrap_err().to_string();
        assert!(err.contains(field), "{q}: {err}");
    }
    // DeepSeek-V3's block-wise config is accepted.
    let q = tiny_config_with(serde_json::json!({
        "quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]
    }))
    .unwrap()
    .quantization
    .unwrap();
    assert_eq!(q.weight_block, Some(128));
    assert_eq!(q.activation_scheme, moe_model::quant::ActivationScheme::Dynamic);
}

/// A copy of the tiny bf16 model with `config.json` edited and `edit` applied to its tensors.
fn tiny_variant(edit_config: impl Fn(&mut serde_json::Value), router_fp8: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_preset(dir.path(), "tiny", 5, DType::BF16, None);
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit_config(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
    if router_fp8 {
        // Rewrite layer 0's router as FP8 with a scale: a well-formed FP8 tensor where the
        // config says none may be.
        let src = Checkpoint::open(dir.path()).unwrap();
        let router = names::layer(0, names::ROUTER);
        let mut specs: Vec<TensorSpec> = src
            .tensor_names()
            .map(|n| {
                let info = src.info(n).unwrap();
                let dtype = if n == router { DType::F8E4M3 } else { info.dtype };
                TensorSpec {
                    name: n.to_owned(),
                    dtype,
                    shape: info.shape,
                }
            })
            .collect();
        let scale = format!("{}_scale", router);
        specs.push(TensorSpec {
            name: scale.clone(),
            dtype: DType::F32,
            shape: vec![],
        });
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        let out = dir.path().join("rewritten.safetensors");
        write_file(&out, &specs, &mut |s, buf| {
            let n: usize = s.shape.iter().product();
            buf.extend(std::iter::repeat_n(0u8, n * s.dtype.size_in_bytes()));
        })
        .unwrap();
        drop(src);
        std::fs::rename(out, dir.path().join("model.safetensors")).unwrap();
    }
    dir
}

fn load_error(dir: &Path) -> String {
    match Engine::load(dir, EngineOptions::default()) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn fp8_tensors_must_agree_with_the_config() {
    let fp8 = |c: &mut serde_json::Value| c["quantization_config"] = serde_json::json!({ "quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head", "mlp.gate.wg"] });
    // An FP8 tensor without any quantization_config.
    let dir = tiny_variant(|_| {}, true);
    let err = load_error(dir.path());
    assert!(
        err.contains("model.layers.0.mlp.gate.wg.weight") && err.contains("no quantization_config"),
        "{err}"
    );
    // An FP8 tensor in a module the config says is not quantised.
    let dir = tiny_variant(fp8, true);
    let err = load_error(dir.path());
    assert!(
        err.contains("model.layers.0.mlp.gate.wg.weight") && err.contains("ignored_layers lists `mlp.gate.wg`"),
        "{err}"
    );
    // The expert side checks the same (an expert worker loads only experts).
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let config = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    let err = LocalExperts::load(&ckpt, &config, &ExpertSelection::Only(vec![(1, 0)])).unwrap_err();
    assert!(err.to_string().contains("ignored_layers"), "{err}");
}

#[test]
fn only_projections_may_be_fp8_and_every_scale_needs_an_fp8_weight() {
    // The router stored as FP8 under a config that does not ignore it: still refused by name.
    let dir = tiny_variant(
        |c| c["quantization_config"] = serde_json::json!({ "quant_method": "fp8", "ignored_layers": null }),
        true,
    );
    let err = load_error(dir.path());
    assert!(
        err.contains("model.layers.0.mlp.gate.wg.weight") && err.contains("only the projections"),
        "{err}"
    );
    // A scale beside a weight that is not FP8 (a conversion that forgot to apply it).
    let raw = raw_file(
        dir.path(),
        &[
            ("m.weight", "F32", vec![2, 2], vec![0; 16]),
            ("m.weight_scale", "F32", vec![], 2.0f32.to_le_bytes().to_vec()),
        ],
    );
    let ckpt = Checkpoint::open(&raw).unwrap();
    let config = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    let err = moe_model::quant::check_checkpoint(&ckpt, &config)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("m.weight_scale") && err.contains("F32, not F8_E4M3") && err.contains("would be ignored"),
        "{err}"
    );
}

#[test]
fn an_fp8_config_over_unquantised_tensors_loads_and_computes_unquantised() {
    // The documented decision: each tensor's dtype decides; an fp8 config whose tensors are all
    // bf16 is a consistent unquantised model and gives the same logits as without the config.
    let with = tiny_variant(
        |c| c["quantization_config"] = serde_json::json!({ "quant_method": "fp8", "activation_scheme": "static" }),
        false,
    );
    let without = tiny_variant(|_| {}, false);
    let logits = |dir: &Path| {
        let mut e = Engine::load(dir, EngineOptions::default()).unwrap();
        e.generate_greedy(&[vec![5, 9, 200]], 2, &[], true)
            .unwrap()
            .remove(0)
            .step_logits
    };
    assert_eq!(logits(with.path()), logits(without.path()));
}
