//! Times `kernels::linear` on the medium model's product shapes, for each weight dtype, number
//! of input rows and kernel path, to place the skinny/blocked crossover (`SKINNY_MAX_ROWS`) by
//! measurement: `cargo run --release -p moe-model --example linear_bench [reps]`.
//! Prints one line per case: GFLOP/s and weight GB/s (median of `reps` timed calls).

use std::time::Instant;

use moe_model::kernels::{Path, linear_with};
use moe_model::weights::{Matrix, MatrixData, f32_to_bf16};

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .map_or(15, |s| s.parse().expect("reps: a number"));
    for (n, k) in [(1024, 1024), (384, 1024), (1024, 384)] {
        let wf: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin() * 0.05).collect();
        let bf = Matrix {
            rows: n,
            cols: k,
            data: MatrixData::BF16(wf.iter().map(|&v| f32_to_bf16(v)).collect()),
        };
        let f32w = Matrix::from_f32(n, k, wf);
        for (name, w) in [("f32", &f32w), ("bf16", &bf)] {
            for m in [1usize, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128] {
                let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.11).cos()).collect();
                let mut y = vec![0.0; m * n];
                let mut line = format!("n={n:5} k={k:5} {name:5} m={m:4}");
                for path in [Path::Skinny, Path::Blocked] {
                    let mut times: Vec<f64> = (0..reps)
                        .map(|_| {
                            let t = Instant::now();
                            linear_with(&x, m, w, &mut y, path);
                            t.elapsed().as_secs_f64()
                        })
                        .collect();
                    times.sort_by(f64::total_cmp);
                    let t = times[reps / 2];
                    let gflops = 2.0 * (m * n * k) as f64 / t / 1e9;
                    let gbps = w.size_in_bytes() as f64 / t / 1e9;
                    line += &format!("  {path:?}: {:8.1} us {gflops:6.1} GF/s {gbps:5.1} GB/s", t * 1e6);
                }
                println!("{line}");
            }
        }
    }
}
