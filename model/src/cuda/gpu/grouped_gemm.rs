//! cuBLAS's grouped GEMM (`cublasGemmGroupedBatchedEx`, cuBLAS 12.5 or newer) over bf16
//! matrices named by device pointers. cuBLAS reads the A, B and C pointer arrays from device
//! memory (its kernels dereference them), while sizes, leading dimensions and scalars stay on
//! the host; so the pointer arrays are uploaded here and kept alive until the stream has passed
//! the GEMM (cudarc's safe wrapper passes host arrays, which faults).

use std::ffi::c_void;

use cudarc::cublas::sys::{self, cublasComputeType_t, cublasOperation_t, cudaDataType_t};
use cudarc::driver::{CudaSlice, DevicePtr};

use super::{CudaDevice, err};
use crate::Result;
use crate::cuda::grouped::{GemmGroup, arrays};

/// Device pointer arrays a queued grouped GEMM reads; drop them only after the stream has
/// passed it (a download on the stream, or a synchronisation).
#[must_use = "the pointer arrays must outlive the queued GEMM"]
pub(super) struct PointerArrays(#[allow(dead_code)] Vec<CudaSlice<u64>>);

impl CudaDevice {
    /// Queues every problem of `groups` on this device's stream as one cuBLAS call.
    pub(super) fn grouped_gemm_bf16(&self, groups: &[GemmGroup]) -> Result<PointerArrays> {
        let host = arrays(groups)?;
        let count = host.m.len();
        if count == 0 {
            return Ok(PointerArrays(Vec::new()));
        }
        let s = self.stream();
        let upload = |ptrs: &[u64]| s.clone_htod(ptrs).map_err(err("uploading GEMM pointer arrays"));
        let (a, b, c) = (upload(&host.a)?, upload(&host.b)?, upload(&host.c)?);
        let trans_a = vec![cublasOperation_t::CUBLAS_OP_T; count];
        let trans_b = vec![cublasOperation_t::CUBLAS_OP_N; count];
        let (alpha, beta) = (vec![1.0f32; count], vec![0.0f32; count]);
        let blas = self.blas();
        {
            let (a_ptr, _a) = a.device_ptr(s);
            let (b_ptr, _b) = b.device_ptr(s);
            let (c_ptr, _c) = c.device_ptr(s);
            // SAFETY: every host array has one entry per group (or per problem for the pointer
            // arrays, uploaded above and alive until the caller drops them after the stream has
            // passed this call); each problem's pointers address buffers of its shape, which the
            // callers allocate from the same sizes; lda = ldb = k and ldc = m match the layout of
            // `GemmGroup`. alpha and beta are f32 as CUBLAS_COMPUTE_32F requires.
            unsafe {
                sys::cublasGemmGroupedBatchedEx(
                    *blas.handle(),
                    trans_a.as_ptr(),
                    trans_b.as_ptr(),
                    host.m.as_ptr(),
                    host.n.as_ptr(),
                    host.k.as_ptr(),
                    alpha.as_ptr() as *const c_void,
                    a_ptr as *const *const c_void,
                    cudaDataType_t::CUDA_R_16BF,
                    host.k.as_ptr(),
                    b_ptr as *const *const c_void,
                    cudaDataType_t::CUDA_R_16BF,
                    host.k.as_ptr(),
                    beta.as_ptr() as *const c_void,
                    c_ptr as *const *mut c_void,
                    cudaDataType_t::CUDA_R_16BF,
                    host.m.as_ptr(),
                    count as i32,
                    host.group_size.as_ptr(),
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                )
            }
            .result()
            .map_err(err("grouped GEMM"))?;
        }
        Ok(PointerArrays(vec![a, b, c]))
    }
}
