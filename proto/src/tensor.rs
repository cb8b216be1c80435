//! Packing f32 activations into [`Tensor`](crate::v1::Tensor) messages and back, with dtype and
//! shape checked on the way in.

use bytes::Bytes;

use crate::v1::{Dtype, Tensor};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    #[error("tensor dtype {0} is not supported (f32 or bf16)")]
    Dtype(i32),
    #[error("tensor shape {shape:?} holds {expected} elements but carries {got} bytes of {dtype}")]
    Size {
        shape: Vec<u32>,
        expected: usize,
        got: usize,
        dtype: &'static str,
    },
    #[error("tensor shape {got:?}, expected {expected}")]
    Shape { got: Vec<u32>, expected: String },
}

/// The element type activations travel in between attention and expert workers: `f32` is exact
/// (the default); `bf16` halves the bytes and rounds each value to bf16 (what a GPU computes
/// in anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireDtype {
    #[default]
    F32,
    Bf16,
}

impl WireDtype {
    /// Packs `data` with the given shape in this dtype.
    pub fn encode(self, data: &[f32], shape: &[usize]) -> Tensor {
        match self {
            WireDtype::F32 => encode_f32(data, shape),
            WireDtype::Bf16 => encode_bf16(data, shape),
        }
    }

    /// The dtype a tensor travelled in, so an answer can go back the same way.
    pub fn of(t: &Tensor) -> Result<Self, TensorError> {
        match Dtype::try_from(t.dtype) {
            Ok(Dtype::F32) => Ok(WireDtype::F32),
            Ok(Dtype::Bf16) => Ok(WireDtype::Bf16),
            _ => Err(TensorError::Dtype(t.dtype)),
        }
    }
}

impl std::str::FromStr for WireDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(WireDtype::F32),
            "bf16" => Ok(WireDtype::Bf16),
            other => Err(format!("wire dtype `{other}`: use f32 or bf16")),
        }
    }
}

impl std::fmt::Display for WireDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WireDtype::F32 => "f32",
            WireDtype::Bf16 => "bf16",
        })
    }
}

/// Packs `data` as f32 with the given shape.
pub fn encode_f32(data: &[f32], shape: &[usize]) -> Tensor {
    debug_assert_eq!(data.len(), shape.iter().product::<usize>());
    let mut bytes = Vec::with_capacity(data.len() * 4);
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    Tensor {
        dtype: Dtype::F32 as i32,
        shape: shape.iter().map(|&d| d as u32).collect(),
        data: Bytes::from(bytes),
    }
}

/// Packs `data` as bf16 (round to nearest even): half the bytes on the wire.
pub fn encode_bf16(data: &[f32], shape: &[usize]) -> Tensor {
    let mut bytes = Vec::with_capacity(data.len() * 2);
    for v in data {
        let bits = v.to_bits();
        // Round to nearest even; NaN stays NaN.
        let rounded = if v.is_nan() {
            (bits >> 16) as u16 | 0x40
        } else {
            ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
        };
        bytes.extend_from_slice(&rounded.to_le_bytes());
    }
    Tensor {
        dtype: Dtype::Bf16 as i32,
        shape: shape.iter().map(|&d| d as u32).collect(),
        data: Bytes::from(bytes),
    }
}

/// Unpacks a tensor of any supported dtype into f32, checking that its byte count matches its
/// shape. Returns the values and the shape.
pub fn decode_f32(t: &Tensor) -> Result<(Vec<f32>, Vec<usize>), TensorError> {
    let elems = t.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d as usize));
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    let (width, name) = match Dtype::try_from(t.dtype) {
        Ok(Dtype::F32) => (4, "f32"),
        Ok(Dtype::Bf16) => (2, "bf16"),
        _ => return Err(TensorError::Dtype(t.dtype)),
    };
    let expected = elems.unwrap_or(usize::MAX);
    if expected.checked_mul(width) != Some(t.data.len()) {
        return Err(TensorError::Size {
            shape: t.shape.clone(),
            expected,
            got: t.data.len(),
            dtype: name,
        });
    }
    let values = if width == 4 {
        t.data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    } else {
        t.data
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes(c.try_into().expect("2 bytes")) as u32) << 16))
            .collect()
    };
    Ok((values, shape))
}

/// Unpacks a `[rows, width]` matrix, checking the width.
pub fn decode_matrix(t: &Tensor, width: usize) -> Result<(Vec<f32>, usize), TensorError> {
    let (values, shape) = decode_f32(t)?;
    match shape.as_slice() {
        [rows, w] if *w == width => Ok((values, *rows)),
        _ => Err(TensorError::Shape {
            got: t.shape.clone(),
            expected: format!("[rows, {width}]"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trip_is_exact() {
        let data = [1.5f32, -0.0, f32::MAX, 1e-30, 3.25, -7.0];
        let t = encode_f32(&data, &[2, 3]);
        assert_eq!(t.data.len(), 24);
        let (back, shape) = decode_f32(&t).unwrap();
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(back, data);
    }

    #[test]
    fn bf16_round_trip_within_half_ulp() {
        let data: Vec<f32> = (0..100).map(|i| (i as f32 * 0.377).sin() * 10.0).collect();
        let t = encode_bf16(&data, &[100]);
        assert_eq!(t.data.len(), 200);
        let (back, _) = decode_f32(&t).unwrap();
        for (a, b) in data.iter().zip(&back) {
            assert!((a - b).abs() <= a.abs() * (1.0 / 256.0), "{a} vs {b}");
        }
    }

    #[test]
    fn wire_dtype_encodes_and_is_read_back_from_the_tensor() {
        let data = [1.0f32, -2.5, 3.0e-3, 7.0];
        for dtype in [WireDtype::F32, WireDtype::Bf16] {
            let t = dtype.encode(&data, &[2, 2]);
            assert_eq!(WireDtype::of(&t), Ok(dtype));
            let width = if dtype == WireDtype::F32 { 4 } else { 2 };
            assert_eq!(t.data.len(), data.len() * width);
            let (back, n) = decode_matrix(&t, 2).unwrap();
            assert_eq!(n, 2);
            for (a, b) in data.iter().zip(&back) {
                assert!((a - b).abs() <= a.abs() / 256.0, "{dtype:?}: {a} vs {b}");
            }
        }
        assert_eq!("bf16".parse::<WireDtype>(), Ok(WireDtype::Bf16));
        assert_eq!(WireDtype::Bf16.to_string().parse::<WireDtype>(), Ok(WireDtype::Bf16));
        assert!("fp8".parse::<WireDtype>().unwrap_err().contains("fp8"));
        let mut t = encode_f32(&data, &[4]);
        t.dtype = 7;
        assert_eq!(WireDtype::of(&t), Err(TensorError::Dtype(7)));
    }

    #[test]
    fn wrong_sizes_and_dtypes_are_refused() {
        let mut t = encode_f32(&[1.0, 2.0], &[2]);
        t.shape = vec![3];
        assert!(matches!(
            decode_f32(&t),
            Err(TensorError::Size {
                expected: 3,
                got: 8,
                ..
            })
        ));
        t.dtype = 9;
        assert_eq!(decode_f32(&t), Err(TensorError::Dtype(9)));
        let t = encode_f32(&[0.0; 6], &[2, 3]);
        assert!(matches!(decode_matrix(&t, 4), Err(TensorError::Shape { .. })));
        assert_eq!(decode_matrix(&t, 3).unwrap().1, 2);
        // A shape whose element count overflows is refused, not a panic.
        let t = Tensor {
            dtype: Dtype::F32 as i32,
            shape: vec![u32::MAX, u32::MAX, u32::MAX],
            data: Bytes::new(),
        };
        assert!(decode_f32(&t).is_err());
    }
}
