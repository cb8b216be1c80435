//! `y = x · Wᵀ` for PyTorch-layout weights `W [n, k]` and activations `x [m, k]`.
//!
//! The output columns are cut into jobs (a range of one weight's rows each) that run on the
//! rayon pool when the product is large enough and the caller is not itself a pool task (the
//! expert layer parallelises over experts; nesting would only add tasks). Few input rows take
//! the skinny kernel (each weight row read once for all of them); many rows take faer's matrix
//! multiply, with non-f32 weights widened block by block into a per-thread scratch buffer
//! that is reused, never allocated per call.

use std::ops::Range;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::scratch::{Scratch, with_scratch};
use super::skinny::{Operands, skinny};
use crate::weights::{Matrix, MatrixData};

/// Up to this many input rows the skinny kernel is used; above it faer. Measured with
/// `examples/linear_bench.rs` on the medium model's shapes (k = 384 and 1024, 2 AVX2 cores):
/// the skinny kernel wins clearly up to 8 rows, bf16 weights (whose widening faer's path pays
/// separately) up to 12; from 16 rows faer wins on most shapes.
const SKINNY_MAX_ROWS_F32: usize = 8;
const SKINNY_MAX_ROWS: usize = 12;

/// Work (m·n·k multiply-adds) below which threads cost more than they save.
const PARALLEL_WORK: usize = 1 << 18;

/// Widened f32 bytes per job of the many-row path: a block that stays in L2 while faer packs
/// and multiplies it.
const WIDE_BLOCK_BYTES: usize = 512 << 10;

/// Which product kernel to use; [`Path::Auto`] picks by the number of input rows. The forced
/// ones exist for tests and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Auto,
    Skinny,
    Blocked,
}

thread_local! {
    /// The widened weight block of the many-row path, per thread, grown once and reused.
    static WIDE: Scratch = const { Scratch::new(Vec::new()) };
}

/// `y[m, n] = x[m, k] · W[n, k]ᵀ`. `W` may be f32, bf16, f16 or FP8 (dequantised: `q * scale`);
/// the arithmetic is f32.
pub fn linear(x: &[f32], m: usize, w: &Matrix, y: &mut [f32]) {
    linear_with(x, m, w, y, Path::Auto);
}

/// [`linear`] with the kernel chosen by `path`.
pub fn linear_with(x: &[f32], m: usize, w: &Matrix, y: &mut [f32], path: Path) {
    let k = w.cols;
    assert_eq!(x.len(), m * k, "linear: input is not [m={m}, k={k}]");
    assert_eq!(y.len(), m * w.rows, "linear: output is not [m={m}, n={}]", w.rows);
    linear_strided(x, k, m, &[w], y, w.rows, path);
}

/// Several weights of the same width applied to the same input, their outputs side by side:
/// `y[i] = [x[i]·W0ᵀ, x[i]·W1ᵀ, ...]`, `y` being `[m, Σ n]`. One pass over `x` and one set of
/// jobs for all of them (e.g. SwiGLU's gate and up).
pub fn linear_many(x: &[f32], m: usize, ws: &[&Matrix], y: &mut [f32]) {
    let k = ws.first().map_or(0, |w| w.cols);
    let n: usize = ws.iter().map(|w| w.rows).sum();
    assert_eq!(x.len(), m * k, "linear_many: input is not [m={m}, k={k}]");
    assert_eq!(y.len(), m * n, "linear_many: output is not [m={m}, n={n}]");
    linear_strided(x, k, m, ws, y, n, Path::Auto);
}

/// The general form: input row `i` is `x[i * x_stride..][..k]`, output row `i` is
/// `y[i * y_stride..]`, the weights' outputs side by side from column 0. Every weight has `k`
/// columns.
pub fn linear_strided(
    x: &[f32],
    x_stride: usize,
    m: usize,
    ws: &[&Matrix],
    y: &mut [f32],
    y_stride: usize,
    path: Path,
) {
    let Some(k) = ws.first().map(|w| w.cols) else { return };
    let n: usize = ws.iter().map(|w| w.rows).sum();
    assert!(ws.iter().all(|w| w.cols == k), "linear: weights of different widths");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        x_stride >= k && x.len() >= (m - 1) * x_stride + k,
        "linear: input is not [m={m}, k={k}]"
    );
    assert!(
        y_stride >= n && y.len() >= (m - 1) * y_stride + n,
        "linear: output is not [m={m}, n={n}]"
    );
    let skinny_path = match path {
        Path::Auto if ws.iter().all(|w| matches!(w.data, MatrixData::F32(_))) => m <= SKINNY_MAX_ROWS_F32,
        Path::Auto => m <= SKINNY_MAX_ROWS,
        Path::Skinny => true,
        Path::Blocked => false,
    };
    let threads = if rayon::current_thread_index().is_some() {
        1
    } else {
        rayon::current_num_threads()
    };
    let parallel = threads > 1 && m * n * k >= PARALLEL_WORK;
    // Rows per job: a few jobs per thread for balance, never so few rows that a job is tiny;
    // the many-row path also bounds the widened block.
    let mut chunk = if parallel {
        n.div_ceil(4 * threads).max(PARALLEL_WORK / 4 / (m * k).max(1))
    } else {
        n
    };
    if !skinny_path && ws.iter().any(|w| !matches!(w.data, MatrixData::F32(_))) {
        chunk = chunk.min((WIDE_BLOCK_BYTES / 4 / k.max(1)).max(16));
    }
    let chunk = chunk.max(1);
    let jobs: usize = ws.iter().map(|w| w.rows.div_ceil(chunk)).sum();
    let out = Out(y.as_mut_ptr());
    let ops = Operands { x, x_stride, m };
    let run = |t: usize| {
        let (w, col, rows) = job(ws, chunk, t);
        // SAFETY: `y` holds m rows of `y_stride` ≥ n (checked above); each job writes its own
        // columns `col..col + rows.len()` of every row, disjoint from every other job's.
        unsafe {
            let y = out.at(col);
            if skinny_path {
                skinny(ops, w, rows, y, y_stride);
            } else {
                blocked(ops, w, rows, y, y_stride);
            }
        }
    };
    if parallel && jobs > 1 {
        (0..jobs).into_par_iter().for_each(run);
    } else {
        (0..jobs).for_each(run);
    }
}

/// Job `t`: its weight, its first output column and its weight rows.
fn job<'a>(ws: &[&'a Matrix], chunk: usize, mut t: usize) -> (&'a Matrix, usize, Range<usize>) {
    let mut col = 0;
    for w in ws {
        let count = w.rows.div_ceil(chunk);
        if t < count {
            let rows = t * chunk..((t + 1) * chunk).min(w.rows);
            return (w, col + rows.start, rows);
        }
        t -= count;
        col += w.rows;
    }
    unreachable!("job index beyond the job count")
}

/// The output pointer shared by the jobs (each writes only its own columns).
#[derive(Clone, Copy)]
struct Out(*mut f32);

// SAFETY: the jobs write disjoint elements through it (see `linear_strided`).
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

impl Out {
    /// # Safety
    /// `col` is inside the output.
    unsafe fn at(self, col: usize) -> *mut f32 {
        // SAFETY: forwarded.
        unsafe { self.0.add(col) }
    }
}

/// The many-row product of one job: faer, on the f32 weights directly or on the job's rows
/// widened into this thread's scratch block.
///
/// # Safety
/// As [`skinny`].
unsafe fn blocked(ops: Operands<'_>, w: &Matrix, rows: Range<usize>, y: *mut f32, y_stride: usize) {
    let (k, m, len) = (w.cols, ops.m, rows.len());
    let lhs = MatRef::from_row_major_slice_with_stride(&ops.x[..(m - 1) * ops.x_stride + k], m, k, ops.x_stride);
    // SAFETY: the caller promises rows i < m, columns 0..len of `y` with row stride `y_stride`.
    let dst = unsafe { MatMut::from_raw_parts_mut(y, m, len, y_stride as isize, 1) };
    let product = |wt: &[f32]| {
        let rhs = MatRef::from_row_major_slice(wt, len, k).transpose();
        matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, Par::Seq);
    };
    match &w.data {
        MatrixData::F32(wd) => product(&wd[rows.start * k..rows.end * k]),
        _ => with_scratch(&WIDE, len * k, |block| {
            w.rows_to_f32(rows.start, len, block);
            product(block);
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::{BLOCK, Fp8Data, Fp8Scale, quantize_per_tensor};
    use crate::weights::{bf16_to_f32, f32_to_bf16};

    /// `x · wᵀ` in f64, and the same product of absolute values (the scale of f32 rounding).
    fn naive(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
        let mut y = vec![0.0; m * n];
        let mut bound = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let v = x[i * k + p] as f64 * w[j * k + p] as f64;
                    y[i * n + j] += v;
                    bound[i * n + j] += v.abs();
                }
            }
        }
        (y, bound)
    }

    fn data(len: usize, seed: f32) -> Vec<f32> {
        (0..len).map(|i| ((i as f32 + seed) * 0.731).sin()).collect()
    }

    /// The weight `wf [n, k]` stored in every dtype, each with the f32 values it stands for.
    fn every_dtype(wf: &[f32], n: usize, k: usize) -> Vec<(&'static str, Matrix, Vec<f32>)> {
        let bf: Vec<u16> = wf.iter().map(|&v| f32_to_bf16(v)).collect();
        let bf_vals = bf.iter().map(|&b| bf16_to_f32(b)).collect();
        let h: Vec<u16> = wf.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
        let h_vals = h.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect();
        let (codes, s) = quantize_per_tensor(wf);
        let bk = k.div_ceil(BLOCK);
        // Distinct per block, of the per-tensor scale's size.
        let blocks: Vec<f32> = (0..n.div_ceil(BLOCK) * bk)
            .map(|i| s * (1.0 + 0.25 * i as f32))
            .collect();
        let fp8 = |scale: Fp8Scale| {
            // The reference dequantises independently of the matrix code.
            let vals = (0..n * k)
                .map(|i| {
                    let (r, c) = (i / k, i % k);
                    let sc = match &scale {
                        Fp8Scale::PerTensor(s) => *s,
                        Fp8Scale::Blocks { .. } => blocks[(r / BLOCK) * bk + c / BLOCK],
                    };
                    crate::fp8::e4m3_to_f32(codes[i]) * sc
                })
                .collect();
            let data = MatrixData::F8E4M3(Box::new(Fp8Data {
                codes: codes.clone(),
                scale,
                input_scale: None,
            }));
            (Matrix { rows: n, cols: k, data }, vals)
        };
        let (fp8_t, fp8_t_vals) = fp8(Fp8Scale::PerTensor(s));
        let (fp8_b, fp8_b_vals) = fp8(Fp8Scale::Blocks {
            block_cols: bk,
            scales: blocks.clone(),
        });
        let with = |data| Matrix { rows: n, cols: k, data };
        vec![
            ("f32", Matrix::from_f32(n, k, wf.to_vec()), wf.to_vec()),
            ("bf16", with(MatrixData::BF16(bf)), bf_vals),
            ("f16", with(MatrixData::F16(h)), h_vals),
            ("fp8 per tensor", fp8_t, fp8_t_vals),
            ("fp8 blocks", fp8_b, fp8_b_vals),
        ]
    }

    /// Every dtype, every kernel, numbers of input rows around the group size (8) and the
    /// crossover, odd widths and heights (vector tails), 128-blocks cut short (FP8), and
    /// products large enough to be split into parallel jobs. Bound: f32 rounding of a k-term
    /// sum, 1e-5 of Σ|x·w| (about 100 ulps, far below any wrong element or missed term).
    #[test]
    fn every_path_matches_naive() {
        let shapes = [(5, 3), (17, 33), (40, 64), (260, 300), (301, 37), (700, 200)];
        for &(n, k) in &shapes {
            let wf = data(n * k, 2.0);
            for (name, w, vals) in every_dtype(&wf, n, k) {
                for m in [1usize, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33] {
                    let x = data(m * k, 1.0);
                    let (want, bound) = naive(&x, m, &vals, n, k);
                    for path in [Path::Auto, Path::Skinny, Path::Blocked] {
                        let mut y = vec![f32::NAN; m * n];
                        linear_with(&x, m, &w, &mut y, path);
                        for (j, ((a, b), t)) in y.iter().zip(&want).zip(&bound).enumerate() {
                            assert!(
                                (*a as f64 - b).abs() <= 1e-5 * t + 1e-30,
                                "{name} {path:?} m={m} n={n} k={k} out {j}: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Two weights side by side, strided input and output: each column block equals the
    /// single-weight product, and the slots outside the output columns stay untouched.
    #[test]
    fn many_and_strided_match_single() {
        let (k, n0, n1) = (300, 260, 37);
        let w0 = Matrix::from_f32(n0, k, data(n0 * k, 2.0));
        let wb: Vec<u16> = data(n1 * k, 3.0).iter().map(|&v| f32_to_bf16(v)).collect();
        let w1 = Matrix {
            rows: n1,
            cols: k,
            data: MatrixData::BF16(wb),
        };
        for m in [1usize, 3, 9, 40] {
            let (xs, ys) = (k + 5, n0 + n1 + 3);
            let x = data(m * xs, 1.0);
            let dense: Vec<f32> = (0..m).flat_map(|i| x[i * xs..i * xs + k].to_vec()).collect();
            let mut y0 = vec![0.0; m * n0];
            let mut y1 = vec![0.0; m * n1];
            linear(&dense, m, &w0, &mut y0);
            linear(&dense, m, &w1, &mut y1);
            let mut both = vec![0.0; m * (n0 + n1)];
            linear_many(&dense, m, &[&w0, &w1], &mut both);
            let mut strided = vec![-7.0; m * ys];
            linear_strided(&x, xs, m, &[&w0, &w1], &mut strided, ys, Path::Auto);
            for i in 0..m {
                let want: Vec<f32> = [&y0[i * n0..(i + 1) * n0], &y1[i * n1..(i + 1) * n1]].concat();
                for (got, what) in [
                    (&both[i * (n0 + n1)..(i + 1) * (n0 + n1)], "many"),
                    (&strided[i * ys..i * ys + n0 + n1], "strided"),
                ] {
                    for (j, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                            "{what} m={m} row {i} col {j}: {a} vs {b}"
                        );
                    }
                }
                assert_eq!(
                    &strided[i * ys + n0 + n1..(i + 1) * ys],
                    &[-7.0; 3],
                    "m={m} row {i}: padding written"
                );
            }
        }
    }
}
