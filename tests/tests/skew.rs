//! `gen-model --skew`: a router logit bias makes expert popularity follow the Zipf ranks it
//! encodes, reproducibly; without it, popularity is flat.

use std::sync::{Arc, Mutex};

use moe_model::checkpoint::Checkpoint;
use moe_model::router::{ExactRouting, ExpertAssignment, RoutePolicy, Routing};
use moe_model::{DType, Engine, EngineOptions, names};
use moe_model_tools::synthetic::{ModelShape, SynthOptions, write_random_model};

/// Counts the experts each layer's tokens are routed to.
#[derive(Default)]
struct Counting {
    counts: Mutex<Vec<Vec<u64>>>,
}

impl RoutePolicy for Counting {
    fn assign(&self, layer: usize, logits: &[f32], routing: &Routing) -> Vec<ExpertAssignment> {
        let assignments = ExactRouting.assign(layer, logits, routing);
        let mut counts = self.counts.lock().unwrap();
        if counts.len() <= layer {
            counts.resize(layer + 1, vec![0; 64]);
        }
        for a in &assignments {
            counts[layer][a.expert as usize] += 1;
        }
        assignments
    }
}

/// Share of layer-0 routed tokens that went to the 8 experts the bias ranks first, with the
/// model generated at `skew`, and the ranks (by the bias of the skewed model).
fn top8_share(skew: f64, ranks_from: Option<&[usize]>) -> (f64, Vec<usize>) {
    let dir = tempfile::tempdir().unwrap();
    let mut shape = ModelShape::preset("tiny").unwrap();
    shape.router_skew = skew;
    let options = SynthOptions {
        seed: 3,
        dtype: DType::F32,
        shard_bytes: None,
        max_bytes: None,
    };
    write_random_model(&shape, &options, dir.path()).unwrap();
    let ranks = match ranks_from {
        Some(r) => r.to_vec(),
        None => {
            let ckpt = Checkpoint::open(dir.path()).unwrap();
            let bias = ckpt.vector(&names::layer(0, names::ROUTER_BIAS), 64).unwrap();
            let mut order: Vec<usize> = (0..64).collect();
            order.sort_by(|&a, &b| bias[b].total_cmp(&bias[a]));
            order
        }
    };
    let mut engine = Engine::load(dir.path(), EngineOptions::default()).unwrap();
    let counting = Arc::new(Counting::default());
    engine.set_route_policy(counting.clone());
    let prompts: Vec<Vec<u32>> = (0..8)
        .map(|p| (0..64).map(|i| 5 + ((p * 977 + i * 131) % 500) as u32).collect())
        .collect();
    engine.generate_greedy(&prompts, 1, &[], false).unwrap();
    let counts = counting.counts.lock().unwrap();
    let layer0 = &counts[0];
    let total: u64 = layer0.iter().sum();
    let top: u64 = ranks[..8].iter().map(|&e| layer0[e]).sum();
    (top as f64 / total as f64, ranks)
}

#[test]
fn a_zipf_router_bias_concentrates_tokens_on_the_top_ranked_experts() {
    let (skewed, ranks) = top8_share(1.0, None);
    let (flat, _) = top8_share(0.0, Some(&ranks));
    // Uniform would be 8/64 = 12.5%; Zipf(1) over 64 ranks puts ~57% of the probability mass on
    // the first 8 (the router's own noise flattens that somewhat).
    assert!(skewed > 0.4, "top-8 share {skewed:.3} with skew 1.0");
    assert!(flat < 0.25, "top-8 share {flat:.3} without skew");
    assert!(skewed > 2.0 * flat, "{skewed:.3} vs {flat:.3}");
    eprintln!("top-8 share of layer-0 tokens: {skewed:.3} with skew 1.0, {flat:.3} without");
}

#[test]
fn a_negative_or_infinite_skew_is_refused() {
    for bad in [-1.0, f64::INFINITY, f64::NAN] {
        let mut shape = ModelShape::preset("tiny").unwrap();
        shape.router_skew = bad;
        let err = shape.validate().unwrap_err().to_string();
        assert!(err.contains("router skew"), "{err}");
    }
}
