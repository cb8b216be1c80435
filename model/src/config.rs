//! Typed Hunyuan configuration, deserialised from a HuggingFace `config.json` and validated up
//! front so that a bad setting is reported before any weight is read.
//!
//! Both released families are covered: Hunyuan-A13B (`hunyuan_v1_moe` / `hunyuan`, per-layer
//! lists, top-8 renormalised routing) and Hunyuan-Large (`hunyuan`, CLA, top-1 routing whose
//! weight is the router probability).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::gptq::GptqQuantization;
use crate::quant::Fp8Quantization;

/// A value given either once for all layers or as a per-layer list (`moe_topk`,
/// `moe_intermediate_size`, `num_shared_expert`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerLayer<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Copy + std::fmt::Debug> PerLayer<T> {
    fn resolve(&self, field: &'static str, num_layers: usize) -> Result<Vec<T>> {
        match self {
            PerLayer::One(v) => Ok(vec![*v; num_layers]),
            PerLayer::Each(list) if list.len() == num_layers => Ok(list.clone()),
            PerLayer::Each(list) => Err(Error::field(
                field,
                list,
                format!("has {} entries, num_hidden_layers is {num_layers}", list.len()),
            )),
        }
    }
}

/// Token ids given as one id or a list (`eos_token_id` in generation configs).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Clone, Deserialize)]
struct RawRopeScaling {
    #[serde(alias = "rope_type")]
    r#type: Option<String>,
    alpha: Option<f64>,
    factor: Option<f64>,
    /// Only in the transformers 5 `rope_parameters` form.
    rope_theta: Option<f64>,
}

/// The keys of `config.json` this crate reads. Unknown keys (vision, classification, ...) are
/// ignored on purpose: the real A13B config carries many.
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    attention_head_dim: Option<usize>,
    intermediate_size: usize,
    moe_intermediate_size: Option<PerLayer<usize>>,
    num_experts: Option<usize>,
    moe_topk: Option<PerLayer<usize>>,
    num_shared_expert: Option<PerLayer<usize>>,
    #[serde(default = "default_true")]
    use_mixed_mlp_moe: bool,
    norm_topk_prob: Option<bool>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRopeScaling>,
    rope_parameters: Option<RawRopeScaling>,
    #[serde(default)]
    use_qk_norm: bool,
    #[serde(default)]
    use_cla: bool,
    cla_share_factor: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
    #[serde(default)]
    use_mla: bool,
    #[serde(default)]
    moe_layer_num_skipped: usize,
    #[serde(default = "default_true")]
    use_rotary_pos_emb: bool,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    quantization_config: Option<crate::quant::RawQuantization>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    pad_token_id: Option<u32>,
    sep_token_id: Option<u32>,
    eod_token_id: Option<u32>,
}

fn default_true() -> bool {
    true
}
fn default_eps() -> f64 {
    1e-5
}
fn default_max_pos() -> usize {
    32768
}

/// Storage type of a checkpoint's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    /// float8 e4m3fn, with a scale beside it (see [`crate::fp8`]).
    F8E4M3,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::F8E4M3 => 1,
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "float32" | "f32" | "F32" => Some(DType::F32),
            "bfloat16" | "bf16" | "BF16" => Some(DType::BF16),
            "float16" | "f16" | "F16" => Some(DType::F16),
            "float8_e4m3fn" | "fp8" | "f8_e4m3" | "F8_E4M3" => Some(DType::F8E4M3),
            _ => None,
        }
    }

    /// The name HuggingFace configs use (`torch_dtype`).
    pub fn hf_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            DType::F8E4M3 => "float8_e4m3fn",
        }
    }
}

/// NTK-alpha rotary embedding: `base = theta * alpha^(d/(d-2))`, no attention scaling, no
/// dependence on sequence length ("dynamic" is only a name in the Hunyuan configs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub alpha: f64,
}

impl RopeConfig {
    pub fn base(&self, head_dim: usize) -> f64 {
        let d = head_dim as f64;
        self.theta * self.alpha.powf(d / (d - 2.0))
    }

    /// `1 / base^(2i/d)` for i in 0..d/2, rounded to f32 as transformers stores it.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let base = self.base(head_dim);
        (0..head_dim / 2)
            .map(|i| (1.0 / base.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect()
    }
}

/// What one decoder layer looks like.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerConfig {
    pub moe_topk: usize,
    /// Intermediate size of each routed expert (`moe_intermediate_size[l]`, as vLLM reads it).
    pub expert_intermediate: usize,
    /// Intermediate size of the shared MLP (`intermediate_size * num_shared_expert[l]`); 0 = none.
    pub shared_intermediate: usize,
    /// The layer whose K/V projections this layer uses: itself, or under CLA the nearest
    /// preceding "self" layer (`l - l % cla_share_factor`).
    pub kv_source_layer: usize,
}

impl LayerConfig {
    pub fn computes_kv(&self, layer: usize) -> bool {
        self.kv_source_layer == layer
    }
}

/// Special token ids from the config.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    pub pad: Option<u32>,
    pub sep: Option<u32>,
    pub eod: Option<u32>,
}

/// A validated model configuration. Every field is consistent with every other.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub num_experts: usize,
    pub layers: Vec<LayerConfig>,
    /// Renormalise the top-k router probabilities to sum to 1. When false the routed weight is
    /// the probability itself (Hunyuan-Large's top-1 gate).
    pub renormalize_topk: bool,
    pub rms_norm_eps: f32,
    pub rope: RopeConfig,
    pub use_qk_norm: bool,
    /// 1 = every layer computes its own K/V; f > 1 = CLA, K/V shared by groups of f layers.
    pub cla_share_factor: usize,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub dtype: Option<DType>,
    /// `quantization_config` when it is FP8; `None` for an unquantised checkpoint.
    pub quantization: Option<Fp8Quantization>,
    /// `quantization_config` when it is GPTQ (`quant_method: "gptq"`).
    pub gptq: Option<GptqQuantization>,
    pub special: SpecialTokens,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            Error::ConfigParse { message, .. } => Error::ConfigParse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| Error::ConfigParse {
            path: "<json>".into(),
            message: e.to_string(),
        })?;
        Self::validate(raw)
    }

    fn validate(raw: RawConfig) -> Result<Self> {
        let model_type = raw.model_type.clone().unwrap_or_default();
        if !matches!(model_type.as_str(), "hunyuan" | "hunyuan_v1_moe") {
            return Err(Error::field(
                "model_type",
                &model_type,
                "expected \"hunyuan\" or \"hunyuan_v1_moe\"",
            ));
        }
        positive("vocab_size", raw.vocab_size)?;
        positive("hidden_size", raw.hidden_size)?;
        positive("num_hidden_layers", raw.num_hidden_layers)?;
        positive("num_attention_heads", raw.num_attention_heads)?;
        positive("intermediate_size", raw.intermediate_size)?;
        let num_layers = raw.num_hidden_layers;

        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        positive("num_key_value_heads", num_kv_heads)?;
        if !raw.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(Error::field(
                "num_key_value_heads",
                num_kv_heads,
                format!("must divide num_attention_heads ({})", raw.num_attention_heads),
            ));
        }

        let head_dim = match (raw.head_dim, raw.attention_head_dim) {
            (Some(h), _) => h,
            (None, Some(h)) => h,
            (None, None) => {
                if !raw.hidden_size.is_multiple_of(raw.num_attention_heads) {
                    return Err(Error::field(
                        "hidden_size",
                        raw.hidden_size,
                        format!(
                            "no head_dim given and hidden_size is not divisible by num_attention_heads ({})",
                            raw.num_attention_heads
                        ),
                    ));
                }
                raw.hidden_size / raw.num_attention_heads
            }
        };
        if let (Some(a), Some(b)) = (raw.head_dim, raw.attention_head_dim)
            && a != b
        {
            return Err(Error::field(
                "head_dim",
                a,
                format!("contradicts attention_head_dim = {b}"),
            ));
        }
        if head_dim < 4 || head_dim % 2 != 0 {
            return Err(Error::field(
                "head_dim",
                head_dim,
                "must be even and at least 4 (RoPE rotates halves)",
            ));
        }

        let num_experts = raw.num_experts.ok_or_else(|| {
            Error::field(
                "num_experts",
                "absent",
                "dense Hunyuan models are not supported; an MoE config is required",
            )
        })?;
        positive("num_experts", num_experts)?;
        let topk = raw
            .moe_topk
            .as_ref()
            .ok_or_else(|| Error::field("moe_topk", "absent", "required for an MoE model"))?
            .resolve("moe_topk", num_layers)?;
        for &k in &topk {
            if k == 0 || k > num_experts {
                return Err(Error::field(
                    "moe_topk",
                    k,
                    format!("must be in 1..={num_experts} (num_experts)"),
                ));
            }
        }
        let expert_inter = match &raw.moe_intermediate_size {
            Some(v) => v.resolve("moe_intermediate_size", num_layers)?,
            None => vec![raw.intermediate_size; num_layers],
        };
        for &i in &expert_inter {
            positive("moe_intermediate_size", i)?;
        }
        let shared_count = match (&raw.num_shared_expert, raw.use_mixed_mlp_moe) {
            (_, false) => vec![0; num_layers],
            (Some(v), true) => v.resolve("num_shared_expert", num_layers)?,
            (None, true) => vec![1; num_layers],
        };

        let cla_share_factor = if raw.use_cla {
            let f = raw.cla_share_factor.unwrap_or(2);
            if f < 1 {
                return Err(Error::field(
                    "cla_share_factor",
                    f,
                    "must be at least 1 when use_cla is true",
                ));
            }
            f
        } else {
            1
        };

        if raw.attention_bias {
            return Err(Error::field(
                "attention_bias",
                true,
                "biased attention projections are not supported",
            ));
        }
        if raw.mlp_bias {
            return Err(Error::field(
                "mlp_bias",
                true,
                "biased MLP projections are not supported",
            ));
        }
        if let Some(act) = &raw.hidden_act
            && act != "silu"
        {
            return Err(Error::field("hidden_act", act, "only \"silu\" (SwiGLU) is supported"));
        }
        if raw.use_mla {
            return Err(Error::field(
                "use_mla",
                true,
                "multi-head latent attention is not part of Hunyuan-A13B/Large",
            ));
        }
        if raw.moe_layer_num_skipped != 0 {
            return Err(Error::field(
                "moe_layer_num_skipped",
                raw.moe_layer_num_skipped,
                "dense leading layers are not supported",
            ));
        }
        if !raw.use_rotary_pos_emb {
            return Err(Error::field("use_rotary_pos_emb", false, "Hunyuan models use RoPE"));
        }
        if !(raw.rms_norm_eps > 0.0 && raw.rms_norm_eps < 1.0) {
            return Err(Error::field("rms_norm_eps", raw.rms_norm_eps, "must be in (0, 1)"));
        }
        positive("max_position_embeddings", raw.max_position_embeddings)?;

        let rope = parse_rope(&raw)?;
        let dtype = match raw.torch_dtype.as_deref().or(raw.dtype.as_deref()) {
            None => None,
            Some(name) => Some(DType::parse(name).filter(|d| *d != DType::F8E4M3).ok_or_else(|| {
                Error::field(
                    "torch_dtype",
                    name,
                    "expected float32, bfloat16 or float16 (FP8 is described by quantization_config)",
                )
            })?),
        };
        let (quantization, gptq) = match &raw.quantization_config {
            Some(q) => q.parse()?,
            None => (None, None),
        };

        // Top-k renormalisation: an explicit norm_topk_prob wins; without one, follow Tencent's
        // code, where the top-1 gate weights by the probability and the top-k gate renormalises.
        let renormalize_topk = match raw.norm_topk_prob {
            Some(v) => v,
            None => topk.iter().all(|&k| k > 1),
        };

        let layers = (0..num_layers)
            .map(|l| LayerConfig {
                moe_topk: topk[l],
                expert_intermediate: expert_inter[l],
                shared_intermediate: raw.intermediate_size * shared_count[l],
                kv_source_layer: l - l % cla_share_factor,
            })
            .collect();

        let special = SpecialTokens {
            bos: raw.bos_token_id,
            eos: match raw.eos_token_id {
                None => vec![],
                Some(OneOrMany::One(id)) => vec![id],
                Some(OneOrMany::Many(ids)) => ids,
            },
            pad: raw.pad_token_id,
            sep: raw.sep_token_id,
            eod: raw.eod_token_id,
        };
        for (name, id) in [("bos_token_id", special.bos), ("pad_token_id", special.pad)] {
            if let Some(id) = id
                && id as usize >= raw.vocab_size
            {
                return Err(Error::field(
                    name,
                    id,
                    format!("outside the vocabulary (vocab_size {})", raw.vocab_size),
                ));
            }
        }

        Ok(ModelConfig {
            model_type,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            num_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            num_experts,
            layers,
            renormalize_topk,
            rms_norm_eps: raw.rms_norm_eps as f32,
            rope,
            use_qk_norm: raw.use_qk_norm,
            cla_share_factor,
            tie_word_embeddings: raw.tie_word_embeddings,
            max_position_embeddings: raw.max_position_embeddings,
            dtype,
            quantization,
            gptq,
            special,
        })
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Layers that compute (and cache) their own K/V. Under CLA the others reuse them.
    pub fn kv_layers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.num_layers).filter(|&l| self.layers[l].computes_kv(l))
    }

    /// Index of the KV-cache slot used by `layer`: one slot per K/V-computing layer.
    pub fn kv_cache_slot(&self, layer: usize) -> usize {
        self.layers[layer].kv_source_layer / self.cla_share_factor
    }

    pub fn num_kv_cache_slots(&self) -> usize {
        self.num_layers.div_ceil(self.cla_share_factor)
    }

    /// Bytes of KV cache per token at the given element size (K and V, every cache slot).
    pub fn kv_bytes_per_token(&self, elem_bytes: usize) -> usize {
        2 * self.num_kv_cache_slots() * self.kv_dim() * elem_bytes
    }

    pub fn max_topk(&self) -> usize {
        self.layers.iter().map(|l| l.moe_topk).max().unwrap_or(1)
    }
}

fn positive(field: &'static str, v: usize) -> Result<()> {
    if v == 0 {
        Err(Error::field(field, v, "must be positive"))
    } else {
        Ok(())
    }
}

fn parse_rope(raw: &RawConfig) -> Result<RopeConfig> {
    // transformers 5 writes `rope_parameters` (theta inside); the released configs write
    // `rope_theta` + `rope_scaling`. Both may appear; they must then agree.
    let scaling = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
    let theta = match (raw.rope_theta, scaling.and_then(|s| s.rope_theta)) {
        (Some(a), Some(b)) if (a - b).abs() > 1e-9 * a.abs() => {
            return Err(Error::field(
                "rope_parameters.rope_theta",
                b,
                format!("contradicts rope_theta = {a}"),
            ));
        }
        (Some(a), _) => a,
        (None, Some(b)) => b,
        (None, None) => 10000.0,
    };
    if theta.is_nan() || theta <= 0.0 {
        return Err(Error::field("rope_theta", theta, "must be positive"));
    }
    let alpha = match scaling {
        None => 1.0,
        Some(s) => {
            let kind = s.r#type.as_deref().unwrap_or("dynamic");
            match kind {
                "dynamic" | "ntk_alpha" | "default" => {}
                other => {
                    return Err(Error::field(
                        "rope_scaling.type",
                        other,
                        "only NTK-alpha scaling (\"dynamic\" with alpha, or \"default\") is supported",
                    ));
                }
            }
            if s.alpha.is_none() && kind == "dynamic" && s.factor.is_some_and(|f| f != 1.0) {
                return Err(Error::field(
                    "rope_scaling.factor",
                    s.factor,
                    "factor-based dynamic NTK is not the Hunyuan scheme; give `alpha`",
                ));
            }
            s.alpha.unwrap_or(1.0)
        }
    };
    if alpha.is_nan() || alpha < 1.0 {
        return Err(Error::field("rope_scaling.alpha", alpha, "must be at least 1"));
    }
    Ok(RopeConfig { theta, alpha })
}
