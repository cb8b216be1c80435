//! Shared access to the [`Cluster`]: a cloneable handle around a mutex, as in tokio's
//! mini-redis. Every cluster operation is synchronous and short, so a plain `std` mutex is held
//! only for the call and never across an `.await`; changes still happen one at a time, in order.
//!
//! The one operation that awaits is taking over leadership ([`StateHandle::lead`]): it reads
//! the registry first, without the lock, then merges what it read under the lock in one step.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use moe_proto::v1::{ClusterStatusResponse, HeartbeatResponse, Placement, RebalanceResponse, WorkerStatus};

use crate::cluster::{Cluster, ClusterConfig, RegisterError};
use crate::members::DrainError;
use crate::nccl::PublishError;
use crate::placements::PlacementError;
use crate::registry::watch::MemberEvent;
use crate::registry::{Fence, Member};
use crate::requests::PickError;
use crate::store::Store;

/// Cheap, cloneable access to the cluster state.
#[derive(Clone)]
pub struct StateHandle {
    shared: Arc<Shared>,
}

struct Shared {
    cluster: Mutex<Cluster>,
    /// Held by a takeover across its registry reads, and by each tick. In the time between
    /// reading the registry and merging it, a tick could expire a member the snapshot still
    /// holds or retarget the placement the snapshot is about to replace; so ticks wait. Every
    /// RPC waits too, by another road: the `LeaderGate` refuses them until the takeover is
    /// done (`leader.rs`). A caller that reached the state outside that gate would need this
    /// lock as well.
    takeover: tokio::sync::Mutex<()>,
}

/// An attention worker chosen for a request; dropping it releases the slot.
pub struct Assignment {
    pub worker_id: String,
    pub address: String,
    handle: StateHandle,
}

impl Drop for Assignment {
    fn drop(&mut self) {
        // Not `lock()`: a poisoned lock must not turn a drop during unwinding into an abort.
        if let Ok(mut cluster) = self.handle.shared.cluster.lock() {
            cluster.done(&self.worker_id);
        }
    }
}

/// Starts the cluster state, recording membership and placements through `store`, and its
/// periodic tick. It serves once told to [`StateHandle::lead`].
pub fn spawn(config: ClusterConfig, store: Store) -> StateHandle {
    let tick = (config.heartbeat_timeout / 4).max(Duration::from_millis(50));
    let shared = Arc::new(Shared {
        cluster: Mutex::new(Cluster::new(config, store)),
        takeover: tokio::sync::Mutex::new(()),
    });
    tokio::spawn(run_ticks(Arc::downgrade(&shared), tick));
    StateHandle { shared }
}

/// Ticks the cluster every `period` until no handle is left.
async fn run_ticks(shared: Weak<Shared>, period: Duration) {
    let mut interval = tokio::time::interval(period);
    loop {
        interval.tick().await;
        let Some(shared) = shared.upgrade() else { break };
        let _quiet = shared.takeover.lock().await;
        lock(&shared.cluster).tick();
    }
}

/// A panic while the lock was held left the state half-changed; going on from it would hide
/// the bug, so every later use panics too: each RPC then fails loudly in the logs. (The actor
/// this replaced answered UNAVAILABLE once its task had died; either way it is a bug that
/// stops this coordinator from serving.)
fn lock(cluster: &Mutex<Cluster>) -> MutexGuard<'_, Cluster> {
    cluster.lock().expect("the cluster state was left poisoned by a panic")
}

impl StateHandle {
    fn cluster(&self) -> MutexGuard<'_, Cluster> {
        lock(&self.shared.cluster)
    }

    pub fn register(&self, joining: Member, recorded: bool) -> Result<String, RegisterError> {
        self.cluster().register(joining, recorded)
    }

    /// Whether etcd answers the leader (see [`crate::cluster::RegistryAway`]).
    pub fn set_registry_reachable(&self, reachable: bool) {
        self.cluster().set_registry_reachable(reachable)
    }

    /// A change of the workers' own records in etcd.
    pub fn member_event(&self, event: MemberEvent) {
        self.cluster().member_event(event)
    }

    /// Rank 0's NCCL unique id for `epoch`.
    pub fn publish_nccl_id(&self, worker: &str, epoch: u64, unique_id: Vec<u8>) -> Result<(), PublishError> {
        self.cluster().publish_nccl_id(worker, epoch, unique_id)
    }

    pub fn heartbeat(&self, id: &str, status: WorkerStatus) -> HeartbeatResponse {
        self.cluster().heartbeat(id, status)
    }

    /// The active placement, or with `target` the one loading if any.
    pub fn placement(&self, target: bool) -> Option<Placement> {
        self.cluster().placement(target)
    }

    /// The least busy attention worker not in `exclude`, if the cluster can serve.
    pub fn pick(&self, exclude: &[String]) -> Result<Assignment, PickError> {
        let (worker_id, address) = self.cluster().pick(exclude)?;
        Ok(Assignment {
            worker_id,
            address,
            handle: self.clone(),
        })
    }

    /// Starts draining a worker; returns what will happen.
    pub fn drain(&self, worker: &str) -> Result<String, DrainError> {
        self.cluster().drain(worker)
    }

    /// Drops a worker another one saw fail; true when it was a member.
    pub fn report_failure(&self, reporter: &str, worker: &str, reason: &str) -> bool {
        self.cluster().report_failure(reporter, worker, reason)
    }

    pub fn status(&self) -> ClusterStatusResponse {
        self.cluster().status()
    }

    /// Workers that left so far, by cause.
    pub fn departures(&self) -> crate::departures::Departures {
        self.cluster().departures()
    }

    /// Plans a placement for the load of the window and makes it the target.
    pub fn rebalance(&self, force: bool) -> Result<RebalanceResponse, PlacementError> {
        self.cluster().rebalance(force)
    }

    /// Goes on leading under a new election key (the old lease was lost while nobody else won):
    /// later writes are fenced on it, the prefix is claimed again (etcd may have lost its data)
    /// and the placement recorded again. The state itself is kept as it is.
    pub async fn refence(&self, fence: Fence) {
        let (store, model_id) = {
            let cluster = self.cluster();
            (cluster.store().clone(), cluster.model_id().to_owned())
        };
        store.set_fence(Some(fence)).await;
        if let Err(e) = store.claim(&model_id).await {
            tracing::error!(error = %e, "claiming the cluster prefix again failed");
        }
        self.cluster().record_all();
    }

    /// Makes this coordinator's state the cluster's: loads what earlier leaders recorded, merges
    /// it with what this one knows, and records the result under `fence`.
    ///
    /// Dropping the future part-way (the election lost its lease meanwhile) leaves the state as
    /// it was: only the last step changes it, and the next term takes over again.
    pub async fn lead(&self, fence: Option<Fence>) {
        let _quiet = self.shared.takeover.lock().await;
        let (store, model_id) = {
            let cluster = self.cluster();
            (cluster.store().clone(), cluster.model_id().to_owned())
        };
        store.set_fence(fence).await;
        if let Err(e) = store.claim(&model_id).await {
            tracing::error!(error = %e, "claiming the cluster prefix again failed");
        }
        let mut snapshot = None;
        for attempt in 1..=3 {
            match store.load().await {
                Ok(s) => {
                    snapshot = Some(s);
                    break;
                }
                Err(e) => tracing::warn!(attempt, error = %e, "reading the registry failed"),
            }
        }
        self.cluster().take_over(snapshot);
    }
}
