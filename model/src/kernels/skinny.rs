//! The skinny product: `y[i, j] = Σ_p W[j, p] · x[i, p]` for a few input rows `i`, reading each
//! weight row once for up to eight input rows (decode is memory-bound: the weight bytes are the
//! cost). With AVX2+FMA+F16C (checked at run time, so binaries stay portable) the weights are
//! widened to f32 in registers: bf16 by a shift, f16 and FP8 by the F16C conversion. Elsewhere
//! the portable dot products of `simd` are used, one input row at a time.

use super::simd::{dot, dot_bf16, dot_fp8, has_f16c};
use crate::fp8::{BLOCK, Fp8Data, Fp8Scale};
use crate::weights::{Matrix, MatrixData};

/// Input rows served by one pass over a weight row (eight accumulators fit the 16 AVX2
/// registers with room for the widened weights).
const GROUP: usize = 8;

/// Where a product reads and writes: `x` rows of `x_stride` values (the first `k` used) and
/// output rows of `y_stride` values starting at `y` (column `j` of row `i` is
/// `y[i * y_stride + j]`).
#[derive(Clone, Copy)]
pub(super) struct Operands<'a> {
    pub x: &'a [f32],
    pub x_stride: usize,
    pub m: usize,
}

/// `y[i * y_stride + (j - rows.start)] = x[i] · W[j]` for the weight rows `rows`, every input
/// row.
///
/// # Safety
/// `y` points at the first output column of the range: for every input row `i < m` the slots
/// `y[i * y_stride..i * y_stride + rows.len()]` are writable and nobody else touches them
/// meanwhile (parallel callers write disjoint column ranges of the same rows, which is why this
/// takes a pointer and not a slice).
pub(super) unsafe fn skinny(ops: Operands<'_>, w: &Matrix, rows: std::ops::Range<usize>, y: *mut f32, y_stride: usize) {
    let k = w.cols;
    // Real checks (once per call): the SIMD path reads and writes through raw pointers.
    assert!(rows.end <= w.rows, "skinny: rows out of range");
    assert!(
        ops.m == 0 || ops.x.len() >= (ops.m - 1) * ops.x_stride + k,
        "skinny: x too short"
    );
    assert!(
        ops.m <= 1 || (ops.x_stride >= k && y_stride >= rows.len()),
        "skinny: rows overlap"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if has_f16c() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked at run time); the input
            // lengths are checked above, the output is the caller's promise.
            unsafe { avx2::skinny(ops, w, rows, y, y_stride) };
            return;
        }
    }
    // SAFETY: as above.
    unsafe { portable(ops, w, rows, y, y_stride) };
}

/// One input row at a time with the portable dot products.
///
/// # Safety
/// As [`skinny`].
unsafe fn portable(ops: Operands<'_>, w: &Matrix, rows: std::ops::Range<usize>, y: *mut f32, y_stride: usize) {
    let k = w.cols;
    let xr = |i: usize| &ops.x[i * ops.x_stride..i * ops.x_stride + k];
    // SAFETY: the caller promises these slots.
    let out = |i: usize, o: usize| unsafe { &mut *y.add(i * y_stride + o) };
    let mut wrow = Vec::new();
    for (o, r) in rows.enumerate() {
        match &w.data {
            MatrixData::F32(wd) => {
                for i in 0..ops.m {
                    *out(i, o) = dot(&wd[r * k..(r + 1) * k], xr(i));
                }
            }
            MatrixData::BF16(wd) => {
                for i in 0..ops.m {
                    *out(i, o) = dot_bf16(&wd[r * k..(r + 1) * k], xr(i));
                }
            }
            MatrixData::F8E4M3(d) => {
                for i in 0..ops.m {
                    *out(i, o) = fp8_row_dot(d, r, k, xr(i));
                }
            }
            MatrixData::F16(_) => {
                wrow.resize(k, 0.0);
                w.row_to_f32(r, &mut wrow);
                for i in 0..ops.m {
                    *out(i, o) = dot(&wrow, xr(i));
                }
            }
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

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{GROUP, Operands};
    use crate::fp8::{BLOCK, Fp8Scale, e4m3_to_f32};
    use crate::weights::{Matrix, MatrixData};

    /// A stored weight type: eight of them widened to f32 lanes, and one alone for the tails.
    /// `FACTOR` multiplies the vector sums (FP8 codes decode to `value * 2^-8`).
    trait Load {
        type T: Copy;
        const FACTOR: f32;
        /// # Safety
        /// `p` points at 8 readable elements; the CPU has AVX2, FMA and F16C.
        unsafe fn load8(p: *const Self::T) -> __m256;
        fn one(v: Self::T) -> f32;
    }

    struct F32;
    struct Bf16;
    struct F16;
    struct Fp8;

    impl Load for F32 {
        type T = f32;
        const FACTOR: f32 = 1.0;
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            // SAFETY: the caller guarantees 8 readable f32s.
            unsafe { _mm256_loadu_ps(p) }
        }
        fn one(v: f32) -> f32 {
            v
        }
    }

    impl Load for Bf16 {
        type T = u16;
        const FACTOR: f32 = 1.0;
        #[inline(always)]
        unsafe fn load8(p: *const u16) -> __m256 {
            // SAFETY: the caller guarantees 8 readable u16s (16 bytes); unaligned load. A bf16
            // is the top half of an f32: zero-extend, shift left by 16.
            unsafe {
                let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v))
            }
        }
        fn one(v: u16) -> f32 {
            crate::weights::bf16_to_f32(v)
        }
    }

    impl Load for F16 {
        type T = u16;
        const FACTOR: f32 = 1.0;
        #[inline(always)]
        unsafe fn load8(p: *const u16) -> __m256 {
            // SAFETY: the caller guarantees 8 readable u16s; the CPU has F16C.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
        }
        fn one(v: u16) -> f32 {
            half::f16::from_bits(v).to_f32()
        }
    }

    impl Load for Fp8 {
        type T = u8;
        /// An e4m3fn code moved into a half's bit positions reads as `value * 2^-8` (see
        /// `simd::dot_fp8_f16c`).
        const FACTOR: f32 = 256.0;
        #[inline(always)]
        unsafe fn load8(p: *const u8) -> __m256 {
            // SAFETY: the caller guarantees 8 readable bytes (a 64-bit load).
            unsafe {
                let v = _mm_cvtepu8_epi16(_mm_loadl_epi64(p.cast()));
                let halves = _mm_or_si128(
                    _mm_slli_epi16::<8>(_mm_and_si128(v, _mm_set1_epi16(0x80))),
                    _mm_slli_epi16::<7>(_mm_and_si128(v, _mm_set1_epi16(0x7f))),
                );
                _mm256_cvtph_ps(halves)
            }
        }
        fn one(v: u8) -> f32 {
            e4m3_to_f32(v)
        }
    }

    /// Where a group's sums go: `y[i * ys]` for input row `i`, times `scale`, stored or (when
    /// `add`) added.
    #[derive(Clone, Copy)]
    struct Dst {
        y: *mut f32,
        ys: usize,
        scale: f32,
        add: bool,
    }

    impl Dst {
        /// The same destination `rows` input rows further down.
        ///
        /// # Safety
        /// The result stays inside the output slice.
        unsafe fn down(self, rows: usize) -> Dst {
            // SAFETY: forwarded from the caller.
            Dst {
                y: unsafe { self.y.add(rows * self.ys) },
                ..self
            }
        }
    }

    /// `[Σ_p w[p] · x[i * xs + p] for i in 0..M]` over `p < k`, with `U` independent
    /// accumulators per input row (so even one row keeps the FMA pipeline busy).
    ///
    /// # Safety
    /// `w` has `k` readable elements, `x` has `(M - 1) * xs + k`; the CPU has AVX2, FMA, F16C.
    #[inline(always)]
    unsafe fn dots<L: Load, const M: usize, const U: usize>(
        w: *const L::T,
        x: *const f32,
        xs: usize,
        k: usize,
    ) -> [f32; M] {
        // SAFETY: every load below stays inside the lengths the caller guarantees.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); U]; M];
            let step = 8 * U;
            let mut p = 0;
            while p + step <= k {
                for u in 0..U {
                    let wv = L::load8(w.add(p + 8 * u));
                    for (i, a) in acc.iter_mut().enumerate() {
                        a[u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(i * xs + p + 8 * u)), a[u]);
                    }
                }
                p += step;
            }
            while p + 8 <= k {
                let wv = L::load8(w.add(p));
                for (i, a) in acc.iter_mut().enumerate() {
                    a[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(i * xs + p)), a[0]);
                }
                p += 8;
            }
            let mut out = [0.0f32; M];
            for (i, (o, a)) in out.iter_mut().zip(&acc).enumerate() {
                let mut v = a[0];
                for &b in &a[1..] {
                    v = _mm256_add_ps(v, b);
                }
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
                let mut tail = 0.0;
                for q in p..k {
                    tail += L::one(*w.add(q)) * *x.add(i * xs + q);
                }
                *o = _mm_cvtss_f32(s) * L::FACTOR + tail;
            }
            out
        }
    }

    /// One input-row group of `M` rows against one weight row segment, into `dst`.
    ///
    /// # Safety
    /// As [`dots`]; `dst` has `M` rows.
    #[inline(always)]
    unsafe fn group<L: Load, const M: usize, const U: usize>(
        w: *const L::T,
        x: *const f32,
        xs: usize,
        k: usize,
        dst: Dst,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            let d = dots::<L, M, U>(w, x, xs, k);
            for (i, v) in d.into_iter().enumerate() {
                let slot = dst.y.add(i * dst.ys);
                *slot = if dst.add { *slot + dst.scale * v } else { dst.scale * v };
            }
        }
    }

    /// Every input row (in groups of up to [`GROUP`]) against weight row segment `w[..k]`.
    ///
    /// # Safety
    /// As [`group`] for `m` rows.
    #[inline(always)]
    unsafe fn all_rows<L: Load>(w: *const L::T, x: *const f32, xs: usize, m: usize, k: usize, dst: Dst) {
        // SAFETY: each group reads rows `i0..i0 + g` of `x` and writes those of `y`, all < m.
        unsafe {
            let mut i0 = 0;
            while i0 < m {
                let (x, d) = (x.add(i0 * xs), dst.down(i0));
                let g = (m - i0).min(GROUP);
                match g {
                    1 => group::<L, 1, 4>(w, x, xs, k, d),
                    2 => group::<L, 2, 4>(w, x, xs, k, d),
                    3 => group::<L, 3, 2>(w, x, xs, k, d),
                    4 => group::<L, 4, 2>(w, x, xs, k, d),
                    5 => group::<L, 5, 1>(w, x, xs, k, d),
                    6 => group::<L, 6, 1>(w, x, xs, k, d),
                    7 => group::<L, 7, 1>(w, x, xs, k, d),
                    _ => group::<L, 8, 1>(w, x, xs, k, d),
                }
                i0 += g;
            }
        }
    }

    /// Every weight row of `rows` (each `k` wide, times `scale`) against every input row.
    ///
    /// # Safety
    /// `wd` holds the rows; the operands and `y` are as [`super::skinny`] checks.
    #[inline(always)]
    unsafe fn plain<L: Load>(
        wd: &[L::T],
        k: usize,
        scale: f32,
        ops: Operands<'_>,
        rows: std::ops::Range<usize>,
        y: *mut f32,
        ys: usize,
    ) {
        let x = ops.x.as_ptr();
        for (o, r) in rows.enumerate() {
            let w = wd[r * k..(r + 1) * k].as_ptr();
            // SAFETY: the row has k elements; x and y as the caller guarantees.
            unsafe {
                let dst = Dst {
                    y: y.add(o),
                    ys,
                    scale,
                    add: false,
                };
                all_rows::<L>(w, x, ops.x_stride, ops.m, k, dst)
            };
        }
    }

    /// See [`super::skinny`].
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `ops.x` holds `m` rows of `x_stride` (at least `k` used)
    /// and `y` is as [`super::skinny`] requires.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn skinny(ops: Operands<'_>, w: &Matrix, rows: std::ops::Range<usize>, y: *mut f32, ys: usize) {
        let k = w.cols;
        // SAFETY: forwarded from the caller.
        unsafe {
            match &w.data {
                MatrixData::F32(wd) => plain::<F32>(wd, k, 1.0, ops, rows, y, ys),
                MatrixData::BF16(wd) => plain::<Bf16>(wd, k, 1.0, ops, rows, y, ys),
                MatrixData::F16(wd) => plain::<F16>(wd, k, 1.0, ops, rows, y, ys),
                MatrixData::F8E4M3(d) => match &d.scale {
                    Fp8Scale::PerTensor(s) => plain::<Fp8>(&d.codes, k, *s, ops, rows, y, ys),
                    Fp8Scale::Blocks { .. } => {
                        // One pass per 128-column block, its scale applied to the block's sum.
                        for (o, r) in rows.clone().enumerate() {
                            for (c, c0) in (0..k).step_by(BLOCK).enumerate() {
                                let len = BLOCK.min(k - c0);
                                let dst = Dst {
                                    y: y.add(o),
                                    ys,
                                    scale: d.scale.at(r, c),
                                    add: c > 0,
                                };
                                let w = d.codes[r * k + c0..].as_ptr();
                                all_rows::<Fp8>(w, ops.x.as_ptr().add(c0), ops.x_stride, ops.m, len, dst);
                            }
                        }
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable path (taken where the CPU lacks AVX2/FMA/F16C) agrees with the dispatched
    /// one on every dtype; the dispatched one is checked against an f64 product in `linear`.
    #[test]
    fn portable_matches_dispatched() {
        let (n, k) = (37, 300);
        let wf: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let (codes, s) = crate::fp8::quantize_per_tensor(&wf);
        let weights = [
            Matrix::from_f32(n, k, wf.clone()),
            Matrix {
                rows: n,
                cols: k,
                data: MatrixData::BF16(wf.iter().map(|&v| crate::weights::f32_to_bf16(v)).collect()),
            },
            Matrix {
                rows: n,
                cols: k,
                data: MatrixData::F16(wf.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect()),
            },
            Matrix {
                rows: n,
                cols: k,
                data: MatrixData::F8E4M3(Box::new(Fp8Data {
                    codes,
                    scale: Fp8Scale::Blocks {
                        block_cols: k.div_ceil(BLOCK),
                        scales: (0..3).map(|i| s * (1.0 + i as f32)).collect(),
                    },
                    input_scale: None,
                })),
            },
        ];
        for w in &weights {
            for m in [1usize, 5, 11] {
                let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.11).cos()).collect();
                let ops = Operands { x: &x, x_stride: k, m };
                let (mut a, mut b) = (vec![0.0; m * n], vec![0.0; m * n]);
                // SAFETY: both outputs are m rows of n columns, used by nobody else.
                unsafe {
                    skinny(ops, w, 0..n, a.as_mut_ptr(), n);
                    portable(ops, w, 0..n, b.as_mut_ptr(), n);
                }
                for (j, (p, q)) in a.iter().zip(&b).enumerate() {
                    assert!((p - q).abs() <= 1e-4 * q.abs().max(1.0), "m={m} out {j}: {p} vs {q}");
                }
            }
        }
    }
}
