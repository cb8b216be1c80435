//! `y = x · Wᵀ` for a PyTorch-layout weight `W [n, k]` and activations `x [m, k]`.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::simd::{dot, dot_bf16};
use crate::weights::{Matrix, MatrixData};

/// Below this many rows the product is memory-bound: read each weight row once and take `m`
/// dot products with it.
const SKINNY_ROWS: usize = 8;

/// Work (m·n·k multiply-adds) below which threads cost more than they save.
const PARALLEL_WORK: usize = 1 << 18;

/// `y[m, n] = x[m, k] · W[n, k]ᵀ`. `W` may be f32, bf16 or f16; the arithmetic is f32.
pub fn linear(x: &[f32], m: usize, w: &Matrix, y: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "linear: input is not [m={m}, k={k}]");
    assert_eq!(y.len(), m * n, "linear: output is not [m={m}, n={n}]");
    if m == 0 {
        return;
    }
    let parallel = m * n * k >= PARALLEL_WORK;
    if let (MatrixData::F32(wd), true) = (&w.data, m >= SKINNY_ROWS) {
        let lhs = MatRef::from_row_major_slice(x, m, k);
        let rhs = MatRef::from_row_major_slice(wd, n, k).transpose();
        let dst = MatMut::from_row_major_slice_mut(y, m, n);
        let par = if parallel { Par::rayon(0) } else { Par::Seq };
        matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, par);
        return;
    }

    // Tiles of weight rows produce contiguous blocks of yᵀ [n, m]; transposed at the end.
    let tile = (65_536 / k.max(1)).clamp(8, 256);
    let mut yt = vec![0.0f32; n * m];
    let run_tile = |(t, out): (usize, &mut [f32])| {
        let r0 = t * tile;
        let rows = out.len() / m;
        if m < SKINNY_ROWS {
            let mut wrow = vec![0.0f32; k];
            for r in 0..rows {
                let rows = (r0 + r) * k..(r0 + r + 1) * k;
                match &w.data {
                    MatrixData::F32(wd) => {
                        for i in 0..m {
                            out[r * m + i] = dot(&wd[rows.clone()], &x[i * k..(i + 1) * k]);
                        }
                    }
                    // Fused: each bf16 weight is read once, widened in registers.
                    MatrixData::BF16(wd) => {
                        for i in 0..m {
                            out[r * m + i] = dot_bf16(&wd[rows.clone()], &x[i * k..(i + 1) * k]);
                        }
                    }
                    MatrixData::F16(_) => {
                        w.row_to_f32(r0 + r, &mut wrow);
                        for i in 0..m {
                            out[r * m + i] = dot(&wrow, &x[i * k..(i + 1) * k]);
                        }
                    }
                }
            }
        } else {
            let mut wt = vec![0.0f32; rows * k];
            w.rows_to_f32(r0, rows, &mut wt);
            let lhs = MatRef::from_row_major_slice(&wt, rows, k);
            let rhs = MatRef::from_row_major_slice(x, m, k).transpose();
            let dst = MatMut::from_row_major_slice_mut(out, rows, m);
            matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, Par::Seq);
        }
    };
    if parallel {
        yt.par_chunks_mut(tile * m).enumerate().for_each(run_tile);
    } else {
        yt.chunks_mut(tile * m).enumerate().for_each(run_tile);
    }
    for j in 0..n {
        for i in 0..m {
            y[i * n + j] = yt[j * m + i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::f32_to_bf16;

    fn naive(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    fn data(len: usize, seed: f32) -> Vec<f32> {
        (0..len).map(|i| ((i as f32 + seed) * 0.731).sin()).collect()
    }

    #[test]
    fn every_path_matches_naive() {
        for &(m, n, k) in &[(1, 5, 3), (3, 17, 33), (8, 40, 64), (33, 300, 96), (2, 700, 200)] {
            let x = data(m * k, 1.0);
            let wf = data(n * k, 2.0);
            let want = naive(&x, m, &wf, n, k);
            let mut y = vec![0.0; m * n];
            linear(&x, m, &Matrix::from_f32(n, k, wf.clone()), &mut y);
            let err = y.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err < 1e-4, "f32 m={m} n={n} k={k}: {err}");

            // bf16: compare against the naive product of the rounded weights.
            let wb: Vec<u16> = wf.iter().map(|&v| f32_to_bf16(v)).collect();
            let wr: Vec<f32> = wb.iter().map(|&b| crate::weights::bf16_to_f32(b)).collect();
            let want = naive(&x, m, &wr, n, k);
            let w = Matrix {
                rows: n,
                cols: k,
                data: MatrixData::BF16(wb),
            };
            linear(&x, m, &w, &mut y);
            let err = y.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err < 1e-4, "bf16 m={m} n={n} k={k}: {err}");

            // f16 likewise.
            let wh: Vec<u16> = wf.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
            let wr: Vec<f32> = wh.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect();
            let want = naive(&x, m, &wr, n, k);
            let w = Matrix {
                rows: n,
                cols: k,
                data: MatrixData::F16(wh),
            };
            linear(&x, m, &w, &mut y);
            let err = y.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err < 1e-4, "f16 m={m} n={n} k={k}: {err}");
        }
    }
}
