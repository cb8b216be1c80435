//! In-memory weight types. Matrices keep their checkpoint dtype (bf16 stays bf16, half the
//! bytes; FP8 stays one byte per weight); kernels widen to f32 as they read. Small vectors (norm
//! weights) are widened once.

use crate::config::DType;
use crate::fp8::Fp8Data;

/// Storage of a weight matrix in its checkpoint dtype.
#[derive(Debug, Clone)]
pub enum MatrixData {
    F32(Vec<f32>),
    BF16(Vec<u16>),
    F16(Vec<u16>),
    /// e4m3fn codes and their scale (boxed: the scale would make every matrix larger).
    F8E4M3(Box<Fp8Data>),
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
            MatrixData::F8E4M3(_) => DType::F8E4M3,
        }
    }

    /// Bytes held, scales included.
    pub fn size_in_bytes(&self) -> usize {
        let scales = match &self.data {
            MatrixData::F8E4M3(d) => d.scale.size_in_bytes(),
            _ => 0,
        };
        self.rows * self.cols * self.dtype().size_in_bytes() + scales
    }

    /// Widens row `r` into `out` (length `cols`); FP8 is dequantised (`q * scale`).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        self.rows_to_f32(r, 1, out);
    }

    /// Widens rows `start..start+n` into `out` (length `n * cols`).
    pub fn rows_to_f32(&self, start: usize, n: usize, out: &mut [f32]) {
        let range = start * self.cols..(start + n) * self.cols;
        match &self.data {
            MatrixData::F32(v) => out.copy_from_slice(&v[range]),
            MatrixData::BF16(v) => crate::kernels::widen_bf16(&v[range], out),
            MatrixData::F16(v) => {
                for (o, &b) in out.iter_mut().zip(&v[range]) {
                    *o = half::f16::from_bits(b).to_f32();
                }
            }
            MatrixData::F8E4M3(d) => {
                for (i, row) in out.chunks_exact_mut(self.cols).enumerate() {
                    d.row_to_f32(start + i, self.cols, row);
                }
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
