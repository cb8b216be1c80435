//! What the worker holds and which placement versions it can serve. Loading a new placement
//! builds a new expert holder while the current one keeps serving, then swaps it in.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use moe_model::ModelConfig;
use moe_model::checkpoint::Checkpoint;
use moe_model::experts::LocalExperts;
use moe_model::progress::LoadProgress;

use crate::error::Result;

pub struct ExpertState {
    pub config: ModelConfig,
    ckpt: Checkpoint,
    inner: RwLock<Inner>,
    pub rows_served: AtomicU64,
    /// Time spent computing dispatches, and dispatches served: the worker's busy time per step.
    pub busy_micros: AtomicU64,
    pub dispatches: AtomicU64,
}

struct Inner {
    experts: Arc<LocalExperts>,
    /// Placement versions whose slots are all loaded, with those slots.
    versions: BTreeMap<u64, Vec<(usize, usize)>>,
    /// Counts [`ExpertState::forget_versions`]: a load that began before the last one is not
    /// served (its version may name another placement of a coordinator that forgot us).
    forgotten: u64,
}

impl ExpertState {
    /// Holds nothing yet; experts are loaded per placement, onto `device`.
    pub fn new(config: ModelConfig, ckpt: Checkpoint, device: moe_model::device::Device) -> Result<Self> {
        let none = moe_model::experts::ExpertSelection::Only(Vec::new());
        let experts = LocalExperts::load_on(&ckpt, &config, &none, device)?;
        Ok(ExpertState {
            config,
            ckpt,
            inner: RwLock::new(Inner {
                experts: Arc::new(experts),
                versions: BTreeMap::new(),
                forgotten: 0,
            }),
            rows_served: AtomicU64::new(0),
            busy_micros: AtomicU64::new(0),
            dispatches: AtomicU64::new(0),
        })
    }

    /// The holder to compute with, if `version` is served.
    pub fn serving(&self, version: u64) -> Result<Arc<LocalExperts>, Vec<u64>> {
        let inner = self.inner.read().expect("lock");
        if inner.versions.contains_key(&version) {
            Ok(inner.experts.clone())
        } else {
            Err(inner.versions.keys().copied().collect())
        }
    }

    pub fn newest_version(&self) -> u64 {
        self.inner
            .read()
            .expect("lock")
            .versions
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
    }

    /// Bytes of the experts held (those kept for reuse included: they are in memory).
    pub fn weight_bytes(&self) -> u64 {
        self.inner.read().expect("lock").experts.size_in_bytes() as u64
    }

    pub fn held_slots(&self) -> Vec<u32> {
        let inner = self.inner.read().expect("lock");
        let e = self.config.num_experts;
        inner
            .experts
            .held()
            .into_iter()
            .map(|(l, x)| (l * e + x) as u32)
            .collect()
    }

    /// Loads `slots` for `version` (blocking; run off the async threads). Versions older than
    /// `active` are forgotten and experts no longer needed by any kept version are freed.
    /// Reports the experts it reads to `progress`. When membership was lost meanwhile, the
    /// experts are kept for reuse but `version` is not served. `membership` is
    /// [`Self::membership`] when the placement was asked for: a placement of a membership lost
    /// since (even before this load began) is not served.
    pub fn load_version(
        &self,
        version: u64,
        slots: Vec<(usize, usize)>,
        active: u64,
        membership: u64,
        progress: &dyn LoadProgress,
    ) -> Result<()> {
        let current = self.inner.read().expect("lock").experts.clone();
        let forgotten = membership;
        let loaded = current.with_progress(&self.ckpt, &self.config, &slots, &[], progress)?;
        let mut inner = self.inner.write().expect("lock");
        if inner.forgotten != forgotten {
            tracing::info!(
                version,
                "membership was lost while loading: the experts are kept, the placement is not served"
            );
            inner.experts = Arc::new(loaded);
            return Ok(());
        }
        inner.versions.insert(version, slots);
        inner.versions.retain(|&v, _| v >= active.min(version));
        let keep: std::collections::HashSet<(usize, usize)> = inner.versions.values().flatten().copied().collect();
        let drop: Vec<_> = loaded.held().into_iter().filter(|s| !keep.contains(s)).collect();
        inner.experts = Arc::new(if drop.is_empty() {
            loaded
        } else {
            loaded.with(&self.ckpt, &self.config, &[], &drop)?
        });
        tracing::info!(version, held = inner.experts.held().len(), "placement loaded");
        Ok(())
    }

    /// Membership was lost (the coordinator no longer knew this worker): serve no placement
    /// until a new one is loaded. The experts stay in memory for reuse.
    /// How many times membership was lost so far: tags a placement with the membership it
    /// belongs to.
    pub fn membership(&self) -> u64 {
        self.inner.read().expect("lock").forgotten
    }

    pub fn forget_versions(&self) {
        let mut inner = self.inner.write().expect("lock");
        inner.versions.clear();
        inner.forgotten += 1;
    }

    pub fn count_dispatch(&self, rows: usize, busy: std::time::Duration) {
        self.rows_served.fetch_add(rows as u64, Ordering::Relaxed);
        self.busy_micros.fetch_add(busy.as_micros() as u64, Ordering::Relaxed);
        self.dispatches.fetch_add(1, Ordering::Relaxed);
    }
}
