//! Weights on the device as stored: bf16, or FP8 (one byte per weight plus its f32 scales,
//! half of bf16's bytes). cuBLAS reads bf16 only, so an FP8 weight is widened by the
//! `fp8_e4m3_to_bf16` kernel into the device's scratch buffer just before the product that
//! reads it (layout and launch shape: `cuda::fp8_widen`).

use std::sync::MutexGuard;

use cudarc::driver::{CudaSlice, CudaView, DevicePtr, LaunchConfig, PushKernelArg};
use half::bf16;

use super::ops::to_bf16;
use super::{CudaDevice, err};
use crate::Result;
use crate::cuda::fp8_widen::{WIDEN_THREADS, device_scales, widen_blocks};
use crate::cuda::grouped::bf16_at;
use crate::weights::{Matrix, MatrixData};

/// A `[rows, cols]` weight in device memory, row-major as the checkpoint stores it.
#[derive(Debug)]
pub(super) enum DeviceWeight {
    /// bf16 values as bytes: the GEMMs read them where they are.
    Bf16(CudaSlice<u8>),
    /// e4m3fn codes and their scales as the kernel reads them (`block_cols` 0: one scale).
    Fp8 {
        codes: CudaSlice<u8>,
        scales: CudaSlice<f32>,
        block_cols: u32,
    },
}

impl DeviceWeight {
    pub(super) fn size_in_bytes(&self) -> usize {
        match self {
            DeviceWeight::Bf16(bytes) => bytes.len(),
            DeviceWeight::Fp8 { codes, scales, .. } => codes.len() + 4 * scales.len(),
        }
    }

    /// How many bf16 values its widened copy takes in the scratch buffer (`None`: read as it is).
    pub(super) fn widened_len(&self) -> Option<usize> {
        match self {
            DeviceWeight::Bf16(_) => None,
            DeviceWeight::Fp8 { codes, .. } => Some(codes.len()),
        }
    }
}

/// The scratch buffer for widened weights, one per device: grown to the largest need seen (one
/// dispatch's FP8 experts, or the largest FP8 attention projection), then reused. Every use is
/// queued on the device's one stream, so a widening cannot overwrite values a queued GEMM still
/// reads, and a buffer replaced by a larger one is freed in stream order (cudarc frees
/// asynchronously on the stream, or synchronises first).
pub(super) type Scratch = Option<CudaSlice<bf16>>;

impl CudaDevice {
    /// Uploads a weight as the device keeps it: FP8 as FP8, bf16 as it is, f32 and f16 (and
    /// GPTQ, dequantised to f16 by the host matrix) narrowed to bf16.
    pub(super) fn upload_weight(&self, m: &Matrix) -> Result<DeviceWeight> {
        let s = self.stream();
        match &m.data {
            MatrixData::F8E4M3(d) => {
                let (scales, block_cols) = device_scales(&d.scale);
                Ok(DeviceWeight::Fp8 {
                    codes: s.clone_htod(&d.codes).map_err(err("uploading FP8 codes"))?,
                    scales: s.clone_htod(&scales).map_err(err("uploading FP8 scales"))?,
                    block_cols,
                })
            }
            _ => {
                let bytes: Vec<u8> = to_bf16(m).into_iter().flat_map(|v| v.to_bits().to_le_bytes()).collect();
                Ok(DeviceWeight::Bf16(
                    s.clone_htod(&bytes).map_err(err("uploading a weight"))?,
                ))
            }
        }
    }

    /// This device's scratch buffer, at least `len` values long.
    pub(super) fn scratch(&self, len: usize) -> Result<MutexGuard<'_, Scratch>> {
        let mut scratch = self.gpu.scratch.lock().expect("scratch lock");
        if scratch.as_ref().is_none_or(|b| b.len() < len) {
            // The old buffer goes first: the two need not fit at once.
            *scratch = None;
            let grown = self.stream().alloc_zeros::<bf16>(len.max(1));
            *scratch = Some(grown.map_err(err("allocating the FP8 widening scratch"))?);
        }
        Ok(scratch)
    }

    /// Queues the widening of the FP8 weight `w` (`[rows, cols]`) into `scratch` from value
    /// `at` on; a bf16 weight needs none.
    pub(super) fn widen(
        &self,
        w: &DeviceWeight,
        rows: usize,
        cols: usize,
        scratch: &mut CudaSlice<bf16>,
        at: usize,
    ) -> Result<()> {
        let DeviceWeight::Fp8 {
            codes,
            scales,
            block_cols,
        } = w
        else {
            return Ok(());
        };
        let n = rows * cols;
        if n == 0 {
            return Ok(());
        }
        assert_eq!(codes.len(), n, "an FP8 weight's codes are [rows, cols]");
        let mut out = scratch.slice_mut(at..at + n);
        let (r, c) = (rows as u32, cols as u32);
        let mut launch = self.stream().launch_builder(self.kernel("fp8_e4m3_to_bf16"));
        launch
            .arg(codes)
            .arg(scales)
            .arg(&mut out)
            .arg(&r)
            .arg(&c)
            .arg(block_cols);
        let cfg = LaunchConfig {
            grid_dim: (widen_blocks(rows), 1, 1),
            block_dim: (WIDEN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: reads rows * cols codes and the scales `device_scales` laid out for this
        // weight (one, or one per block of its grid); writes rows * cols values of `out`.
        unsafe { launch.launch(cfg) }.map_err(err("FP8 widening kernel"))?;
        Ok(())
    }

    /// The device address of the bf16 values a GEMM reads for `w`: its own, or (FP8) its
    /// widened copy at `widened_at` in `scratch`.
    pub(super) fn weight_ptr(&self, w: &DeviceWeight, scratch: &CudaSlice<bf16>, widened_at: Option<usize>) -> u64 {
        match (w, widened_at) {
            (DeviceWeight::Bf16(bytes), _) => bytes.device_ptr(self.stream()).0,
            (DeviceWeight::Fp8 { .. }, Some(at)) => bf16_at(scratch.device_ptr(self.stream()).0, at),
            (DeviceWeight::Fp8 { .. }, None) => unreachable!("an FP8 weight is widened before its product"),
        }
    }

    /// `w` (`[rows, cols]`) as bf16 values a GEMM reads: its own, or widened into `scratch`.
    pub(super) fn bf16_view<'a>(
        &self,
        w: &'a DeviceWeight,
        rows: usize,
        cols: usize,
        scratch: &'a mut CudaSlice<bf16>,
    ) -> Result<CudaView<'a, bf16>> {
        match w {
            // SAFETY: the bytes are bf16 values (uploaded as such), rows * cols of them.
            DeviceWeight::Bf16(bytes) => {
                Ok(unsafe { bytes.transmute::<bf16>(rows * cols) }.expect("a bf16 weight holds rows * cols values"))
            }
            DeviceWeight::Fp8 { .. } => {
                self.widen(w, rows, cols, scratch, 0)?;
                Ok(scratch.slice(0..rows * cols))
            }
        }
    }
}
