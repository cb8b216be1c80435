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

impl CudaDevice {
    pub fn open(_ordinal: usize) -> Result<CudaDevice> {
        Err(Error::Device(
            "this build has no GPU support: rebuild with `--features cuda` (the CUDA libraries are loaded at run time)"
                .into(),
        ))
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

impl DeviceSwiGlu {
    pub fn size_in_bytes(&self) -> usize {
        match self.never {}
    }
}
