//! Intermediate values of one forward pass, recorded on request (golden checks, debugging).
//! Every array covers all rows of the batch, in batch row order.

use crate::router::Routing;

#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub embeddings: Vec<f32>,
    pub layers: Vec<LayerTrace>,
    pub final_norm: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct LayerTrace {
    /// o_proj output, before the residual add.
    pub attn_out: Vec<f32>,
    /// post_attention_layernorm output: what the router, the shared expert and the routed
    /// experts see.
    pub moe_input: Vec<f32>,
    pub router_logits: Vec<f32>,
    pub routing: Routing,
    /// Σ weight · expert(x), without the shared expert.
    pub routed_out: Vec<f32>,
    /// Routed plus shared, before the residual add.
    pub moe_out: Vec<f32>,
    /// The residual stream after the layer.
    pub hidden_out: Vec<f32>,
}
