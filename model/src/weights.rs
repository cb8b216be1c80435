//! In-memory weight types. Matrices keep their checkpoint dtype (bf16 stays bf16, half the
//! bytes); kernels widen to f32 as they read. Small vectors (norm weights) are widened once.

use crate::config::DType;

/// Storage of a weight matrix in its checkpoint dtype.
#[derive(Debug, Clone)]
pub enum MatrixData {
    F32(Vec<f32>),
    BF16(Vec<u16>),
    F16(Vec<u16>),
}

/// A row-major `[rows, cols]` weight, as PyTorch stores `nn.Linear.weight`: `rows` outputs,
/// `cols` inputs.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: MatrixData,
}

impl Matrix {
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix data does not match its shape");
        Matrix {
            rows,
            cols,
            data: MatrixData::F32(data),
        }
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            MatrixData::F32(_) => DType::F32,
            MatrixData::BF16(_) => DType::BF16,
            MatrixData::F16(_) => DType::F16,
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        self.rows * self.cols * self.dtype().size_in_bytes()
    }

    /// Widens row `r` into `out` (length `cols`).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let range = r * self.cols..(r + 1) * self.cols;
        widen(&self.data, range, out);
    }

    /// Widens rows `start..start+n` into `out` (length `n * cols`).
    pub fn rows_to_f32(&self, start: usize, n: usize, out: &mut [f32]) {
        widen(&self.data, start * self.cols..(start + n) * self.cols, out);
    }
}

fn widen(data: &MatrixData, range: std::ops::Range<usize>, out: &mut [f32]) {
    match data {
        MatrixData::F32(v) => out.copy_from_slice(&v[range]),
        MatrixData::BF16(v) => crate::kernels::widen_bf16(&v[range], out),
        MatrixData::F16(v) => {
            for (o, &b) in out.iter_mut().zip(&v[range]) {
                *o = half::f16::from_bits(b).to_f32();
            }
        }
    }
}

/// bf16 is the top half of an f32; widening is a shift (faster than a table or `half`).
#[inline(always)]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Round-to-nearest-even narrowing, used when writing bf16 checkpoints.
pub fn f32_to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}
