//! The expert placement's lifecycle. Placements are versioned: when the set of staying expert
//! workers changes, a new *target* is computed and the expert workers load their slots for it;
//! only once every worker in it reports that version loaded does it become *active*, the one
//! attention workers route with. Serving never stops for a placement change.
//!
//! A rebalance (asked for, or automatic once the active placement's expected imbalance over the
//! load window passes a threshold) plans a target fitted to the load the same way. At most one
//! target loads at a time: a rebalance waits for it, a membership change replaces it.
//!
//! Plain data: the methods take the members and the load window and change nothing else, so the
//! caller records what became active and maps refusals ([`PlacementError`]) to its protocol.

use std::time::{Duration, Instant};

use moe_proto::v1::{Placement, RebalanceResponse, Role};
use moe_runtime::PlacementView;
use moe_runtime::placement::ExpertWorkerRef;

use crate::load::LoadWindow;
use crate::members::Members;
use crate::planner::{self, WorkerSlots};

#[cfg(test)]
mod tests;

/// When and how the expert placement follows the load.
#[derive(Debug, Clone)]
pub struct BalanceConfig {
    /// Expert load is counted over this moving window.
    pub window: Duration,
    /// Rebalance by itself when the active placement's expected imbalance (max/mean expert
    /// worker load, worst layer) over the window passes this; 0 = only on request.
    pub threshold: f64,
    /// Least time between two automatic rebalances.
    pub min_interval: Duration,
    /// Tokens the window must hold before an automatic rebalance trusts it.
    pub min_tokens: u64,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            window: Duration::from_secs(30),
            threshold: 0.0,
            min_interval: Duration::from_secs(60),
            min_tokens: 10_000,
        }
    }
}

/// A placement within this of perfect balance is left alone by a rebalance that is not forced.
const BALANCED: f64 = 1.05;

/// Why a rebalance was refused.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("placement {0} is still loading; rebalance once it is active")]
    StillLoading(u64),
    #[error("no placement yet: waiting for expert workers")]
    NoPlacement,
    #[error("no expert load seen in the last {0:?}: nothing to balance on")]
    NoLoad(Duration),
    /// The planner could not place the experts on the workers' slots.
    #[error(transparent)]
    Plan(#[from] crate::planner::TooFewSlots),
    #[error(transparent)]
    Away(#[from] crate::cluster::RegistryAway),
}

/// What the placement depends on besides the members and the load.
#[derive(Debug, Clone)]
pub struct PlacementConfig {
    pub num_layers: usize,
    pub num_experts: usize,
    /// Expert workers to wait for before the first placement.
    pub min_expert_workers: usize,
    pub balance: BalanceConfig,
}

#[derive(Debug)]
pub struct Placements {
    config: PlacementConfig,
    /// What attention workers route with.
    active: Option<PlacementView>,
    /// What expert workers are loading; becomes active once all of them have.
    target: Option<PlacementView>,
    /// The newest version handed out (versions are never reused, even for a dropped target).
    last_version: u64,
    /// When the placement was last rebalanced (or an automatic attempt made).
    last_rebalance: Option<Instant>,
}

impl Placements {
    pub fn new(config: PlacementConfig) -> Self {
        Placements {
            config,
            active: None,
            target: None,
            last_version: 0,
            last_rebalance: None,
        }
    }

    pub fn active(&self) -> Option<&PlacementView> {
        self.active.as_ref()
    }

    /// The placement being loaded, else the active one.
    pub fn latest(&self) -> Option<&PlacementView> {
        self.target.as_ref().or(self.active.as_ref())
    }

    /// Takes over a placement recorded by an earlier leader when it is newer than any this one
    /// made: another coordinator led since, so it is the truth and any local target is dropped.
    pub fn adopt(&mut self, recorded: &Placement) {
        match PlacementView::from_proto(recorded) {
            Ok(view) if view.version > self.last_version => {
                self.last_version = view.version;
                self.target = None;
                self.active = Some(view);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "the recorded placement is invalid: ignored"),
        }
    }

    /// Whether a draining expert worker can leave: nothing loading, and the active placement
    /// gives it no slots.
    pub fn releases(&self, worker: &str) -> bool {
        self.target.is_none()
            && self
                .active
                .as_ref()
                .is_some_and(|p| p.workers.iter().all(|x| x.id != worker))
    }

    /// Moves the placement towards the staying expert workers: a new target when they differ
    /// from the latest placement's, activation once every worker of the target has loaded it.
    /// Returns the placement that became active, for the caller to record.
    pub fn reconcile(&mut self, members: &Members, load: &LoadWindow) -> Option<&PlacementView> {
        let experts = expert_workers(members);
        // The same workers in another order (a new leader adopting them) need no new placement.
        let changed = self
            .latest()
            .is_none_or(|p| p.workers.len() != experts.len() || p.workers.iter().any(|w| !experts.contains(w)));
        let enough =
            experts.len() >= self.config.min_expert_workers.max(1) || (self.active.is_some() && !experts.is_empty());
        if changed && enough {
            self.last_version += 1;
            let p = self.placement_for(self.last_version, experts, members, load);
            tracing::info!(version = p.version, workers = p.workers.len(), "new target placement");
            self.target = Some(p);
        }
        let target = self.target.as_ref()?;
        let loaded = target.workers.iter().all(|w| {
            members
                .get(&w.id)
                .is_some_and(|r| r.status.placement_version >= target.version)
        });
        if !loaded {
            return None;
        }
        tracing::info!(version = target.version, "placement active");
        self.active = self.target.take();
        self.active.as_ref()
    }

    /// Plans a placement for the window's load and makes it the target, unless it would not
    /// improve on the active one (`force` plans from scratch and applies any change). The
    /// response's `target_version` is 0 when the placement is kept; else the caller reconciles.
    pub fn rebalance(
        &mut self,
        force: bool,
        members: &Members,
        load: &LoadWindow,
        now: Instant,
    ) -> Result<RebalanceResponse, PlacementError> {
        if let Some(t) = &self.target {
            return Err(PlacementError::StillLoading(t.version));
        }
        let Some(active) = self.active.clone() else {
            return Err(PlacementError::NoPlacement);
        };
        let matrix = load.matrix();
        if matrix.iter().flatten().sum::<f64>() == 0.0 {
            return Err(PlacementError::NoLoad(load.window()));
        }
        let before = self.imbalance(&matrix);
        let slots = self.worker_slots(expert_workers(members), members);
        let current = (!force).then_some(&active);
        let plan =
            planner::plan(self.last_version + 1, &matrix, &slots, current, BALANCED).map_err(PlacementError::Plan)?;
        let after = worst(&planner::imbalance(&plan, &matrix));
        // Loading slots costs expert workers time and memory: only for a real improvement.
        if plan.same_slots(&active) || (!force && after >= before) {
            return Ok(RebalanceResponse {
                target_version: 0,
                imbalance_before: before,
                imbalance_after: before,
                detail: format!(
                    "placement {} kept: imbalance {before:.3} is as good as planning gets",
                    active.version
                ),
            });
        }
        self.last_version = plan.version;
        self.last_rebalance = Some(now);
        tracing::info!(
            version = plan.version,
            before,
            after,
            "rebalancing: new target placement"
        );
        let detail = format!(
            "placement {} loading: expected imbalance {before:.3} -> {after:.3}; it switches once every expert worker has loaded its slots",
            plan.version
        );
        let target_version = plan.version;
        self.target = Some(plan);
        Ok(RebalanceResponse {
            target_version,
            imbalance_before: before,
            imbalance_after: after,
            detail,
        })
    }

    /// Rebalances by itself when the threshold is set and passed by a window holding enough
    /// tokens, at most once per interval and never while a target loads. True when a new target
    /// was set (the caller then reconciles).
    pub fn auto_rebalance(&mut self, members: &Members, load: &LoadWindow, now: Instant) -> bool {
        let b = &self.config.balance;
        let recent = self
            .last_rebalance
            .is_some_and(|t| now.saturating_duration_since(t) < b.min_interval);
        if b.threshold <= 0.0 || self.target.is_some() || recent {
            return false;
        }
        let (threshold, min_tokens) = (b.threshold, b.min_tokens);
        let matrix = load.matrix();
        if (matrix.iter().flatten().sum::<f64>() as u64) < min_tokens {
            return false;
        }
        let imbalance = self.imbalance(&matrix);
        if imbalance > threshold {
            // Whatever the outcome, wait an interval before trying again.
            self.last_rebalance = Some(now);
            match self.rebalance(false, members, load, now) {
                Ok(r) => {
                    tracing::info!(imbalance, threshold, detail = %r.detail, "automatic rebalance");
                    return r.target_version != 0;
                }
                Err(e) => tracing::warn!(imbalance, error = %e, "automatic rebalance not possible"),
            }
        }
        false
    }

    /// Expected imbalance of the active placement under `load` (`[layer][expert]`, worst
    /// layer), or 0 when there is no load or no placement.
    pub fn imbalance(&self, load: &[Vec<f64>]) -> f64 {
        let Some(active) = &self.active else { return 0.0 };
        if load.iter().flatten().all(|&x| x == 0.0) {
            return 0.0;
        }
        worst(&planner::imbalance(active, load))
    }

    /// Slots per layer each expert worker offers: an even share of the experts plus its spares.
    fn worker_slots(&self, experts: Vec<ExpertWorkerRef>, members: &Members) -> Vec<WorkerSlots> {
        let e = self.config.num_experts;
        let share = e.div_ceil(experts.len().max(1));
        experts
            .into_iter()
            .map(|worker| {
                let spare = members.get(&worker.id).map_or(0, |w| w.status.spare_slots as usize);
                WorkerSlots {
                    worker,
                    slots: (share + spare).min(e),
                }
            })
            .collect()
    }

    /// The placement after a membership change: fitted to the window's load when the workers
    /// have spare slots for replicas and load was seen (replicas survive a join or a failure),
    /// else even slices.
    fn placement_for(
        &self,
        version: u64,
        experts: Vec<ExpertWorkerRef>,
        members: &Members,
        load: &LoadWindow,
    ) -> PlacementView {
        let c = &self.config;
        let matrix = load.matrix();
        let slots = self.worker_slots(experts.clone(), members);
        let share = c.num_experts.div_ceil(experts.len().max(1));
        let spares = slots.iter().any(|w| w.slots > share);
        if spares && matrix.iter().flatten().any(|&x| x > 0.0) {
            match planner::plan(version, &matrix, &slots, None, BALANCED) {
                Ok(p) => return p,
                Err(e) => tracing::warn!(error = %e, "load-aware placement not possible; even slices"),
            }
        }
        PlacementView::even_slices(version, c.num_layers, c.num_experts, experts)
    }
}

/// The staying expert workers, in registration order: the workers a new placement uses.
fn expert_workers(members: &Members) -> Vec<ExpertWorkerRef> {
    members
        .staying()
        .filter(|w| w.role == Role::Expert)
        .map(|w| ExpertWorkerRef {
            id: w.id.clone(),
            address: w.address.clone(),
        })
        .collect()
}

/// The worst layer's imbalance.
fn worst(per_layer: &[f64]) -> f64 {
    per_layer.iter().copied().fold(0.0, f64::max)
}
