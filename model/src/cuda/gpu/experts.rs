//! Routed experts on the GPU: weights uploaded straight from the mmapped checkpoint, and one
//! dispatch computed as two grouped GEMMs (gate+up for every expert, then down), SwiGLU in
//! between, and the weighted combine on the device: one upload of the rows and one download
//! of the combined output per dispatch.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{GroupedGemm, GroupedGemmConfig};
use cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use half::bf16;

use super::ops::to_bf16;
use super::{CudaDevice, err};
use crate::checkpoint::Checkpoint;
use crate::config::DType;
use crate::cuda::ExpertGroup;
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

/// One expert's weights on the GPU: the checkpoint's row-major bf16 bytes, as stored.
#[derive(Debug)]
pub struct DeviceSwiGlu {
    /// `[inter, hidden]`, `[inter, hidden]`, `[hidden, inter]` as bf16 bytes.
    gate: CudaSlice<u8>,
    up: CudaSlice<u8>,
    down: CudaSlice<u8>,
    hidden: usize,
    inter: usize,
}

impl DeviceSwiGlu {
    pub fn size_in_bytes(&self) -> usize {
        self.gate.len() + self.up.len() + self.down.len()
    }

    /// Zeroed weights of one expert (for measurements: a product's speed does not depend on
    /// the values).
    pub(super) fn zeroed(gpu: &CudaDevice, hidden: usize, inter: usize) -> Result<DeviceSwiGlu> {
        let s = gpu.stream();
        let alloc = || s.alloc_zeros::<u8>(2 * hidden * inter).map_err(err("allocating"));
        Ok(DeviceSwiGlu {
            gate: alloc()?,
            up: alloc()?,
            down: alloc()?,
            hidden,
            inter,
        })
    }

    fn view(m: &CudaSlice<u8>) -> CudaView<'_, bf16> {
        // SAFETY: uploads below write bf16 bytes only, an even count.
        unsafe { m.transmute::<bf16>(m.len() / 2) }.expect("an even byte count")
    }
}

impl CudaDevice {
    /// Uploads `{prefix}.{gate,up,down}_proj.weight` (via `name(proj)`). bf16 tensors go from
    /// the mmapped file to the device with no host copy; f32 and f16 ones are narrowed first.
    pub fn upload_expert(
        &self,
        ckpt: &Checkpoint,
        name: impl Fn(&str) -> String,
        hidden: usize,
        inter: usize,
    ) -> Result<DeviceSwiGlu> {
        let upload = |proj: &str, rows: usize, cols: usize| -> Result<CudaSlice<u8>> {
            let (dtype, bytes, _) = ckpt.bytes(&name(proj), &[rows, cols])?;
            let s = self.stream();
            match dtype {
                DType::BF16 => s.clone_htod(bytes),
                DType::F32 | DType::F16 => {
                    let narrowed: Vec<u8> = to_bf16(&ckpt.matrix(&name(proj), rows, cols)?)
                        .into_iter()
                        .flat_map(|v| v.to_bits().to_le_bytes())
                        .collect();
                    s.clone_htod(&narrowed)
                }
            }
            .map_err(err("uploading expert weights"))
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
    /// `rows` `[num_rows, hidden]` f32. `groups` partition `assignments` by expert.
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
        let s = self.stream();
        // Rows in group order, narrowed to bf16: one upload. Then the members' output rows and
        // routing weights, also in group order.
        let total: usize = groups.iter().map(|g| g.members.len()).sum();
        let mut x = Vec::with_capacity(total * hidden);
        let mut out_rows = Vec::with_capacity(total);
        let mut out_weights = Vec::with_capacity(total);
        for g in groups {
            for &i in g.members {
                let r = assignments[i].row as usize;
                x.extend(rows[r * hidden..(r + 1) * hidden].iter().map(|&v| bf16::from_f32(v)));
                out_rows.push(r as u32);
                out_weights.push(assignments[i].weight);
            }
        }
        let x_d = s.clone_htod(&x).map_err(err("uploading rows"))?;
        let rows_d = s.clone_htod(&out_rows).map_err(err("uploading rows"))?;
        let weights_d = s.clone_htod(&out_weights).map_err(err("uploading weights"))?;
        let mut out = s.alloc_zeros::<f32>(num_rows * hidden).map_err(err("allocating"))?;
        if total == 0 {
            return s.clone_dtoh(&out).map_err(err("downloading outputs"));
        }

        let offsets = starts(groups.iter().map(|g| g.members.len()));
        let problems: Vec<(&DeviceSwiGlu, usize)> = groups.iter().map(|g| (g.weights, g.members.len())).collect();
        let y = self.grouped_swiglu(&x_d, hidden, &problems)?;
        let (h, threads) = (hidden as u32, 256u32);
        for ((y, g), &o) in y.iter().zip(groups).zip(&offsets) {
            let n = g.members.len() as u32;
            let member_rows = rows_d.slice(o..o + g.members.len());
            let member_weights = weights_d.slice(o..o + g.members.len());
            let mut launch = s.launch_builder(self.kernel("combine_add"));
            launch
                .arg(y)
                .arg(&member_rows)
                .arg(&member_weights)
                .arg(&mut out)
                .arg(&n)
                .arg(&h);
            let cfg = LaunchConfig {
                grid_dim: (n, 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: n member rows of y, rows[i] < num_rows (checked by the caller), hidden columns.
            unsafe { launch.launch(cfg) }.map_err(err("combine kernel"))?;
        }
        s.clone_dtoh(&out).map_err(err("downloading outputs"))
    }

    /// `y_g = down(silu(gate(x_g)) * up(x_g))` for each `(expert, rows)` of `groups`, whose
    /// rows lie one after the other in `x` (`[sum rows, hidden]` bf16): one grouped GEMM for
    /// every gate and up product, the SwiGLU kernels, one grouped GEMM for the down products.
    pub(super) fn grouped_swiglu(
        &self,
        x_d: &CudaSlice<bf16>,
        hidden: usize,
        groups: &[(&DeviceSwiGlu, usize)],
    ) -> Result<Vec<CudaSlice<bf16>>> {
        let s = self.stream();
        let offsets = starts(groups.iter().map(|&(_, rows)| rows));
        let x_views: Vec<CudaView<'_, bf16>> = groups
            .iter()
            .zip(&offsets)
            .map(|(g, &o)| x_d.slice(o * hidden..(o + g.1) * hidden))
            .collect();
        let mut gate_up: Vec<CudaSlice<bf16>> = groups
            .iter()
            .map(|g| s.alloc_zeros::<bf16>(2 * g.1 * g.0.inter))
            .collect::<std::result::Result<_, _>>()
            .map_err(err("allocating"))?;
        let mut act: Vec<CudaSlice<bf16>> = groups
            .iter()
            .map(|g| s.alloc_zeros::<bf16>(g.1 * g.0.inter))
            .collect::<std::result::Result<_, _>>()
            .map_err(err("allocating"))?;
        let mut y: Vec<CudaSlice<bf16>> = groups
            .iter()
            .map(|g| s.alloc_zeros::<bf16>(g.1 * hidden))
            .collect::<std::result::Result<_, _>>()
            .map_err(err("allocating"))?;

        // Row-major Y[n_rows, n] = X[n_rows, k] W^T for W[n, k] is, column-major,
        // Y^T[n, n_rows] = op(W)[n, k] X^T[k, n_rows] with op = transpose of W's [k, n] view.
        // Per expert: one group of two problems (gate and up, same shape), then one of one (down).
        let config = |shapes: &[(usize, usize, usize, usize)]| GroupedGemmConfig::<bf16> {
            transas: vec![cublasOperation_t::CUBLAS_OP_T; shapes.len()],
            transbs: vec![cublasOperation_t::CUBLAS_OP_N; shapes.len()],
            ms: shapes.iter().map(|s| s.0).collect(),
            ns: shapes.iter().map(|s| s.1).collect(),
            ks: shapes.iter().map(|s| s.2).collect(),
            alphas: vec![1.0; shapes.len()],
            betas: vec![0.0; shapes.len()],
            ldas: shapes.iter().map(|s| s.2).collect(),
            ldbs: shapes.iter().map(|s| s.2).collect(),
            ldcs: shapes.iter().map(|s| s.0).collect(),
            problem_sizes: shapes.iter().map(|s| s.3).collect(),
        };
        let blas = self.blas();
        {
            let shapes: Vec<_> = groups.iter().map(|g| (g.0.inter, g.1, hidden, 2)).collect();
            let a: Vec<CudaView<'_, bf16>> = groups
                .iter()
                .flat_map(|g| [DeviceSwiGlu::view(&g.0.gate), DeviceSwiGlu::view(&g.0.up)])
                .collect();
            let b: Vec<&CudaView<'_, bf16>> = x_views.iter().flat_map(|v| [v, v]).collect();
            let mut c: Vec<_> = gate_up
                .iter_mut()
                .zip(groups)
                .flat_map(|(buf, g)| {
                    let (gate, up) = buf.split_at_mut(g.1 * g.0.inter);
                    [gate, up]
                })
                .collect();
            let a: Vec<&CudaView<'_, bf16>> = a.iter().collect();
            let mut c: Vec<_> = c.iter_mut().collect();
            // SAFETY: every problem's shapes match its buffers, allocated above from the same sizes.
            unsafe { blas.grouped_gemm(config(&shapes), &a, &b, &mut c) }.map_err(err("gate/up grouped GEMM"))?;
        }
        for ((buf, act), g) in gate_up.iter().zip(act.iter_mut()).zip(groups) {
            let n = g.1 * g.0.inter;
            let (gate, up) = buf.split_at(n);
            let n = n as u32;
            let mut launch = s.launch_builder(self.kernel("swiglu"));
            launch.arg(&gate).arg(&up).arg(act).arg(&n);
            // SAFETY: reads n values of gate and up, writes n of act.
            unsafe { launch.launch(LaunchConfig::for_num_elems(n)) }.map_err(err("swiglu kernel"))?;
        }
        {
            let shapes: Vec<_> = groups.iter().map(|g| (hidden, g.1, g.0.inter, 1)).collect();
            let a: Vec<CudaView<'_, bf16>> = groups.iter().map(|g| DeviceSwiGlu::view(&g.0.down)).collect();
            let a: Vec<&CudaView<'_, bf16>> = a.iter().collect();
            let b: Vec<&CudaSlice<bf16>> = act.iter().collect();
            let mut c: Vec<&mut CudaSlice<bf16>> = y.iter_mut().collect();
            // SAFETY: as above.
            unsafe { blas.grouped_gemm(config(&shapes), &a, &b, &mut c) }.map_err(err("down grouped GEMM"))?;
        }
        Ok(y)
    }
}
