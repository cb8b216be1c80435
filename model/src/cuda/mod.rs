//! GPU support. With the `cuda` feature, [`gpu`]; without it, a stub with the same API whose
//! types cannot be constructed, so the rest of the crate never branches on the feature. The
//! decisions the GPU code makes that do not need a GPU (the NCCL group plan and abort state,
//! the kernel target, the combine order, the FP8 widening layout) are plain modules compiled
//! and tested in every build.

pub mod combine;
pub mod exchange;
pub mod fp8_widen;
pub mod grouped;
pub mod target;

#[cfg(feature = "cuda")]
mod gpu;
#[cfg(feature = "cuda")]
pub use gpu::{
    CudaDevice, DeviceAttention, DeviceAttentionStack, DeviceKvCache, DeviceMatrix, DeviceSwiGlu, NcclComm, PagedRows,
};

#[cfg(not(feature = "cuda"))]
mod stub;
#[cfg(not(feature = "cuda"))]
pub use stub::{CudaDevice, DeviceAttentionStack, DeviceSwiGlu, NcclComm};

/// One expert of a dispatch on the GPU: its weights and the indices of the assignments it computes.
pub struct ExpertGroup<'a> {
    pub weights: &'a DeviceSwiGlu,
    pub members: &'a [usize],
}
