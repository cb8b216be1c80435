//! The host side of keeping FP8 weights as FP8 on the GPU: how an FP8 weight's scales are laid
//! out for the `fp8_e4m3_to_bf16` kernel, where the widened (bf16) copies of the weights a
//! product needs go in the reusable scratch buffer, and the kernel's launch shape. Pure, so it
//! is tested in every build; `gpu::fp8` uploads and launches.
//!
//! The weights stay one byte per code (plus their f32 scales) in device memory; just before a
//! product, the kernel expands the ones it reads into bf16 scratch (cuBLAS's GEMMs read bf16),
//! `bf16(float(q) * scale)`: the value the host computes for the weight (`kernels::widen_fp8`)
//! rounded once to bf16, the rounding the bf16 upload applied before.

use crate::fp8::{BLOCK, Fp8Scale};

/// An FP8 weight's scales as the kernel reads them: the f32 values (one, or one per
/// `BLOCK x BLOCK` block, row-major) and the number of block columns (0: one scale for the
/// whole tensor).
pub fn device_scales(scale: &Fp8Scale) -> (Vec<f32>, u32) {
    match scale {
        Fp8Scale::PerTensor(s) => (vec![*s], 0),
        Fp8Scale::Blocks { block_cols, scales } => (scales.clone(), *block_cols as u32),
    }
}

/// The index in [`device_scales`]'s values of the scale of weight `(r, c)`: what the kernel
/// computes per weight, stated here so that it is tested against [`Fp8Scale::at`].
pub fn scale_index(r: usize, c: usize, block_cols: u32) -> usize {
    match block_cols {
        0 => 0,
        n => (r / BLOCK) * n as usize + c / BLOCK,
    }
}

/// Where each weight that needs widening (`Some(len)`, in values; `None` for one the GEMM reads
/// as it is) starts in the scratch buffer, one after the other, and the values they take in all.
pub fn scratch_layout(lens: impl IntoIterator<Item = Option<usize>>) -> (Vec<Option<usize>>, usize) {
    let mut total = 0;
    let at = lens
        .into_iter()
        .map(|len| {
            len.map(|len| {
                let start = total;
                total += len;
                start
            })
        })
        .collect();
    (at, total)
}

/// Threads per block of the widening kernel.
pub const WIDEN_THREADS: u32 = 256;
/// At most this many blocks: the kernel strides over the rest (a weight of A13B's experts is
/// 12.6M values; more blocks than the GPU runs at once only cost scheduling).
pub const WIDEN_MAX_BLOCKS: u32 = 4096;

/// The grid of a widening of `n` values (`n > 0`).
pub fn widen_blocks(n: usize) -> u32 {
    n.div_ceil(WIDEN_THREADS as usize).clamp(1, WIDEN_MAX_BLOCKS as usize) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_indexing_matches_the_host_scales() {
        // 3 x 2 blocks over a 300 x 200 weight; the kernel's index must pick what Fp8Scale::at
        // (the CPU path's lookup) picks, at block edges too.
        let scale = Fp8Scale::Blocks {
            block_cols: 2,
            scales: (0..6).map(|i| 1.0 + i as f32).collect(),
        };
        let (values, block_cols) = device_scales(&scale);
        assert_eq!(block_cols, 2);
        for r in [0, 1, 127, 128, 255, 256, 299] {
            for c in [0, 127, 128, 199] {
                assert_eq!(
                    values[scale_index(r, c, block_cols)],
                    scale.at(r, c / BLOCK),
                    "weight ({r}, {c})"
                );
            }
        }
        assert_eq!(scale_index(299, 199, 2), 5);
        let (values, block_cols) = device_scales(&Fp8Scale::PerTensor(0.25));
        assert_eq!((values, block_cols), (vec![0.25], 0));
        assert_eq!(scale_index(1000, 1000, 0), 0);
    }

    #[test]
    fn scratch_holds_the_widened_weights_one_after_the_other() {
        let (at, total) = scratch_layout([Some(6), None, Some(4), None, Some(10)]);
        assert_eq!(at, [Some(0), None, Some(6), None, Some(10)]);
        assert_eq!(total, 20);
        let (at, total) = scratch_layout([None, None]);
        assert_eq!((at, total), (vec![None, None], 0));
    }

    #[test]
    fn the_grid_covers_small_weights_and_strides_over_large_ones() {
        assert_eq!(widen_blocks(1), 1);
        assert_eq!(widen_blocks(256), 1);
        assert_eq!(widen_blocks(257), 2);
        let a13b = 3072 * 4096;
        assert_eq!(widen_blocks(a13b), WIDEN_MAX_BLOCKS);
        assert!(WIDEN_MAX_BLOCKS as usize * WIDEN_THREADS as usize <= a13b);
    }
}
