//! Expert capacity and what happens to assignments over it: the lossy policies of the brief
//! (decision 2), as plain functions over routing decisions. The default (`exact`) never drops;
//! these exist for deployments that choose the reference Tencent semantics.

use crate::kernels::softmax_in_place;
use crate::rng::SplitMix64;
use crate::router::{ExpertAssignment, RoutePolicy, Routing};

/// Per-expert capacity of a step of `tokens` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Capacity {
    /// Tencent's A13B `topkgating`: `max(k, k * T / E)` (integer division).
    #[default]
    TopK,
    /// GShard/Switch: `ceil(T * factor / E)` (the convention of the Large fixture's capacity
    /// cases, factor 1.0).
    Factor(f64),
    /// A fixed number of slots per expert.
    Fixed(usize),
}

impl Capacity {
    pub fn slots(self, tokens: usize, experts: usize, k: usize) -> usize {
        match self {
            Capacity::TopK => k.max(k * tokens / experts),
            Capacity::Factor(f) => (tokens as f64 * f / experts as f64).ceil() as usize,
            Capacity::Fixed(c) => c,
        }
    }
}

/// The outcome of a capacity policy for one layer's step.
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityOutcome {
    /// What the experts compute: kept (and, under `recycle`, moved) assignments.
    pub assignments: Vec<ExpertAssignment>,
    /// Per (token, rank): kept by its routed expert.
    pub kept: Vec<bool>,
    /// Per (token, rank): the expert that processed it, `None` if dropped.
    pub final_expert: Vec<Option<u32>>,
    pub counts_routed: Vec<usize>,
    pub counts_kept: Vec<usize>,
    pub counts_final: Vec<usize>,
}

impl CapacityOutcome {
    pub fn dropped(&self) -> usize {
        self.kept.iter().filter(|k| !**k).count()
    }
}

/// `drop`: per expert at most `capacity` assignments; first choices are served before second
/// choices, tokens in order within a rank; over-capacity assignments contribute nothing (the
/// other weights are not renormalised).
pub fn drop_over_capacity(routing: &Routing, num_experts: usize, capacity: usize) -> CapacityOutcome {
    let (k, n) = (routing.topk, routing.num_rows());
    let mut counts_routed = vec![0; num_experts];
    let mut counts_kept = vec![0; num_experts];
    let mut kept = vec![false; n * k];
    for rank in 0..k {
        for t in 0..n {
            let e = routing.experts[t * k + rank] as usize;
            counts_routed[e] += 1;
            if counts_kept[e] < capacity {
                counts_kept[e] += 1;
                kept[t * k + rank] = true;
            }
        }
    }
    let mut assignments = Vec::new();
    let mut final_expert = vec![None; n * k];
    for i in 0..n * k {
        if kept[i] {
            final_expert[i] = Some(routing.experts[i]);
            assignments.push(ExpertAssignment {
                row: (i / k) as u32,
                expert: routing.experts[i],
                weight: routing.weights[i],
            });
        }
    }
    CapacityOutcome {
        assignments,
        kept,
        final_expert,
        counts_final: counts_kept.clone(),
        counts_routed,
        counts_kept,
    }
}

/// `recycle` (Hunyuan-Large's random compensation routing): after `drop`, every dropped
/// assignment, in token order, moves to a random expert that still has room (each free slot
/// equally likely, seeded), weighted by the router probability of that new expert. No expert
/// ends above capacity; an assignment never returns to its full expert. `probs` is the router
/// softmax, `[tokens, experts]`.
pub fn recycle(routing: &Routing, probs: &[f32], num_experts: usize, capacity: usize, seed: u64) -> CapacityOutcome {
    let mut out = drop_over_capacity(routing, num_experts, capacity);
    let k = routing.topk;
    let mut free: Vec<u32> = (0..num_experts)
        .flat_map(|e| std::iter::repeat_n(e as u32, capacity - out.counts_kept[e]))
        .collect();
    // Fisher-Yates with a seeded generator: reproducible runs.
    let mut rng = SplitMix64::new(seed);
    for i in (1..free.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        free.swap(i, j);
    }
    let mut next = free.into_iter();
    for i in 0..out.kept.len() {
        if out.kept[i] {
            continue;
        }
        let Some(e) = next.next() else { break };
        let t = i / k;
        out.final_expert[i] = Some(e);
        out.counts_final[e as usize] += 1;
        out.assignments.push(ExpertAssignment {
            row: t as u32,
            expert: e,
            weight: probs[t * num_experts + e as usize],
        });
    }
    // Combine in (row, rank) order, as the exact path does.
    out.assignments.sort_by_key(|a| a.row);
    out
}

/// A lossy capacity policy as a [`RoutePolicy`]: `drop`, or `recycle` with a seed (each layer
/// draws from its own stream, `seed ^ layer`). Counts what it drops and moves, so deployments
/// that choose it can see the cost in their metrics.
#[derive(Debug, Clone, Default)]
pub struct CapacityRouting {
    pub capacity: Capacity,
    pub recycle_seed: Option<u64>,
    pub stats: std::sync::Arc<CapacityStats>,
}

/// Lossy events since start.
#[derive(Debug, Default)]
pub struct CapacityStats {
    /// Assignments over capacity that contributed nothing.
    pub dropped: std::sync::atomic::AtomicU64,
    /// Assignments over capacity moved to another expert (`recycle`).
    pub rerouted: std::sync::atomic::AtomicU64,
}

impl CapacityRouting {
    pub fn new(capacity: Capacity, recycle_seed: Option<u64>) -> Self {
        CapacityRouting {
            capacity,
            recycle_seed,
            stats: Default::default(),
        }
    }
}

impl RoutePolicy for CapacityRouting {
    fn assign(&self, layer: usize, router_logits: &[f32], routing: &Routing) -> Vec<ExpertAssignment> {
        let n = routing.num_rows();
        let experts = router_logits.len() / n.max(1);
        let slots = self.capacity.slots(n, experts, routing.topk);
        use std::sync::atomic::Ordering::Relaxed;
        match self.recycle_seed {
            None => {
                let out = drop_over_capacity(routing, experts, slots);
                self.stats.dropped.fetch_add(out.dropped() as u64, Relaxed);
                out.assignments
            }
            Some(seed) => {
                let mut probs = router_logits.to_vec();
                for row in probs.chunks_mut(experts) {
                    softmax_in_place(row);
                }
                let out = recycle(routing, &probs, experts, slots, seed ^ layer as u64);
                let moved = out
                    .kept
                    .iter()
                    .zip(&out.final_expert)
                    .filter(|(k, f)| !**k && f.is_some())
                    .count();
                self.stats.rerouted.fetch_add(moved as u64, Relaxed);
                self.stats.dropped.fetch_add((out.dropped() - moved) as u64, Relaxed);
                out.assignments
            }
        }
    }
}

/// Forces recorded assignments: per layer, per token, the expert that processed it (`-1` =
/// none), weighted by its router probability. Used to replay assignments made by code whose
/// choices cannot be reproduced (torch's tie-breaking and RNG).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayRouting(pub Vec<Vec<i64>>);

impl RoutePolicy for ReplayRouting {
    fn assign(&self, layer: usize, router_logits: &[f32], _routing: &Routing) -> Vec<ExpertAssignment> {
        let finals = &self.0[layer];
        let experts = router_logits.len() / finals.len().max(1);
        let mut out = Vec::new();
        for (t, &e) in finals.iter().enumerate() {
            if e < 0 {
                continue;
            }
            let mut p = router_logits[t * experts..(t + 1) * experts].to_vec();
            softmax_in_place(&mut p);
            out.push(ExpertAssignment {
                row: t as u32,
                expert: e as u32,
                weight: p[e as usize],
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_built_top2_drop() {
        // 4 tokens, 4 experts, top-2: capacity max(2, 2*4/4) = 2. First choices go first:
        // e0 takes t0 and t1, so t2's first choice is dropped; t3's first choice e1 is kept.
        // Then second choices: t0 -> e1 (its 2nd slot), t1 -> e2, t2 -> e1 (full: dropped),
        // t3 -> e0 (full: dropped).
        let routing = Routing {
            topk: 2,
            experts: vec![0, 1, 0, 2, 0, 1, 1, 0],
            weights: vec![0.6, 0.4, 0.7, 0.3, 0.5, 0.5, 0.9, 0.1],
        };
        let c = Capacity::TopK.slots(4, 4, 2);
        assert_eq!(c, 2);
        let out = drop_over_capacity(&routing, 4, c);
        assert_eq!(out.kept, vec![true, true, true, true, false, false, true, false]);
        assert_eq!(out.counts_routed, vec![4, 3, 1, 0]);
        assert_eq!(out.counts_kept, vec![2, 2, 1, 0]);
        assert_eq!(out.dropped(), 3);
        // Weights are not renormalised: t3 keeps 0.9 alone, t2 contributes nothing.
        let t3: Vec<_> = out.assignments.iter().filter(|a| a.row == 3).collect();
        assert_eq!(t3.len(), 1);
        assert_eq!((t3[0].expert, t3[0].weight), (1, 0.9));
        assert!(out.assignments.iter().all(|a| a.row != 2));
    }

    #[test]
    fn recycle_fills_only_free_slots() {
        let routing = Routing {
            topk: 1,
            experts: vec![0, 0, 0, 0, 1],
            weights: vec![0.9; 5],
        };
        let probs = vec![0.2f32; 5 * 4];
        let out = recycle(&routing, &probs, 4, 2, 7);
        assert_eq!(out.counts_kept, vec![2, 1, 0, 0]);
        assert!(out.counts_final.iter().all(|&c| c <= 2));
        assert_eq!(out.counts_final.iter().sum::<usize>(), 5);
        for i in [2, 3] {
            assert_ne!(
                out.final_expert[i],
                Some(0),
                "a dropped token never returns to its full expert"
            );
        }
        assert_eq!(out, recycle(&routing, &probs, 4, 2, 7), "seeded: reproducible");
    }
}
