//! Tensor names of the HuggingFace Hunyuan checkpoints (the same in the real A13B / A52B
//! releases and in `save_pretrained` output).

pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

pub fn layer(l: usize, suffix: &str) -> String {
    format!("model.layers.{l}.{suffix}")
}

pub fn expert(l: usize, e: usize, proj: &str) -> String {
    format!("model.layers.{l}.mlp.experts.{e}.{proj}.weight")
}

pub fn shared(l: usize, proj: &str) -> String {
    format!("model.layers.{l}.mlp.shared_mlp.{proj}.weight")
}

pub const INPUT_NORM: &str = "input_layernorm.weight";
pub const POST_ATTN_NORM: &str = "post_attention_layernorm.weight";
pub const Q_PROJ: &str = "self_attn.q_proj.weight";
pub const K_PROJ: &str = "self_attn.k_proj.weight";
pub const V_PROJ: &str = "self_attn.v_proj.weight";
pub const O_PROJ: &str = "self_attn.o_proj.weight";
pub const Q_NORM: &str = "self_attn.query_layernorm.weight";
pub const K_NORM: &str = "self_attn.key_layernorm.weight";
pub const ROUTER: &str = "mlp.gate.wg.weight";
/// Not in the released checkpoints (their gate has no bias; HF's loader ignores the key): our
/// synthetic skewed models carry a per-expert router logit bias here.
pub const ROUTER_BIAS: &str = "mlp.gate.wg.bias";

/// Is this tensor part of a routed expert (the part expert workers own)?
pub fn is_routed_expert(name: &str) -> bool {
    name.contains(".mlp.experts.")
}
