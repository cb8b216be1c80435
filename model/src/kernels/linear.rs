//! `y = x · Wᵀ` for a PyTorch-layout weight `W [n, k]` and activations `x [m, k]`.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::simd::{dot, dot_bf16, dot_fp8};
use crate::fp8::{BLOCK, Fp8Data, Fp8Scale};
use crate::weights::{Matrix, MatrixData};

/// Below this many rows the product is memory-bound: read each weight row once and take `m`
/// dot products with it.
const SKINNY_ROWS: usize = 8;

/// Work (m·n·k multiply-adds) below which threads cost more than they save.
const PARALLEL_WORK: usize = 1 << 18;

/// `y[m, n] = x[m, k] · W[n, k]ᵀ`. `W` may be f32, bf16, f16 or FP8 (dequantised: `q * scale`);
/// the arithmetic is f32.
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
                    // Fused like bf16, one byte per weight; the scale multiplies each
                    // row's (or 128-column block's) dot product instead of every weight.
                    MatrixData::F8E4M3(d) => {
                        for i in 0..m {
                            out[r * m + i] = fp8_row_dot(d, r0 + r, k, &x[i * k..(i + 1) * k]);
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

/// Row `r` of an FP8 matrix of width `k`, dotted with `x`, scaled.
fn fp8_row_dot(d: &Fp8Data, r: usize, k: usize, x: &[f32]) -> f32 {
    let codes = &d.codes[r * k..(r + 1) * k];
    match &d.scale {
        Fp8Scale::PerTensor(s) => s * dot_fp8(codes, x),
        Fp8Scale::Blocks { .. } => codes
            .chunks(BLOCK)
            .zip(x.chunks(BLOCK))
            .enumerate()
            .map(|(c, (w, x))| d.scale.at(r, c) * dot_fp8(w, x))
            .sum(),
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

    /// FP8, per-tensor and block-wise, on both paths (skinny fused dot, dequantised tiles),
    /// against the naive product of the dequantised weights.
    #[test]
    fn fp8_matches_dequantise_then_f32() {
        use crate::fp8::{Fp8Data, Fp8Scale, quantize_per_tensor};
        // k = 300 and n = 260 leave partial 128-blocks in both directions.
        for &(m, n, k) in &[(1, 5, 3), (3, 17, 33), (1, 260, 300), (4, 260, 300), (33, 260, 300)] {
            let x = data(m * k, 1.0);
            let wf = data(n * k, 2.0);
            let (codes, scale) = quantize_per_tensor(&wf);
            let (bn, bk) = (n.div_ceil(BLOCK), k.div_ceil(BLOCK));
            // Distinct per block, of the per-tensor scale's size (so values stay comparable).
            let blocks: Vec<f32> = (0..bn * bk).map(|i| scale * (1.0 + 0.25 * i as f32)).collect();
            for scale in [
                Fp8Scale::PerTensor(scale),
                Fp8Scale::Blocks {
                    block_cols: bk,
                    scales: blocks.clone(),
                },
            ] {
                // The reference: w = float(q) * scale in f32, computed independently of the
                // matrix code, then an f64 product.
                let deq: Vec<f32> = (0..n * k)
                    .map(|i| {
                        let (r, c) = (i / k, i % k);
                        let s = match &scale {
                            Fp8Scale::PerTensor(s) => *s,
                            Fp8Scale::Blocks { .. } => blocks[(r / BLOCK) * bk + c / BLOCK],
                        };
                        crate::fp8::e4m3_to_f32(codes[i]) * s
                    })
                    .collect();
                let want = naive(&x, m, &deq, n, k);
                let w = Matrix {
                    rows: n,
                    cols: k,
                    data: MatrixData::F8E4M3(Box::new(Fp8Data {
                        codes: codes.clone(),
                        scale: scale.clone(),
                        input_scale: None,
                    })),
                };
                assert_eq!(w.size_in_bytes(), n * k + scale.size_in_bytes());
                // f32 rounding grows with the sum of |x·w|: 1e-5 of it (~100 f32 ulps).
                let abs = |v: &[f32]| v.iter().map(|a| a.abs()).collect::<Vec<_>>();
                let bound = naive(&abs(&x), m, &abs(&deq), n, k);
                let mut y = vec![0.0; m * n];
                linear(&x, m, &w, &mut y);
                for (j, ((a, b), t)) in y.iter().zip(&want).zip(&bound).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * t,
                        "fp8 {scale:?} m={m} n={n} k={k} out {j}: {a} vs {b}"
                    );
                }
                let mut row = vec![0.0; k];
                w.row_to_f32(n - 1, &mut row);
                assert_eq!(row, deq[(n - 1) * k..]);
            }
        }
    }
}
