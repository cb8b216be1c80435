//! Config parsing and up-front validation.

use moe_model::{DType, Error, ModelConfig};
use moe_model_tools::synthetic::ModelShape;
use moe_tests::fixtures_dir;

#[test]
fn real_a13b_config_parses() {
    let c = ModelConfig::from_file(&fixtures_dir().join("hunyuan-a13b-release/config.json")).unwrap();
    assert_eq!(c.model_type, "hunyuan");
    assert_eq!(
        (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads),
        (4096, 32, 32, 8)
    );
    assert_eq!(c.head_dim, 128, "head_dim comes from attention_head_dim");
    assert_eq!((c.num_experts, c.vocab_size), (64, 128167));
    assert!(
        c.layers
            .iter()
            .all(|l| l.moe_topk == 8 && l.expert_intermediate == 3072 && l.shared_intermediate == 3072)
    );
    assert!(c.renormalize_topk && c.use_qk_norm && c.tie_word_embeddings);
    assert_eq!(c.cla_share_factor, 1, "use_cla is false");
    assert_eq!(c.dtype, Some(DType::BF16));
    assert_eq!(c.special.eos, vec![127960]);
    assert_eq!(c.special.eod, Some(127967));
    assert_eq!(c.special.pad, Some(127961));
    // NTK-alpha base for head_dim 128, alpha 1000: 1.1159e7 (golden/README.md).
    assert!((c.rope.base(128) / 1.1159e7 - 1.0).abs() < 1e-3, "{}", c.rope.base(128));
    // 128 KB of bf16 KV cache per token (BRIEF section 2).
    assert_eq!(c.kv_bytes_per_token(2), 128 * 1024);
}

#[test]
fn large_shapes_parse_with_cla_and_top1() {
    let json = ModelShape::preset("large")
        .unwrap()
        .config_json(DType::BF16)
        .to_string();
    let c = ModelConfig::from_json_str(&json).unwrap();
    assert_eq!(c.model_type, "hunyuan");
    assert_eq!(
        (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim),
        (6400, 64, 80, 8, 80)
    );
    assert_eq!((c.num_experts, c.vocab_size), (16, 129024));
    assert_eq!(c.layers[0].moe_topk, 1);
    assert!(!c.renormalize_topk, "top-1 weights by the probability");
    assert_eq!(c.layers[0].shared_intermediate, 18304);
    assert_eq!(c.cla_share_factor, 2);
    assert_eq!(c.layers[3].kv_source_layer, 2);
    assert_eq!(c.num_kv_cache_slots(), 32);
    // 80 KiB per token in bf16 (golden/README.md): 32 distinct K/V.
    assert_eq!(c.kv_bytes_per_token(2), 80 * 1024);
    assert!((c.rope.base(80) / 1.1938e7 - 1.0).abs() < 1e-3);
}

fn base() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("hunyuan-tiny/config.json")).unwrap()).unwrap()
}

fn parse_with(edit: impl FnOnce(&mut serde_json::Value)) -> moe_model::Result<ModelConfig> {
    let mut v = base();
    edit(&mut v);
    ModelConfig::from_json_str(&v.to_string())
}

fn field_error(edit: impl FnOnce(&mut serde_json::Value)) -> (String, String) {
    match parse_with(edit) {
        Err(Error::ConfigField { field, value, .. }) => (field.to_string(), value),
        other => panic!("expected a field error, got {other:?}"),
    }
}

#[test]
fn alternative_forms_parse() {
    // Scalars instead of per-layer lists.
    let c = parse_with(|v| {
        v["moe_topk"] = 2.into();
        v["moe_intermediate_size"] = 48.into();
        v["num_shared_expert"] = 2.into();
    })
    .unwrap();
    assert!(
        c.layers
            .iter()
            .all(|l| l.moe_topk == 2 && l.expert_intermediate == 48 && l.shared_intermediate == 64)
    );
    // transformers 5 rope_parameters form.
    let c = parse_with(|v| {
        v.as_object_mut().unwrap().remove("rope_scaling");
        v.as_object_mut().unwrap().remove("rope_theta");
        v["rope_parameters"] = serde_json::json!({"rope_type": "dynamic", "alpha": 1000.0, "rope_theta": 10000.0});
    })
    .unwrap();
    assert!((c.rope.base(16) - 2.6826957952797e7).abs() < 1.0);
    // head_dim fallback: no head_dim, no attention_head_dim -> hidden / heads.
    let c = parse_with(|v| {
        v.as_object_mut().unwrap().remove("head_dim");
        v.as_object_mut().unwrap().remove("attention_head_dim");
    })
    .unwrap();
    assert_eq!(c.head_dim, 16);
    // head_dim: null (as transformers may write) falls back to attention_head_dim.
    let c = parse_with(|v| {
        v["head_dim"] = serde_json::Value::Null;
        v["attention_head_dim"] = 32.into();
    })
    .unwrap();
    assert_eq!(c.head_dim, 32);
    // eos as a list.
    let c = parse_with(|v| v["eos_token_id"] = serde_json::json!([2, 3])).unwrap();
    assert_eq!(c.special.eos, vec![2, 3]);
}

#[test]
fn contradictions_name_the_field_and_value() {
    assert_eq!(field_error(|v| v["model_type"] = "llama".into()).0, "model_type");
    let (f, val) = field_error(|v| v["moe_topk"] = serde_json::json!([8, 8, 8]));
    assert_eq!(f, "moe_topk");
    assert!(val.contains("8, 8, 8"), "{val}");
    assert_eq!(
        field_error(|v| v["moe_topk"] = 65.into()),
        ("moe_topk".into(), "65".into())
    );
    assert_eq!(
        field_error(|v| v["num_key_value_heads"] = 3.into()).0,
        "num_key_value_heads"
    );
    assert_eq!(
        field_error(|v| v["head_dim"] = 32.into()).0,
        "head_dim",
        "contradicts attention_head_dim 16"
    );
    assert_eq!(
        field_error(|v| v["rope_scaling"]["type"] = "yarn".into()).0,
        "rope_scaling.type"
    );
    assert_eq!(field_error(|v| v["attention_bias"] = true.into()).0, "attention_bias");
    assert_eq!(field_error(|v| v["hidden_act"] = "gelu".into()).0, "hidden_act");
    assert_eq!(field_error(|v| v["num_experts"] = 0.into()).0, "num_experts");
    assert_eq!(field_error(|v| v["rms_norm_eps"] = 0.0.into()).0, "rms_norm_eps");
    assert_eq!(field_error(|v| v["pad_token_id"] = 512.into()).0, "pad_token_id");
    assert_eq!(field_error(|v| v["torch_dtype"] = "int8".into()).0, "torch_dtype");
    let err = parse_with(|v| v["hidden_size"] = "big".into()).unwrap_err();
    assert!(
        err.to_string().contains("hidden_size") || err.to_string().contains("invalid type"),
        "{err}"
    );
}
