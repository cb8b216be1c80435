//! The MoE gate: router logits in f32, softmax over **all** experts, top-k, then either
//! renormalised weights (A13B, `norm_topk_prob`) or the probabilities themselves (Large, top-1).

use crate::kernels::{linear, softmax_in_place};
use crate::weights::Matrix;

/// Routing decisions for `rows` tokens, `topk` experts each, in descending probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub topk: usize,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Routing {
    pub fn num_rows(&self) -> usize {
        self.experts.len() / self.topk
    }

    /// The routing as one assignment per (row, rank), in row then rank order.
    pub fn assignments(&self) -> Vec<ExpertAssignment> {
        self.experts
            .iter()
            .zip(&self.weights)
            .enumerate()
            .map(|(i, (&expert, &weight))| ExpertAssignment {
                row: (i / self.topk) as u32,
                expert,
                weight,
            })
            .collect()
    }
}

/// One token row sent to one expert with its routing weight: the unit of the expert interface.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertAssignment {
    pub row: u32,
    pub expert: u32,
    pub weight: f32,
}

/// Turns one layer's routing decisions into the assignments the experts compute. The default,
/// [`ExactRouting`], sends every top-k choice; lossy capacity policies live in `capacity`.
pub trait RoutePolicy: Send + Sync {
    fn assign(&self, layer: usize, router_logits: &[f32], routing: &Routing) -> Vec<ExpertAssignment>;
}

/// Every token to every one of its top-k experts: the reference semantics.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExactRouting;

impl RoutePolicy for ExactRouting {
    fn assign(&self, _layer: usize, _router_logits: &[f32], routing: &Routing) -> Vec<ExpertAssignment> {
        routing.assignments()
    }
}

#[derive(Debug, Clone)]
pub struct Router {
    /// `[num_experts, hidden]`, always f32 (the checkpoints keep `wg` in f32 too).
    pub wg: Matrix,
    /// Added to the logits when the checkpoint has `mlp.gate.wg.bias` (synthetic skewed models).
    pub bias: Option<Vec<f32>>,
    pub topk: usize,
    pub renormalize: bool,
}

impl Router {
    /// Router logits `[rows, num_experts]`.
    pub fn logits(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut logits = vec![0.0; rows * self.wg.rows];
        linear(x, rows, &self.wg, &mut logits);
        if let Some(bias) = &self.bias {
            for row in logits.chunks_mut(bias.len()) {
                row.iter_mut().zip(bias).for_each(|(l, b)| *l += b);
            }
        }
        logits
    }

    pub fn route(&self, logits: &[f32]) -> Routing {
        let e = self.wg.rows;
        let rows = logits.len() / e;
        let mut experts = Vec::with_capacity(rows * self.topk);
        let mut weights = Vec::with_capacity(rows * self.topk);
        let mut probs = vec![0.0; e];
        let mut order: Vec<u32> = Vec::with_capacity(e);
        for r in 0..rows {
            probs.copy_from_slice(&logits[r * e..(r + 1) * e]);
            softmax_in_place(&mut probs);
            order.clear();
            order.extend(0..e as u32);
            // Descending probability; the lower index first on exact ties.
            order.select_nth_unstable_by(self.topk - 1, |&a, &b| {
                probs[b as usize].total_cmp(&probs[a as usize]).then(a.cmp(&b))
            });
            let top = &mut order[..self.topk];
            top.sort_by(|&a, &b| probs[b as usize].total_cmp(&probs[a as usize]).then(a.cmp(&b)));
            let norm = if self.renormalize {
                1.0 / top.iter().map(|&i| probs[i as usize]).sum::<f32>()
            } else {
                1.0
            };
            for &i in top.iter() {
                experts.push(i);
                weights.push(probs[i as usize] * norm);
            }
        }
        Routing {
            topk: self.topk,
            experts,
            weights,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top2_renormalised_and_top1_probability() {
        let logits = vec![0.0f32, 2.0, 1.0, -1.0];
        let wg = Matrix::from_f32(4, 1, vec![0.0; 4]);
        let mut router = Router {
            wg,
            bias: None,
            topk: 2,
            renormalize: true,
        };
        let r = router.route(&logits);
        assert_eq!(r.experts, vec![1, 2]);
        assert!((r.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let (e1, e2) = (2.0f32.exp(), 1.0f32.exp());
        assert!((r.weights[0] - e1 / (e1 + e2)).abs() < 1e-6);

        router.topk = 1;
        router.renormalize = false;
        let r = router.route(&logits);
        let total: f32 = logits.iter().map(|v| v.exp()).sum();
        assert_eq!(r.experts, vec![1]);
        assert!((r.weights[0] - e1 / total).abs() < 1e-6);
    }

    #[test]
    fn a_router_bias_is_added_to_every_row_of_logits() {
        // wg = identity on 2 inputs, 3 experts (third reads nothing).
        let wg = Matrix::from_f32(3, 2, vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
        let router = Router {
            wg,
            bias: Some(vec![0.5, -1.0, 2.0]),
            topk: 1,
            renormalize: false,
        };
        let logits = router.logits(&[1.0, 2.0, 3.0, 4.0], 2);
        assert_eq!(logits, [1.5, 1.0, 2.0, 3.5, 3.0, 2.0]);
    }
}
