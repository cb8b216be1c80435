//! The machine's own limits, measured, so benchmark numbers can be read as ratios.

use std::time::Instant;

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};
use rayon::prelude::*;

#[derive(Debug, Clone, serde::Serialize)]
pub struct MachineLimits {
    /// Streaming read bandwidth over a 1 GiB buffer, all threads, best of 3 (GB/s).
    pub memory_bandwidth_gbps: f64,
    /// f32 matrix multiply 1024x1024x1024 (faer, all threads), best of 3 (GFLOP/s).
    pub matmul_f32_gflops: f64,
    pub threads: usize,
}

pub fn measure() -> MachineLimits {
    let buf: Vec<u64> = (0..(1usize << 27)).map(|i| i as u64).collect();
    let mut best_bw = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let sum: u64 = buf
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .reduce(|| 0, u64::wrapping_add);
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best_bw = best_bw.max((buf.len() * 8) as f64 / secs / 1e9);
    }
    drop(buf);
    let n = 1024;
    let a = Mat::<f32>::from_fn(n, n, |i, j| ((i * 7 + j) % 13) as f32 * 0.1);
    let b = Mat::<f32>::from_fn(n, n, |i, j| ((i + j * 3) % 11) as f32 * 0.1);
    let mut c = Mat::<f32>::zeros(n, n);
    let mut best_flops = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        matmul(c.as_mut(), Accum::Replace, a.as_ref(), b.as_ref(), 1.0, Par::rayon(0));
        let secs = t.elapsed().as_secs_f64();
        best_flops = best_flops.max(2.0 * (n * n * n) as f64 / secs / 1e9);
    }
    std::hint::black_box(&c);
    MachineLimits {
        memory_bandwidth_gbps: best_bw,
        matmul_f32_gflops: best_flops,
        threads: rayon::current_num_threads(),
    }
}
