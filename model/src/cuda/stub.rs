//! Builds without the `cuda` feature: the GPU types exist (so call sites do not branch on the
//! feature) but cannot be constructed; opening a GPU says how to get one.

use super::ExpertGroup;
use crate::checkpoint::Checkpoint;
use crate::router::ExpertAssignment;
use crate::{Error, Result};

/// Never constructed in this build.
#[derive(Clone)]
pub struct CudaDevice {
    never: std::convert::Infallible,
}

/// Never constructed in this build.
#[derive(Debug)]
pub struct DeviceSwiGlu {
    never: std::convert::Infallible,
}

/// Never constructed in this build.
pub struct NcclComm {
    never: std::convert::Infallible,
}

/// Never constructed in this build.
#[derive(Debug)]
pub struct DeviceAttentionStack {
    never: std::convert::Infallible,
}

impl DeviceAttentionStack {
    pub fn upload<'a>(
        gpu: &CudaDevice,
        _config: &crate::config::ModelConfig,
        _layer: impl Fn(usize) -> &'a crate::attention::AttentionWeights,
        _kv: crate::kv_cache::KvCacheConfig,
    ) -> Result<DeviceAttentionStack> {
        match gpu.never {}
    }

    pub fn forward(
        &self,
        _l: usize,
        _config: &crate::config::ModelConfig,
        _rope: &crate::rope::Rope,
        _batch: &crate::batch::BatchLayout,
        _x: &[f32],
        _tables: &crate::kv_cache::KvCache,
    ) -> Result<Vec<f32>> {
        match self.never {}
    }
}

fn no_gpu_support() -> Error {
    Error::Device(
        "this build has no GPU support: rebuild with `--features cuda` (the CUDA libraries are loaded at run time)"
            .into(),
    )
}

impl CudaDevice {
    pub fn open(_ordinal: usize) -> Result<CudaDevice> {
        Err(no_gpu_support())
    }

    pub fn ordinal(&self) -> usize {
        match self.never {}
    }

    pub fn upload_expert(
        &self,
        _ckpt: &Checkpoint,
        _name: impl Fn(&str) -> String,
        _hidden: usize,
        _inter: usize,
    ) -> Result<DeviceSwiGlu> {
        match self.never {}
    }

    pub fn experts_forward(
        &self,
        _rows: &[f32],
        _num_rows: usize,
        _hidden: usize,
        _assignments: &[ExpertAssignment],
        _groups: &[ExpertGroup<'_>],
    ) -> Result<Vec<f32>> {
        match self.never {}
    }
}

impl CudaDevice {
    pub fn measure_bf16_matmul_tflops(&self, _n: usize, _iters: usize) -> Result<f64> {
        match self.never {}
    }

    pub fn measure_memory_gbps(&self, _bytes: usize, _iters: usize) -> Result<f64> {
        match self.never {}
    }

    pub fn measure_grouped_experts(
        &self,
        _experts: usize,
        _rows: usize,
        _hidden: usize,
        _inter: usize,
        _iters: usize,
    ) -> Result<(f64, f64)> {
        match self.never {}
    }
}

impl DeviceSwiGlu {
    pub fn size_in_bytes(&self) -> usize {
        match self.never {}
    }
}

impl NcclComm {
    pub fn available() -> Result<()> {
        Err(no_gpu_support())
    }

    pub fn unique_id() -> Result<Vec<u8>> {
        Err(no_gpu_support())
    }

    pub fn join(
        device: &CudaDevice,
        _rank: usize,
        _world_size: usize,
        _unique_id: &[u8],
        _timeout: std::time::Duration,
    ) -> Result<NcclComm> {
        match device.never {}
    }

    pub fn rank(&self) -> usize {
        match self.never {}
    }

    pub fn world_size(&self) -> usize {
        match self.never {}
    }

    pub fn aborted(&self) -> Option<String> {
        match self.never {}
    }

    pub fn abort(&self, _why: &str) {
        match self.never {}
    }

    pub fn exchange(
        &self,
        _sends: &[(usize, &[f32])],
        _recvs: &[(usize, usize)],
        _timeout: std::time::Duration,
    ) -> Result<Vec<Vec<f32>>> {
        match self.never {}
    }
}
