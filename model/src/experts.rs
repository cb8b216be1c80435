//! The routed-expert unit: given token rows and, per row, the experts it goes to with their
//! weights, return the weighted sum of those experts' outputs per row. It is the whole contract
//! between the attention half and the expert half, so it can run in process or behind a
//! transport (expert workers).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::cuda::{DeviceSwiGlu, ExpertGroup};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::kernels::{Scratch, axpy, with_scratch};
use crate::mlp::SwiGlu;
use crate::names;
use crate::plan::{LoadPlan, Want};
use crate::progress::{LoadProgress, NoProgress};
pub use crate::router::ExpertAssignment;

/// Anything that can compute routed experts for one layer.
pub trait ExpertCompute: Send + Sync {
    /// `rows` is `[num_rows, hidden]`. Returns `[num_rows, hidden]` where row `r` is
    /// `Σ weight · expert(rows[r])` over the assignments of `r`, summed in assignment order;
    /// rows without assignments are zero.
    fn compute(
        &self,
        layer: usize,
        rows: &[f32],
        num_rows: usize,
        assignments: &[ExpertAssignment],
    ) -> Result<Vec<f32>>;

    /// Starts the computation and returns a handle to its result, so the caller can do other
    /// work (the shared expert) while it runs elsewhere. In-process holders compute right away.
    fn begin(&self, layer: usize, rows: &[f32], num_rows: usize, assignments: &[ExpertAssignment]) -> Result<Pending> {
        self.compute(layer, rows, num_rows, assignments).map(Pending::ready)
    }
}

/// A routed-expert result that may still be in flight.
pub struct Pending(Box<dyn FnOnce() -> Result<(Vec<f32>, Instant)> + Send>);

impl Pending {
    /// A result computed already: it was there when the handle was made.
    pub fn ready(out: Vec<f32>) -> Self {
        let at = Instant::now();
        Pending(Box::new(move || Ok((out, at))))
    }

    /// A result that `wait` produces when asked (blocking until it is there); it counts as
    /// there when `wait` returns.
    pub fn later(wait: impl FnOnce() -> Result<Vec<f32>> + Send + 'static) -> Self {
        Pending(Box::new(move || wait().map(|out| (out, Instant::now()))))
    }

    /// Like [`Pending::later`], for a holder that knows when the result arrived (before
    /// `wait` was called): the micro-batch overlap is measured against that instant.
    pub fn arriving(wait: impl FnOnce() -> Result<(Vec<f32>, Instant)> + Send + 'static) -> Self {
        Pending(Box::new(wait))
    }

    pub fn wait(self) -> Result<Vec<f32>> {
        self.wait_timed().map(|(out, _)| out)
    }

    /// The result and when it arrived.
    pub fn wait_timed(self) -> Result<(Vec<f32>, Instant)> {
        (self.0)()
    }
}

/// Which routed experts to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpertSelection {
    All,
    /// Explicit `(layer, expert)` pairs.
    Only(Vec<(usize, usize)>),
}

impl ExpertSelection {
    pub(crate) fn pairs(&self, config: &ModelConfig) -> Vec<(usize, usize)> {
        match self {
            ExpertSelection::All => (0..config.num_layers)
                .flat_map(|l| (0..config.num_experts).map(move |e| (l, e)))
                .collect(),
            ExpertSelection::Only(pairs) => pairs.clone(),
        }
    }
}

/// Routed experts held in this process.
#[derive(Debug, Clone)]
pub struct LocalExperts {
    hidden: usize,
    /// `experts[layer][expert]`; `None` where not held. Shared so that a holder with more or
    /// fewer experts can be derived cheaply while the current one keeps serving.
    experts: Vec<Vec<Option<Arc<Held>>>>,
    /// Where the products run (and so where the weights live).
    device: Device,
}

/// One expert's weights where they are used: host memory for the CPU, GPU memory for a GPU
/// (the host copy read from the checkpoint is dropped once uploaded).
#[derive(Debug)]
enum Held {
    Host(SwiGlu),
    /// Boxed: a device expert (three weights, each possibly FP8 codes plus scales) is larger
    /// than a host one.
    Gpu(Box<DeviceSwiGlu>),
}

impl LocalExperts {
    pub fn load(ckpt: &Checkpoint, config: &ModelConfig, selection: &ExpertSelection) -> Result<Self> {
        Self::load_on(ckpt, config, selection, Device::Cpu)
    }

    /// Like [`LocalExperts::load`], computing on `device` (weights are copied there).
    pub fn load_on(
        ckpt: &Checkpoint,
        config: &ModelConfig,
        selection: &ExpertSelection,
        device: Device,
    ) -> Result<Self> {
        Self::empty(ckpt, config, device)?.with(ckpt, config, &selection.pairs(config), &[])
    }

    /// An empty holder computing on `device`, after checking the checkpoint's quantisation.
    pub(crate) fn empty(ckpt: &Checkpoint, config: &ModelConfig, device: Device) -> Result<Self> {
        crate::quant::check_checkpoint(ckpt, config)?;
        Ok(LocalExperts {
            hidden: config.hidden_size,
            experts: (0..config.num_layers).map(|_| vec![None; config.num_experts]).collect(),
            device,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A holder with `add` loaded (those already held are shared, not reloaded) and `remove`
    /// dropped. `self` is unchanged and can keep serving meanwhile.
    pub fn with(
        &self,
        ckpt: &Checkpoint,
        config: &ModelConfig,
        add: &[(usize, usize)],
        remove: &[(usize, usize)],
    ) -> Result<Self> {
        self.with_progress(ckpt, config, add, remove, &NoProgress)
    }

    /// Like [`LocalExperts::with`], reporting to `progress`. Every tensor to load is checked
    /// before the first is read.
    pub fn with_progress(
        &self,
        ckpt: &Checkpoint,
        config: &ModelConfig,
        add: &[(usize, usize)],
        remove: &[(usize, usize)],
        progress: &dyn LoadProgress,
    ) -> Result<Self> {
        let (new, plan) = self.plan(ckpt, config, add)?;
        progress.planned(plan.total());
        self.with_planned(ckpt, config, &new, &plan, remove, progress)
    }

    /// The experts of `add` not held yet, in order and without repeats, and their checked plan
    /// (one unit per expert).
    pub(crate) fn plan(
        &self,
        ckpt: &Checkpoint,
        config: &ModelConfig,
        add: &[(usize, usize)],
    ) -> Result<(Vec<(usize, usize)>, LoadPlan)> {
        let mut new = Vec::new();
        for &(l, e) in add {
            if l >= config.num_layers || e >= config.num_experts {
                return Err(Error::InvalidInput(format!(
                    "expert ({l}, {e}) does not exist: the model has {} layers of {} experts",
                    config.num_layers, config.num_experts
                )));
            }
            if !self.holds(l, e) && !new.contains(&(l, e)) {
                new.push((l, e));
            }
        }
        let units: Vec<Vec<Want>> = new
            .iter()
            .map(|&(l, e)| {
                SwiGlu::wants(
                    |p| names::expert(l, e, p),
                    config.hidden_size,
                    config.layers[l].expert_intermediate,
                )
                .to_vec()
            })
            .collect();
        Ok((new, LoadPlan::check(ckpt, &units)?))
    }

    /// Loads `new` (checked by [`LocalExperts::plan`] into `plan`) and drops `remove`.
    pub(crate) fn with_planned(
        &self,
        ckpt: &Checkpoint,
        config: &ModelConfig,
        new: &[(usize, usize)],
        plan: &LoadPlan,
        remove: &[(usize, usize)],
        progress: &dyn LoadProgress,
    ) -> Result<Self> {
        let mut experts = self.experts.clone();
        for &(l, e) in remove {
            if let Some(slot) = experts.get_mut(l).and_then(|layer| layer.get_mut(e)) {
                *slot = None;
            }
        }
        for (&(l, e), &size) in new.iter().zip(&plan.units) {
            let (hidden, inter) = (config.hidden_size, config.layers[l].expert_intermediate);
            let name = |p: &str| names::expert(l, e, p);
            let held = match &self.device {
                Device::Cpu => Held::Host(SwiGlu::load(ckpt, name, hidden, inter)?),
                Device::Cuda(gpu) => Held::Gpu(Box::new(gpu.upload_expert(ckpt, name, hidden, inter)?)),
            };
            experts[l][e] = Some(Arc::new(held));
            progress.loaded(size);
        }
        Ok(LocalExperts {
            hidden: self.hidden,
            experts,
            device: self.device.clone(),
        })
    }

    pub fn holds(&self, layer: usize, expert: usize) -> bool {
        self.get(layer, expert).is_some()
    }

    fn get(&self, layer: usize, expert: usize) -> Option<&Held> {
        self.experts.get(layer)?.get(expert)?.as_deref()
    }

    /// `(layer, expert)` pairs held, in order.
    pub fn held(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (l, layer) in self.experts.iter().enumerate() {
            for (e, x) in layer.iter().enumerate() {
                if x.is_some() {
                    out.push((l, e));
                }
            }
        }
        out
    }

    pub fn size_in_bytes(&self) -> usize {
        self.experts
            .iter()
            .flatten()
            .flatten()
            .map(|e| match e.as_ref() {
                Held::Host(mlp) => mlp.size_in_bytes(),
                Held::Gpu(mlp) => mlp.size_in_bytes(),
            })
            .sum()
    }
}

impl ExpertCompute for LocalExperts {
    fn compute(
        &self,
        layer: usize,
        rows: &[f32],
        num_rows: usize,
        assignments: &[ExpertAssignment],
    ) -> Result<Vec<f32>> {
        let h = self.hidden;
        if rows.len() != num_rows * h {
            return Err(Error::InvalidInput(format!(
                "expert input has {} values, expected {num_rows} rows of hidden size {h}",
                rows.len()
            )));
        }
        // Group the assignments by expert: one grouped SwiGLU per expert over all its rows.
        let mut groups: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, a) in assignments.iter().enumerate() {
            if a.row as usize >= num_rows {
                return Err(Error::InvalidInput(format!(
                    "assignment names row {} of {num_rows}",
                    a.row
                )));
            }
            if !a.weight.is_finite() {
                return Err(Error::InvalidInput(format!(
                    "assignment {i} has a non-finite weight {}",
                    a.weight
                )));
            }
            if !self.holds(layer, a.expert as usize) {
                return Err(Error::ExpertNotHeld {
                    layer,
                    expert: a.expert as usize,
                });
            }
            groups.entry(a.expert).or_default().push(i);
        }
        let groups: Vec<(u32, Vec<usize>)> = groups.into_iter().collect();
        match &self.device {
            Device::Cpu => Ok(self.compute_on_host(layer, rows, num_rows, assignments, &groups)),
            Device::Cuda(gpu) => {
                let on_device: Vec<ExpertGroup<'_>> = groups
                    .iter()
                    .map(|(expert, members)| match self.get(layer, *expert as usize) {
                        Some(Held::Gpu(weights)) => ExpertGroup { weights, members },
                        _ => unreachable!("a GPU holder loads every expert onto the GPU"),
                    })
                    .collect();
                gpu.experts_forward(rows, num_rows, h, assignments, &on_device)
            }
        }
    }
}

impl LocalExperts {
    /// One grouped SwiGLU per expert over all its rows, written into one per-thread buffer (a
    /// slice per group), then combined. Many groups run in parallel, one task each, each
    /// product inside on its task's thread; a few groups (at most two per thread) run one after
    /// the other with each product split over the pool instead, so a layer routed to one or
    /// two experts still uses every core and no product nests tasks inside tasks.
    fn compute_on_host(
        &self,
        layer: usize,
        rows: &[f32],
        num_rows: usize,
        assignments: &[ExpertAssignment],
        groups: &[(u32, Vec<usize>)],
    ) -> Vec<f32> {
        thread_local! {
            static OUTPUTS: Scratch = const { Scratch::new(Vec::new()) };
            static GATHERED: Scratch = const { Scratch::new(Vec::new()) };
        }
        let h = self.hidden;
        // Group g's outputs start at row `first[g]` of the buffer.
        let mut first = Vec::with_capacity(groups.len());
        let mut total = 0;
        for (_, members) in groups {
            first.push(total);
            total += members.len();
        }
        with_scratch(&OUTPUTS, total * h, |outputs| {
            let mut slices = Vec::with_capacity(groups.len());
            let mut rest = &mut outputs[..];
            for (_, members) in groups {
                let (head, tail) = rest.split_at_mut(members.len() * h);
                slices.push(head);
                rest = tail;
            }
            let run = |((expert, members), out): (&(u32, Vec<usize>), &mut &mut [f32])| {
                let Some(Held::Host(mlp)) = self.get(layer, *expert as usize) else {
                    unreachable!("a CPU holder keeps every expert on the host")
                };
                with_scratch(&GATHERED, members.len() * h, |x| {
                    for (dst, &i) in x.chunks_exact_mut(h).zip(members) {
                        let r = assignments[i].row as usize;
                        dst.copy_from_slice(&rows[r * h..(r + 1) * h]);
                    }
                    mlp.forward_into(x, members.len(), out);
                });
            };
            if groups.len() > 2 * rayon::current_num_threads() {
                groups.par_iter().zip(slices.par_iter_mut()).for_each(run);
            } else {
                groups.iter().zip(slices.iter_mut()).for_each(run);
            }

            // Combine in assignment order so the summation order does not depend on how
            // experts were grouped or scheduled.
            let mut location = vec![0usize; assignments.len()];
            for ((_, members), &f) in groups.iter().zip(&first) {
                for (slot, &i) in members.iter().enumerate() {
                    location[i] = f + slot;
                }
            }
            let mut out = vec![0.0; num_rows * h];
            for (a, &at) in assignments.iter().zip(&location) {
                let r = a.row as usize;
                axpy(a.weight, &outputs[at * h..(at + 1) * h], &mut out[r * h..(r + 1) * h]);
            }
            out
        })
    }
}
