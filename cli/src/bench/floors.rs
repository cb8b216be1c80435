//! The two floors of a decode step, as pure arithmetic over the model's sizes, so they are
//! unit-tested apart from any checkpoint or clock.
//!
//! * Bandwidth floor: the bytes the step must read (dense weights once, the embedding rows of
//!   its tokens, every distinct routed expert the step touches, the KV cache of every sequence)
//!   over the measured streaming bandwidth.
//! * FLOP floor: 2 x active parameters per token plus attention's QK^T and AV products, over the
//!   measured f32 matmul rate.

/// One MoE layer's routed experts.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertLayer {
    pub experts: usize,
    pub topk: usize,
    /// Bytes and parameters of one routed expert (gate, up and down projections).
    pub expert_bytes: f64,
    pub expert_params: f64,
}

/// What a step costs per unit of work, read once from the checkpoint and config.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCosts {
    /// Every weight each step reads in full: attention, norms, router, shared expert and the LM
    /// head (the embedding table when the two are tied).
    pub dense_bytes: f64,
    /// Parameters each token multiplies by in those dense weights.
    pub dense_params: f64,
    /// Bytes of one embedding row (each token of the step reads its own).
    pub embed_row_bytes: f64,
    pub layers: Vec<ExpertLayer>,
    /// KV cache bytes per cached position (K and V of every cache slot).
    pub kv_bytes_per_token: f64,
    /// Attention FLOPs per query token per cached position, every layer: QK^T and AV, each
    /// 2 x heads x head_dim.
    pub attention_flops_per_position: f64,
}

/// Expected distinct experts a step of `tokens` touches in a layer of `experts` with top-`k`
/// routing, if each token's k experts are a uniform draw: each expert is missed by one token with
/// probability 1 - k/E, so by all of them with (1 - k/E)^B.
pub fn expected_distinct_experts(experts: usize, k: usize, tokens: usize) -> f64 {
    let e = experts as f64;
    let miss = 1.0 - k.min(experts) as f64 / e;
    e * (1.0 - miss.powi(tokens as i32))
}

impl ModelCosts {
    /// Weight bytes a decode step of `batch` sequences reads, routed experts at their expected
    /// distinct count (exact at batch 1: the top-k).
    pub fn weight_bytes(&self, batch: usize) -> f64 {
        let experts: f64 = self
            .layers
            .iter()
            .map(|l| expected_distinct_experts(l.experts, l.topk, batch) * l.expert_bytes)
            .sum();
        self.dense_bytes + batch as f64 * self.embed_row_bytes + experts
    }

    /// KV cache bytes a decode step of `batch` sequences of `context` cached positions reads.
    pub fn kv_bytes(&self, batch: usize, context: usize) -> f64 {
        (batch * context) as f64 * self.kv_bytes_per_token
    }

    /// 2 x active parameters of one token (dense weights plus its top-k experts).
    pub fn flops_per_token(&self) -> f64 {
        let experts: f64 = self.layers.iter().map(|l| l.topk as f64 * l.expert_params).sum();
        2.0 * (self.dense_params + experts)
    }

    /// FLOPs of a decode step: every token's matmuls plus its attention over `context` positions.
    pub fn step_flops(&self, batch: usize, context: usize) -> f64 {
        batch as f64 * (self.flops_per_token() + context as f64 * self.attention_flops_per_position)
    }

    /// The decode step's floors at `batch` and `context` on a machine.
    pub fn step_floors(&self, batch: usize, context: usize, bandwidth_gbps: f64, matmul_gflops: f64) -> StepFloors {
        let weight_bytes = self.weight_bytes(batch);
        let kv_bytes = self.kv_bytes(batch, context);
        let flops = self.step_flops(batch, context);
        StepFloors {
            weight_bytes,
            kv_bytes,
            bandwidth_ms: (weight_bytes + kv_bytes) / (bandwidth_gbps * 1e9) * 1e3,
            flops,
            flop_ms: flops / (matmul_gflops * 1e9) * 1e3,
        }
    }
}

/// One decode step's floors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepFloors {
    pub weight_bytes: f64,
    pub kv_bytes: f64,
    pub bandwidth_ms: f64,
    pub flops: f64,
    pub flop_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn distinct_experts_by_hand() {
        // One token touches exactly its k experts.
        assert!(close(expected_distinct_experts(64, 8, 1), 8.0));
        // Two tokens: 64 * (1 - (7/8)^2) = 64 * 15/64 = 15.
        assert!(close(expected_distinct_experts(64, 8, 2), 15.0));
        // Four experts top-2, three tokens: 4 * (1 - (1/2)^3) = 3.5.
        assert!(close(expected_distinct_experts(4, 2, 3), 3.5));
        // Never more than every expert; all of them when k = E.
        assert!(expected_distinct_experts(64, 8, 128) < 64.0);
        assert!(close(
            expected_distinct_experts(64, 8, 128),
            64.0 * (1.0 - (0.875f64).powi(128))
        ));
        assert!(close(expected_distinct_experts(4, 4, 5), 4.0));
        assert_eq!(expected_distinct_experts(64, 8, 0), 0.0);
    }

    fn costs() -> ModelCosts {
        ModelCosts {
            dense_bytes: 1000.0,
            dense_params: 500.0,
            embed_row_bytes: 10.0,
            layers: vec![
                ExpertLayer {
                    experts: 4,
                    topk: 2,
                    expert_bytes: 100.0,
                    expert_params: 50.0,
                },
                ExpertLayer {
                    experts: 4,
                    topk: 1,
                    expert_bytes: 200.0,
                    expert_params: 100.0,
                },
            ],
            kv_bytes_per_token: 8.0,
            attention_flops_per_position: 3.0,
        }
    }

    #[test]
    fn floors_by_hand() {
        let c = costs();
        // Batch 1: 1000 + 10 + 2 x 100 + 1 x 200.
        assert!(close(c.weight_bytes(1), 1410.0));
        // Batch 2: distinct 4(1 - 1/4) = 3 and 4(1 - 9/16) = 1.75 -> 1000 + 20 + 300 + 350.
        assert!(close(c.weight_bytes(2), 1670.0));
        assert!(close(c.kv_bytes(2, 5), 80.0));
        // 2 x (500 + 2 x 50 + 1 x 100) = 1400 per token.
        assert!(close(c.flops_per_token(), 1400.0));
        // 2 tokens x (1400 + 5 positions x 3).
        assert!(close(c.step_flops(2, 5), 2830.0));
        // 1750 bytes at 1 GB/s = 1.75 us; 2830 FLOPs at 1 GFLOP/s = 2.83 us.
        let f = c.step_floors(2, 5, 1.0, 1.0);
        assert!(close(f.weight_bytes + f.kv_bytes, 1750.0));
        assert!(close(f.bandwidth_ms, 1.75e-3));
        assert!(close(f.flops, 2830.0));
        assert!(close(f.flop_ms, 2.83e-3));
    }
}
