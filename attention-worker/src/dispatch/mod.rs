//! Routed experts on expert workers, behind the same [`ExpertCompute`] interface the
//! single-process engine uses.
//!
//! Per layer, one message goes to each expert worker that owns any of the batch's routed
//! experts, holding every row routed to it (`split`); it travels on that worker's long-lived
//! stream (`link`), with the rows inline or, on the NCCL data plane, beside it (`plane`); the
//! answers (one weighted sum per row per worker) are added up in worker order (`layer`). A
//! failed layer dispatch retries by itself, on the next placement or over gRPC (`error` has the
//! rule), so callers see only a result or a final error. Each dispatch owns its rows and its
//! attempt, so several can be in flight at once: any number over gRPC (a link pipelines them),
//! one at a time over NCCL (an expert worker posts its receives in header order, so two
//! exchanges racing on one communicator could swap their rows); a dispatch that finds the
//! NCCL plane busy goes over gRPC.

mod error;
mod layer;
mod link;
mod plane;
mod split;
mod stats;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moe_model::Error;
use moe_model::experts::{ExpertAssignment, ExpertCompute, Pending};
use moe_proto::tensor::WireDtype;
use moe_runtime::PlacementView;
use moe_runtime::nccl::NcclAgent;
use tokio::sync::watch;

pub use error::DispatchError;
pub use link::LinkError;
pub use split::NotHeld;
pub use stats::DispatchStats;

use layer::LayerDispatch;
use link::{Link, Reply};

/// How the attention worker reaches its expert workers.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    pub hidden: usize,
    pub num_layers: usize,
    pub num_experts: usize,
    /// Rows per expert slot per micro-batch (`None`: unlimited).
    pub slot_capacity: Option<usize>,
    /// The dtype rows travel in over gRPC (expert workers answer in the same).
    pub wire: WireDtype,
    /// How long a failed layer dispatch waits for a new placement before it fails.
    pub recover_timeout: Duration,
    /// How long an expert worker may take to answer (from the send, or from its previous
    /// answer when several are queued) before it is considered lost.
    pub answer_timeout: Duration,
}

impl DispatchConfig {
    /// The default `answer_timeout`: far above any healthy layer's time on a CPU worker.
    pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
}

/// The attention worker's expert unit. Cheap to share: everything lives in [`Shared`].
pub struct RemoteExperts {
    shared: Arc<Shared>,
    pub stats: Arc<DispatchStats>,
}

/// What every layer dispatch reaches: the placement, the links, the data plane, the counters.
pub(crate) struct Shared {
    handle: tokio::runtime::Handle,
    hidden: usize,
    num_experts: usize,
    slot_capacity: Option<usize>,
    wire: WireDtype,
    recover_timeout: Duration,
    answer_timeout: Duration,
    /// This worker's place on the NCCL data plane (`--nccl-device`): layers go over it while
    /// its group is ready and holds every expert worker of the layer, else over gRPC.
    nccl: Option<NcclAgent>,
    /// A layer's exchange is on the NCCL plane (one at a time: see the module doc).
    nccl_busy: Arc<AtomicBool>,
    /// The placement in use; waits that must end when it changes watch it.
    placement: watch::Sender<Option<Arc<PlacementView>>>,
    links: Mutex<HashMap<String, Link>>,
    next_id: AtomicU64,
    /// Expert workers seen failing, with the reason, to be reported to the coordinator.
    suspects: Mutex<Vec<(String, String)>>,
    stats: Arc<DispatchStats>,
}

impl RemoteExperts {
    pub fn new(handle: tokio::runtime::Handle, config: DispatchConfig, nccl: Option<NcclAgent>) -> Self {
        let stats = Arc::new(DispatchStats::new(config.num_layers, config.num_experts));
        let shared = Shared {
            handle,
            hidden: config.hidden,
            num_experts: config.num_experts,
            slot_capacity: config.slot_capacity,
            wire: config.wire,
            recover_timeout: config.recover_timeout,
            answer_timeout: config.answer_timeout,
            nccl,
            nccl_busy: Arc::new(AtomicBool::new(false)),
            placement: watch::Sender::new(None),
            links: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            suspects: Mutex::new(Vec::new()),
            stats: stats.clone(),
        };
        RemoteExperts {
            shared: Arc::new(shared),
            stats,
        }
    }

    pub fn set_placement(&self, placement: PlacementView) {
        self.shared.placement.send_replace(Some(Arc::new(placement)));
    }

    pub fn placement_version(&self) -> u64 {
        self.shared.placement_version()
    }

    /// Failed expert workers seen since the last call, with the reason.
    pub fn take_suspects(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.shared.suspects.lock().expect("lock"))
    }
}

impl ExpertCompute for RemoteExperts {
    fn compute(
        &self,
        layer: usize,
        rows: &[f32],
        num_rows: usize,
        assignments: &[ExpertAssignment],
    ) -> Result<Vec<f32>, Error> {
        self.begin(layer, rows, num_rows, assignments)?.wait()
    }

    fn begin(
        &self,
        layer: usize,
        rows: &[f32],
        num_rows: usize,
        assignments: &[ExpertAssignment],
    ) -> Result<Pending, Error> {
        let shared = &self.shared;
        if let Some(a) = assignments
            .iter()
            .find(|a| a.row as usize >= num_rows || a.expert as usize >= shared.num_experts)
        {
            return Err(Error::InvalidInput(format!("assignment {a:?} out of range")));
        }
        if rows.len() != num_rows * shared.hidden {
            return Err(Error::InvalidInput(format!(
                "{} values for {num_rows} rows of {}",
                rows.len(),
                shared.hidden
            )));
        }
        let mut dispatch = LayerDispatch::new(shared.clone(), layer, rows.to_vec(), num_rows, assignments.to_vec());
        let first = dispatch.send();
        Ok(Pending::arriving(move || {
            dispatch.finish(first).map_err(DispatchError::into_model)
        }))
    }
}

impl Shared {
    fn placement(&self) -> Option<Arc<PlacementView>> {
        self.placement.borrow().clone()
    }

    fn placement_version(&self) -> u64 {
        version_of(&self.placement.borrow())
    }

    fn next_request_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn link(&self, address: &str) -> Link {
        let mut links = self.links.lock().expect("lock");
        links
            .entry(address.to_owned())
            .or_insert_with(|| Link::spawn(&self.handle, address.to_owned(), self.answer_timeout))
            .clone()
    }

    fn report_suspect(&self, suspect: (String, String)) {
        self.suspects.lock().expect("lock").push(suspect);
    }

    /// Waits (blocking, outside the runtime) for a placement newer than `version`; false when
    /// none came within the recovery timeout.
    fn wait_for_placement_after(&self, version: u64) -> bool {
        let mut placements = self.placement.subscribe();
        self.handle.block_on(async {
            tokio::time::timeout(self.recover_timeout, placements.wait_for(|p| version_of(p) != version))
                .await
                .is_ok_and(|changed| changed.is_ok())
        })
    }

    /// A link's answer, unless the placement moves on from `version` first: a worker that
    /// stopped answering without closing its connection is waited for only until the
    /// coordinator re-places its experts.
    fn await_reply(&self, reply: Reply, version: u64) -> Awaited {
        let mut placements = self.placement.subscribe();
        self.handle.block_on(async {
            tokio::select! {
                // An answer already there wins over a placement that has moved meanwhile (with
                // two micro-batches answers are collected half a step after they arrive).
                biased;
                r = reply => Awaited::Answer(r.unwrap_or_else(|_| Err(LinkError::Closed("dispatch link dropped the request".into())))),
                _ = placements.wait_for(|p| version_of(p) != version) => Awaited::PlacementMoved,
            }
        })
    }
}

/// What waiting for one answer ended with.
enum Awaited {
    Answer(Result<link::Arrived, LinkError>),
    PlacementMoved,
}

fn version_of(placement: &Option<Arc<PlacementView>>) -> u64 {
    placement.as_ref().map_or(0, |p| p.version)
}
