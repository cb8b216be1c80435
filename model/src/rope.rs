//! Rotary position embedding in the NeoX (rotate-half) layout with the NTK-alpha base.

use crate::config::ModelConfig;

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(config: &ModelConfig) -> Self {
        Rope {
            inv_freq: config.rope.inv_freq(config.head_dim),
        }
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// cos and sin of `pos * inv_freq[i]`, computed in f32 as transformers does.
    pub fn cos_sin(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let angle = pos as f32 * f;
            cos[i] = angle.cos();
            sin[i] = angle.sin();
        }
    }

    /// Rotates every head of `row` (`[heads, head_dim]`) in place:
    /// `x1' = x1 cos - x2 sin`, `x2' = x2 cos + x1 sin` over the two halves.
    pub fn apply(row: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
        let half = head_dim / 2;
        for head in row.chunks_exact_mut(head_dim) {
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * cos[i] - b * sin[i];
                x2[i] = b * cos[i] + a * sin[i];
            }
        }
    }
}
