//! An NCCL communicator between GPUs of different worker processes: the data plane between
//! attention and expert workers. Set up through the coordinator (see `moe_runtime::nccl`): rank
//! 0 makes the unique id, every rank joins with it.
//!
//! The communicator is **non-blocking** (`ncclCommInitRankConfig` with `blocking = 0`) and every
//! operation is bounded by a deadline: a peer that died or moved to another epoch would
//! otherwise leave this side's kernels (and a blocking initialisation) waiting forever. On a
//! deadline or an asynchronous error the communicator is aborted (`ncclCommAbort`, which also
//! ends the kernels waiting on it) and refuses every later call; the owner builds a new one.
//!
//! An exchange issues its sends as one NCCL group, then its receives as another
//! ([`exchange_groups`]: both sides of a pair must mirror each other's groups), on a stream of
//! its own so that a waiting receive never holds up the device's compute stream. Values travel
//! as bf16 (half the bytes; what the GPU computes in anyway).
//!
//! Lock discipline: NCCL calls on a communicator are issued one at a time under its mutex, and
//! an exchange holds it while it waits. The abort state lives outside that mutex
//! ([`AbortFlag`]): [`NcclComm::aborted`] never waits, and [`NcclComm::abort`] takes effect at
//! once: it aborts the communicator itself when no call is in progress, and otherwise the
//! waiting exchange sees the request at its next poll and aborts it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cuda::exchange::{AbortFlag, Direction, Stopped, exchange_groups, poll_until};

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::result::NcclStatus;
use cudarc::nccl::sys;
use half::bf16;

use super::{CudaDevice, err};
use crate::{Error, Result};

/// Size of `ncclUniqueId`.
pub const UNIQUE_ID_BYTES: usize = 128;

/// `NCCL_CONFIG_UNDEF_INT`: "use NCCL's default" for a config field.
const UNDEF_INT: i32 = i32::MIN;

pub struct NcclComm {
    /// One NCCL call at a time on a communicator: an exchange is issued and waited for whole
    /// under this lock.
    raw: Mutex<RawComm>,
    /// Read and set without the lock.
    abort: AbortFlag,
    rank: usize,
    world_size: usize,
    stream: Arc<CudaStream>,
}

struct RawComm {
    comm: sys::ncclComm_t,
    /// The communicator was aborted (NCCL freed it); every later call is refused.
    aborted: bool,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; `NcclComm` only reaches it through its mutex.
unsafe impl Send for RawComm {}

impl RawComm {
    /// Aborts the communicator (idempotent): NCCL frees it and ends its pending kernels.
    fn abort(&mut self, why: &str) {
        if !self.aborted {
            tracing::warn!(reason = %why, "aborting the NCCL communicator");
            // SAFETY: `comm` came from ncclCommInitRankConfig and is aborted at most once.
            let _ = unsafe { sys::ncclCommAbort(self.comm) };
            self.aborted = true;
        }
    }

    /// The communicator's asynchronous state: `Ok(true)` done, `Ok(false)` still in progress.
    fn settled(&self) -> std::result::Result<bool, String> {
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: `comm` is live (not aborted: callers check) and `state` is a valid out pointer.
        let called = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
        if called != sys::ncclResult_t::ncclSuccess {
            return Err(format!("ncclCommGetAsyncError: {called:?}"));
        }
        match state {
            sys::ncclResult_t::ncclSuccess => Ok(true),
            sys::ncclResult_t::ncclInProgress => Ok(false),
            e => Err(format!("NCCL asynchronous error {e:?}")),
        }
    }

    /// Polls until the communicator has no call in progress; aborts it at `deadline`, on an
    /// error, or when an abort is requested meanwhile.
    fn wait_settled(&mut self, abort: &AbortFlag, what: &str, deadline: Instant) -> Result<()> {
        let waited = poll_until(deadline, abort, || self.settled());
        self.finish(abort, waited, what)
    }

    /// Turns the end of a wait into a result, aborting the communicator unless it settled.
    fn finish(&mut self, abort: &AbortFlag, waited: std::result::Result<(), Stopped>, what: &str) -> Result<()> {
        let why = match waited {
            Ok(()) => return Ok(()),
            Err(Stopped::TimedOut) => format!("{what} did not complete in time"),
            Err(Stopped::Failed(e)) => format!("{what}: {e}"),
            Err(Stopped::Aborted(why)) => format!("{what}: aborted ({why})"),
        };
        Err(self.fail(abort, why))
    }

    fn fail(&mut self, abort: &AbortFlag, why: String) -> Error {
        abort.request(&why);
        self.abort(&why);
        Error::Device(format!("NCCL: {why}; communicator aborted"))
    }
}

fn nccl_present() -> Result<()> {
    // SAFETY: only probes for the shared library.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::Device("NCCL (libnccl.so) not found".into()))
    }
}

fn nccl_call(what: &str, r: sys::ncclResult_t) -> std::result::Result<(), String> {
    match r.result() {
        Ok(NcclStatus::Success | NcclStatus::InProgress) => Ok(()),
        Ok(NcclStatus::NumResults) | Err(_) => Err(format!("{what}: {r:?}")),
    }
}

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: every other field left to NCCL.
fn non_blocking_config() -> sys::ncclConfig_t {
    // SAFETY: a plain C struct of integers and pointers; every field is set below.
    let mut c: sys::ncclConfig_t = unsafe { std::mem::zeroed() };
    c.size = std::mem::size_of::<sys::ncclConfig_t>();
    c.magic = 0xcafe_beef;
    // NCCL_VERSION(2, 30, 0): the layout these bindings describe.
    c.version = 2 * 10000 + 30 * 100;
    c.blocking = 0;
    c.cgaClusterSize = UNDEF_INT;
    c.minCTAs = UNDEF_INT;
    c.maxCTAs = UNDEF_INT;
    c.netName = std::ptr::null();
    c.splitShare = UNDEF_INT;
    c.trafficClass = UNDEF_INT;
    c.commName = std::ptr::null();
    c.collnetEnable = UNDEF_INT;
    c.CTAPolicy = UNDEF_INT;
    c.shrinkShare = UNDEF_INT;
    c.nvlsCTAs = UNDEF_INT;
    c.nChannelsPerNetPeer = UNDEF_INT;
    c.nvlinkCentricSched = UNDEF_INT;
    c.graphUsageMode = UNDEF_INT;
    c.numRmaCtx = UNDEF_INT;
    c.maxP2pPeers = UNDEF_INT;
    c
}

impl NcclComm {
    /// Whether NCCL can be loaded: what a worker checks at start-up.
    pub fn available() -> Result<()> {
        nccl_present()
    }

    /// A fresh `ncclUniqueId` (rank 0 makes it; it names the communicator to every rank).
    pub fn unique_id() -> Result<Vec<u8>> {
        nccl_present()?;
        let id = cudarc::nccl::result::get_uniqueid().map_err(err("ncclGetUniqueId"))?;
        Ok(id.internal.iter().map(|&c| c as u8).collect())
    }

    /// Joins communicator `unique_id` as `rank` of `world_size` on `device`. NCCL's
    /// initialisation is collective: this returns once every rank has joined, or fails (and
    /// frees what it built) when they have not within `timeout`.
    pub fn join(
        device: &CudaDevice,
        rank: usize,
        world_size: usize,
        unique_id: &[u8],
        timeout: Duration,
    ) -> Result<NcclComm> {
        nccl_present()?;
        let internal: [std::ffi::c_char; UNIQUE_ID_BYTES] = unique_id
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| {
                Error::InvalidInput(format!(
                    "an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {}",
                    unique_id.len()
                ))
            })?;
        if rank >= world_size {
            return Err(Error::InvalidInput(format!("NCCL rank {rank} of {world_size}")));
        }
        let deadline = Instant::now() + timeout;
        let ctx = device.stream().context().clone();
        ctx.bind_to_thread().map_err(err("binding the CUDA context"))?;
        let stream = ctx.new_stream().map_err(err("creating the NCCL stream"))?;
        let mut config = non_blocking_config();
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: valid out pointer, id and config; NCCL copies the config.
        let r = unsafe {
            sys::ncclCommInitRankConfig(
                &mut comm,
                world_size as i32,
                sys::ncclUniqueId { internal },
                rank as i32,
                &mut config,
            )
        };
        nccl_call("ncclCommInitRankConfig", r).map_err(Error::Device)?;
        if comm.is_null() {
            return Err(Error::Device(format!(
                "ncclCommInitRankConfig gave no communicator ({r:?})"
            )));
        }
        let mut raw = RawComm { comm, aborted: false };
        let abort = AbortFlag::default();
        raw.wait_settled(&abort, &format!("joining as rank {rank} of {world_size}"), deadline)?;
        let comm = NcclComm {
            raw: Mutex::new(raw),
            abort,
            rank,
            world_size,
            stream,
        };
        comm.warm_up(deadline)?;
        Ok(comm)
    }

    /// One value to and from every other rank in a single group, issued by every rank alike
    /// right after joining: NCCL sets point-to-point connections up lazily, and setting them up
    /// inside a data exchange can deadlock when several ranks wait on each other's first
    /// exchange (two attention workers whose headers reached two expert workers in opposite
    /// orders). Symmetric on every rank, this group always matches.
    fn warm_up(&self, deadline: Instant) -> Result<()> {
        let peers: Vec<usize> = (0..self.world_size).filter(|&p| p != self.rank).collect();
        let ones = vec![1.0f32; 1];
        let sends: Vec<(usize, &[f32])> = peers.iter().map(|&p| (p, ones.as_slice())).collect();
        let recvs: Vec<(usize, usize)> = peers.iter().map(|&p| (p, 1)).collect();
        let timeout = deadline.saturating_duration_since(Instant::now());
        self.run(&sends, &recvs, timeout, true).map(drop)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RawComm> {
        self.raw.lock().expect("NCCL communicator lock")
    }

    /// Why the communicator was aborted (or asked to be), if it was. Never waits.
    pub fn aborted(&self) -> Option<String> {
        self.abort.why().map(str::to_owned)
    }

    /// Aborts the communicator: its pending operations end and later calls are refused. Never
    /// waits for an exchange in progress: that exchange aborts it at its next poll.
    pub fn abort(&self, why: &str) {
        self.abort.request(why);
        match self.raw.try_lock() {
            Ok(mut raw) => raw.abort(why),
            // A panic mid-call left the lock poisoned: the communicator still has to go.
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().abort(why),
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
    }

    fn check_peer(&self, peer: usize) -> Result<i32> {
        if peer >= self.world_size || peer == self.rank {
            return Err(Error::InvalidInput(format!(
                "NCCL peer {peer}: this is rank {} of {}",
                self.rank, self.world_size
            )));
        }
        Ok(peer as i32)
    }

    /// Sends each buffer to its peer and receives `len` values from each receive peer, in bf16:
    /// the sends as one NCCL group, then the receives as another ([`exchange_groups`]); returns
    /// the received values once everything has arrived. Not done within `timeout`, or failed:
    /// the communicator is aborted and the error says why.
    pub fn exchange(
        &self,
        sends: &[(usize, &[f32])],
        recvs: &[(usize, usize)],
        timeout: Duration,
    ) -> Result<Vec<Vec<f32>>> {
        self.run(sends, recvs, timeout, false)
    }

    /// An exchange; `one_group` issues sends and receives in a single group (the warm-up, which
    /// every rank issues alike).
    fn run(
        &self,
        sends: &[(usize, &[f32])],
        recvs: &[(usize, usize)],
        timeout: Duration,
        one_group: bool,
    ) -> Result<Vec<Vec<f32>>> {
        let deadline = Instant::now() + timeout;
        for &(peer, _) in sends {
            self.check_peer(peer)?;
        }
        for &(peer, _) in recvs {
            self.check_peer(peer)?;
        }
        // Zero-length operations move nothing: they are left out (no zero-byte buffers).
        let sends: Vec<(usize, &[f32])> = sends.iter().copied().filter(|(_, d)| !d.is_empty()).collect();
        let wanted: Vec<(usize, usize)> = recvs.to_vec();
        let recvs: Vec<(usize, usize)> = recvs.iter().copied().filter(|&(_, n)| n > 0).collect();
        let s = &self.stream;
        s.context().bind_to_thread().map_err(err("binding the CUDA context"))?;
        // Everything on this communicator's stream happens under its lock: a second exchange's
        // uploads must not interleave with a group in progress.
        let mut raw = self.lock();
        if let Some(why) = self.abort.why() {
            raw.abort(why);
            return Err(Error::Device(format!("NCCL communicator was aborted ({why})")));
        }
        let mut outgoing: Vec<(i32, CudaSlice<bf16>)> = Vec::with_capacity(sends.len());
        for &(peer, data) in &sends {
            let narrowed: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
            outgoing.push((peer as i32, s.clone_htod(&narrowed).map_err(err("uploading"))?));
        }
        let mut incoming: Vec<(i32, CudaSlice<bf16>)> = Vec::with_capacity(recvs.len());
        for &(peer, len) in &recvs {
            incoming.push((peer as i32, s.alloc_zeros(len).map_err(err("allocating"))?));
        }
        let sizes =
            |bufs: &[(i32, CudaSlice<bf16>)]| bufs.iter().map(|(p, b)| (*p as usize, b.len())).collect::<Vec<_>>();
        let groups = if one_group {
            vec![Direction::Send]
        } else {
            exchange_groups(&sizes(&outgoing), &sizes(&incoming))
                .iter()
                .map(|g| g[0].direction)
                .collect()
        };
        for direction in groups {
            let issued = match (one_group, direction) {
                (true, _) => group(|| {
                    self.issue_sends(&raw, s, &outgoing)?;
                    self.issue_recvs(&raw, s, &mut incoming)
                }),
                (false, Direction::Send) => group(|| self.issue_sends(&raw, s, &outgoing)),
                (false, Direction::Recv) => group(|| self.issue_recvs(&raw, s, &mut incoming)),
            };
            if let Err(e) = issued {
                return Err(raw.fail(&self.abort, e));
            }
            raw.wait_settled(&self.abort, "issuing the exchange", deadline)?;
        }
        // The kernels are queued: wait for them (and watch for asynchronous errors and aborts).
        let peers: Vec<i32> = outgoing.iter().chain(&incoming).map(|(p, _)| *p).collect();
        let what = format!("exchange with ranks {peers:?}");
        let done = match s.record_event(None) {
            Ok(done) => done,
            Err(e) => return Err(raw.fail(&self.abort, format!("{what}: recording its end: {e:?}"))),
        };
        let waited = poll_until(deadline, &self.abort, || {
            raw.settled()?;
            done.try_is_complete()
                .map_err(|e| format!("waiting for the exchange: {e:?}"))
        });
        raw.finish(&self.abort, waited, &what)?;
        // An abort asked for while this held the lock takes effect before the lock goes.
        if let Some(why) = self.abort.why() {
            raw.abort(why);
        }
        drop(raw);
        let mut received = incoming.iter();
        wanted
            .iter()
            .map(|&(_, len)| {
                if len == 0 {
                    return Ok(Vec::new());
                }
                let (_, buf) = received.next().expect("one buffer per non-empty receive");
                let bits: Vec<bf16> = s.clone_dtoh(buf).map_err(err("downloading"))?;
                Ok(bits.into_iter().map(bf16::to_f32).collect())
            })
            .collect()
    }

    /// Issues a send per buffer (inside a group the caller opened).
    fn issue_sends(
        &self,
        raw: &RawComm,
        s: &Arc<CudaStream>,
        outgoing: &[(i32, CudaSlice<bf16>)],
    ) -> std::result::Result<(), String> {
        let stream = s.cu_stream() as sys::cudaStream_t;
        let mut first_error = Ok(());
        for (peer, buf) in outgoing {
            let (ptr, _sync) = buf.device_ptr(s);
            // SAFETY: `buf` lives until the exchange completes (the caller waits on the stream).
            let r = unsafe {
                sys::ncclSend(
                    ptr as *const _,
                    buf.len(),
                    sys::ncclDataType_t::ncclBfloat16,
                    *peer,
                    raw.comm,
                    stream,
                )
            };
            first_error = first_error.and(nccl_call("ncclSend", r));
        }
        first_error
    }

    /// Issues a receive per buffer (inside a group the caller opened).
    fn issue_recvs(
        &self,
        raw: &RawComm,
        s: &Arc<CudaStream>,
        incoming: &mut [(i32, CudaSlice<bf16>)],
    ) -> std::result::Result<(), String> {
        let stream = s.cu_stream() as sys::cudaStream_t;
        let mut first_error = Ok(());
        for (peer, buf) in incoming.iter_mut() {
            let len = buf.len();
            let (ptr, _sync) = buf.device_ptr_mut(s);
            // SAFETY: as for the sends.
            let r = unsafe {
                sys::ncclRecv(
                    ptr as *mut _,
                    len,
                    sys::ncclDataType_t::ncclBfloat16,
                    *peer,
                    raw.comm,
                    stream,
                )
            };
            first_error = first_error.and(nccl_call("ncclRecv", r));
        }
        first_error
    }
}

/// Runs `ops` between `ncclGroupStart` and `ncclGroupEnd`, closing the group whatever happens.
fn group(ops: impl FnOnce() -> std::result::Result<(), String>) -> std::result::Result<(), String> {
    // SAFETY: group calls are paired below whatever happens in between.
    nccl_call("ncclGroupStart", unsafe { sys::ncclGroupStart() })?;
    let issued = ops();
    // SAFETY: closes the group opened above.
    let ended = nccl_call("ncclGroupEnd", unsafe { sys::ncclGroupEnd() });
    issued.and(ended)
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Abort rather than destroy: destroying waits for pending operations, which may never
        // finish when a peer is gone.
        let raw = self.raw.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !raw.aborted {
            // SAFETY: the communicator is live and not used after this.
            let _ = unsafe { sys::ncclCommAbort(raw.comm) };
        }
    }
}
