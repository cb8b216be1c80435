//! An NCCL communicator between GPUs of different worker processes: the data plane between
//! attention and expert workers. Point-to-point only, each batch of sends or receives issued as
//! one NCCL group so that several peers progress together. Set up through the coordinator
//! (see `moe_runtime::nccl`): rank 0 makes the unique id, every rank joins with it.

use cudarc::driver::CudaSlice;
use cudarc::nccl::{Comm, Id};

use super::{CudaDevice, err};
use crate::{Error, Result};

/// Size of `ncclUniqueId`.
pub const UNIQUE_ID_BYTES: usize = 128;

pub struct NcclComm {
    /// One NCCL call at a time on a communicator: sends and receives of a step are issued
    /// together under this lock.
    comm: std::sync::Mutex<ThreadComm>,
    rank: usize,
    world_size: usize,
    device: CudaDevice,
}

/// cudarc's `Comm` holds NCCL's raw handle and so is not `Send`.
struct ThreadComm(Comm);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; `NcclComm` only reaches it through its mutex.
unsafe impl Send for ThreadComm {}

fn nccl_present() -> Result<()> {
    // SAFETY: only probes for the shared library.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::Device("NCCL (libnccl.so) not found".into()))
    }
}

impl NcclComm {
    /// Whether NCCL can be loaded: what a worker checks at start-up.
    pub fn available() -> Result<()> {
        nccl_present()
    }

    /// A fresh `ncclUniqueId` (rank 0 makes it; it names the communicator to every rank).
    pub fn unique_id() -> Result<Vec<u8>> {
        nccl_present()?;
        let id = Id::new().map_err(err("ncclGetUniqueId"))?;
        Ok(id.internal().iter().map(|&c| c as u8).collect())
    }

    /// Joins communicator `unique_id` as `rank` of `world_size` on `device`. Blocks until every
    /// rank has joined (NCCL's initialisation is collective).
    pub fn join(device: &CudaDevice, rank: usize, world_size: usize, unique_id: &[u8]) -> Result<NcclComm> {
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
        let comm = Comm::from_rank(device.stream().clone(), rank, world_size, Id::uninit(internal))
            .map_err(err("ncclCommInitRank"))?;
        Ok(NcclComm {
            comm: std::sync::Mutex::new(ThreadComm(comm)),
            rank,
            world_size,
            device: device.clone(),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ThreadComm> {
        self.comm.lock().expect("NCCL communicator lock")
    }

    fn check_peer(&self, peer: usize) -> Result<i32> {
        if peer >= self.world_size() || peer == self.rank() {
            return Err(Error::InvalidInput(format!(
                "NCCL peer {peer}: this is rank {} of {}",
                self.rank(),
                self.world_size()
            )));
        }
        Ok(peer as i32)
    }

    /// Sends each buffer to its peer, all in one NCCL group; returns once they are sent.
    pub fn send_all(&self, sends: &[(usize, &[f32])]) -> Result<()> {
        let s = self.device.stream();
        let mut on_device: Vec<(i32, CudaSlice<f32>)> = Vec::with_capacity(sends.len());
        for &(peer, data) in sends {
            on_device.push((self.check_peer(peer)?, s.clone_htod(data).map_err(err("uploading"))?));
        }
        {
            let comm = self.lock();
            let mut group = comm.0.group();
            for (peer, buf) in &on_device {
                group.send(buf.as_view(), *peer).map_err(err("ncclSend"))?;
            }
        }
        s.synchronize().map_err(err("waiting for the sends"))
    }

    /// Receives `len` values from each peer, all in one NCCL group.
    pub fn recv_all(&self, recvs: &[(usize, usize)]) -> Result<Vec<Vec<f32>>> {
        let s = self.device.stream();
        let mut on_device: Vec<(i32, CudaSlice<f32>)> = Vec::with_capacity(recvs.len());
        for &(peer, len) in recvs {
            on_device.push((self.check_peer(peer)?, s.alloc_zeros(len).map_err(err("allocating"))?));
        }
        {
            let comm = self.lock();
            let mut group = comm.0.group();
            for (peer, buf) in &mut on_device {
                group.recv(buf.as_view_mut(), *peer).map_err(err("ncclRecv"))?;
            }
        }
        on_device
            .iter()
            .map(|(_, buf)| s.clone_dtoh(buf).map_err(err("downloading")))
            .collect()
    }
}
