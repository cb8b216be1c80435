//! Seeded random Hunyuan-shaped models in the HuggingFace layout (config.json + safetensors with
//! the real tensor names), for tests, benchmarks and the built-in default model.
//!
//! Initialisation follows the golden fixtures' scheme so that the models behave like trained
//! ones in the ways that matter for testing: routing is decisive (router logits with std ≈ 3),
//! layers outweigh the embedding in the residual stream, and greedy decoding does not collapse
//! onto one token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use moe_model::config::{DType, ModelConfig};
use moe_model::fp8::quantize_per_tensor;
use moe_model::names;
use moe_model::rng::SplitMix64;
use moe_model::weights::f32_to_bf16;
use moe_text::synthetic::{MIN_VOCAB, TemplateFamily, write_tokenizer};
use serde_json::json;

use crate::error::{Error, Result};
use crate::safetensors_writer::{TensorSpec, write_model};

/// The architecture family a preset follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Hunyuan-A13B style: `hunyuan_v1_moe`, per-layer lists, top-k renormalised.
    A13b,
    /// Hunyuan-Large style: `hunyuan`, CLA, top-1 weighted by probability.
    Large,
}

/// Every size that defines a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    pub family: Family,
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub experts: usize,
    pub topk: usize,
    /// Routed-expert and (per shared expert) shared-MLP intermediate size.
    pub intermediate: usize,
    pub cla_share_factor: usize,
    pub tie_embeddings: bool,
    pub max_positions: usize,
    /// Zipf exponent of expert popularity (0: none). Non-zero adds a router logit bias
    /// `-S * c * ln(rank + 1)` per layer (c = 2.34, the router noise's Gumbel scale) (ranks a seeded permutation of the experts), stored as
    /// `mlp.gate.wg.bias`, so the imbalance is a property of the model and reproducible.
    pub router_skew: f64,
}

pub const PRESETS: &[&str] = &["tiny", "tiny-large", "medium", "a13b", "large"];

impl ModelShape {
    pub fn preset(name: &str) -> Result<Self> {
        let a13b_like = |vocab, hidden, layers, heads, kv_heads, head_dim, intermediate| ModelShape {
            family: Family::A13b,
            vocab,
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            experts: 64,
            topk: 8,
            intermediate,
            cla_share_factor: 1,
            tie_embeddings: true,
            max_positions: 32768,
            router_skew: 0.0,
        };
        Ok(match name {
            // The golden fixture's shapes.
            "tiny" => a13b_like(512, 64, 2, 4, 2, 16, 32),
            "medium" => a13b_like(32000, 1024, 4, 16, 4, 64, 384),
            "a13b" => a13b_like(128167, 4096, 32, 32, 8, 128, 3072),
            "tiny-large" => ModelShape {
                family: Family::Large,
                vocab: 512,
                hidden: 64,
                layers: 4,
                heads: 8,
                kv_heads: 2,
                head_dim: 8,
                experts: 16,
                topk: 1,
                intermediate: 32,
                cla_share_factor: 2,
                tie_embeddings: true,
                max_positions: 131072,
                router_skew: 0.0,
            },
            "large" => ModelShape {
                family: Family::Large,
                vocab: 129024,
                hidden: 6400,
                layers: 64,
                heads: 80,
                kv_heads: 8,
                head_dim: 80,
                experts: 16,
                topk: 1,
                intermediate: 18304,
                cla_share_factor: 2,
                tie_embeddings: true,
                max_positions: 131072,
                router_skew: 0.0,
            },
            other => {
                return Err(Error::InvalidInput(format!(
                    "unknown preset `{other}`; known presets: {}",
                    PRESETS.join(", ")
                )));
            }
        })
    }

    /// Checks that the sizes make a model this crate (and the reference) can run.
    pub fn validate(&self) -> Result<()> {
        if !self.router_skew.is_finite() || self.router_skew < 0.0 {
            return Err(Error::InvalidInput(format!(
                "router skew {} must be a finite exponent >= 0",
                self.router_skew
            )));
        }
        let bad = |what: String| Err(Error::InvalidInput(format!("model shape: {what}")));
        for (name, v) in [
            ("vocab", self.vocab),
            ("hidden", self.hidden),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("experts", self.experts),
            ("topk", self.topk),
            ("intermediate", self.intermediate),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!("kv_heads {} must divide heads {}", self.kv_heads, self.heads));
        }
        if self.head_dim < 4 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even and at least 4", self.head_dim));
        }
        if self.topk > self.experts {
            return bad(format!("topk {} exceeds experts {}", self.topk, self.experts));
        }
        if self.family == Family::Large && self.hidden != self.heads * self.head_dim {
            return bad(format!(
                "the Large family derives head_dim from hidden / heads, so hidden ({}) must equal heads ({}) x head_dim ({})",
                self.hidden, self.heads, self.head_dim
            ));
        }
        Ok(())
    }

    fn computes_kv(&self, l: usize) -> bool {
        l.is_multiple_of(self.cla_share_factor)
    }

    /// config.json in the key style of the released checkpoints. FP8 (`F8E4M3`) is described
    /// as Tencent's FP8 release describes it: `torch_dtype` of the unquantised tensors (bf16)
    /// and a static-FP8 `quantization_config`.
    pub fn config_json(&self, dtype: DType) -> serde_json::Value {
        let (dtype, fp8) = (unquantised(dtype), dtype == DType::F8E4M3);
        let per_layer = |v: usize| vec![v; self.layers];
        let common = json!({
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": self.max_positions,
            "moe_drop_tokens": false,
            "moe_random_routing_dropped_token": false,
            "num_attention_heads": self.heads,
            "num_experts": self.experts,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-5,
            "rope_scaling": { "alpha": 1000.0, "beta_fast": 32, "beta_slow": 1, "factor": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "type": "dynamic" },
            "rope_theta": 10000.0,
            "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": dtype.hf_name(),
            "use_cache": true,
            "use_cla": self.cla_share_factor > 1,
            "cla_share_factor": self.cla_share_factor.max(2),
            "use_mixed_mlp_moe": true,
            "use_qk_norm": true,
            "vocab_size": self.vocab,
        });
        let mut c = common.as_object().expect("object").clone();
        match self.family {
            Family::A13b => {
                let extra = json!({
                    "architectures": ["HunYuanMoEV1ForCausalLM"],
                    "model_type": "hunyuan_v1_moe",
                    "attention_head_dim": self.head_dim,
                    "head_dim": self.head_dim,
                    "moe_topk": per_layer(self.topk),
                    "moe_intermediate_size": per_layer(self.intermediate),
                    "num_shared_expert": per_layer(1),
                    "norm_topk_prob": true,
                    "moe_layer_num_skipped": 0,
                    "mlp_bias": false,
                    "use_mla": false,
                    "use_rotary_pos_emb": true,
                    "sep_token_id": 4,
                    "eod_token_id": 3,
                    "routed_scaling_factor": 1.0,
                    "dtype": dtype.hf_name(),
                });
                c.extend(extra.as_object().expect("object").clone());
            }
            Family::Large => {
                // Hunyuan-Large's config has no head_dim key: hidden / heads (see `validate`).
                let extra = json!({
                    "architectures": ["HunYuanForCausalLM"],
                    "model_type": "hunyuan",
                    "moe_topk": self.topk,
                    "num_shared_expert": 1,
                    "capacity_factor": 1.0,
                });
                c.extend(extra.as_object().expect("object").clone());
            }
        }
        if fp8 {
            c.insert(
                "quantization_config".into(),
                json!({ "quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head", "mlp.gate.wg"] }),
            );
        }
        serde_json::Value::Object(c)
    }

    /// Every tensor of the checkpoint, sorted by name. The router stays f32, as released. With
    /// `F8E4M3` every projection (attention, shared and routed experts) is FP8 with scalar f32
    /// `weight_scale` and `input_scale` beside it, and the rest (embedding, norms, LM head) bf16,
    /// the layout of the static-FP8 releases.
    pub fn tensor_specs(&self, dtype: DType) -> Vec<TensorSpec> {
        let (proj, dtype) = (dtype, unquantised(dtype));
        let (h, q, kv, i) = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        );
        let mut specs = vec![
            spec(names::EMBED.into(), dtype, &[self.vocab, h]),
            spec(names::FINAL_NORM.into(), dtype, &[h]),
        ];
        if !self.tie_embeddings {
            specs.push(spec(names::LM_HEAD.into(), dtype, &[self.vocab, h]));
        }
        for l in 0..self.layers {
            let n = |s: &str| names::layer(l, s);
            specs.push(spec(n(names::INPUT_NORM), dtype, &[h]));
            specs.push(spec(n(names::POST_ATTN_NORM), dtype, &[h]));
            specs.push(spec(n(names::Q_PROJ), proj, &[q, h]));
            if self.computes_kv(l) {
                specs.push(spec(n(names::K_PROJ), proj, &[kv, h]));
                specs.push(spec(n(names::V_PROJ), proj, &[kv, h]));
            }
            specs.push(spec(n(names::O_PROJ), proj, &[h, q]));
            specs.push(spec(n(names::Q_NORM), dtype, &[self.head_dim]));
            specs.push(spec(n(names::K_NORM), dtype, &[self.head_dim]));
            specs.push(spec(n(names::ROUTER), DType::F32, &[self.experts, h]));
            if self.router_skew != 0.0 {
                specs.push(spec(n(names::ROUTER_BIAS), DType::F32, &[self.experts]));
            }
            for p in ["gate_proj", "up_proj"] {
                specs.push(spec(names::shared(l, p), proj, &[i, h]));
            }
            specs.push(spec(names::shared(l, "down_proj"), proj, &[h, i]));
            for e in 0..self.experts {
                for p in ["gate_proj", "up_proj"] {
                    specs.push(spec(names::expert(l, e, p), proj, &[i, h]));
                }
                specs.push(spec(names::expert(l, e, "down_proj"), proj, &[h, i]));
            }
        }
        let scales: Vec<TensorSpec> = specs
            .iter()
            .filter(|s| s.dtype == DType::F8E4M3)
            .flat_map(|s| {
                let module = s.name.strip_suffix(".weight").expect("projections are `.weight`");
                [WEIGHT_SCALE, INPUT_SCALE].map(|suffix| spec(format!("{module}.{suffix}"), DType::F32, &[]))
            })
            .collect();
        specs.extend(scales);
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        specs
    }

    pub fn size_in_bytes(&self, dtype: DType) -> usize {
        self.tensor_specs(dtype).iter().map(TensorSpec::size_in_bytes).sum()
    }
}

const WEIGHT_SCALE: &str = "weight_scale";
const INPUT_SCALE: &str = "input_scale";

/// The dtype of the tensors that are not quantised: bf16 beside FP8 projections (as released).
fn unquantised(dtype: DType) -> DType {
    match dtype {
        DType::F8E4M3 => DType::BF16,
        other => other,
    }
}

fn spec(name: String, dtype: DType, shape: &[usize]) -> TensorSpec {
    TensorSpec {
        name,
        dtype,
        shape: shape.to_vec(),
    }
}

/// How one tensor is drawn (the golden fixtures' scheme).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    Normal(f64),
    Uniform(f64, f64),
    /// `-S * c * ln(rank + 1)`, ranks a seeded permutation.
    Zipf(f64),
}

fn init_for(name: &str, shape: &[usize], hidden: usize, skew: f64) -> Init {
    if name.ends_with(names::ROUTER_BIAS) {
        return Init::Zipf(skew);
    }
    let fan_in = *shape.last().unwrap_or(&1) as f64;
    if name.ends_with("layernorm.weight") || name == names::FINAL_NORM {
        Init::Uniform(0.7, 1.3)
    } else if name == names::EMBED || name == names::LM_HEAD {
        Init::Normal(4.0 / (hidden as f64).sqrt())
    } else if name.ends_with(names::ROUTER) {
        Init::Normal(3.0 / (hidden as f64).sqrt())
    } else if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
        Init::Normal(3.0 / fan_in.sqrt())
    } else {
        Init::Normal(1.0 / fan_in.sqrt())
    }
}

/// Each tensor gets its own stream from (seed, name), so values do not depend on sharding or
/// on which tensors are generated.
fn tensor_rng(seed: u64, name: &str) -> SplitMix64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    SplitMix64::new(seed ^ h.rotate_left(17))
}

/// What the generator draws, whatever the dtype it is stored in.
#[derive(Debug, Clone, Copy)]
struct Draw {
    hidden: usize,
    skew: f64,
    seed: u64,
}

impl Draw {
    fn values(&self, name: &str, shape: &[usize]) -> Vec<f32> {
        let mut v = Vec::with_capacity(shape.iter().product());
        self.each(name, shape, &mut |x| v.push(x));
        v
    }

    /// The per-tensor FP8 codes and scale of weight `name`: its values quantised.
    fn fp8(&self, name: &str, shape: &[usize]) -> (Vec<u8>, f32) {
        quantize_per_tensor(&self.values(name, shape))
    }
}

/// The scale of each FP8 weight written so far, so that its `weight_scale` (which sorts after
/// it) need not draw the weight again; `shape_of` gives a weight's shape when it was not.
struct Fp8Scales<'a> {
    written: HashMap<String, f32>,
    shape_of: &'a dyn Fn(&str) -> Vec<usize>,
}

/// Appends `spec`'s little-endian bytes.
fn fill_tensor(spec: &TensorSpec, draw: Draw, scales: &mut Fp8Scales<'_>, out: &mut Vec<u8>) {
    if spec.dtype == DType::F8E4M3 {
        let (codes, scale) = draw.fp8(&spec.name, &spec.shape);
        scales.written.insert(spec.name.clone(), scale);
        return out.extend(codes);
    }
    if let Some(module) = spec.name.strip_suffix(&format!(".{WEIGHT_SCALE}")) {
        let weight = format!("{module}.weight");
        let scale = match scales.written.get(&weight) {
            Some(&s) => s,
            None => draw.fp8(&weight, &(scales.shape_of)(&weight)).1,
        };
        return out.extend(scale.to_le_bytes());
    }
    if spec.name.ends_with(&format!(".{INPUT_SCALE}")) {
        // Activations are not quantised by this crate; 1.0 is the neutral static scale.
        return out.extend(1.0f32.to_le_bytes());
    }
    let dtype = spec.dtype;
    draw.each(&spec.name, &spec.shape, &mut |v: f32| match dtype {
        DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
        DType::BF16 => out.extend_from_slice(&f32_to_bf16(v).to_le_bytes()),
        DType::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes()),
        DType::F8E4M3 => unreachable!("FP8 tensors are quantised as a whole, above"),
    });
}

impl Draw {
    /// Passes each value of tensor `name` to `push`, in order.
    fn each(&self, name: &str, shape: &[usize], push: &mut dyn FnMut(f32)) {
        let mut rng = tensor_rng(self.seed, name);
        let count: usize = shape.iter().product();
        let init = init_for(name, shape, self.hidden, self.skew);
        match init {
            Init::Zipf(s) => {
                // Fisher-Yates: which expert gets which popularity rank differs per layer.
                let mut rank: Vec<usize> = (0..count).collect();
                for i in (1..count).rev() {
                    rank.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
                }
                // Choices under noisy logits behave like a softmax with the noise's Gumbel scale
                // (std * sqrt(6) / pi; the router logits have std ~3 here), so scaling the bias by
                // it makes the *realised* popularity fall off like rank^-S.
                let gumbel_scale = 3.0 * 6f64.sqrt() / std::f64::consts::PI;
                rank.iter()
                    .for_each(|&r| push((-s * gumbel_scale * ((r + 1) as f64).ln()) as f32));
            }
            Init::Uniform(lo, hi) => (0..count).for_each(|_| push((lo + (hi - lo) * rng.unit()) as f32)),
            Init::Normal(std) => {
                // Box-Muller, two values per draw.
                let mut i = 0;
                while i < count {
                    let (u1, u2) = (rng.unit(), rng.unit());
                    let r = (-2.0 * u1.ln()).sqrt() * std;
                    let t = 2.0 * std::f64::consts::PI * u2;
                    push((r * t.cos()) as f32);
                    if i + 1 < count {
                        push((r * t.sin()) as f32);
                    }
                    i += 2;
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub seed: u64,
    pub dtype: DType,
    /// Split the weights into shards of at most this many bytes (with an index file).
    pub shard_bytes: Option<usize>,
    /// Refuse to write a model larger than this (the memory a worker could load it into).
    pub max_bytes: Option<usize>,
}

impl Family {
    /// Whose released chat template a generated model of this family carries.
    pub fn template_family(self) -> TemplateFamily {
        match self {
            Family::A13b => TemplateFamily::A13b,
            Family::Large => TemplateFamily::Large,
        }
    }
}

/// Writes config.json, generation_config.json, the weights and, where the vocabulary can hold
/// one (at least [`moe_text::synthetic::MIN_VOCAB`] ids), a generated tokenizer (`hy.tiktoken`
/// and the family's `tokenizer_config.json`, see [`moe_text::synthetic`]) into `dir`. Returns
/// the files.
pub fn write_random_model(shape: &ModelShape, options: &SynthOptions, dir: &Path) -> Result<Vec<PathBuf>> {
    shape.validate()?;
    let total = shape.size_in_bytes(options.dtype);
    if let Some(max) = options.max_bytes
        && total > max
    {
        return Err(Error::InvalidInput(format!(
            "refusing to materialise a {:.1} GB model: only {:.1} GB of memory is available to load it",
            total as f64 / 1e9,
            max as f64 / 1e9
        )));
    }
    let config = shape.config_json(options.dtype);
    // What we write must be what we accept.
    ModelConfig::from_json_str(&config.to_string())?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let write_json = |name: &str, value: &serde_json::Value| {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_string_pretty(value).expect("JSON"))
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        Ok::<_, Error>(path)
    };
    let mut files = vec![
        write_json("config.json", &config)?,
        write_json(
            "generation_config.json",
            &json!({ "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0 }),
        )?,
    ];
    let specs = shape.tensor_specs(options.dtype);
    let draw = Draw {
        hidden: shape.hidden,
        skew: shape.router_skew,
        seed: options.seed,
    };
    let shapes: HashMap<String, Vec<usize>> = specs.iter().map(|s| (s.name.clone(), s.shape.clone())).collect();
    let shape_of = |name: &str| shapes[name].clone();
    let mut scales = Fp8Scales {
        written: HashMap::new(),
        shape_of: &shape_of,
    };
    files.extend(write_model(dir, &specs, options.shard_bytes, &mut |s, buf| {
        fill_tensor(s, draw, &mut scales, buf)
    })?);
    if shape.vocab >= MIN_VOCAB {
        files.extend(write_tokenizer(dir, shape.vocab, shape.family.template_family())?);
    }
    Ok(files)
}

/// Memory this machine could give a model (`MemAvailable`), where the OS reports it.
pub fn available_memory_bytes() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
