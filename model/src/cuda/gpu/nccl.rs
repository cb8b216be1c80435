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
//! Each exchange is one NCCL group of sends and receives to several peers, on a stream of its
//! own so that a waiting receive never holds up the device's compute stream. Values travel as
//! bf16 (half the bytes; what the GPU computes in anyway).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// One NCCL call at a time on a communicator: an exchange is issued whole under this lock.
    raw: Mutex<RawComm>,
    rank: usize,
    world_size: usize,
    stream: Arc<CudaStream>,
}

struct RawComm {
    comm: sys::ncclComm_t,
    /// Set once the communicator was aborted; every later call is refused.
    aborted: Option<String>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; `NcclComm` only reaches it through its mutex.
unsafe impl Send for RawComm {}

impl RawComm {
    /// Aborts the communicator (idempotent): NCCL frees it and ends its pending kernels.
    fn abort(&mut self, why: String) {
        if self.aborted.is_none() {
            tracing::warn!(reason = %why, "aborting the NCCL communicator");
            // SAFETY: `comm` came from ncclCommInitRankConfig and is aborted at most once.
            let _ = unsafe { sys::ncclCommAbort(self.comm) };
            self.aborted = Some(why);
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

    /// Polls until the communicator has no call in progress, or aborts it at `deadline`.
    fn wait_settled(&mut self, what: &str, deadline: Instant) -> Result<()> {
        let mut spins = 0u32;
        loop {
            match self.settled() {
                Ok(true) => return Ok(()),
                Ok(false) if Instant::now() < deadline => backoff(&mut spins),
                Ok(false) => return Err(self.fail(format!("{what} did not complete in time"))),
                Err(e) => return Err(self.fail(format!("{what}: {e}"))),
            }
        }
    }

    fn fail(&mut self, why: String) -> Error {
        self.abort(why.clone());
        Error::Device(format!("NCCL: {why}; communicator aborted"))
    }

    fn check_live(&self) -> Result<()> {
        match &self.aborted {
            Some(why) => Err(Error::Device(format!("NCCL communicator was aborted ({why})"))),
            None => Ok(()),
        }
    }
}

/// Spins briefly (a layer's exchange takes tens of microseconds), then sleeps in short steps.
fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 2000 {
        std::hint::spin_loop();
    } else {
        std::thread::sleep(Duration::from_micros(50));
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
        let mut raw = RawComm { comm, aborted: None };
        raw.wait_settled(&format!("joining as rank {rank} of {world_size}"), deadline)?;
        Ok(NcclComm {
            raw: Mutex::new(raw),
            rank,
            world_size,
            stream,
        })
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

    /// Why the communicator was aborted, if it was.
    pub fn aborted(&self) -> Option<String> {
        self.lock().aborted.clone()
    }

    /// Aborts the communicator: its pending operations end and later calls are refused.
    pub fn abort(&self, why: &str) {
        self.lock().abort(why.to_owned());
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

    /// Sends each buffer to its peer and receives `len` values from each receive peer, all as
    /// one NCCL group in bf16; returns the received values once everything has arrived. Not
    /// done within `timeout`, or failed: the communicator is aborted and the error says why.
    pub fn exchange(
        &self,
        sends: &[(usize, &[f32])],
        recvs: &[(usize, usize)],
        timeout: Duration,
    ) -> Result<Vec<Vec<f32>>> {
        let deadline = Instant::now() + timeout;
        let s = &self.stream;
        s.context().bind_to_thread().map_err(err("binding the CUDA context"))?;
        let mut outgoing: Vec<(i32, CudaSlice<bf16>)> = Vec::with_capacity(sends.len());
        for &(peer, data) in sends {
            let narrowed: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
            outgoing.push((
                self.check_peer(peer)?,
                s.clone_htod(&narrowed).map_err(err("uploading"))?,
            ));
        }
        let mut incoming: Vec<(i32, CudaSlice<bf16>)> = Vec::with_capacity(recvs.len());
        for &(peer, len) in recvs {
            incoming.push((self.check_peer(peer)?, s.alloc_zeros(len).map_err(err("allocating"))?));
        }
        let mut raw = self.lock();
        raw.check_live()?;
        let issued = self.issue(&raw, s, &outgoing, &mut incoming);
        if let Err(e) = issued {
            return Err(raw.fail(e));
        }
        raw.wait_settled("issuing the exchange", deadline)?;
        // The kernels are queued: wait for them (and watch for asynchronous errors).
        let done = s.record_event(None).map_err(err("recording the exchange"))?;
        let mut spins = 0u32;
        loop {
            match done.try_is_complete() {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => return Err(raw.fail(format!("waiting for the exchange: {e:?}"))),
            }
            if let Err(e) = raw.settled() {
                return Err(raw.fail(e));
            }
            if Instant::now() >= deadline {
                let peers: Vec<i32> = outgoing.iter().chain(&incoming).map(|(p, _)| *p).collect();
                return Err(raw.fail(format!("exchange with ranks {peers:?} not done within {timeout:?}")));
            }
            backoff(&mut spins);
        }
        drop(raw);
        incoming
            .iter()
            .map(|(_, buf)| {
                let bits: Vec<bf16> = s.clone_dtoh(buf).map_err(err("downloading"))?;
                Ok(bits.into_iter().map(bf16::to_f32).collect())
            })
            .collect()
    }

    /// Issues one group of sends and receives; the group is always closed, even after an error.
    fn issue(
        &self,
        raw: &RawComm,
        s: &Arc<CudaStream>,
        outgoing: &[(i32, CudaSlice<bf16>)],
        incoming: &mut [(i32, CudaSlice<bf16>)],
    ) -> std::result::Result<(), String> {
        let stream = s.cu_stream() as sys::cudaStream_t;
        // SAFETY: group calls are paired below whatever happens in between.
        nccl_call("ncclGroupStart", unsafe { sys::ncclGroupStart() })?;
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
        for (peer, buf) in incoming.iter_mut() {
            let len = buf.len();
            let (ptr, _sync) = buf.device_ptr_mut(s);
            // SAFETY: as above.
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
        // SAFETY: closes the group opened above.
        let ended = nccl_call("ncclGroupEnd", unsafe { sys::ncclGroupEnd() });
        first_error.and(ended)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Abort rather than destroy: destroying waits for pending operations, which may never
        // finish when a peer is gone.
        let raw = self.raw.get_mut().expect("NCCL communicator lock");
        if raw.aborted.is_none() {
            // SAFETY: the communicator is live and not used after this.
            let _ = unsafe { sys::ncclCommAbort(raw.comm) };
        }
    }
}
