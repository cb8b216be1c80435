//! The CUDA backend (`cuda` feature): bf16 storage (FP8 weights kept as FP8 and widened to bf16
//! scratch before each product), f32 arithmetic. Products through cuBLAS
//! (the experts' as one grouped GEMM per dispatch), everything else as NVRTC kernels
//! (`kernels.cu`). The CUDA libraries are loaded at run time (cudarc's dynamic loading), so a
//! `cuda` build starts on machines without them and says so instead of panicking.
//!
//! Its status (what has run where) is stated once, in docs/architecture.md ("GPU path").

mod attention;
mod experts;
mod fp8;
mod grouped_gemm;
mod measure;
mod nccl;
mod ops;
mod source;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::cublas::sys as cublas_sys;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};

use crate::cuda::target::{check_cublas as check_cublas_version, kernel_targets};

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
    /// Where FP8 weights are widened to bf16 before a product (`fp8::Scratch`).
    scratch: Mutex<fp8::Scratch>,
}

/// One GPU: its stream, cuBLAS handle and compiled kernels. Cheap to clone.
#[derive(Clone)]
pub struct CudaDevice {
    gpu: Arc<Gpu>,
}

/// Compiles and loads the kernels for a device of compute capability `cc`, trying the targets of
/// [`kernel_targets`] in order (its own CUBIN first: a driver older than NVRTC refuses newer
/// PTX, never a CUBIN); the error lists every attempt.
fn load_kernels(ctx: &Arc<CudaContext>, cc: (i32, i32)) -> Result<Arc<CudaModule>> {
    let mut failures = Vec::new();
    for target in kernel_targets(cc, &source::supported_archs()?) {
        let loaded =
            source::compile(target).and_then(|image| ctx.load_module(image).map_err(err("loading the CUDA kernels")));
        match loaded {
            Ok(module) => {
                tracing::info!(?target, major = cc.0, minor = cc.1, "CUDA kernels loaded");
                return Ok(module);
            }
            Err(e) => failures.push(format!("{target:?}: {e}")),
        }
    }
    Err(Error::Device(format!(
        "no kernel build loads on this GPU (compute capability {}.{}): {}",
        cc.0,
        cc.1,
        failures.join("; ")
    )))
}

/// Refuses a cuBLAS without the grouped GEMM before anything calls it (cudarc aborts the
/// process on a missing symbol).
fn check_cublas() -> Result<()> {
    let property = |p| {
        let mut v = 0;
        // SAFETY: valid out pointer; cublasGetProperty exists in every cuBLAS.
        unsafe { cublas_sys::cublasGetProperty(p, &mut v) }
            .result()
            .map(|()| v)
            .map_err(err("reading the cuBLAS version"))
    };
    use cublas_sys::libraryPropertyType::{MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL};
    let version = (
        property(MAJOR_VERSION)?,
        property(MINOR_VERSION)?,
        property(PATCH_LEVEL)?,
    );
    // SAFETY: only looks the symbol up in the loaded library.
    let grouped = unsafe { cublas_sys::culib().get::<*const ()>(b"cublasGemmGroupedBatchedEx") }.is_ok();
    check_cublas_version(version, grouped).map_err(Error::Device)
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
        check_cublas()?;
        let ctx = CudaContext::new(ordinal).map_err(err("creating the CUDA context"))?;
        let capability = |a| ctx.attribute(a).map_err(err("reading the compute capability"));
        let cc = (
            capability(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            capability(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(err("creating the cuBLAS handle"))?;
        let module = load_kernels(&ctx, cc)?;
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
                scratch: Mutex::new(None),
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
