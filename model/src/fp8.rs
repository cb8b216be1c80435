//! FP8 weights as the static-FP8 checkpoints store them: float8 **e4m3fn** codes (1 sign bit,
//! 4 exponent bits with bias 7, 3 mantissa bits; no infinities; 0x7f / 0xff are NaN; largest
//! finite value 448; exponent field 0 is subnormal, `m * 2^-9`) and a scale that maps them back,
//! `w = float(q) * scale`, either one per tensor or one per 128x128 block.
//!
//! The codes stay one byte per weight in memory; kernels widen them as they read (see
//! `kernels::dot_fp8`), so an FP8 matrix costs half the bytes of a bf16 one.

/// Side of the square weight blocks of block-wise scales (`weight_scale_inv`, the DeepSeek-V3
/// layout, `weight_block_size: [128, 128]`).
pub const BLOCK: usize = 128;

/// Largest finite e4m3fn magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// How an FP8 matrix's codes map back to real values.
#[derive(Debug, Clone, PartialEq)]
pub enum Fp8Scale {
    /// `w = q * scale` for every weight (`<name>.weight_scale`, a scalar).
    PerTensor(f32),
    /// `w[r, c] = q[r, c] * scale[r / 128, c / 128]` (`<name>.weight_scale_inv`), row-major
    /// `[ceil(rows / 128), ceil(cols / 128)]`.
    Blocks { block_cols: usize, scales: Vec<f32> },
}

impl Fp8Scale {
    /// The scale of weight row `r`, columns `[c * 128, (c + 1) * 128)` (every column for a
    /// per-tensor scale).
    #[inline]
    pub fn at(&self, r: usize, c: usize) -> f32 {
        match self {
            Fp8Scale::PerTensor(s) => *s,
            Fp8Scale::Blocks { block_cols, scales } => scales[(r / BLOCK) * block_cols + c],
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        match self {
            Fp8Scale::PerTensor(_) => 4,
            Fp8Scale::Blocks { scales, .. } => 4 * scales.len(),
        }
    }
}

/// An FP8 matrix's storage: row-major codes and their scale.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Data {
    pub codes: Vec<u8>,
    pub scale: Fp8Scale,
    /// The static activation scale stored beside the weight (`<name>.input_scale`), if any.
    /// Weight-only dequantisation (what the reference computes) does not use it.
    pub input_scale: Option<f32>,
}

impl Fp8Data {
    /// Dequantises row `r` (of `cols` codes) into `out`: `float(q) * scale`, as the reference
    /// computes it, in f32.
    pub fn row_to_f32(&self, r: usize, cols: usize, out: &mut [f32]) {
        let codes = &self.codes[r * cols..(r + 1) * cols];
        for (c, (block, out)) in codes.chunks(BLOCK).zip(out.chunks_mut(BLOCK)).enumerate() {
            crate::kernels::widen_fp8(block, self.scale.at(r, c), out);
        }
    }
}

/// Decodes one e4m3fn code. Branch-free (selects), so loops over codes vectorise: a normal code
/// becomes an f32 by moving its exponent and mantissa bits into place and rebiasing the
/// exponent (+120); a subnormal one is `m * 2^-9`, computed from the integer so that no f32
/// subnormal (slow on some CPUs) is ever formed.
#[inline(always)]
pub fn e4m3_to_f32(code: u8) -> f32 {
    let code = code as u32;
    let sign = (code & 0x80) << 24;
    let mag = code & 0x7f;
    let normal = f32::from_bits(sign | ((mag << 20) + (120 << 23)));
    let subnormal = f32::from_bits(sign | (mag as f32 * (1.0 / 512.0)).to_bits());
    let value = if mag < 8 { subnormal } else { normal };
    if mag == 0x7f { f32::NAN } else { value }
}

/// Every non-negative finite e4m3fn value, indexed by code (0x00..=0x7e): increasing.
fn positive_values() -> &'static [f32; 127] {
    use std::sync::OnceLock;
    static VALUES: OnceLock<[f32; 127]> = OnceLock::new();
    VALUES.get_or_init(|| std::array::from_fn(|c| e4m3_to_f32(c as u8)))
}

/// The e4m3fn code nearest to `x`, ties to the even code (round-to-nearest-even, as torch's
/// cast); magnitudes beyond 448 saturate to ±448 (as quantisers clamp before casting); NaN
/// becomes the NaN code.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let mag = x.abs().min(E4M3_MAX);
    let values = positive_values();
    // The first code whose value is >= mag; the nearest code is it or the one below.
    let hi = values.partition_point(|&v| v < mag);
    let code = if hi == 0 {
        0
    } else {
        let (lo, hi) = (hi - 1, hi);
        let (below, above) = (mag - values[lo], values[hi] - mag);
        match below.partial_cmp(&above) {
            Some(std::cmp::Ordering::Less) => lo,
            Some(std::cmp::Ordering::Greater) => hi,
            // A tie: the code whose last mantissa bit is 0.
            _ => {
                if lo % 2 == 0 {
                    lo
                } else {
                    hi
                }
            }
        }
    };
    sign | code as u8
}

/// Quantises a matrix with one scale for the tensor, `max|w| / 448` (so the largest weight maps
/// to the largest code), as static-FP8 quantisers do. Returns the codes and the scale.
pub fn quantize_per_tensor(w: &[f32]) -> (Vec<u8>, f32) {
    let amax = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    // An all-zero tensor: any positive scale reproduces it; 1 keeps the scale meaningful.
    let scale = if amax > 0.0 { amax / E4M3_MAX } else { 1.0 };
    (w.iter().map(|&v| f32_to_e4m3(v / scale)).collect(), scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// e4m3fn decoded from its definition, in f64, independently of the bit tricks above.
    fn reference(code: u8) -> f64 {
        let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let exp = ((code >> 3) & 0xf) as i32;
        let man = (code & 7) as f64;
        if exp == 0xf && code & 7 == 7 {
            return f64::NAN;
        }
        if exp == 0 {
            sign * (man / 8.0) * 2f64.powi(1 - 7)
        } else {
            sign * (1.0 + man / 8.0) * 2f64.powi(exp - 7)
        }
    }

    #[test]
    fn decoding_matches_the_definition_for_all_256_codes() {
        for code in 0..=255u8 {
            let (got, want) = (e4m3_to_f32(code), reference(code));
            if want.is_nan() {
                assert!(got.is_nan(), "code {code:#04x}: {got}, want NaN");
            } else {
                assert_eq!(got as f64, want, "code {code:#04x}");
                assert_eq!(got.is_sign_negative(), code & 0x80 != 0, "sign of {code:#04x}");
            }
        }
        // Landmarks of the format.
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0xfe), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert!(e4m3_to_f32(0xff).is_nan());
    }

    #[test]
    fn encoding_round_trips_every_code_and_rounds_to_nearest_even() {
        for code in (0..=255u8).filter(|c| c & 0x7f != 0x7f) {
            assert_eq!(f32_to_e4m3(e4m3_to_f32(code)), code, "code {code:#04x}");
        }
        // Between 1.0 (0x38) and 1.125 (0x39): the midpoint goes to the even code 0x38, and
        // between 1.125 and 1.25 (0x3a) to 0x3a.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.1875), 0x3a);
        assert_eq!(f32_to_e4m3(1.07), 0x39);
        assert_eq!(f32_to_e4m3(-1.07), 0xb9);
        // Saturation, tiny values, NaN.
        assert_eq!(f32_to_e4m3(1e9), 0x7e);
        assert_eq!(f32_to_e4m3(-500.0), 0xfe);
        assert_eq!(f32_to_e4m3(2f32.powi(-10)), 0x00, "a tie between 0 and 2^-9 goes to 0");
        assert_eq!(f32_to_e4m3(2f32.powi(-10) * 1.5), 0x01);
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7f);
    }

    #[test]
    fn encoding_picks_the_nearest_value() {
        // Against a brute-force search over every finite code.
        let finite: Vec<u8> = (0..=255u8).filter(|c| c & 0x7f != 0x7f).collect();
        for i in 0..20_000 {
            let x = ((i as f32 * 0.618_034).fract() - 0.5) * 1000.0 * ((i % 7) as f32 * -1.7).exp();
            let got = e4m3_to_f32(f32_to_e4m3(x));
            let best = finite
                .iter()
                .map(|&c| (e4m3_to_f32(c) - x.clamp(-448.0, 448.0)).abs())
                .fold(f32::INFINITY, f32::min);
            assert_eq!((got - x.clamp(-448.0, 448.0)).abs(), best, "x = {x}");
        }
    }

    #[test]
    fn per_tensor_quantisation_maps_the_largest_weight_to_448() {
        let w = [0.5f32, -2.0, 0.001, 1.3];
        let (codes, scale) = quantize_per_tensor(&w);
        assert_eq!(scale, 2.0 / 448.0);
        assert_eq!(codes[1], 0xfe);
        for (&q, &v) in codes.iter().zip(&w) {
            let back = e4m3_to_f32(q) * scale;
            // Half a unit in the last place: 2^-4 relative for normals, 2^-10 * scale absolute
            // for subnormals.
            assert!(
                (back - v).abs() <= (v.abs() / 16.0).max(scale / 1024.0) * 1.0001,
                "{v} -> {back}"
            );
        }
        assert_eq!(quantize_per_tensor(&[0.0, 0.0]), (vec![0, 0], 1.0));
    }

    #[test]
    fn block_scales_apply_per_128x128_block() {
        let (rows, cols) = (130, 200);
        let scales: Vec<f32> = (0..4).map(|i| 1.0 + i as f32).collect();
        let data = Fp8Data {
            codes: vec![0x38; rows * cols], // 1.0 everywhere
            scale: Fp8Scale::Blocks { block_cols: 2, scales },
            input_scale: None,
        };
        let mut row = vec![0.0; cols];
        data.row_to_f32(0, cols, &mut row);
        assert!(row[..128].iter().all(|&v| v == 1.0) && row[128..].iter().all(|&v| v == 2.0));
        data.row_to_f32(129, cols, &mut row);
        assert!(row[..128].iter().all(|&v| v == 3.0) && row[128..].iter().all(|&v| v == 4.0));
    }
}
