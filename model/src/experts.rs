//! The routed-expert unit: given token rows and, per row, the experts it goes to with their
//! weights, return the weighted sum of those experts' outputs per row. It is the whole contract
//! between the attention half and the expert half, so it can run in process or behind a
//! transport (expert workers).

use std::collections::BTreeMap;

use rayon::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kernels::axpy;
use crate::mlp::SwiGlu;
use crate::names;
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
}

/// Which routed experts to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpertSelection {
    All,
    /// Explicit `(layer, expert)` pairs.
    Only(Vec<(usize, usize)>),
}

impl ExpertSelection {
    fn pairs(&self, config: &ModelConfig) -> Vec<(usize, usize)> {
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
    /// `experts[layer][expert]`; `None` where not held.
    experts: Vec<Vec<Option<SwiGlu>>>,
}

impl LocalExperts {
    pub fn load(ckpt: &Checkpoint, config: &ModelConfig, selection: &ExpertSelection) -> Result<Self> {
        let mut experts: Vec<Vec<Option<SwiGlu>>> =
            (0..config.num_layers).map(|_| vec![None; config.num_experts]).collect();
        for (l, e) in selection.pairs(config) {
            if l >= config.num_layers || e >= config.num_experts {
                return Err(Error::InvalidInput(format!(
                    "expert ({l}, {e}) does not exist: the model has {} layers of {} experts",
                    config.num_layers, config.num_experts
                )));
            }
            let inter = config.layers[l].expert_intermediate;
            experts[l][e] = Some(SwiGlu::load(
                ckpt,
                |p| names::expert(l, e, p),
                config.hidden_size,
                inter,
            )?);
        }
        Ok(LocalExperts {
            hidden: config.hidden_size,
            experts,
        })
    }

    pub fn holds(&self, layer: usize, expert: usize) -> bool {
        self.get(layer, expert).is_some()
    }

    fn get(&self, layer: usize, expert: usize) -> Option<&SwiGlu> {
        self.experts.get(layer)?.get(expert)?.as_ref()
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
        self.experts.iter().flatten().flatten().map(SwiGlu::size_in_bytes).sum()
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
        let outputs: Vec<Vec<f32>> = groups
            .par_iter()
            .map(|(expert, members)| {
                let mut x = Vec::with_capacity(members.len() * h);
                for &i in members {
                    let r = assignments[i].row as usize;
                    x.extend_from_slice(&rows[r * h..(r + 1) * h]);
                }
                self.get(layer, *expert as usize)
                    .expect("checked above")
                    .forward(&x, members.len())
            })
            .collect();

        // Where each assignment's expert output sits, then combine in assignment order so the
        // summation order does not depend on how experts were grouped or scheduled.
        let mut location = vec![(0usize, 0usize); assignments.len()];
        for (g, (_, members)) in groups.iter().enumerate() {
            for (slot, &i) in members.iter().enumerate() {
                location[i] = (g, slot);
            }
        }
        let mut out = vec![0.0; num_rows * h];
        for (a, &(g, slot)) in assignments.iter().zip(&location) {
            let r = a.row as usize;
            axpy(
                a.weight,
                &outputs[g][slot * h..(slot + 1) * h],
                &mut out[r * h..(r + 1) * h],
            );
        }
        Ok(out)
    }
}
