//! The expert placement: which expert worker serves which (layer, expert). Versioned; every
//! dispatch names the version it was routed with.

use std::collections::HashMap;

use moe_proto::v1::{ExpertWorkerSlots, Placement};

/// A placement message that does not describe a usable placement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPlacement {
    #[error("placement {version}: worker {worker} holds slot {slot} of {slots}")]
    SlotOutOfRange {
        version: u64,
        worker: String,
        slot: usize,
        slots: usize,
    },
    #[error("placement {version}: expert {expert} of layer {layer} has no worker")]
    Unserved { version: u64, layer: usize, expert: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertWorkerRef {
    pub id: String,
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementView {
    pub version: u64,
    pub num_layers: usize,
    pub num_experts: usize,
    pub workers: Vec<ExpertWorkerRef>,
    /// `owners[layer * num_experts + expert]`: indices into `workers` (more than one = replicas).
    owners: Vec<Vec<usize>>,
}

impl PlacementView {
    /// Every (layer, expert) spread over `workers` in contiguous, near-equal expert ranges (the
    /// first `E % W` workers take one more), the same ranges in every layer.
    pub fn even_slices(version: u64, num_layers: usize, num_experts: usize, workers: Vec<ExpertWorkerRef>) -> Self {
        let w = workers.len();
        let mut owners = vec![Vec::new(); num_layers * num_experts];
        if let (Some(base), Some(extra)) = (num_experts.checked_div(w), num_experts.checked_rem(w)) {
            let mut start = 0;
            for i in 0..w {
                let count = base + usize::from(i < extra);
                for e in start..start + count {
                    for l in 0..num_layers {
                        owners[l * num_experts + e].push(i);
                    }
                }
                start += count;
            }
        }
        PlacementView {
            version,
            num_layers,
            num_experts,
            workers,
            owners,
        }
    }

    /// The same workers serving the same slots (versions aside).
    pub fn same_slots(&self, other: &PlacementView) -> bool {
        self.workers == other.workers && self.owners == other.owners
    }

    /// A placement from explicit owners: `owners[layer * num_experts + expert]` lists the
    /// indices into `workers` that serve it.
    pub fn from_owners(
        version: u64,
        num_layers: usize,
        num_experts: usize,
        workers: Vec<ExpertWorkerRef>,
        owners: Vec<Vec<usize>>,
    ) -> Self {
        assert_eq!(
            owners.len(),
            num_layers * num_experts,
            "one owner list per (layer, expert)"
        );
        PlacementView {
            version,
            num_layers,
            num_experts,
            workers,
            owners,
        }
    }

    /// Parses and checks a placement: slots in range, every slot served by someone.
    pub fn from_proto(p: &Placement) -> Result<Self, InvalidPlacement> {
        let (l, e) = (p.num_layers as usize, p.num_experts as usize);
        let mut owners = vec![Vec::new(); l * e];
        let mut workers = Vec::with_capacity(p.workers.len());
        for (i, w) in p.workers.iter().enumerate() {
            for &slot in &w.slots {
                let slot = slot as usize;
                if slot >= owners.len() {
                    return Err(InvalidPlacement::SlotOutOfRange {
                        version: p.version,
                        worker: w.worker_id.clone(),
                        slot,
                        slots: l * e,
                    });
                }
                owners[slot].push(i);
            }
            workers.push(ExpertWorkerRef {
                id: w.worker_id.clone(),
                address: w.address.clone(),
            });
        }
        if let Some(slot) = owners.iter().position(Vec::is_empty) {
            return Err(InvalidPlacement::Unserved {
                version: p.version,
                layer: slot / e.max(1),
                expert: slot % e.max(1),
            });
        }
        Ok(PlacementView {
            version: p.version,
            num_layers: l,
            num_experts: e,
            workers,
            owners,
        })
    }

    pub fn to_proto(&self) -> Placement {
        let mut slots: Vec<Vec<u32>> = vec![Vec::new(); self.workers.len()];
        for (slot, owners) in self.owners.iter().enumerate() {
            for &w in owners {
                slots[w].push(slot as u32);
            }
        }
        Placement {
            version: self.version,
            num_layers: self.num_layers as u32,
            num_experts: self.num_experts as u32,
            workers: self
                .workers
                .iter()
                .zip(slots)
                .map(|(w, slots)| ExpertWorkerSlots {
                    worker_id: w.id.clone(),
                    address: w.address.clone(),
                    slots,
                })
                .collect(),
        }
    }

    /// Workers serving (layer, expert), as indices into `workers`.
    pub fn owners(&self, layer: usize, expert: usize) -> &[usize] {
        &self.owners[layer * self.num_experts + expert]
    }

    /// (layer, expert) pairs a worker serves.
    pub fn slots_of(&self, worker_id: &str) -> Vec<(usize, usize)> {
        let Some(i) = self.workers.iter().position(|w| w.id == worker_id) else {
            return Vec::new();
        };
        (0..self.owners.len())
            .filter(|&s| self.owners[s].contains(&i))
            .map(|s| (s / self.num_experts, s % self.num_experts))
            .collect()
    }

    /// Experts per worker id (for status displays).
    pub fn counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for owners in &self.owners {
            for &w in owners {
                *counts.entry(self.workers[w].id.clone()).or_default() += 1;
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(n: usize) -> Vec<ExpertWorkerRef> {
        (0..n)
            .map(|i| ExpertWorkerRef {
                id: format!("w{i}"),
                address: format!("127.0.0.1:{}", 1000 + i),
            })
            .collect()
    }

    #[test]
    fn even_slices_cover_every_expert_once() {
        for (e, w) in [(64, 1), (64, 3), (64, 4), (16, 3), (8, 5), (3, 3)] {
            let p = PlacementView::even_slices(1, 2, e, workers(w));
            let sizes: Vec<usize> = (0..w).map(|i| p.slots_of(&format!("w{i}")).len() / 2).collect();
            assert_eq!(sizes.iter().sum::<usize>(), e);
            let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(max - min <= 1, "uneven beyond one expert: {sizes:?}");
            for l in 0..2 {
                for x in 0..e {
                    assert_eq!(p.owners(l, x).len(), 1);
                }
            }
        }
        // 64 over 3: 22, 21, 21 in contiguous ranges.
        let p = PlacementView::even_slices(1, 1, 64, workers(3));
        assert_eq!(p.slots_of("w0"), (0..22).map(|e| (0, e)).collect::<Vec<_>>());
        assert_eq!(p.slots_of("w2").first(), Some(&(0, 43)));
    }

    #[test]
    fn proto_round_trip_and_checks() {
        let p = PlacementView::even_slices(7, 3, 10, workers(4));
        assert_eq!(PlacementView::from_proto(&p.to_proto()).unwrap(), p);
        let mut proto = p.to_proto();
        proto.workers[0].slots.push(30);
        assert!(
            PlacementView::from_proto(&proto)
                .unwrap_err()
                .to_string()
                .contains("slot 30")
        );
        let mut proto = p.to_proto();
        proto.workers[1].slots.clear();
        assert!(
            PlacementView::from_proto(&proto)
                .unwrap_err()
                .to_string()
                .contains("has no worker")
        );
    }
}
