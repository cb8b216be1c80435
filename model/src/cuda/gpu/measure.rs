//! The GPU's own limits and the expert products' rate, measured, so benchmark numbers read as
//! ratios: cuBLAS bf16 dense matmul (f32 accumulation), device memory bandwidth, and the grouped
//! expert GEMM of one dispatch. Wall time around a stream synchronise, best of `iters`.

use std::time::Instant;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig};
use half::bf16;

use super::experts::DeviceSwiGlu;
use super::{CudaDevice, err};
use crate::Result;

impl CudaDevice {
    fn best_of(&self, iters: usize, mut run: impl FnMut() -> Result<()>) -> Result<f64> {
        run()?; // warm-up: kernel selection, lazy allocations
        self.stream().synchronize().map_err(err("synchronising"))?;
        let mut best = f64::INFINITY;
        for _ in 0..iters.max(1) {
            let t = Instant::now();
            run()?;
            self.stream().synchronize().map_err(err("synchronising"))?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    }

    /// bf16 `n x n x n` matmul through cuBLAS, TFLOP/s.
    pub fn measure_bf16_matmul_tflops(&self, n: usize, iters: usize) -> Result<f64> {
        let s = self.stream();
        let a = s.alloc_zeros::<bf16>(n * n).map_err(err("allocating"))?;
        let b = s.alloc_zeros::<bf16>(n * n).map_err(err("allocating"))?;
        let mut c = s.alloc_zeros::<bf16>(n * n).map_err(err("allocating"))?;
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: n as i32,
            k: n as i32,
            alpha: bf16::ONE,
            lda: n as i32,
            ldb: n as i32,
            beta: bf16::ZERO,
            ldc: n as i32,
        };
        let secs = self.best_of(iters, || {
            // SAFETY: three n x n buffers.
            unsafe { self.blas().gemm(cfg, &a, &b, &mut c) }.map_err(err("matmul"))
        })?;
        Ok(2.0 * (n as f64).powi(3) / secs / 1e12)
    }

    /// Device-to-device copy of `bytes`, counting the read and the write, GB/s.
    pub fn measure_memory_gbps(&self, bytes: usize, iters: usize) -> Result<f64> {
        let s = self.stream();
        let src = s.alloc_zeros::<u8>(bytes).map_err(err("allocating"))?;
        let mut dst = s.alloc_zeros::<u8>(bytes).map_err(err("allocating"))?;
        let secs = self.best_of(iters, || s.memcpy_dtod(&src, &mut dst).map_err(err("copying")))?;
        Ok(2.0 * bytes as f64 / secs / 1e9)
    }

    /// One dispatch's expert products, `experts` experts of `[hidden, inter]` with `rows` token
    /// rows each, as the expert worker runs them (grouped gate/up GEMM, SwiGLU, grouped down
    /// GEMM): TFLOP/s and the seconds per dispatch.
    pub fn measure_grouped_experts(
        &self,
        experts: usize,
        rows: usize,
        hidden: usize,
        inter: usize,
        iters: usize,
    ) -> Result<(f64, f64)> {
        let s = self.stream();
        let weights: Vec<DeviceSwiGlu> = (0..experts)
            .map(|_| DeviceSwiGlu::zeroed(self, hidden, inter))
            .collect::<Result<_>>()?;
        let x = s
            .alloc_zeros::<bf16>(experts * rows * hidden)
            .map_err(err("allocating"))?;
        let groups: Vec<(&DeviceSwiGlu, usize)> = weights.iter().map(|w| (w, rows)).collect();
        let secs = self.best_of(iters, || self.grouped_swiglu(&x, hidden, &groups).map(drop))?;
        let flops = 2.0 * 3.0 * (experts * rows * hidden * inter) as f64;
        Ok((flops / secs / 1e12, secs))
    }
}
