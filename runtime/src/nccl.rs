//! The worker side of the NCCL data plane's set-up. Each heartbeat answer says which group
//! this worker is in (`NcclGroup`: epoch, rank, peers, the unique id once rank 0 published it);
//! the agent publishes the id when it is rank 0, joins the communicator when the id arrives
//! (NCCL's collective initialisation waits for every rank, so on a blocking thread, bounded by
//! [`JOIN_TIMEOUT`]), reports the epoch it is ready for in its status, and drops a communicator
//! whose epoch has passed. The data path uses [`NcclAgent::ready`]: a communicator of the
//! current epoch that every member has joined. A communicator aborted mid-exchange (a peer
//! failed or timed out) is dropped; the worker then reports no epoch, and the coordinator
//! starts the group over.
//!
//! Lock discipline: the agent's lock guards its bookkeeping only. Nothing calls into a
//! communicator while holding it (an exchange may wait on a communicator for seconds, and the
//! heartbeat must not wait behind it), and a dropped communicator is freed after the lock is
//! released.

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

/// What the agent needs of a communicator: NCCL's in production, a fake in tests.
pub trait Communicator: Send + Sync + Sized + 'static {
    /// What a communicator is made on.
    type Device: Clone + Send + Sync + 'static;
    /// A fresh unique id (rank 0 makes it).
    fn unique_id() -> moe_model::Result<Vec<u8>>;
    /// Joins communicator `unique_id` as `rank` of `world`, within `timeout`.
    fn join(
        device: &Self::Device,
        rank: usize,
        world: usize,
        unique_id: &[u8],
        timeout: Duration,
    ) -> moe_model::Result<Self>;
    /// Why it was aborted, if it was.
    fn aborted(&self) -> Option<String>;
}

impl Communicator for NcclComm {
    type Device = CudaDevice;

    fn unique_id() -> moe_model::Result<Vec<u8>> {
        NcclComm::unique_id()
    }

    fn join(
        device: &CudaDevice,
        rank: usize,
        world: usize,
        unique_id: &[u8],
        timeout: Duration,
    ) -> moe_model::Result<Self> {
        NcclComm::join(device, rank, world, unique_id, timeout)
    }

    fn aborted(&self) -> Option<String> {
        NcclComm::aborted(self)
    }
}

struct AgentState<C> {
    group: Option<NcclGroup>,
    comm: Option<(u64, Arc<C>)>,
    /// The epoch whose unique id this worker published (as rank 0).
    published: u64,
    /// The newest epoch this worker tried to join (joining now, joined, or failed): an epoch
    /// is tried once; after a failure the coordinator starts a new one.
    attempted: u64,
}

impl<C> Default for AgentState<C> {
    fn default() -> Self {
        AgentState {
            group: None,
            comm: None,
            published: 0,
            attempted: 0,
        }
    }
}

/// Cheap to clone; one per worker process.
pub struct NcclAgent<C: Communicator = NcclComm> {
    device: C::Device,
    state: Arc<Mutex<AgentState<C>>>,
}

impl<C: Communicator> Clone for NcclAgent<C> {
    fn clone(&self) -> Self {
        NcclAgent {
            device: self.device.clone(),
            state: self.state.clone(),
        }
    }
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
        Ok(NcclAgent::on(device))
    }
}

impl<C: Communicator> NcclAgent<C> {
    /// An agent on `device` in no group yet.
    pub fn on(device: C::Device) -> Self {
        NcclAgent {
            device,
            state: Arc::new(Mutex::new(AgentState::default())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AgentState<C>> {
        self.state.lock().expect("NCCL agent lock")
    }

    /// The epoch whose communicator this worker holds (0: none), for its heartbeat status.
    pub fn ready_epoch(&self) -> u64 {
        self.live().map_or(0, |(epoch, _)| epoch)
    }

    /// The held communicator and its epoch, unless it was aborted: then it is dropped, so that
    /// it is neither used nor reported. Asks the communicator outside the agent's lock.
    fn live(&self) -> Option<(u64, Arc<C>)> {
        let (epoch, comm) = self.lock().comm.clone()?;
        let Some(why) = comm.aborted() else {
            return Some((epoch, comm));
        };
        tracing::warn!(epoch, reason = %why, "NCCL communicator aborted: dropped until the group starts over");
        let dropped = {
            let mut st = self.lock();
            match &st.comm {
                Some((_, held)) if Arc::ptr_eq(held, &comm) => st.comm.take(),
                _ => None,
            }
        };
        drop(dropped);
        None
    }

    /// The communicator and group, when every member of the current group has joined it.
    pub fn ready(&self) -> Option<(Arc<C>, NcclGroup)> {
        let (epoch, comm) = self.live()?;
        let group = self.lock().group.clone().filter(|g| g.ready && g.epoch == epoch)?;
        Some((comm, group))
    }

    /// The communicator of `epoch`, when this worker holds it (joined, not aborted): what a
    /// receiver needs. Unlike [`ready`](Self::ready) this does not wait for the coordinator to
    /// say everyone joined: a sender only uses the epoch once it has, and the receiver may
    /// learn that a heartbeat later than the sender.
    pub fn communicator(&self, epoch: u64) -> Option<Arc<C>> {
        self.live().filter(|(e, _)| *e == epoch).map(|(_, comm)| comm)
    }

    /// Acts on one heartbeat answer's group.
    pub async fn on_heartbeat(&self, membership: &mut Membership, group: Option<NcclGroup>) {
        if let Some(epoch) = self.apply_group(group) {
            match C::unique_id() {
                Ok(id) => match membership.publish_nccl_id(epoch, id).await {
                    Ok(()) => self.lock().published = epoch,
                    Err(s) => tracing::warn!(epoch, status = %s, "publishing the NCCL unique id failed"),
                },
                Err(e) => tracing::error!(epoch, error = %e, "making an NCCL unique id failed"),
            }
        }
    }

    /// Takes a heartbeat's group in: drops a communicator of another epoch, starts joining a
    /// new one once its id is there, and returns the epoch to publish an id for (rank 0).
    fn apply_group(&self, group: Option<NcclGroup>) -> Option<u64> {
        let (publish, dropped) = {
            let mut st = self.lock();
            let epoch = group.as_ref().map_or(0, |g| g.epoch);
            let dropped = match &st.comm {
                Some((e, _)) if *e != epoch => {
                    tracing::info!(epoch, "NCCL group changed: dropping the old communicator");
                    st.comm.take()
                }
                _ => None,
            };
            st.group = group.clone();
            let publish = match group {
                None => None,
                Some(g) if g.unique_id.is_empty() => (g.rank == 0 && st.published != g.epoch).then_some(g.epoch),
                Some(g) => {
                    if st.comm.is_none() && st.attempted != g.epoch {
                        st.attempted = g.epoch;
                        self.join(g);
                    }
                    None
                }
            };
            (publish, dropped)
        };
        // Freed outside the lock: dropping the last handle aborts the communicator.
        drop(dropped);
        publish
    }

    fn join(&self, g: NcclGroup) {
        let agent = self.clone();
        tokio::task::spawn_blocking(move || {
            let result = C::join(
                &agent.device,
                g.rank as usize,
                g.world_size as usize,
                &g.unique_id,
                JOIN_TIMEOUT,
            );
            let stale = {
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
                        None
                    }
                    Ok(comm) => {
                        tracing::info!(epoch = g.epoch, "joined an NCCL group that has since changed: dropped");
                        Some(comm)
                    }
                    Err(e) => {
                        tracing::error!(epoch = g.epoch, error = %e, "joining the NCCL group failed");
                        None
                    }
                }
            };
            // Freed outside the lock.
            drop(stale);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Condvar;
    use std::time::Instant;

    /// Shared by a test and its fake communicators: makes `aborted()` block on demand (as the
    /// real one did while an exchange held its lock) and records aborts.
    #[derive(Default)]
    struct Control {
        state: Mutex<(bool, usize, Option<String>)>, // (blocking, callers blocked, aborted)
        changed: Condvar,
        /// The agent's state, to see from a communicator's drop whether its lock was held.
        agent: std::sync::OnceLock<std::sync::Weak<Mutex<AgentState<Fake>>>>,
        /// Per drop of a fake: was the agent's lock free then?
        drops: Mutex<Vec<bool>>,
    }

    impl Control {
        fn set_blocking(&self, on: bool) {
            self.state.lock().unwrap().0 = on;
            self.changed.notify_all();
        }

        fn blocked_callers(&self) -> usize {
            self.state.lock().unwrap().1
        }
    }

    struct Fake(Arc<Control>);

    impl Drop for Fake {
        fn drop(&mut self) {
            if let Some(state) = self.0.agent.get().and_then(std::sync::Weak::upgrade) {
                let free = state.try_lock().is_ok();
                self.0.drops.lock().unwrap().push(free);
            }
        }
    }

    impl Communicator for Fake {
        type Device = Arc<Control>;

        fn unique_id() -> moe_model::Result<Vec<u8>> {
            Ok(vec![7; 128])
        }

        fn join(device: &Arc<Control>, _: usize, _: usize, _: &[u8], _: Duration) -> moe_model::Result<Self> {
            Ok(Fake(device.clone()))
        }

        fn aborted(&self) -> Option<String> {
            let mut st = self.0.state.lock().unwrap();
            st.1 += 1;
            while st.0 {
                st = self.0.changed.wait(st).unwrap();
            }
            st.1 -= 1;
            st.2.clone()
        }
    }

    fn group(epoch: u64, rank: u32, unique_id: Vec<u8>) -> NcclGroup {
        NcclGroup {
            epoch,
            rank,
            world_size: 2,
            unique_id,
            ready: true,
            ..Default::default()
        }
    }

    fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs `f` on a thread; panics unless it returns within a few seconds.
    fn promptly<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("{what} waited for a communicator call"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_communicator_call_that_blocks_does_not_stop_the_agent() {
        let control = Arc::new(Control::default());
        let agent = NcclAgent::<Fake>::on(control.clone());
        let _ = control.agent.set(Arc::downgrade(&agent.state));
        assert_eq!(agent.apply_group(Some(group(7, 1, vec![1; 128]))), None);
        until("the fake never joined", || agent.ready_epoch() == 7);
        assert!(agent.ready().is_some());

        // A data-path caller is now stuck inside the communicator.
        control.set_blocking(true);
        let stuck = {
            let agent = agent.clone();
            std::thread::spawn(move || agent.ready().is_some())
        };
        until("the caller never reached the communicator", || {
            control.blocked_callers() == 1
        });
        // The heartbeat's work goes on meanwhile: a new group (this worker is its rank 0, so
        // it publishes the id) replaces the old communicator.
        let publish = {
            let agent = agent.clone();
            promptly("taking a new group in", move || {
                agent.apply_group(Some(group(8, 0, Vec::new())))
            })
        };
        assert_eq!(publish, Some(8));
        control.set_blocking(false);
        assert!(stuck.join().is_ok());
        assert_eq!(agent.ready_epoch(), 0, "the epoch-7 communicator was dropped");
        // Its last handle went after the agent's lock was released (a real drop aborts NCCL).
        assert_eq!(*control.drops.lock().unwrap(), [true]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_aborted_communicator_is_neither_used_nor_reported() {
        let control = Arc::new(Control::default());
        let agent = NcclAgent::<Fake>::on(control.clone());
        agent.apply_group(Some(group(3, 1, vec![1; 128])));
        until("the fake never joined", || agent.ready_epoch() == 3);
        control.state.lock().unwrap().2 = Some("peer gone".into());
        assert!(agent.ready().is_none());
        assert!(agent.communicator(3).is_none());
        assert_eq!(agent.ready_epoch(), 0);
        // An epoch is tried once: the same group does not join again.
        agent.apply_group(Some(group(3, 1, vec![1; 128])));
        std::thread::sleep(Duration::from_millis(50));
        assert!(agent.lock().comm.is_none());
    }
}
