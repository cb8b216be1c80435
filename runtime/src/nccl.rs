//! The worker side of the NCCL data plane's set-up. Each heartbeat answer says which group
//! this worker is in (`NcclGroup`: epoch, rank, peers, the unique id once rank 0 published it);
//! the agent publishes the id when it is rank 0, joins the communicator when the id arrives
//! (NCCL's collective initialisation waits for every rank, so on a blocking thread, bounded by
//! [`JOIN_TIMEOUT`]), reports the epoch it is ready for in its status, and drops a communicator
//! whose epoch has passed. The data path uses [`NcclAgent::ready`]: a communicator of the
//! current epoch that every member has joined. A communicator aborted mid-exchange (a peer
//! failed or timed out) is dropped; the worker then reports no epoch, and the coordinator
//! starts the group over.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use moe_model::cuda::{CudaDevice, NcclComm};
use moe_model::device::Device;
use moe_proto::v1::NcclGroup;

use crate::control::Membership;

/// How long one exchange of a layer's rows may take on the data plane before the communicator
/// is aborted (the step is then retried over gRPC). Failures seen on the gRPC side (a refusal,
/// a broken stream) abort it at once; this bounds what nothing else would.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a member waits for the others to join a communicator before giving up on it.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct AgentState {
    group: Option<NcclGroup>,
    comm: Option<(u64, Arc<NcclComm>)>,
    /// The epoch whose unique id this worker published (as rank 0).
    published: u64,
    /// The newest epoch this worker tried to join (joining now, joined, or failed): an epoch
    /// is tried once; after a failure the coordinator starts a new one.
    attempted: u64,
}

/// Cheap to clone; one per worker process.
#[derive(Clone)]
pub struct NcclAgent {
    device: CudaDevice,
    state: Arc<Mutex<AgentState>>,
}

impl NcclAgent {
    /// For `--nccl-device`: opens the GPU, and checks NCCL is there, at start-up.
    pub fn open(spec: &str) -> moe_model::Result<NcclAgent> {
        let device = match Device::open(spec)? {
            Device::Cuda(gpu) => gpu,
            Device::Cpu => {
                return Err(moe_model::Error::InvalidInput(format!(
                    "--nccl-device {spec}: NCCL needs a GPU (cuda:N)"
                )));
            }
        };
        NcclComm::available()?;
        Ok(NcclAgent {
            device,
            state: Arc::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AgentState> {
        self.state.lock().expect("NCCL agent lock")
    }

    /// The epoch whose communicator this worker holds (0: none), for its heartbeat status.
    pub fn ready_epoch(&self) -> u64 {
        let mut st = self.lock();
        Self::forget_aborted(&mut st);
        st.comm.as_ref().map_or(0, |(epoch, _)| *epoch)
    }

    /// Drops a communicator that was aborted, so that it is neither used nor reported.
    fn forget_aborted(st: &mut AgentState) {
        if let Some((epoch, comm)) = &st.comm
            && let Some(why) = comm.aborted()
        {
            tracing::warn!(epoch, reason = %why, "NCCL communicator aborted: dropped until the group starts over");
            st.comm = None;
        }
    }

    /// The communicator and group, when every member of the current group has joined it.
    pub fn ready(&self) -> Option<(Arc<NcclComm>, NcclGroup)> {
        let mut st = self.lock();
        Self::forget_aborted(&mut st);
        let group = st.group.as_ref().filter(|g| g.ready)?;
        match &st.comm {
            Some((epoch, comm)) if *epoch == group.epoch => Some((comm.clone(), group.clone())),
            _ => None,
        }
    }

    /// The communicator of `epoch`, when this worker holds it (joined, not aborted): what a
    /// receiver needs. Unlike [`ready`](Self::ready) this does not wait for the coordinator to
    /// say everyone joined: a sender only uses the epoch once it has, and the receiver may
    /// learn that a heartbeat later than the sender.
    pub fn communicator(&self, epoch: u64) -> Option<Arc<NcclComm>> {
        let mut st = self.lock();
        Self::forget_aborted(&mut st);
        st.comm
            .as_ref()
            .filter(|(e, _)| *e == epoch)
            .map(|(_, comm)| comm.clone())
    }

    /// Acts on one heartbeat answer's group.
    pub async fn on_heartbeat(&self, membership: &mut Membership, group: Option<NcclGroup>) {
        let publish = {
            let mut st = self.lock();
            let epoch = group.as_ref().map_or(0, |g| g.epoch);
            if st.comm.as_ref().is_some_and(|(e, _)| *e != epoch) {
                tracing::info!(epoch, "NCCL group changed: dropping the old communicator");
                st.comm = None;
            }
            st.group = group.clone();
            let Some(g) = group else { return };
            if g.unique_id.is_empty() {
                (g.rank == 0 && st.published != g.epoch).then_some(g.epoch)
            } else {
                if st.comm.is_none() && st.attempted != g.epoch {
                    st.attempted = g.epoch;
                    self.join(g);
                }
                None
            }
        };
        if let Some(epoch) = publish {
            match NcclComm::unique_id() {
                Ok(id) => match membership.publish_nccl_id(epoch, id).await {
                    Ok(()) => self.lock().published = epoch,
                    Err(s) => tracing::warn!(epoch, status = %s, "publishing the NCCL unique id failed"),
                },
                Err(e) => tracing::error!(epoch, error = %e, "making an NCCL unique id failed"),
            }
        }
    }

    fn join(&self, g: NcclGroup) {
        let agent = self.clone();
        tokio::task::spawn_blocking(move || {
            let result = NcclComm::join(
                &agent.device,
                g.rank as usize,
                g.world_size as usize,
                &g.unique_id,
                JOIN_TIMEOUT,
            );
            let mut st = agent.lock();
            match result {
                Ok(comm) if st.group.as_ref().is_some_and(|now| now.epoch == g.epoch) => {
                    tracing::info!(
                        epoch = g.epoch,
                        rank = g.rank,
                        world = g.world_size,
                        "joined the NCCL group"
                    );
                    st.comm = Some((g.epoch, Arc::new(comm)));
                }
                Ok(_) => tracing::info!(epoch = g.epoch, "joined an NCCL group that has since changed: dropped"),
                Err(e) => tracing::error!(epoch = g.epoch, error = %e, "joining the NCCL group failed"),
            }
        });
    }
}
