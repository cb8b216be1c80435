//! The CUDA backend (`cuda` feature): bf16 storage, f32 arithmetic. Products through cuBLAS
//! (the experts' as one grouped GEMM per dispatch), everything else as NVRTC kernels
//! (`kernels.cu`). The CUDA libraries are loaded at run time (cudarc's dynamic loading), so a
//! `cuda` build starts on machines without them and says so instead of panicking.
//!
//! Its status (what has run where) is stated once, in docs/architecture.md ("GPU path").

mod attention;
mod experts;
mod measure;
mod nccl;
mod ops;
mod source;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream};

pub use attention::{DeviceAttention, DeviceAttentionStack};
pub use experts::DeviceSwiGlu;
pub use nccl::NcclComm;
pub use ops::{DeviceKvCache, DeviceMatrix, PagedRows};

use crate::{Error, Result};

fn device_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device(format!("{what}: {e:?}"))
}

/// `map_err` adapter naming what failed.
fn err<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> Error {
    move |e| device_err(what, e)
}

struct Gpu {
    ordinal: usize,
    stream: Arc<CudaStream>,
    /// cuBLAS calls on one handle are serialised.
    blas: Mutex<CudaBlas>,
    kernels: HashMap<&'static str, CudaFunction>,
}

/// One GPU: its stream, cuBLAS handle and compiled kernels. Cheap to clone.
#[derive(Clone)]
pub struct CudaDevice {
    gpu: Arc<Gpu>,
}

impl CudaDevice {
    pub fn open(ordinal: usize) -> Result<CudaDevice> {
        // Without libcuda, cudarc's context creation panics: look first.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Device(
                "no NVIDIA driver (libcuda) on this machine: use --device cpu".into(),
            ));
        }
        let count = CudaContext::device_count().map_err(err("counting GPUs"))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Device(format!(
                "GPU {ordinal} requested, this machine has {count}"
            )));
        }
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Device("cuBLAS (libcublas) not found".into()));
        }
        let ctx = CudaContext::new(ordinal).map_err(err("creating the CUDA context"))?;
        let capability = |a| ctx.attribute(a).map_err(err("reading the compute capability"));
        let arch = source::arch(
            capability(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            capability(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(err("creating the cuBLAS handle"))?;
        let module = ctx
            .load_module(source::compile(arch)?)
            .map_err(err("loading the CUDA kernels"))?;
        let mut kernels = HashMap::new();
        for name in source::KERNELS {
            let f = module
                .load_function(name)
                .map_err(|e| device_err(&format!("loading kernel {name}"), e))?;
            kernels.insert(name, f);
        }
        Ok(CudaDevice {
            gpu: Arc::new(Gpu {
                ordinal,
                stream,
                blas: Mutex::new(blas),
                kernels,
            }),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.gpu.ordinal
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.gpu.stream
    }

    fn kernel(&self, name: &'static str) -> &CudaFunction {
        &self.gpu.kernels[name]
    }

    fn blas(&self) -> std::sync::MutexGuard<'_, CudaBlas> {
        self.gpu.blas.lock().expect("cuBLAS lock")
    }
}
