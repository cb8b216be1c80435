//! Routed experts on expert workers, behind the same [`ExpertCompute`] interface the
//! single-process engine uses. Per layer, one dispatch message goes to each expert worker that
//! owns any of the batch's routed experts, holding every row routed to it; the answers (one
//! weighted sum per row per worker) are added up in worker order. On the NCCL data plane
//! (`--nccl-device`, once the group is ready) the messages carry only headers and the rows and
//! answers move over NCCL; any failure there aborts the communicator and the step is retried
//! over gRPC.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use moe_model::Error;
use moe_model::cuda::NcclComm;
use moe_model::experts::{ExpertAssignment, ExpertCompute, Pending};
use moe_proto::PROTOCOL_VERSION;
use moe_proto::tensor::{WireDtype, decode_matrix};
use moe_proto::v1::dispatch_response::Result as DispatchResult;
use moe_proto::v1::expert_client::ExpertClient;
use moe_proto::v1::{DispatchRequest, DispatchResponse, NcclGroup, NcclRows};
use moe_runtime::PlacementView;
use moe_runtime::nccl::{NcclAgent, STEP_TIMEOUT};
use moe_runtime::net::{self, MAX_MESSAGE_BYTES};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

/// How long a dispatch may take before the worker is considered lost.
const DISPATCH_TIMEOUT: Duration = Duration::from_secs(30);

type Reply = oneshot::Sender<Result<DispatchResponse, String>>;

/// One expert worker's dispatch stream, owned by a task; requests are answered in order.
#[derive(Clone)]
struct Link {
    tx: mpsc::Sender<(DispatchRequest, Reply)>,
}

impl Link {
    fn spawn(handle: &tokio::runtime::Handle, address: String) -> Self {
        let (tx, mut rx) = mpsc::channel::<(DispatchRequest, Reply)>(64);
        handle.spawn(async move {
            let mut stream: Option<(mpsc::Sender<DispatchRequest>, tonic::Streaming<DispatchResponse>)> = None;
            while let Some((req, reply)) = rx.recv().await {
                let result = Self::round_trip(&address, &mut stream, req).await;
                if result.is_err() {
                    // Reconnect on the next request.
                    stream = None;
                }
                let _ = reply.send(result);
            }
        });
        Link { tx }
    }

    async fn round_trip(
        address: &str,
        stream: &mut Option<(mpsc::Sender<DispatchRequest>, tonic::Streaming<DispatchResponse>)>,
        req: DispatchRequest,
    ) -> Result<DispatchResponse, String> {
        if stream.is_none() {
            let channel = net::channel(address).map_err(|e| format!("bad address {address}: {e}"))?;
            let mut client = ExpertClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            let (tx, rx) = mpsc::channel(16);
            let responses = client
                .dispatch(ReceiverStream::new(rx))
                .await
                .map_err(|s| format!("opening the dispatch stream: {}", s.message()))?
                .into_inner();
            *stream = Some((tx, responses));
        }
        let (tx, responses) = stream.as_mut().expect("connected above");
        let id = req.request_id;
        tx.send(req).await.map_err(|_| "dispatch stream closed".to_owned())?;
        match tokio::time::timeout(DISPATCH_TIMEOUT, responses.next()).await {
            Err(_) => Err(format!("no answer within {DISPATCH_TIMEOUT:?}")),
            Ok(None) => Err("dispatch stream ended".into()),
            Ok(Some(Err(s))) => Err(format!("dispatch stream failed: {}", s.message())),
            Ok(Some(Ok(resp))) if resp.request_id != id => {
                Err(format!("answer to request {} while waiting for {id}", resp.request_id))
            }
            Ok(Some(Ok(resp))) => Ok(resp),
        }
    }
}

/// Traffic counters, for benchmarks and status.
#[derive(Debug, Default)]
pub struct DispatchStats {
    pub bytes: AtomicU64,
    /// Tokens routed to each `layer * num_experts + expert` since start: the coordinator's
    /// load statistics.
    pub expert_tokens: Vec<AtomicU64>,
    /// Per layer dispatch: assignments to the busiest expert worker, and the mean over the
    /// placement's workers (x1000), summed; their ratio is the measured per-step imbalance.
    pub busiest_assignments: AtomicU64,
    pub mean_assignments_milli: AtomicU64,
    /// Dispatch messages sent as later micro-batches because a slot was full.
    pub overflow_dispatches: AtomicU64,
    /// Layer dispatches answered, and their round trips (send to every answer held), summed.
    pub layer_dispatches: AtomicU64,
    pub layer_dispatch_micros: AtomicU64,
    /// Layer dispatches whose rows went over NCCL.
    pub nccl_layer_dispatches: AtomicU64,
}

impl DispatchStats {
    pub fn expert_tokens(&self) -> Vec<u64> {
        self.expert_tokens.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }
}

pub struct RemoteExperts {
    handle: tokio::runtime::Handle,
    /// Expert workers seen failing, to be reported to the coordinator.
    suspects: Mutex<Vec<(String, String)>>,
    hidden: usize,
    placement: RwLock<Option<Arc<PlacementView>>>,
    /// The placement version in use, for waits that must end when it changes.
    version: tokio::sync::watch::Sender<u64>,
    /// The version the last dispatch was routed with.
    last_used: AtomicU64,
    links: Mutex<HashMap<String, Link>>,
    next_id: AtomicU64,
    slot_capacity: Option<usize>,
    wire: WireDtype,
    /// This worker's place on the NCCL data plane (`--nccl-device`): layers go over it while
    /// its group is ready and holds every expert worker of the step, else over gRPC.
    nccl: Option<NcclAgent>,
    /// A step over NCCL failed (its communicator is aborted): retry it at once, over gRPC.
    nccl_failed: Arc<AtomicBool>,
    pub stats: Arc<DispatchStats>,
}

impl RemoteExperts {
    /// `slot_capacity`: rows per expert slot per micro-batch (`None`: unlimited); `wire`: the
    /// dtype token rows travel in over gRPC (expert workers answer in the same); `nccl`: the
    /// data plane, when this worker is on one.
    pub fn new(
        handle: tokio::runtime::Handle,
        hidden: usize,
        num_layers: usize,
        num_experts: usize,
        slot_capacity: Option<usize>,
        wire: WireDtype,
        nccl: Option<NcclAgent>,
    ) -> Self {
        RemoteExperts {
            handle,
            hidden,
            placement: RwLock::new(None),
            version: tokio::sync::watch::Sender::new(0),
            last_used: AtomicU64::new(0),
            links: Mutex::new(HashMap::new()),
            suspects: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            slot_capacity,
            wire,
            nccl,
            nccl_failed: Arc::new(AtomicBool::new(false)),
            stats: Arc::new(DispatchStats {
                bytes: AtomicU64::new(0),
                busiest_assignments: AtomicU64::new(0),
                mean_assignments_milli: AtomicU64::new(0),
                overflow_dispatches: AtomicU64::new(0),
                layer_dispatches: AtomicU64::new(0),
                layer_dispatch_micros: AtomicU64::new(0),
                nccl_layer_dispatches: AtomicU64::new(0),
                expert_tokens: (0..num_layers * num_experts).map(|_| AtomicU64::new(0)).collect(),
            }),
        }
    }

    pub fn set_placement(&self, placement: PlacementView) {
        let version = placement.version;
        *self.placement.write().expect("lock") = Some(Arc::new(placement));
        self.version.send_replace(version);
    }

    pub fn placement_version(&self) -> u64 {
        self.placement.read().expect("lock").as_ref().map_or(0, |p| p.version)
    }

    /// Failed expert workers seen since the last call, with the reason.
    pub fn take_suspects(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.suspects.lock().expect("lock"))
    }

    /// The communicator, its epoch and the expert workers' ranks, when this layer can go over
    /// NCCL: a ready group that holds every expert worker the layer is sent to.
    fn nccl_plane(
        &self,
        placement: &PlacementView,
        batches: &[WorkerBatch],
    ) -> Option<(Arc<NcclComm>, u64, HashMap<String, usize>)> {
        let (comm, group) = self.nccl.as_ref()?.ready()?;
        let ranks = nccl_ranks(&group, batches.iter().map(|b| placement.workers[b.worker].id.as_str()))?;
        Some((comm, group.epoch, ranks))
    }

    fn link(&self, address: &str) -> Link {
        let mut links = self.links.lock().expect("lock");
        links
            .entry(address.to_owned())
            .or_insert_with(|| Link::spawn(&self.handle, address.to_owned()))
            .clone()
    }
}

/// Rows and assignments bound for one worker in one micro-batch, rows renumbered densely.
struct WorkerBatch {
    worker: usize,
    /// 0 for the step itself; 1, 2, ... for rows over a slot's capacity (`exact` policy).
    round: usize,
    /// Global row of each local row.
    rows: Vec<u32>,
    assignments: Vec<ExpertAssignment>,
    /// Local row of each global row.
    local: HashMap<u32, u32>,
}

/// Splits one layer's assignments over the expert workers. Each assignment goes to the replica
/// of its expert that is least loaded in this step, among those whose slot still has room
/// under `slot_capacity` (rows per slot per micro-batch); when every replica's slot is full, to
/// the next micro-batch of the least loaded one. Nothing is dropped: the outputs equal an
/// unlimited run's.
fn split_by_worker(
    placement: &PlacementView,
    layer: usize,
    num_rows: usize,
    assignments: &[ExpertAssignment],
    slot_capacity: Option<usize>,
) -> Result<Vec<WorkerBatch>, Error> {
    let mut batches: BTreeMap<(usize, usize), WorkerBatch> = BTreeMap::new();
    // Assignments given to each worker, and to each (worker, expert) slot, so far in this step.
    let mut load = vec![0usize; placement.workers.len()];
    let mut taken: HashMap<(usize, u32), usize> = HashMap::new();
    for a in assignments {
        if a.row as usize >= num_rows || a.expert as usize >= placement.num_experts {
            return Err(Error::InvalidInput(format!("assignment {a:?} out of range")));
        }
        let round_at = |w: usize| {
            let t = taken.get(&(w, a.expert)).copied().unwrap_or(0);
            slot_capacity.map_or(0, |c| t / c.max(1))
        };
        let (round, w) = placement
            .owners(layer, a.expert as usize)
            .iter()
            .map(|&w| (round_at(w), w))
            .min_by_key(|&(round, w)| (round, load[w]))
            .ok_or(Error::ExpertNotHeld {
                layer,
                expert: a.expert as usize,
            })?;
        load[w] += 1;
        *taken.entry((w, a.expert)).or_default() += 1;
        let batch = batches.entry((round, w)).or_insert_with(|| WorkerBatch {
            worker: w,
            round,
            rows: Vec::new(),
            assignments: Vec::new(),
            local: HashMap::new(),
        });
        let next = batch.rows.len() as u32;
        let row = *batch.local.entry(a.row).or_insert_with(|| {
            batch.rows.push(a.row);
            next
        });
        batch.assignments.push(ExpertAssignment { row, ..*a });
    }
    Ok(batches.into_values().collect())
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

    /// A worker unreachable, or answering for another placement: report it, then wait for the
    /// coordinator to publish a placement that routes around it.
    fn recover(&self, err: &Error, timeout: Duration) -> bool {
        if self.nccl_failed.swap(false, Ordering::Relaxed) {
            // The communicator is aborted, so the retry goes over gRPC; a worker that is
            // really gone fails there too and is reported then.
            tracing::warn!(error = %err, "a step over NCCL failed; retrying it over gRPC");
            return true;
        }
        let Error::Remote {
            worker,
            message,
            retryable: true,
        } = err
        else {
            return false;
        };
        let failed_version = self.last_used.load(Ordering::Relaxed);
        if self.placement_version() != failed_version {
            // The placement moved on since the failed step (the worker may be fine): retry.
            return true;
        }
        if worker != "-" {
            self.suspects
                .lock()
                .expect("lock")
                .push((worker.clone(), message.clone()));
        }
        tracing::warn!(%worker, %message, failed_version, "expert dispatch failed; waiting for a new placement");
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.placement_version() != failed_version {
                tracing::info!(version = self.placement_version(), "retrying on the new placement");
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn begin(
        &self,
        layer: usize,
        rows: &[f32],
        num_rows: usize,
        assignments: &[ExpertAssignment],
    ) -> Result<Pending, Error> {
        let h = self.hidden;
        let placement = self
            .placement
            .read()
            .expect("lock")
            .clone()
            .ok_or_else(|| Error::Remote {
                worker: "-".into(),
                message: "no expert placement received yet".into(),
                retryable: true,
            })?;
        self.last_used.store(placement.version, Ordering::Relaxed);
        let e = placement.num_experts;
        for a in assignments {
            if let Some(c) = self.stats.expert_tokens.get(layer * e + a.expert as usize) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        let batches = split_by_worker(&placement, layer, num_rows, assignments, self.slot_capacity)?;
        let workers = placement.workers.len().max(1);
        let mut per_worker = vec![0usize; workers];
        for b in &batches {
            per_worker[b.worker] += b.assignments.len();
        }
        let busiest = per_worker.into_iter().max().unwrap_or(0);
        self.stats
            .busiest_assignments
            .fetch_add(busiest as u64, Ordering::Relaxed);
        self.stats
            .mean_assignments_milli
            .fetch_add((assignments.len() * 1000 / workers) as u64, Ordering::Relaxed);
        let sent = std::time::Instant::now();
        let plane = self.nccl_plane(&placement, &batches);
        let mut inflight = Vec::with_capacity(batches.len());
        let mut nccl_sends = Vec::new();
        for b in batches {
            if b.round > 0 {
                self.stats.overflow_dispatches.fetch_add(1, Ordering::Relaxed);
            }
            let mut packed = Vec::with_capacity(b.rows.len() * h);
            for &r in &b.rows {
                packed.extend_from_slice(&rows[r as usize * h..(r as usize + 1) * h]);
            }
            let worker = placement.workers[b.worker].clone();
            let mut req = DispatchRequest {
                protocol_version: PROTOCOL_VERSION,
                placement_version: placement.version,
                request_id: self.next_id.fetch_add(1, Ordering::Relaxed),
                layer: layer as u32,
                rows: None,
                nccl: None,
                assignment_rows: b.assignments.iter().map(|a| a.row).collect(),
                assignment_experts: b.assignments.iter().map(|a| a.expert).collect(),
                assignment_weights: b.assignments.iter().map(|a| a.weight).collect(),
            };
            match &plane {
                Some((comm, epoch, ranks)) => {
                    req.nccl = Some(NcclRows {
                        epoch: *epoch,
                        sender_rank: comm.rank() as u32,
                        rows: b.rows.len() as u32,
                    });
                    // bf16 over NCCL, both ways.
                    self.stats
                        .bytes
                        .fetch_add((2 * packed.len() * 2) as u64, Ordering::Relaxed);
                    nccl_sends.push((ranks[&worker.id], packed));
                }
                None => req.rows = Some(self.wire.encode(&packed, &[b.rows.len(), h])),
            }
            self.stats.bytes.fetch_add(req.encoded_len() as u64, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            let link = self.link(&worker.address);
            if link.tx.blocking_send((req, tx)).is_err() {
                if let Some((comm, ..)) = &plane {
                    comm.abort("a dispatch link stopped before its rows were sent");
                }
                return Err(Error::Remote {
                    worker: worker.id,
                    message: "dispatch link stopped".into(),
                    retryable: true,
                });
            }
            inflight.push((worker.id, b.rows, rx));
        }
        // Over NCCL the rows move once every header is on its way: the expert workers post
        // their receives when a header arrives, and this group waits for their answers.
        let exchange = plane.as_ref().map(|(comm, ..)| {
            let comm = comm.clone();
            let recvs: Vec<(usize, usize)> = nccl_sends.iter().map(|(rank, rows)| (*rank, rows.len())).collect();
            self.handle.spawn_blocking(move || {
                let sends: Vec<(usize, &[f32])> =
                    nccl_sends.iter().map(|(rank, rows)| (*rank, rows.as_slice())).collect();
                comm.exchange(&sends, &recvs, STEP_TIMEOUT)
            })
        });
        let comm = plane.map(|(comm, ..)| comm);
        let stats = self.stats.clone();
        let nccl_failed = self.nccl_failed.clone();
        let (handle, versions, sent_version) = (self.handle.clone(), self.version.subscribe(), placement.version);
        Ok(Pending::later(move || {
            // Any failure of a step over NCCL aborts the communicator (the other side's
            // operations end with it) and is retried at once over gRPC.
            let give_up_nccl = |e: Error| {
                if let Some(comm) = &comm {
                    comm.abort(&e.to_string());
                    nccl_failed.store(true, Ordering::Relaxed);
                }
                e
            };
            let mut answers = Vec::with_capacity(inflight.len());
            for (worker, rows, rx) in inflight {
                // Transport failures can succeed elsewhere; a refusal only when it is about
                // the placement (stale version, expert moved).
                let fail = |message: String, retryable: bool| Error::Remote {
                    worker: worker.clone(),
                    message,
                    retryable,
                };
                // A worker that stopped answering without closing its connection (frozen, or
                // partitioned) is waited for only until the coordinator re-places its experts.
                let mut versions = versions.clone();
                let resp = handle
                    .block_on(async {
                        tokio::select! {
                            r = rx => r.map_err(|_| fail("dispatch link dropped the request".into(), true))?.map_err(|m| fail(m, true)),
                            _ = versions.wait_for(|&v| v != sent_version) => {
                                Err(fail("the placement changed while waiting for this worker".into(), true))
                            }
                        }
                    })
                    .map_err(give_up_nccl)?;
                stats.bytes.fetch_add(resp.encoded_len() as u64, Ordering::Relaxed);
                let values = match resp.result {
                    Some(DispatchResult::Output(_)) if comm.is_some() => {
                        Err(fail("answered in the message; the rows went over NCCL".into(), false))
                    }
                    Some(DispatchResult::NcclRows(_)) if comm.is_none() => {
                        Err(fail("answered over NCCL; the rows went in the message".into(), false))
                    }
                    Some(DispatchResult::Output(tensor)) => {
                        let (values, n) = decode_matrix(&tensor, h).map_err(|e| fail(e.to_string(), false))?;
                        if n != rows.len() {
                            return Err(fail(format!("answered {n} rows for {} sent", rows.len()), false));
                        }
                        Ok(Some(values))
                    }
                    Some(DispatchResult::NcclRows(n)) if n as usize != rows.len() => Err(fail(
                        format!("answered {n} rows over NCCL for {} sent", rows.len()),
                        false,
                    )),
                    Some(DispatchResult::NcclRows(_)) => Ok(None),
                    Some(DispatchResult::Error(e)) => {
                        let code = tonic::Code::from(e.code);
                        let retryable = code == tonic::Code::FailedPrecondition || comm.is_some();
                        Err(fail(format!("refused ({code}): {}", e.message), retryable))
                    }
                    None => Err(fail("empty answer".into(), false)),
                }
                .map_err(give_up_nccl)?;
                answers.push((rows, values));
            }
            let mut over_nccl = match exchange {
                Some(exchange) => {
                    let received = handle
                        .block_on(exchange)
                        .map_err(|e| Error::Device(format!("NCCL exchange task: {e}")))
                        .and_then(|r| r)
                        .map_err(give_up_nccl)?;
                    stats.nccl_layer_dispatches.fetch_add(1, Ordering::Relaxed);
                    received.into_iter()
                }
                None => Vec::new().into_iter(),
            };
            let mut out = vec![0.0f32; num_rows * h];
            for (rows, values) in answers {
                let values = match values {
                    Some(v) => v,
                    None => over_nccl.next().expect("one NCCL receive per answer"),
                };
                for (i, &r) in rows.iter().enumerate() {
                    let dst = &mut out[r as usize * h..(r as usize + 1) * h];
                    for (d, v) in dst.iter_mut().zip(&values[i * h..(i + 1) * h]) {
                        *d += v;
                    }
                }
            }
            stats.layer_dispatches.fetch_add(1, Ordering::Relaxed);
            stats
                .layer_dispatch_micros
                .fetch_add(sent.elapsed().as_micros() as u64, Ordering::Relaxed);
            Ok(out)
        }))
    }
}

/// The NCCL rank of each expert worker a layer dispatch goes to, when the group holds them all.
fn nccl_ranks<'a>(group: &NcclGroup, workers: impl IntoIterator<Item = &'a str>) -> Option<HashMap<String, usize>> {
    let mut ranks = HashMap::new();
    for id in workers {
        let peer = group.peers.iter().find(|p| p.worker_id == id)?;
        ranks.insert(id.to_owned(), peer.rank as usize);
    }
    Some(ranks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_runtime::placement::ExpertWorkerRef;

    fn worker(i: usize) -> ExpertWorkerRef {
        ExpertWorkerRef {
            id: format!("w{i}"),
            address: format!("127.0.0.1:{i}"),
        }
    }

    fn assignment(row: u32, expert: u32) -> ExpertAssignment {
        ExpertAssignment {
            row,
            expert,
            weight: 0.5,
        }
    }

    #[test]
    fn replicas_share_a_hot_expert_and_rows_are_renumbered() {
        // One layer, 2 experts; expert 0 on both workers, expert 1 on worker 1 only.
        let p = PlacementView::from_owners(3, 1, 2, vec![worker(0), worker(1)], vec![vec![0, 1], vec![1]]);
        let a: Vec<_> = (0..6).map(|r| assignment(r, 0)).chain([assignment(0, 1)]).collect();
        let batches = split_by_worker(&p, 0, 6, &a, None).unwrap();
        let per: Vec<(usize, usize)> = batches.iter().map(|b| (b.worker, b.assignments.len())).collect();
        // Six rows of the hot expert alternate between its replicas; expert 1 goes to w1.
        assert_eq!(per, [(0, 3), (1, 4)]);
        let w0 = &batches[0];
        assert_eq!(w0.rows, [0, 2, 4]);
        assert_eq!(
            w0.assignments.iter().map(|a| a.row).collect::<Vec<_>>(),
            [0, 1, 2],
            "dense local rows"
        );
        // Every assignment is sent exactly once.
        let total: usize = batches.iter().map(|b| b.assignments.len()).sum();
        assert_eq!(total, a.len());
    }

    #[test]
    fn an_expert_nobody_holds_is_an_error() {
        let p = PlacementView::from_owners(1, 1, 2, vec![worker(0)], vec![vec![0], vec![]]);
        let err = split_by_worker(&p, 0, 1, &[assignment(0, 1)], None).err().unwrap();
        assert!(matches!(err, Error::ExpertNotHeld { layer: 0, expert: 1 }), "{err}");
    }

    #[test]
    fn rows_over_a_slot_capacity_go_to_other_replicas_then_to_later_micro_batches() {
        // Expert 0 on both workers, expert 1 on worker 0 only; capacity 2 rows per slot.
        let p = PlacementView::from_owners(1, 1, 2, vec![worker(0), worker(1)], vec![vec![0, 1], vec![0]]);
        let a: Vec<_> = (0..6)
            .map(|r| assignment(r, 0))
            .chain((0..5).map(|r| assignment(r, 1)))
            .collect();
        let batches = split_by_worker(&p, 0, 6, &a, Some(2)).unwrap();
        let mut per_slot_round: HashMap<(usize, usize, u32), usize> = HashMap::new();
        let mut seen = Vec::new();
        for b in &batches {
            for x in &b.assignments {
                *per_slot_round.entry((b.worker, b.round, x.expert)).or_default() += 1;
                seen.push((b.rows[x.row as usize], x.expert));
            }
        }
        assert!(per_slot_round.values().all(|&n| n <= 2), "{per_slot_round:?}");
        // Expert 0's six rows: 2 + 2 on the replicas in round 0, the rest in round 1.
        let expert0_round0: usize = per_slot_round
            .iter()
            .filter(|((_, r, e), _)| *r == 0 && *e == 0)
            .map(|(_, n)| n)
            .sum();
        assert_eq!(expert0_round0, 4);
        // Expert 1 has one replica: 2 + 2 + 1 over three rounds.
        assert_eq!(per_slot_round[&(0, 2, 1)], 1);
        // Every assignment exactly once.
        seen.sort_unstable();
        let mut want: Vec<(u32, u32)> = a.iter().map(|x| (x.row, x.expert)).collect();
        want.sort_unstable();
        assert_eq!(seen, want);
        // Without a capacity everything is one micro-batch.
        assert!(
            split_by_worker(&p, 0, 6, &a, None)
                .unwrap()
                .iter()
                .all(|b| b.round == 0)
        );
    }

    #[test]
    fn a_layer_goes_over_nccl_only_when_the_group_holds_every_worker_it_is_sent_to() {
        let peer = |id: &str, rank| moe_proto::v1::NcclPeer {
            worker_id: id.into(),
            rank,
        };
        let group = NcclGroup {
            epoch: 3,
            rank: 0,
            world_size: 3,
            peers: vec![peer("a1", 0), peer("w0", 1), peer("w1", 2)],
            ..Default::default()
        };
        let ranks = nccl_ranks(&group, ["w1", "w0", "w1"]).unwrap();
        assert_eq!(ranks.len(), 2);
        assert_eq!((ranks["w0"], ranks["w1"]), (1, 2));
        // An expert worker outside the group (it joined after the group was formed, or has
        // no GPU): the whole layer goes over gRPC.
        assert!(nccl_ranks(&group, ["w0", "w2"]).is_none());
    }
}
