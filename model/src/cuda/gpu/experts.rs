//! Routed experts on the GPU: weights uploaded straight from the mmapped checkpoint, and one
//! dispatch computed as two grouped GEMMs (gate+up for every expert, then down), SwiGLU in
//! between, and the weighted combine on the device in assignment order (the CPU's order): one
//! upload of the rows and one download of the combined output per dispatch. FP8 experts stay
//! FP8 in device memory; a dispatch widens the ones it computes into the device's scratch
//! buffer just before each grouped GEMM (`gpu::fp8`).

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use half::bf16;

use super::fp8::DeviceWeight;
use super::grouped_gemm::PointerArrays;
use super::{CudaDevice, err};
use crate::checkpoint::Checkpoint;
use crate::config::DType;
use crate::cuda::ExpertGroup;
use crate::cuda::combine::combine_plan;
use crate::cuda::fp8_widen::scratch_layout;
use crate::cuda::grouped::{GemmGroup, bf16_at};
use crate::router::ExpertAssignment;
use crate::{Error, Result};

/// Where each of consecutive runs of `lens` starts.
fn starts(lens: impl Iterator<Item = usize>) -> Vec<usize> {
    lens.scan(0, |at, len| {
        let start = *at;
        *at += len;
        Some(start)
    })
    .collect()
}

/// One expert's weights on the GPU, row-major as the checkpoint stores them: bf16, or FP8
/// (one byte per weight and its scales).
#[derive(Debug)]
pub struct DeviceSwiGlu {
    /// `[inter, hidden]`, `[inter, hidden]`, `[hidden, inter]`.
    gate: DeviceWeight,
    up: DeviceWeight,
    down: DeviceWeight,
    hidden: usize,
    inter: usize,
}

impl DeviceSwiGlu {
    /// The device memory its weights take (not counting the device's shared widening scratch).
    pub fn size_in_bytes(&self) -> usize {
        self.gate.size_in_bytes() + self.up.size_in_bytes() + self.down.size_in_bytes()
    }

    /// Zeroed weights of one expert (for measurements: a product's speed does not depend on
    /// the values).
    pub(super) fn zeroed(gpu: &CudaDevice, hidden: usize, inter: usize) -> Result<DeviceSwiGlu> {
        let s = gpu.stream();
        let alloc = || {
            s.alloc_zeros::<u8>(2 * hidden * inter)
                .map(DeviceWeight::Bf16)
                .map_err(err("allocating"))
        };
        Ok(DeviceSwiGlu {
            gate: alloc()?,
            up: alloc()?,
            down: alloc()?,
            hidden,
            inter,
        })
    }
}

impl CudaDevice {
    /// Uploads `{prefix}.{gate,up,down}_proj.weight` (via `name(proj)`). bf16 tensors go from
    /// the mmapped file to the device with no host copy; FP8 ones as their codes and scales
    /// (widened on the device per dispatch); f32 and f16 ones are narrowed first, GPTQ ones
    /// dequantised and narrowed (the grouped GEMM reads bf16 only).
    pub fn upload_expert(
        &self,
        ckpt: &Checkpoint,
        name: impl Fn(&str) -> String,
        hidden: usize,
        inter: usize,
    ) -> Result<DeviceSwiGlu> {
        let upload = |proj: &str, rows: usize, cols: usize| -> Result<DeviceWeight> {
            let name = name(proj);
            match ckpt.bytes(&name, &[rows, cols]) {
                Ok((DType::BF16, bytes, _)) => {
                    let on_device = self
                        .stream()
                        .clone_htod(bytes)
                        .map_err(err("uploading expert weights"))?;
                    // Copied to the GPU: the host's mapped pages need not stay resident.
                    ckpt.evict(&name);
                    Ok(DeviceWeight::Bf16(on_device))
                }
                // Any other stored form (and a GPTQ weight, stored under other names) through
                // the host matrix, which also reports what is wrong with the tensor.
                _ => self.upload_weight(&ckpt.matrix(&name, rows, cols)?),
            }
        };
        Ok(DeviceSwiGlu {
            gate: upload("gate_proj", inter, hidden)?,
            up: upload("up_proj", inter, hidden)?,
            down: upload("down_proj", hidden, inter)?,
            hidden,
            inter,
        })
    }

    /// `out[row] = sum over assignments a of that row: a.weight * expert_a(rows[row])`, for
    /// `rows` `[num_rows, hidden]` f32, added up per row in assignment order (as on the CPU).
    /// `groups` partition `assignments` by expert.
    pub fn experts_forward(
        &self,
        rows: &[f32],
        num_rows: usize,
        hidden: usize,
        assignments: &[ExpertAssignment],
        groups: &[ExpertGroup<'_>],
    ) -> Result<Vec<f32>> {
        if groups.iter().any(|g| g.weights.hidden != hidden) {
            return Err(Error::InvalidInput(format!(
                "expert weights do not have hidden size {hidden}"
            )));
        }
        let total: usize = groups.iter().map(|g| g.members.len()).sum();
        // Nothing to launch: no zero-sized allocations or empty grids.
        if num_rows == 0 || hidden == 0 {
            return Ok(Vec::new());
        }
        if total == 0 {
            return Ok(vec![0.0; num_rows * hidden]);
        }
        // Rows in group order, narrowed to bf16: one upload; where each assignment's output
        // lands among them.
        let mut x = Vec::with_capacity(total * hidden);
        let mut slot_of = vec![0usize; assignments.len()];
        for (slot, &i) in groups.iter().flat_map(|g| g.members).enumerate() {
            let r = assignments[i].row as usize;
            x.extend(rows[r * hidden..(r + 1) * hidden].iter().map(|&v| bf16::from_f32(v)));
            slot_of[i] = slot;
        }
        let plan = combine_plan(assignments, num_rows, &slot_of);
        let s = self.stream();
        let x_d = s.clone_htod(&x).map_err(err("uploading rows"))?;
        let problems: Vec<(&DeviceSwiGlu, usize)> = groups.iter().map(|g| (g.weights, g.members.len())).collect();
        let (y, _pointers) = self.grouped_swiglu(&x_d, hidden, &problems)?;
        let starts = s.clone_htod(&plan.starts).map_err(err("uploading the combine plan"))?;
        let slots = s.clone_htod(&plan.slots).map_err(err("uploading the combine plan"))?;
        let weights = s.clone_htod(&plan.weights).map_err(err("uploading the combine plan"))?;
        let mut out = s.alloc_zeros::<f32>(num_rows * hidden).map_err(err("allocating"))?;
        let (n, h) = (num_rows as u32, hidden as u32);
        let mut launch = s.launch_builder(self.kernel("combine_rows"));
        launch
            .arg(&y)
            .arg(&starts)
            .arg(&slots)
            .arg(&weights)
            .arg(&mut out)
            .arg(&n)
            .arg(&h);
        let cfg = LaunchConfig {
            grid_dim: (n, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: starts has num_rows + 1 entries indexing slots and weights; every slot is
        // below `total`, the rows of y; out is [num_rows, hidden].
        unsafe { launch.launch(cfg) }.map_err(err("combine kernel"))?;
        // The download waits for the stream, so the GEMMs' pointer arrays may go after it.
        s.clone_dtoh(&out).map_err(err("downloading outputs"))
    }

    /// `y_g = down(silu(gate(x_g)) * up(x_g))` for each `(expert, rows)` of `groups`, whose
    /// rows lie one after the other in `x` (`[sum rows, hidden]` bf16): one grouped GEMM for
    /// every gate and up product, the SwiGLU kernels, one grouped GEMM for the down products.
    /// Returns `y` (`[sum rows, hidden]`, in the same order) and the GEMMs' pointer arrays,
    /// which must live until the stream has passed them.
    pub(super) fn grouped_swiglu(
        &self,
        x_d: &CudaSlice<bf16>,
        hidden: usize,
        groups: &[(&DeviceSwiGlu, usize)],
    ) -> Result<(CudaSlice<bf16>, [PointerArrays; 2])> {
        let s = self.stream();
        let total: usize = groups.iter().map(|g| g.1).sum();
        // Per group: its first row, and where its gate|up and activation blocks start.
        let rows_at = starts(groups.iter().map(|g| g.1));
        let gate_up_at = starts(groups.iter().map(|g| 2 * g.1 * g.0.inter));
        let act_at = starts(groups.iter().map(|g| g.1 * g.0.inter));
        let gate_up_len: usize = groups.iter().map(|g| 2 * g.1 * g.0.inter).sum();
        let alloc = |n: usize| s.alloc_zeros::<bf16>(n.max(1)).map_err(err("allocating"));
        let (gate_up, mut act, y) = (alloc(gate_up_len)?, alloc(gate_up_len / 2)?, alloc(total * hidden)?);
        let base = |buf: &CudaSlice<bf16>| buf.device_ptr(s).0;
        let (x_p, gu_p, act_p, y_p) = (base(x_d), base(&gate_up), base(&act), base(&y));
        // FP8 experts' gate and up, then their down, widened into the scratch buffer; the down
        // widenings are queued after the first GEMM, which has then read the gate and up ones.
        let (gate_up_wide, gate_up_scratch) = scratch_layout(
            groups
                .iter()
                .flat_map(|(w, _)| [w.gate.widened_len(), w.up.widened_len()]),
        );
        let (down_wide, down_scratch) = scratch_layout(groups.iter().map(|(w, _)| w.down.widened_len()));
        let mut guard = self.scratch(gate_up_scratch.max(down_scratch))?;
        let scratch = guard.as_mut().expect("scratch() allocates");
        for (g, (w, _)) in groups.iter().enumerate() {
            for (proj, at) in [(&w.gate, gate_up_wide[2 * g]), (&w.up, gate_up_wide[2 * g + 1])] {
                if let Some(at) = at {
                    self.widen(proj, w.inter, hidden, scratch, at)?;
                }
            }
        }
        let weight = |w: &DeviceWeight, at: Option<usize>| self.weight_ptr(w, scratch, at);

        // Gate and up of each expert: one group of two problems of the same shape.
        let gate_up_gemm: Vec<GemmGroup> = groups
            .iter()
            .enumerate()
            .map(|(g, (w, rows))| {
                let x = bf16_at(x_p, rows_at[g] * hidden);
                let gate = bf16_at(gu_p, gate_up_at[g]);
                let up = bf16_at(gu_p, gate_up_at[g] + rows * w.inter);
                GemmGroup {
                    m: w.inter,
                    n: *rows,
                    k: hidden,
                    problems: vec![
                        (weight(&w.gate, gate_up_wide[2 * g]), x, gate),
                        (weight(&w.up, gate_up_wide[2 * g + 1]), x, up),
                    ],
                }
            })
            .collect();
        let first = self.grouped_gemm_bf16(&gate_up_gemm)?;
        for (g, (w, _)) in groups.iter().enumerate() {
            if let Some(at) = down_wide[g] {
                self.widen(&w.down, hidden, w.inter, scratch, at)?;
            }
        }
        let weight = |w: &DeviceWeight, at: Option<usize>| self.weight_ptr(w, scratch, at);
        for (g, (w, rows)) in groups.iter().enumerate() {
            let n = rows * w.inter;
            if n == 0 {
                continue;
            }
            let gate = gate_up.slice(gate_up_at[g]..gate_up_at[g] + n);
            let up = gate_up.slice(gate_up_at[g] + n..gate_up_at[g] + 2 * n);
            let mut out = act.slice_mut(act_at[g]..act_at[g] + n);
            let n = n as u32;
            let mut launch = s.launch_builder(self.kernel("swiglu"));
            launch.arg(&gate).arg(&up).arg(&mut out).arg(&n);
            // SAFETY: reads n values of gate and up, writes n of out.
            unsafe { launch.launch(LaunchConfig::for_num_elems(n)) }.map_err(err("swiglu kernel"))?;
        }
        // Down of each expert: a group of one.
        let down_gemm: Vec<GemmGroup> = groups
            .iter()
            .enumerate()
            .map(|(g, (w, rows))| GemmGroup {
                m: hidden,
                n: *rows,
                k: w.inter,
                problems: vec![(
                    weight(&w.down, down_wide[g]),
                    bf16_at(act_p, act_at[g]),
                    bf16_at(y_p, rows_at[g] * hidden),
                )],
            })
            .collect();
        let second = self.grouped_gemm_bf16(&down_gemm)?;
        Ok((y, [first, second]))
    }
}
