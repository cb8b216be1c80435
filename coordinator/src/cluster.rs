//! The cluster as the leader knows it: members, the expert placement's lifecycle, requests in
//! flight, the expert load window and the NCCL group, and the rules that tie them together (a
//! heartbeat may activate a placement or release a drained worker; a lost worker retargets the
//! placement). Plain data: every method is synchronous and quick, so [`crate::state`] can keep
//! it behind a mutex. Registry writes are handed to the write-behind [`Store`] and never waited
//! on.

mod status;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moe_model::ModelConfig;
use moe_proto::v1::{HeartbeatResponse, Placement, RebalanceResponse, Role, WorkerStatus};

use crate::departures::{Departure, Departures};
use crate::load::LoadWindow;
use crate::members::{DrainError, Members};
use crate::nccl::{NcclPlane, PublishError};
use crate::placements::{BalanceConfig, PlacementConfig, PlacementError, Placements};
use crate::registry::watch::MemberEvent;
use crate::registry::{Member, Snapshot};
use crate::requests::{InFlight, PickError};
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub model: ModelConfig,
    pub model_id: String,
    /// Expert workers to wait for before the first placement.
    pub min_expert_workers: usize,
    /// A worker not heard from for this long is dropped.
    pub heartbeat_timeout: Duration,
    /// Members keep their own records in etcd: every worker must (else a successor could not
    /// know it).
    pub members_in_etcd: bool,
    pub balance: BalanceConfig,
}

/// Why a worker's registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("role must be attention or expert")]
    NoRole,
    #[error("worker at {address} serves model {theirs}, but this cluster serves {ours}: refusing it")]
    OtherModel {
        address: String,
        theirs: String,
        ours: String,
    },
    #[error("address `{0}` is not host:port")]
    Address(String),
    #[error(transparent)]
    Id(#[from] moe_runtime::member::BadWorkerId),
    #[error(transparent)]
    Away(#[from] RegistryAway),
    #[error(
        "worker id `{id}` is in use by a live worker at {address}; retry once it is gone, or give this one another --worker-id"
    )]
    IdInUse { id: String, address: String },
    #[error(
        "this cluster keeps its members in etcd: start the worker with --etcd and --etcd-prefix (as the coordinators) so that it records itself"
    )]
    NotRecorded,
}

/// etcd is unreachable: a change whose outcome a successor could not read waits until it is
/// back. Serving goes on meanwhile; only dropping failed workers does not wait (serving needs it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("etcd is unreachable: membership and placement changes wait until it is back (serving goes on)")]
pub struct RegistryAway;

pub struct Cluster {
    config: ClusterConfig,
    members: Members,
    store: Store,
    placements: Placements,
    inflight: InFlight,
    load: LoadWindow,
    nccl: NcclPlane,
    /// The leader reaches etcd (always, with the in-memory registry).
    registry_reachable: bool,
    /// Workers that left, by cause (for moe_worker_departures_total).
    departures: Departures,
}

impl Cluster {
    /// An empty cluster recording membership and placements through `store`.
    pub fn new(config: ClusterConfig, store: Store) -> Self {
        let m = &config.model;
        let load = LoadWindow::new(config.balance.window, m.num_layers, m.num_experts);
        let placements = Placements::new(PlacementConfig {
            num_layers: m.num_layers,
            num_experts: m.num_experts,
            min_expert_workers: config.min_expert_workers,
            balance: config.balance.clone(),
        });
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Cluster {
            config,
            members: Members::default(),
            store,
            placements,
            inflight: InFlight::default(),
            load,
            nccl: NcclPlane::starting_after(millis),
            registry_reachable: true,
            departures: Departures::default(),
        }
    }

    /// Told by the leadership loop whether etcd answers.
    pub fn set_registry_reachable(&mut self, reachable: bool) {
        if reachable != self.registry_reachable {
            tracing::warn!(
                reachable,
                "etcd reachability changed: membership and placement changes {}",
                if reachable { "resume" } else { "wait" }
            );
        }
        self.registry_reachable = reachable;
    }

    fn changes_allowed(&self) -> Result<(), RegistryAway> {
        if self.registry_reachable {
            Ok(())
        } else {
            Err(RegistryAway)
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn model_id(&self) -> &str {
        &self.config.model_id
    }

    /// A worker joining through the control plane; returns its id. The same id and incarnation
    /// again (a worker registering twice, or one known from its record) is the same member; the
    /// same id from another process replaces the member once that member is silent (a restarted
    /// worker, which holds nothing yet), and is refused while it still heartbeats (two workers
    /// given one id would otherwise take turns replacing each other).
    pub fn register(&mut self, joining: Member, recorded: bool) -> Result<String, RegisterError> {
        if self.config.members_in_etcd && !recorded {
            return Err(RegisterError::NotRecorded);
        }
        self.check_joining(&joining)?;
        if let Some(known) = self.members.get(&joining.id) {
            if known.incarnation == joining.incarnation && known.address == joining.address {
                if !known.proven {
                    self.members.prove(&joining.id);
                    self.reconcile();
                }
                return Ok(joining.id);
            }
            if known.proven && known.last_seen.elapsed() < self.config.heartbeat_timeout {
                return Err(RegisterError::IdInUse {
                    id: joining.id,
                    address: known.address.clone(),
                });
            }
            self.changes_allowed()?;
            tracing::warn!(worker = %joining.id, "a new process took this worker id: replacing the member");
            self.forget(&joining.id, Departure::Replaced);
        } else {
            self.changes_allowed()?;
        }
        let member = self.members.add(joining);
        tracing::info!(worker = %member.id, role = ?member.role, address = %member.address, nccl = member.nccl, "worker registered");
        self.reconcile();
        Ok(member.id)
    }

    fn check_joining(&self, m: &Member) -> Result<(), RegisterError> {
        if m.role == Role::Unspecified {
            return Err(RegisterError::NoRole);
        }
        if m.model_id != self.config.model_id {
            return Err(RegisterError::OtherModel {
                address: m.address.clone(),
                theirs: m.model_id.clone(),
                ours: self.config.model_id.clone(),
            });
        }
        if m.address.parse::<std::net::SocketAddr>().is_err() && !m.address.contains(':') {
            return Err(RegisterError::Address(m.address.clone()));
        }
        if !m.id.is_empty() {
            moe_runtime::member::check_worker_id(&m.id)?;
        }
        Ok(())
    }

    /// A change of the workers' own records in etcd: a new record is a worker joining, pending
    /// until it proves itself with a heartbeat (then it is given experts or requests); a record
    /// that is gone drops its member unless the member still heartbeats (it lost its lease to an
    /// etcd outage and records itself again). Records never override a member that heartbeats:
    /// heartbeats are the fresher word.
    pub fn member_event(&mut self, event: MemberEvent) {
        match event {
            MemberEvent::Recorded(m) => {
                let id = m.id.clone();
                let mut replaced = false;
                if let Some(known) = self.members.get(&id) {
                    // The record of another process with this id replaces the member only once
                    // the member is silent: a live member's record may simply be older (the
                    // previous process's, not yet expired) than its registration.
                    if known.incarnation == m.incarnation || known.last_seen.elapsed() < self.config.heartbeat_timeout {
                        return;
                    }
                    replaced = self.forget(&id, Departure::Replaced);
                }
                if let Err(why) = self.check_joining(&m) {
                    tracing::warn!(worker = %id, %why, "member record refused");
                } else {
                    self.members.add_pending(m);
                    tracing::info!(worker = %id, "worker recorded in etcd: it serves once it heartbeats");
                }
                if replaced {
                    self.reconcile();
                }
            }
            MemberEvent::Gone(id) => {
                let Some(known) = self.members.get(&id) else { return };
                if known.last_seen.elapsed() < self.config.heartbeat_timeout {
                    tracing::info!(worker = %id, "member record gone, but the worker heartbeats: keeping it");
                } else if self.forget(&id, Departure::LeaseExpired) {
                    tracing::warn!(worker = %id, "member record gone (its lease ended): dropped");
                    self.reconcile();
                }
            }
        }
    }

    /// Takes in a worker's status; the reply says which placements are active and loading,
    /// whether the worker is released (drained), and its NCCL group.
    pub fn heartbeat(&mut self, id: &str, mut status: WorkerStatus) -> HeartbeatResponse {
        let address = status.address.clone();
        // Load counters feed the window; the stored status stays small.
        let tokens = std::mem::take(&mut status.expert_tokens);
        self.nccl.report(id, status.nccl_ready_epoch, Instant::now());
        let known = self.members.heartbeat(id, &address, status);
        if known && let Err(why) = self.load.observe(id, &tokens) {
            tracing::warn!(worker = %id, %why, "load report ignored");
        }
        self.reconcile();
        let active = self.placements.active().map_or(0, |p| p.version);
        let released = known && self.releasable(id);
        if released {
            tracing::info!(worker = %id, "drained: released");
            self.forget(id, Departure::Drained);
        }
        HeartbeatResponse {
            known,
            placement_version: active,
            target_placement_version: self.placements.latest().map_or(0, |p| p.version),
            released,
            nccl: self.nccl.view(id),
        }
    }

    /// The active placement, or with `target` the one loading if any.
    pub fn placement(&self, target: bool) -> Option<Placement> {
        let p = if target {
            self.placements.latest()
        } else {
            self.placements.active()
        };
        p.map(|p| p.to_proto())
    }

    /// The attention worker for a request, `(id, address)`; see [`InFlight::pick`].
    pub fn pick(&mut self, exclude: &[String]) -> Result<(String, String), PickError> {
        if self.placements.active().is_none() {
            return Err(PickError::NoPlacement);
        }
        self.inflight.pick(&self.members, exclude)
    }

    /// A request picked for `worker` finished.
    pub fn done(&mut self, worker: &str) {
        self.inflight.done(worker);
    }

    /// Starts draining a worker; returns what will happen.
    pub fn drain(&mut self, worker: &str) -> Result<String, DrainError> {
        self.changes_allowed()?;
        let role = self.members.drain(worker)?;
        tracing::info!(%worker, ?role, "draining");
        self.reconcile();
        Ok(match role {
            Role::Expert => {
                format!("`{worker}`: its experts move to the other workers; it leaves once that placement is active")
            }
            _ => format!("`{worker}`: no new requests; it leaves once its running requests finish"),
        })
    }

    /// Drops a worker another one saw fail; true when it was a member.
    pub fn report_failure(&mut self, reporter: &str, worker: &str, reason: &str) -> bool {
        // Only attention workers dispatch to others, so only their reports count: anything
        // else reporting is a confused or hostile caller, and a report drops a worker.
        if self.members.get(reporter).is_none_or(|m| m.role != Role::Attention) {
            tracing::warn!(%reporter, %worker, "failure report from no attention worker of the cluster: ignored");
            return false;
        }
        let removed = self.forget(worker, Departure::ReportedFailed);
        if removed {
            tracing::warn!(%worker, %reporter, %reason, "worker reported failed: dropped");
            self.reconcile();
        }
        removed
    }

    /// Plans a placement for the load of the window and makes it the target.
    pub fn rebalance(&mut self, force: bool) -> Result<RebalanceResponse, PlacementError> {
        self.changes_allowed()?;
        let r = self
            .placements
            .rebalance(force, &self.members, &self.load, Instant::now())?;
        if r.target_version != 0 {
            self.reconcile();
        }
        Ok(r)
    }

    /// Rank 0's NCCL unique id for `epoch`.
    pub fn publish_nccl_id(&mut self, worker: &str, epoch: u64, unique_id: Vec<u8>) -> Result<(), PublishError> {
        let result = self.nccl.publish(worker, epoch, unique_id);
        if let Err(why) = &result {
            tracing::warn!(%worker, epoch, %why, "NCCL unique id refused");
        }
        result
    }

    /// Periodic work: drops workers not heard from, moves the placement on, and rebalances by
    /// itself when configured to.
    pub fn tick(&mut self) {
        let timeout = self.config.heartbeat_timeout;
        for w in self.members.expire(timeout) {
            tracing::warn!(worker = %w.id, role = ?w.role, "no heartbeat within {timeout:?}: dropped");
            self.departures.count(Departure::HeartbeatTimeout);
            self.forget_removed(&w.id);
        }
        self.reconcile();
        if self.registry_reachable
            && self
                .placements
                .auto_rebalance(&self.members, &self.load, Instant::now())
        {
            self.reconcile();
        }
    }

    /// Merges what earlier leaders recorded (`None`: the registry could not be read) with what
    /// this coordinator knows, and records the result under this leader's term.
    pub fn take_over(&mut self, recorded: Option<Snapshot>) {
        let Some(snapshot) = recorded else {
            tracing::error!(
                "could not read the registry: leading with what this coordinator knows; unknown workers will register again"
            );
            return self.record_all();
        };
        let adopted = snapshot
            .members
            .into_iter()
            .filter(|m| self.members.adopt(m.clone()))
            .count();
        if let Some(p) = snapshot.placement {
            self.placements.adopt(&p);
        }
        tracing::info!(
            adopted,
            members = self.members.iter().count(),
            placement = self.placements.active().map_or(0, |p| p.version),
            "leading"
        );
        self.record_all();
        self.reconcile();
    }

    /// Records the active placement under this leader's term.
    pub fn record_all(&mut self) {
        if let Some(p) = self.placements.active() {
            self.store.put_placement(p.to_proto());
        }
    }

    /// Brings the NCCL group and the placement in line with the staying members.
    fn reconcile(&mut self) {
        self.nccl.set_members(
            self.members
                .staying()
                .filter(|w| w.nccl)
                .map(|w| (w.id.as_str(), w.role)),
        );
        if let Some(active) = self.placements.reconcile(&self.members, &self.load) {
            self.store.put_placement(active.to_proto());
        }
    }

    /// A draining worker nothing depends on any more.
    fn releasable(&self, id: &str) -> bool {
        let Some(w) = self.members.get(id).filter(|w| w.draining) else {
            return false;
        };
        match w.role {
            Role::Expert => self.placements.releases(id),
            _ => self.inflight.of(id) == 0 && w.status.running == 0 && w.status.waiting == 0,
        }
    }

    /// Drops a member from the view, counting why; true when it was one.
    fn forget(&mut self, id: &str, why: Departure) -> bool {
        let known = self.members.remove(id).is_some();
        if known {
            self.departures.count(why);
            self.forget_removed(id);
        }
        known
    }

    /// Workers that left so far, by cause.
    pub fn departures(&self) -> Departures {
        self.departures
    }

    /// Everything kept about a member already gone from the view.
    fn forget_removed(&mut self, id: &str) {
        self.inflight.forget(id);
        self.load.forget(id);
    }
}
