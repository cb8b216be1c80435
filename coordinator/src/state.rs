//! Cluster state, owned by one task. The gRPC handlers reach it through [`StateHandle`]
//! (mpsc + oneshot), so there are no locks to get wrong and every change happens in order.
//!
//! Expert placement is versioned: when the set of expert workers changes, a new *target*
//! placement is computed and expert workers load their slots for it; only when every worker in
//! it reports the version loaded does it become *active*, the one attention workers route with.
//! Serving never stops for a placement change.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use moe_model::ModelConfig;
use moe_proto::v1::{ClusterStatusResponse, HeartbeatResponse, Placement, RebalanceResponse, Role, WorkerStatus};
use moe_runtime::PlacementView;
use moe_runtime::placement::ExpertWorkerRef;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::load::LoadWindow;
use crate::members::Members;
use crate::nccl::NcclPlane;
use crate::planner::{self, WorkerSlots};
use crate::registry::Fence;
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub model: ModelConfig,
    pub model_id: String,
    /// Expert workers to wait for before the first placement.
    pub min_expert_workers: usize,
    /// A worker not heard from for this long is dropped.
    pub heartbeat_timeout: Duration,
    pub balance: BalanceConfig,
}

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

/// An attention worker chosen for a request; dropping it releases the slot.
pub struct Assignment {
    pub worker_id: String,
    pub address: String,
    handle: StateHandle,
}

impl Drop for Assignment {
    fn drop(&mut self) {
        let _ = self.handle.tx.send(Command::Done(self.worker_id.clone()));
    }
}

enum Command {
    Register {
        role: Role,
        address: String,
        model_id: String,
        nccl: bool,
        reply: oneshot::Sender<Result<String, Status>>,
    },
    Heartbeat {
        id: String,
        status: Box<WorkerStatus>,
        reply: oneshot::Sender<HeartbeatResponse>,
    },
    Placement {
        target: bool,
        reply: oneshot::Sender<Option<Placement>>,
    },
    Pick {
        exclude: Vec<String>,
        reply: oneshot::Sender<Result<(String, String), String>>,
    },
    Done(String),
    Drain {
        worker: String,
        reply: oneshot::Sender<Result<String, Status>>,
    },
    ReportFailure {
        reporter: String,
        worker: String,
        reason: String,
        reply: oneshot::Sender<bool>,
    },
    Status {
        reply: oneshot::Sender<ClusterStatusResponse>,
    },
    Rebalance {
        force: bool,
        reply: oneshot::Sender<Result<RebalanceResponse, Status>>,
    },
    /// This coordinator became the leader: take over what the registry holds.
    Lead {
        fence: Option<Fence>,
        reply: oneshot::Sender<()>,
    },
    PublishNcclId {
        worker: String,
        epoch: u64,
        unique_id: Vec<u8>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Tick,
}

/// Cheap, cloneable access to the state task.
#[derive(Clone)]
pub struct StateHandle {
    tx: mpsc::UnboundedSender<Command>,
}

fn stopped() -> Status {
    Status::unavailable("coordinator is shutting down")
}

impl StateHandle {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Status> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    pub async fn register(&self, role: Role, address: String, model_id: String, nccl: bool) -> Result<String, Status> {
        self.ask(|reply| Command::Register {
            role,
            address,
            model_id,
            nccl,
            reply,
        })
        .await?
    }

    /// Rank 0's NCCL unique id for `epoch`; `Err` says why it was refused.
    pub async fn publish_nccl_id(
        &self,
        worker: String,
        epoch: u64,
        unique_id: Vec<u8>,
    ) -> Result<Result<(), String>, Status> {
        self.ask(|reply| Command::PublishNcclId {
            worker,
            epoch,
            unique_id,
            reply,
        })
        .await
    }

    pub async fn heartbeat(&self, id: String, status: WorkerStatus) -> Result<HeartbeatResponse, Status> {
        self.ask(|reply| Command::Heartbeat {
            id,
            status: Box::new(status),
            reply,
        })
        .await
    }

    pub async fn placement(&self, target: bool) -> Result<Option<Placement>, Status> {
        self.ask(|reply| Command::Placement { target, reply }).await
    }

    /// The least busy attention worker not in `exclude`, if the cluster can serve.
    pub async fn pick(&self, exclude: Vec<String>) -> Result<Result<Assignment, String>, Status> {
        let picked = self.ask(|reply| Command::Pick { exclude, reply }).await?;
        Ok(picked.map(|(worker_id, address)| Assignment {
            worker_id,
            address,
            handle: self.clone(),
        }))
    }

    /// Starts draining a worker; returns what will happen.
    pub async fn drain(&self, worker: String) -> Result<String, Status> {
        self.ask(|reply| Command::Drain { worker, reply }).await?
    }

    /// Drops a worker another one saw fail; true when it was a member.
    pub async fn report_failure(&self, reporter: String, worker: String, reason: String) -> Result<bool, Status> {
        self.ask(|reply| Command::ReportFailure {
            reporter,
            worker,
            reason,
            reply,
        })
        .await
    }

    pub async fn status(&self) -> Result<ClusterStatusResponse, Status> {
        self.ask(|reply| Command::Status { reply }).await
    }

    /// Plans a placement for the load of the window and makes it the target.
    pub async fn rebalance(&self, force: bool) -> Result<RebalanceResponse, Status> {
        self.ask(|reply| Command::Rebalance { force, reply }).await?
    }

    /// Makes this coordinator's state the cluster's: loads what earlier leaders recorded, merges
    /// it with what this one knows, and records the result under `fence`.
    pub async fn lead(&self, fence: Option<Fence>) -> Result<(), Status> {
        self.ask(|reply| Command::Lead { fence, reply }).await
    }
}

struct State {
    config: StateConfig,
    members: Members,
    store: Store,
    active: Option<PlacementView>,
    target: Option<PlacementView>,
    last_version: u64,
    /// Requests the coordinator has handed to each attention worker and not seen finish.
    inflight: HashMap<String, usize>,
    /// Workers being drained.
    draining: std::collections::HashSet<String>,
    load: LoadWindow,
    /// When the placement was last rebalanced (or an automatic attempt made).
    last_rebalance: Option<Instant>,
    nccl: NcclPlane,
}

/// Starts the state task, recording membership and placements through `store`. It serves once
/// told to [`StateHandle::lead`].
pub fn spawn(config: StateConfig, store: Store) -> StateHandle {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let tick = config.heartbeat_timeout / 4;
    let load = LoadWindow::new(config.balance.window, config.model.num_layers, config.model.num_experts);
    let mut state = State {
        load,
        last_rebalance: None,
        config,
        members: Members::default(),
        store,
        active: None,
        target: None,
        last_version: 0,
        inflight: HashMap::new(),
        draining: Default::default(),
        nccl: NcclPlane::starting_after(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        ),
    };
    let ticker = tx.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(tick.max(Duration::from_millis(50)));
        loop {
            interval.tick().await;
            if ticker.send(Command::Tick).is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        while let Some(cmd) = rx.recv().await {
            state.handle(cmd).await;
        }
    });
    StateHandle { tx }
}

impl State {
    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Register {
                role,
                address,
                model_id,
                nccl,
                reply,
            } => {
                let result = self.register(role, address, model_id, nccl);
                let _ = reply.send(result);
            }
            Command::Heartbeat { id, mut status, reply } => {
                let address = status.address.clone();
                // Load counters feed the window; the stored status stays small.
                let tokens = std::mem::take(&mut status.expert_tokens);
                self.nccl
                    .report(&id, status.nccl_ready_epoch, std::time::Instant::now());
                let known = self.members.heartbeat(&id, &address, *status);
                if known && let Err(why) = self.load.observe(&id, &tokens) {
                    tracing::warn!(worker = %id, %why, "load report ignored");
                }
                self.reconcile();
                let active = self.active.as_ref().map_or(0, |p| p.version);
                let released = known && self.releasable(&id);
                if released {
                    tracing::info!(worker = %id, "drained: released");
                    self.forget(&id);
                }
                let _ = reply.send(HeartbeatResponse {
                    known,
                    placement_version: active,
                    target_placement_version: self.target.as_ref().map_or(active, |p| p.version),
                    released,
                    nccl: self.nccl.view(&id),
                });
            }
            Command::Drain { worker, reply } => {
                let _ = reply.send(self.drain(worker));
            }
            Command::Placement { target, reply } => {
                let p = if target {
                    self.target.as_ref().or(self.active.as_ref())
                } else {
                    self.active.as_ref()
                };
                let _ = reply.send(p.map(PlacementView::to_proto));
            }
            Command::Pick { exclude, reply } => {
                let _ = reply.send(self.pick(&exclude));
            }
            Command::Done(id) => {
                if let Some(n) = self.inflight.get_mut(&id) {
                    *n = n.saturating_sub(1);
                }
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::ReportFailure {
                reporter,
                worker,
                reason,
                reply,
            } => {
                let removed = self.forget(&worker);
                if removed {
                    tracing::warn!(%worker, %reporter, %reason, "worker reported failed: dropped");
                    self.reconcile();
                }
                let _ = reply.send(removed);
            }
            Command::Tick => {
                for w in self.members.expire(self.config.heartbeat_timeout) {
                    tracing::warn!(worker = %w.id, role = ?w.role, "no heartbeat within {:?}: dropped", self.config.heartbeat_timeout);
                    self.forget_removed(&w.id);
                }
                self.reconcile();
                self.auto_rebalance();
            }
            Command::PublishNcclId {
                worker,
                epoch,
                unique_id,
                reply,
            } => {
                let result = self.nccl.publish(&worker, epoch, unique_id);
                if let Err(why) = &result {
                    tracing::warn!(%worker, epoch, %why, "NCCL unique id refused");
                }
                let _ = reply.send(result);
            }
            Command::Rebalance { force, reply } => {
                let _ = reply.send(self.rebalance(force));
            }
            Command::Lead { fence, reply } => {
                self.lead(fence).await;
                let _ = reply.send(());
            }
        }
    }

    /// Drops a member from the view and the registry; true when it was one.
    fn forget(&mut self, id: &str) -> bool {
        let known = self.members.remove(id).is_some();
        if known {
            self.forget_removed(id);
        }
        known
    }

    /// Everything kept about a member already gone from the view.
    fn forget_removed(&mut self, id: &str) {
        self.inflight.remove(id);
        self.draining.remove(id);
        self.load.forget(id);
        self.store.remove_member(id.to_owned());
    }

    async fn lead(&mut self, fence: Option<Fence>) {
        self.store.set_fence(fence).await;
        if let Err(e) = self.store.claim(&self.config.model_id).await {
            tracing::error!(error = %e, "claiming the cluster prefix again failed");
        }
        let mut snapshot = None;
        for attempt in 1..=3 {
            match self.store.load().await {
                Ok(s) => {
                    snapshot = Some(s);
                    break;
                }
                Err(e) => tracing::warn!(attempt, error = %e, "reading the registry failed"),
            }
        }
        let Some(snapshot) = snapshot else {
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
            match PlacementView::from_proto(&p) {
                // A newer placement than ours: another coordinator led since; it is the truth.
                Ok(view) if view.version > self.last_version => {
                    self.last_version = view.version;
                    self.target = None;
                    self.active = Some(view);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "the recorded placement is invalid: ignored"),
            }
        }
        tracing::info!(
            adopted,
            members = self.members.iter().count(),
            placement = self.active.as_ref().map_or(0, |p| p.version),
            "leading"
        );
        self.record_all();
        self.reconcile();
    }

    /// Records every member and the active placement under this leader's term.
    fn record_all(&mut self) {
        for w in self.members.iter() {
            self.store.put_member(w.member());
        }
        if let Some(p) = &self.active {
            self.store.put_placement(p.to_proto());
        }
    }

    fn register(&mut self, role: Role, address: String, model_id: String, nccl: bool) -> Result<String, Status> {
        if role == Role::Unspecified {
            return Err(Status::invalid_argument("role must be attention or expert"));
        }
        if model_id != self.config.model_id {
            return Err(Status::failed_precondition(format!(
                "worker at {address} serves model {model_id}, but this cluster serves {}: refusing it",
                self.config.model_id
            )));
        }
        if address.parse::<std::net::SocketAddr>().is_err() && !address.contains(':') {
            return Err(Status::invalid_argument(format!(
                "address `{address}` is not host:port"
            )));
        }
        let member = self.members.add(role, address.clone(), model_id, nccl);
        let id = member.id.clone();
        self.store.put_member(member);
        tracing::info!(worker = %id, ?role, %address, nccl, "worker registered");
        self.reconcile();
        Ok(id)
    }

    fn drain(&mut self, worker: String) -> Result<String, Status> {
        let role = self
            .members
            .iter()
            .find(|w| w.id == worker)
            .map(|w| w.role)
            .ok_or_else(|| Status::not_found(format!("no worker `{worker}` in the cluster")))?;
        let others = self
            .members
            .iter()
            .filter(|w| w.role == role && w.id != worker && !self.draining.contains(&w.id))
            .count();
        if others == 0 {
            return Err(Status::failed_precondition(format!(
                "`{worker}` is the last {} worker; draining it would stop the cluster",
                if role == Role::Expert { "expert" } else { "attention" }
            )));
        }
        self.draining.insert(worker.clone());
        tracing::info!(%worker, ?role, "draining");
        self.reconcile();
        Ok(match role {
            Role::Expert => {
                format!("`{worker}`: its experts move to the other workers; it leaves once that placement is active")
            }
            _ => format!("`{worker}`: no new requests; it leaves once its running requests finish"),
        })
    }

    /// A draining worker nothing depends on any more.
    fn releasable(&self, id: &str) -> bool {
        if !self.draining.contains(id) {
            return false;
        }
        let Some(w) = self.members.iter().find(|w| w.id == id) else {
            return false;
        };
        match w.role {
            Role::Expert => {
                self.target.is_none()
                    && self
                        .active
                        .as_ref()
                        .is_some_and(|p| p.workers.iter().all(|x| x.id != id))
            }
            _ => self.inflight.get(id).copied().unwrap_or(0) == 0 && w.status.running == 0 && w.status.waiting == 0,
        }
    }

    /// Expected imbalance of the active placement under the window's load (worst layer), or
    /// 0 when there is no load or no placement.
    fn imbalance(&self, load: &[Vec<f64>]) -> f64 {
        let Some(active) = &self.active else { return 0.0 };
        if load.iter().flatten().all(|&x| x == 0.0) {
            return 0.0;
        }
        planner::imbalance(active, load).into_iter().fold(0.0, f64::max)
    }

    fn rebalance(&mut self, force: bool) -> Result<RebalanceResponse, Status> {
        if let Some(t) = &self.target {
            return Err(Status::failed_precondition(format!(
                "placement {} is still loading; rebalance once it is active",
                t.version
            )));
        }
        let Some(active) = self.active.clone() else {
            return Err(Status::unavailable("no placement yet: waiting for expert workers"));
        };
        let load = self.load.matrix();
        let seen: f64 = load.iter().flatten().sum();
        if seen == 0.0 {
            return Err(Status::failed_precondition(format!(
                "no expert load seen in the last {:?}: nothing to balance on",
                self.load.window()
            )));
        }
        let before = self.imbalance(&load);
        let slots = self.worker_slots(self.expert_workers());
        let current = (!force).then_some(&active);
        let plan = planner::plan(self.last_version + 1, &load, &slots, current, BALANCED)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let after = planner::imbalance(&plan, &load).into_iter().fold(0.0, f64::max);
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
        self.last_rebalance = Some(Instant::now());
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
        self.reconcile();
        Ok(RebalanceResponse {
            target_version,
            imbalance_before: before,
            imbalance_after: after,
            detail,
        })
    }

    /// Slots per layer each expert worker offers: an even share of the experts plus its spares.
    fn worker_slots(&self, experts: Vec<ExpertWorkerRef>) -> Vec<WorkerSlots> {
        let e = self.config.model.num_experts;
        let share = e.div_ceil(experts.len().max(1));
        experts
            .into_iter()
            .map(|worker| {
                let spare = self
                    .members
                    .get(&worker.id)
                    .map_or(0, |w| w.status.spare_slots as usize);
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
    fn placement_for(&self, version: u64, experts: Vec<ExpertWorkerRef>) -> PlacementView {
        let m = &self.config.model;
        let load = self.load.matrix();
        let slots = self.worker_slots(experts.clone());
        let share = m.num_experts.div_ceil(experts.len().max(1));
        let spares = slots.iter().any(|w| w.slots > share);
        if spares && load.iter().flatten().any(|&x| x > 0.0) {
            match planner::plan(version, &load, &slots, None, BALANCED) {
                Ok(p) => return p,
                Err(e) => tracing::warn!(error = %e, "load-aware placement not possible; even slices"),
            }
        }
        PlacementView::even_slices(version, m.num_layers, m.num_experts, experts)
    }

    /// Rebalances by itself when the threshold is set and passed, at most once per interval.
    fn auto_rebalance(&mut self) {
        let b = self.config.balance.clone();
        let recent = self.last_rebalance.is_some_and(|t| t.elapsed() < b.min_interval);
        if b.threshold <= 0.0 || self.target.is_some() || recent {
            return;
        }
        let load = self.load.matrix();
        if (load.iter().flatten().sum::<f64>() as u64) < b.min_tokens {
            return;
        }
        let imbalance = self.imbalance(&load);
        if imbalance > b.threshold {
            // Whatever the outcome, wait an interval before trying again.
            self.last_rebalance = Some(Instant::now());
            match self.rebalance(false) {
                Ok(r) => tracing::info!(imbalance, threshold = b.threshold, detail = %r.detail, "automatic rebalance"),
                Err(s) => tracing::warn!(imbalance, status = %s, "automatic rebalance not possible"),
            }
        }
    }

    fn expert_workers(&self) -> Vec<ExpertWorkerRef> {
        self.members
            .iter()
            .filter(|w| w.role == Role::Expert && !self.draining.contains(&w.id))
            .map(|w| ExpertWorkerRef {
                id: w.id.clone(),
                address: w.address.clone(),
            })
            .collect()
    }

    /// Moves the placement towards the live expert workers: a new target when they changed,
    /// activation once every worker of the target has loaded it.
    fn reconcile(&mut self) {
        self.nccl.set_members(
            self.members
                .iter()
                .filter(|w| w.nccl && !self.draining.contains(&w.id))
                .map(|w| (w.id.as_str(), w.role)),
        );
        let experts = self.expert_workers();
        let latest = self.target.as_ref().or(self.active.as_ref());
        // The same workers in another order (a new leader adopting them) need no new placement.
        let changed =
            latest.is_none_or(|p| p.workers.len() != experts.len() || p.workers.iter().any(|w| !experts.contains(w)));
        let enough =
            experts.len() >= self.config.min_expert_workers.max(1) || (self.active.is_some() && !experts.is_empty());
        if changed && enough {
            self.last_version += 1;
            let p = self.placement_for(self.last_version, experts);
            tracing::info!(version = p.version, workers = p.workers.len(), "new target placement");
            self.target = Some(p);
        }
        let Some(target) = &self.target else { return };
        let loaded = target.workers.iter().all(|w| {
            self.members
                .iter()
                .any(|r| r.id == w.id && r.status.placement_version >= target.version)
        });
        if loaded {
            tracing::info!(version = target.version, "placement active");
            self.active = self.target.take();
            if let Some(p) = &self.active {
                self.store.put_placement(p.to_proto());
            }
        }
    }

    fn pick(&mut self, exclude: &[String]) -> Result<(String, String), String> {
        if self.active.is_none() {
            return Err("no expert placement is active yet (waiting for expert workers to load)".into());
        }
        let best = self
            .members
            .iter()
            // Only workers that already route with a placement can serve.
            .filter(|w| {
                w.role == Role::Attention
                    && w.status.placement_version > 0
                    && !exclude.contains(&w.id)
                    && !self.draining.contains(&w.id)
            })
            .min_by_key(|w| {
                let s = &w.status;
                let inflight = self.inflight.get(&w.id).copied().unwrap_or(0);
                let kv_permille = (s.kv_blocks_used as u64 * 1000)
                    .checked_div(s.kv_blocks_total as u64)
                    .unwrap_or(0);
                (inflight.max((s.running + s.waiting) as usize), kv_permille)
            })
            .map(|w| (w.id.clone(), w.address.clone()));
        match best {
            Some((id, addr)) => {
                *self.inflight.entry(id.clone()).or_default() += 1;
                Ok((id, addr))
            }
            None => Err("no attention worker has received the expert placement yet".into()),
        }
    }

    fn status(&self) -> ClusterStatusResponse {
        let now = Instant::now();
        let active = self.active.as_ref();
        let load = self.load.matrix();
        let shares = active.map(|p| planner::load_shares(p, &load)).unwrap_or_default();
        let workers = self
            .members
            .iter()
            .map(|w| {
                let mut s = w.status.clone();
                s.worker_id = w.id.clone();
                s.role = w.role as i32;
                s.address = w.address.clone();
                s.millis_since_heartbeat = now.duration_since(w.last_seen).as_millis() as u64;
                if w.role == Role::Expert {
                    let e = self.config.model.num_experts;
                    if let Some(p) = active {
                        s.expert_slots = p.slots_of(&w.id).into_iter().map(|(l, x)| (l * e + x) as u32).collect();
                        s.load_share = p
                            .workers
                            .iter()
                            .position(|x| x.id == w.id)
                            .and_then(|i| shares.get(i).copied())
                            .unwrap_or(0.0);
                    }
                }
                s
            })
            .collect::<Vec<_>>();
        let running = workers.iter().map(|w| w.running).sum();
        let queued = workers.iter().map(|w| w.waiting).sum();
        ClusterStatusResponse {
            expert_load: self.load.totals(),
            num_layers: self.config.model.num_layers as u32,
            num_experts: self.config.model.num_experts as u32,
            load_window_s: self.load.window().as_secs_f64(),
            load_imbalance: self.imbalance(&load),
            model_id: self.config.model_id.clone(),
            placement_version: active.map_or(0, |p| p.version),
            workers,
            queued_requests: queued,
            running_requests: running,
        }
    }
}
