//! Dot products compiled twice: once for the baseline target and once with AVX2+FMA, chosen at
//! run time, so release binaries stay portable (no `target-cpu=native`) and still use wide
//! vectors where the machine has them.

use crate::fp8::e4m3_to_f32;

#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler keep a full vector register busy and
    // break the add dependency chain.
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0;
    for i in chunks * 8..a.len() {
        tail += a[i] * b[i];
    }
    let s0 = (acc[0] + acc[4]) + (acc[1] + acc[5]);
    let s1 = (acc[2] + acc[6]) + (acc[3] + acc[7]);
    s0 + s1 + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_body(a, b)
}

/// `sum(a[i] * b[i])` over equal-length slices.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_body(a, b)
}

/// `sum(widen(w[i]) * x[i])` with 16 independent accumulators, so the loop vectorises; the
/// weights are widened in registers, each stored byte read once.
#[inline(always)]
fn dot_widened<T: Copy>(w: &[T], x: &[f32], widen: impl Fn(T) -> f32) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = w.len() / 16;
    for c in 0..chunks {
        let (ws, xs) = (&w[c * 16..c * 16 + 16], &x[c * 16..c * 16 + 16]);
        for l in 0..16 {
            acc[l] += widen(ws[l]) * xs[l];
        }
    }
    let mut tail = 0.0;
    for i in chunks * 16..w.len() {
        tail += widen(w[i]) * x[i];
    }
    let mut sum = 0.0;
    for pair in acc.chunks(2) {
        sum += pair[0] + pair[1];
    }
    sum + tail
}

#[inline(always)]
fn dot_bf16_body(w: &[u16], x: &[f32]) -> f32 {
    // Widening bf16 is a shift into the top half of an f32.
    dot_widened(w, x, |b| f32::from_bits((b as u32) << 16))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_bf16_avx2(w: &[u16], x: &[f32]) -> f32 {
    dot_bf16_body(w, x)
}

/// `sum(bf16(w[i]) * x[i])`.
#[inline]
pub fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            return unsafe { dot_bf16_avx2(w, x) };
        }
    }
    dot_bf16_body(w, x)
}

#[inline(always)]
fn dot_fp8_body(w: &[u8], x: &[f32]) -> f32 {
    // `e4m3_to_f32` is branch-free so this vectorises; the scale is applied by the caller, once
    // per row or block.
    dot_widened(w, x, e4m3_to_f32)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_fp8_avx2(w: &[u8], x: &[f32]) -> f32 {
    dot_fp8_body(w, x)
}

/// The F16C path: an e4m3fn code shifted into a half's bit positions (sign to bit 15,
/// exponent and mantissa to bits 7..14) is a half of exactly `value * 2^-8`, subnormals included
/// (both formats' subnormals line up), so the hardware conversion (8 halves per instruction)
/// decodes 16 codes in a few instructions and one multiply by 256 at the end restores the
/// scale. The NaN codes would read as 480; the loader refuses them (`quant::load_fp8`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_fp8_f16c(w: &[u8], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let chunks = w.len() / 16;
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let (sign, magnitude) = (_mm256_set1_epi16(0x80), _mm256_set1_epi16(0x7f));
    for c in 0..chunks {
        let (ws, xs) = (&w[c * 16..c * 16 + 16], &x[c * 16..c * 16 + 16]);
        // SAFETY: `ws` holds 16 bytes and `xs` 16 f32s (sliced above); unaligned loads.
        let (codes, x0, x1) = unsafe {
            (
                _mm_loadu_si128(ws.as_ptr().cast()),
                _mm256_loadu_ps(xs.as_ptr()),
                _mm256_loadu_ps(xs.as_ptr().add(8)),
            )
        };
        let v = _mm256_cvtepu8_epi16(codes);
        let halves = _mm256_or_si256(
            _mm256_slli_epi16::<8>(_mm256_and_si256(v, sign)),
            _mm256_slli_epi16::<7>(_mm256_and_si256(v, magnitude)),
        );
        let lo = _mm256_cvtph_ps(_mm256_castsi256_si128(halves));
        let hi = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(halves));
        acc0 = _mm256_fmadd_ps(lo, x0, acc0);
        acc1 = _mm256_fmadd_ps(hi, x1, acc1);
    }
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` holds 8 f32s.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc0, acc1)) };
    let mut tail = 0.0;
    for i in chunks * 16..w.len() {
        tail += e4m3_to_f32(w[i]) * x[i];
    }
    let sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    sum * 256.0 + tail
}

/// `sum(e4m3(w[i]) * x[i])`: the codes' values, unscaled. `w` must hold no NaN code.
#[inline]
pub fn dot_fp8(w: &[u8], x: &[f32]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    {
        if has_f16c() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked at run time).
            return unsafe { dot_fp8_f16c(w, x) };
        }
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            return unsafe { dot_fp8_avx2(w, x) };
        }
    }
    dot_fp8_body(w, x)
}

#[inline(always)]
fn widen_bf16_body(w: &[u16], out: &mut [f32]) {
    for (o, &b) in out.iter_mut().zip(w) {
        *o = f32::from_bits((b as u32) << 16);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn widen_bf16_avx2(w: &[u16], out: &mut [f32]) {
    widen_bf16_body(w, out)
}

/// bf16 -> f32 for a whole slice (the tiles of the many-row product).
pub fn widen_bf16(w: &[u16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 (checked at run time).
            return unsafe { widen_bf16_avx2(w, out) };
        }
    }
    widen_bf16_body(w, out)
}

#[inline(always)]
fn widen_fp8_body(w: &[u8], scale: f32, out: &mut [f32]) {
    for (o, &q) in out.iter_mut().zip(w) {
        *o = e4m3_to_f32(q) * scale;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn widen_fp8_avx2(w: &[u8], scale: f32, out: &mut [f32]) {
    widen_fp8_body(w, scale, out)
}

/// FP8 codes -> `float(q) * scale` for a slice (dequantised tiles of the many-row product).
pub fn widen_fp8(w: &[u8], scale: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 (checked at run time).
            return unsafe { widen_fp8_avx2(w, scale, out) };
        }
    }
    widen_fp8_body(w, scale, out)
}

#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(target_arch = "x86_64")]
pub(super) fn has_f16c() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| has_avx2() && is_x86_feature_detected!("f16c"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn bf16_dot_and_widen_match_naive() {
        for n in [0usize, 1, 15, 16, 17, 100, 1024] {
            let w: Vec<u16> = (0..n)
                .map(|i| crate::weights::f32_to_bf16((i as f32 * 0.21).sin()))
                .collect();
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.13).cos()).collect();
            let wide: Vec<f32> = w.iter().map(|&b| crate::weights::bf16_to_f32(b)).collect();
            let naive: f64 = wide.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!((super::dot_bf16(&w, &x) as f64 - naive).abs() < 1e-4, "n={n}");
            let mut out = vec![0.0; n];
            super::widen_bf16(&w, &mut out);
            assert_eq!(out, wide);
        }
    }

    #[test]
    fn fp8_dot_matches_naive_for_every_code() {
        for n in [0usize, 1, 15, 16, 17, 256, 1000] {
            // Every code appears (NaN ones excepted), the subnormals included.
            let w: Vec<u8> = (0..n)
                .map(|i| (i * 37 % 256) as u8)
                .map(|c| if c & 0x7f == 0x7f { 0 } else { c })
                .collect();
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.13).cos()).collect();
            let naive: f64 = w
                .iter()
                .zip(&x)
                .map(|(&q, &v)| crate::fp8::e4m3_to_f32(q) as f64 * v as f64)
                .sum();
            // The dispatched kernel (F16C where the CPU has it) and the portable one.
            for got in [super::dot_fp8(&w, &x), super::dot_fp8_body(&w, &x)] {
                let got = got as f64;
                assert!(
                    (got - naive).abs() <= 1e-5 * naive.abs().max(1.0),
                    "n={n}: {got} vs {naive}"
                );
            }
        }
    }

    #[test]
    fn fp8_dot_is_exact_for_each_code_alone() {
        // One code repeated over a full 16-lane chunk plus a tail, against ±1: the sum is
        // exactly ±17 times its value, so a wrong subnormal or signed-zero mapping in any path
        // shows (in a mixed sum the small codes would drown under the large ones).
        for code in 0..=255u8 {
            if code & 0x7f == 0x7f {
                continue;
            }
            let want = crate::fp8::e4m3_to_f32(code);
            let w = [code; 17];
            for sign in [1.0f32, -1.0] {
                let x = [sign; 17];
                for got in [super::dot_fp8(&w, &x), super::dot_fp8_body(&w, &x)] {
                    assert_eq!(got, 17.0 * sign * want, "code {code:#04x}, sign {sign}");
                }
            }
        }
    }

    #[test]
    fn dot_matches_naive_on_odd_lengths() {
        for n in [0usize, 1, 7, 8, 9, 31, 64, 1000] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((super::dot(&a, &b) as f64 - naive).abs() < 1e-4, "n={n}");
        }
    }
}
