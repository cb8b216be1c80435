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

/// Values between the starts of widened weights in the scratch buffer: 128 bf16 values, 256
/// bytes, the alignment of a fresh device allocation, so that cuBLAS sees a widened weight
/// aligned as it would see the same weight uploaded as bf16 (its kernel choice depends on it).
pub const SCRATCH_ALIGN: usize = 128;

/// Where each weight that needs widening (`Some(len)`, in values; `None` for one the GEMM reads
/// as it is) starts in the scratch buffer, one after the other at [`SCRATCH_ALIGN`]ed starts,
/// and the values they take in all.
pub fn scratch_layout(lens: impl IntoIterator<Item = Option<usize>>) -> (Vec<Option<usize>>, usize) {
    let mut total = 0;
    let at = lens
        .into_iter()
        .map(|len| {
            len.map(|len| {
                let start = total;
                total += len.next_multiple_of(SCRATCH_ALIGN);
                start
            })
        })
        .collect();
    (at, total)
}

/// Threads per block of the widening kernel: they stride over one row's columns.
pub const WIDEN_THREADS: u32 = 256;
/// At most this many blocks, one row each at a time: the kernel strides over the other rows
/// (more blocks than the GPU runs at once only cost scheduling).
pub const WIDEN_MAX_BLOCKS: u32 = 4096;

/// The grid of a widening of a weight of `rows` rows (`rows > 0`).
pub fn widen_blocks(rows: usize) -> u32 {
    rows.clamp(1, WIDEN_MAX_BLOCKS as usize) as u32
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
        let (at, total) = scratch_layout([Some(256), None, Some(4), None, Some(130), Some(1)]);
        assert_eq!(at, [Some(0), None, Some(256), None, Some(384), Some(640)]);
        assert_eq!(total, 768);
        assert!(at.iter().flatten().all(|a| a % SCRATCH_ALIGN == 0));
        let (at, total) = scratch_layout([None, None]);
        assert_eq!((at, total), (vec![None, None], 0));
    }

    #[test]
    fn the_grid_has_a_block_per_row_up_to_its_cap() {
        assert_eq!(widen_blocks(1), 1);
        assert_eq!(widen_blocks(200), 200);
        // A13B's gate/up [3072, 4096] gets a block per row; Large's [18304, 6400] strides.
        assert_eq!(widen_blocks(3072), 3072);
        assert_eq!(widen_blocks(18304), WIDEN_MAX_BLOCKS);
    }
}
