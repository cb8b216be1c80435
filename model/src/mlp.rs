//! SwiGLU MLP, `down(silu(gate(x)) * up(x))`: the shared expert and every routed expert.

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::kernels::{linear, silu_mul};
use crate::plan::Want;
use crate::weights::Matrix;

#[derive(Debug, Clone)]
pub struct SwiGlu {
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
}

impl SwiGlu {
    /// The tensors `{prefix}.{gate,up,down}_proj.weight` (named by `name(proj)`), in that order.
    pub fn wants(name: impl Fn(&str) -> String, hidden: usize, inter: usize) -> [Want; 3] {
        [
            Want::matrix(name("gate_proj"), inter, hidden),
            Want::matrix(name("up_proj"), inter, hidden),
            Want::matrix(name("down_proj"), hidden, inter),
        ]
    }

    /// Loads [`SwiGlu::wants`].
    pub fn load(ckpt: &Checkpoint, name: impl Fn(&str) -> String, hidden: usize, inter: usize) -> Result<Self> {
        let [gate, up, down] = Self::wants(name, hidden, inter).map(|w| ckpt.matrix(&w.name, w.shape[0], w.shape[1]));
        Ok(SwiGlu {
            gate: gate?,
            up: up?,
            down: down?,
        })
    }

    pub fn intermediate(&self) -> usize {
        self.gate.rows
    }

    pub fn size_in_bytes(&self) -> usize {
        self.gate.size_in_bytes() + self.up.size_in_bytes() + self.down.size_in_bytes()
    }

    /// `x [m, hidden]` -> `[m, hidden]`.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let inter = self.intermediate();
        let mut g = vec![0.0; m * inter];
        let mut u = vec![0.0; m * inter];
        linear(x, m, &self.gate, &mut g);
        linear(x, m, &self.up, &mut u);
        silu_mul(&mut g, &u);
        let mut out = vec![0.0; m * self.down.rows];
        linear(&g, m, &self.down, &mut out);
        out
    }
}
