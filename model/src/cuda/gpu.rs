//! The CUDA expert backend (`cuda` feature): expert weights in bf16 on the GPU, the gate, up and
//! down products through cuBLAS (bf16 in, f32 accumulation), SwiGLU as an NVRTC kernel. The
//! CUDA libraries are loaded at run time (cudarc's dynamic loading), so a `cuda` build starts on
//! machines without them and reports that instead of panicking.
//!
//! Status: compiled and linted in CI; not yet run on a GPU (none was available while it was
//! written). The tests that need one are `#[ignore]`d with the reason.

use std::sync::{Arc, Mutex};

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::mlp::SwiGlu;
use crate::weights::{Matrix, MatrixData};
use crate::{Error, Result};

/// SwiGLU on bf16 bits without CUDA headers (NVRTC then needs no include path): f32 math,
/// round-to-nearest-even back to bf16.
const KERNELS: &str = r#"
__device__ __forceinline__ float bf2f(unsigned short b) { return __uint_as_float(((unsigned int)b) << 16); }
__device__ __forceinline__ unsigned short f2bf(float f) {
    unsigned int u = __float_as_uint(f);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
extern "C" __global__ void swiglu(const unsigned short* gate, const unsigned short* up,
                                  unsigned short* out, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float g = bf2f(gate[i]);
        out[i] = f2bf(g / (1.0f + __expf(-g)) * bf2f(up[i]));
    }
}
"#;

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
    swiglu: CudaFunction,
}

/// One GPU, its stream, cuBLAS handle and kernels.
#[derive(Clone)]
pub struct CudaDevice {
    gpu: Arc<Gpu>,
}

/// One expert's weights on the GPU, row-major bf16 like the checkpoint.
#[derive(Debug)]
pub struct DeviceSwiGlu {
    gate: CudaSlice<bf16>,
    up: CudaSlice<bf16>,
    down: CudaSlice<bf16>,
    hidden: usize,
    inter: usize,
}

fn to_bf16(m: &Matrix) -> Vec<bf16> {
    match &m.data {
        MatrixData::BF16(bits) => bits.iter().map(|&b| bf16::from_bits(b)).collect(),
        MatrixData::F32(v) => v.iter().map(|&x| bf16::from_f32(x)).collect(),
        MatrixData::F16(bits) => bits
            .iter()
            .map(|&b| bf16::from_f32(half::f16::from_bits(b).to_f32()))
            .collect(),
    }
}

impl CudaDevice {
    pub fn open(ordinal: usize) -> Result<CudaDevice> {
        // Without libcuda, cudarc's context creation panics: look first.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Device(
                "no NVIDIA driver (libcuda) on this machine: use --device cpu".into(),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| device_err("counting GPUs", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Device(format!(
                "GPU {ordinal} requested, this machine has {count}"
            )));
        }
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Device("cuBLAS (libcublas) not found".into()));
        }
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(Error::Device("NVRTC (libnvrtc) not found".into()));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| device_err("creating the CUDA context", e))?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| device_err("creating the cuBLAS handle", e))?;
        let ptx = cudarc::nvrtc::compile_ptx(KERNELS).map_err(|e| device_err("compiling kernels", e))?;
        let module = ctx.load_module(ptx).map_err(|e| device_err("loading kernels", e))?;
        let swiglu = module
            .load_function("swiglu")
            .map_err(|e| device_err("loading swiglu", e))?;
        Ok(CudaDevice {
            gpu: Arc::new(Gpu {
                ordinal,
                stream,
                blas: Mutex::new(blas),
                swiglu,
            }),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.gpu.ordinal
    }

    /// Copies an expert's weights to the GPU as bf16.
    pub fn upload(&self, mlp: &SwiGlu) -> Result<DeviceSwiGlu> {
        let s = &self.gpu.stream;
        let copy = |m: &Matrix| {
            s.clone_htod(&to_bf16(m))
                .map_err(|e| device_err("uploading weights", e))
        };
        Ok(DeviceSwiGlu {
            gate: copy(&mlp.gate)?,
            up: copy(&mlp.up)?,
            down: copy(&mlp.down)?,
            hidden: mlp.gate.cols,
            inter: mlp.gate.rows,
        })
    }

    /// `out[rows, hidden] = down(silu(gate(x)) * up(x))` for `x[rows, hidden]`.
    pub fn forward(&self, mlp: &DeviceSwiGlu, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let (h, i) = (mlp.hidden, mlp.inter);
        if x.len() != rows * h {
            return Err(Error::InvalidInput(format!(
                "expert input has {} values, expected {rows} rows of {h}",
                x.len()
            )));
        }
        if rows == 0 {
            return Ok(Vec::new());
        }
        let g = &self.gpu;
        let s = &g.stream;
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let x_d = s.clone_htod(&xb).map_err(err("uploading rows"))?;
        let mut gate = s.alloc_zeros::<bf16>(rows * i).map_err(err("allocating"))?;
        let mut up = s.alloc_zeros::<bf16>(rows * i).map_err(err("allocating"))?;
        let mut act = s.alloc_zeros::<bf16>(rows * i).map_err(err("allocating"))?;
        let mut out = s.alloc_zeros::<bf16>(rows * h).map_err(err("allocating"))?;
        // Row-major Y[rows, n] = X[rows, k] W^T for W[n, k] is, column-major,
        // Y^T[n, rows] = op(W)[n, k] X^T[k, rows] with op = transpose of W's [k, n] view.
        let cfg = |n: usize, k: usize| GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: rows as i32,
            k: k as i32,
            alpha: bf16::ONE,
            lda: k as i32,
            ldb: k as i32,
            beta: bf16::ZERO,
            ldc: n as i32,
        };
        {
            let blas = g.blas.lock().expect("cuBLAS lock");
            // SAFETY: shapes match the allocations above (gate/up: [i, h]; x: [rows, h]).
            unsafe {
                blas.gemm(cfg(i, h), &mlp.gate, &x_d, &mut gate)
                    .map_err(err("gate product"))?;
                blas.gemm(cfg(i, h), &mlp.up, &x_d, &mut up)
                    .map_err(err("up product"))?;
            }
            let n = (rows * i) as u32;
            let mut launch = s.launch_builder(&g.swiglu);
            launch.arg(&gate).arg(&up).arg(&mut act).arg(&n);
            // SAFETY: the kernel reads n elements of gate and up and writes n of act.
            unsafe { launch.launch(LaunchConfig::for_num_elems(n)) }.map_err(err("swiglu kernel"))?;
            // SAFETY: down is [h, i]; act is [rows, i]; out is [rows, h].
            unsafe { blas.gemm(cfg(h, i), &mlp.down, &act, &mut out) }.map_err(err("down product"))?;
        }
        let out = s.clone_dtoh(&out).map_err(err("downloading outputs"))?;
        Ok(out.into_iter().map(bf16::to_f32).collect())
    }
}

impl DeviceSwiGlu {
    pub fn size_in_bytes(&self) -> usize {
        2 * (self.gate.len() + self.up.len() + self.down.len())
    }
}
