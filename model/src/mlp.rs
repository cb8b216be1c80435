//! SwiGLU MLP, `down(silu(gate(x)) * up(x))`: the shared expert and every routed expert.

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::kernels::{Path, Scratch, linear_many, linear_strided, silu_mul, with_scratch};
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
        let mut out = vec![0.0; m * self.down.rows];
        self.forward_into(x, m, &mut out);
        out
    }

    /// [`SwiGlu::forward`] into `out [m, hidden]`. Gate and up are one product (one pass over
    /// `x`, their outputs side by side in each row of a reused per-thread buffer); the
    /// activation overwrites the gate half in place and `down` reads it with the row stride.
    pub fn forward_into(&self, x: &[f32], m: usize, out: &mut [f32]) {
        thread_local! {
            static GATE_UP: Scratch = const { Scratch::new(Vec::new()) };
        }
        let (inter, hidden) = (self.intermediate(), self.down.rows);
        assert_eq!(out.len(), m * hidden, "SwiGLU output is not [m={m}, hidden={hidden}]");
        with_scratch(&GATE_UP, m * 2 * inter, |gu| {
            linear_many(x, m, &[&self.gate, &self.up], gu);
            for row in gu.chunks_exact_mut(2 * inter) {
                let (g, u) = row.split_at_mut(inter);
                silu_mul(g, u);
            }
            linear_strided(gu, 2 * inter, m, &[&self.down], out, hidden, Path::Auto);
        });
    }
}
