//! Reading a fixture directory: its config, expected arrays and tolerances.

use std::path::{Path, PathBuf};

use moe_model::checkpoint::{Checkpoint, read_i64};
use moe_model::config::ModelConfig;
use serde::Serialize;

use crate::error::{Error, Result};

/// Per-quantity absolute tolerances (`cases.json` → `suggested_tolerance`).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tolerances {
    pub logits: f64,
    pub hidden: f64,
    pub router_logits: f64,
    pub topk_weight: f64,
    pub kv_states: f64,
}

impl Default for Tolerances {
    fn default() -> Self {
        Tolerances {
            logits: 5e-4,
            hidden: 5e-4,
            router_logits: 5e-4,
            topk_weight: 1e-4,
            kv_states: 5e-4,
        }
    }
}

impl Tolerances {
    /// For a run whose activations are bf16 between operations (the GPU path): bf16 keeps 8
    /// significant bits, so each quantity is allowed about 2^-5 of a unit-scale value, the
    /// top-k weights a little less. Stated up front, not fitted to a run.
    pub fn bf16() -> Self {
        Tolerances {
            logits: 5e-2,
            hidden: 5e-2,
            router_logits: 5e-2,
            topk_weight: 2e-2,
            kv_states: 5e-2,
        }
    }
}

/// An opened fixture directory.
pub struct Fixture {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub tolerances: Tolerances,
    pub(super) expected: Checkpoint,
}

impl Fixture {
    pub fn open(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let expected = Checkpoint::open(&dir.join("expected.safetensors"))?;
        let tolerances = read_tolerances(&dir.join("cases.json"))?;
        Ok(Fixture {
            dir: dir.to_owned(),
            config,
            tolerances,
            expected,
        })
    }

    pub(super) fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self.expected.info(name)?;
        Ok((self.expected.f32_tensor(name, &info.shape)?, info.shape))
    }

    pub(super) fn ids(&self, name: &str) -> Result<Vec<i64>> {
        Ok(read_i64(&self.expected, name)?.0)
    }

    pub(super) fn has(&self, name: &str) -> bool {
        self.expected.contains(name)
    }

    /// Prompt names (`prompt0`, `prompt1`, ...) in numeric order.
    pub(super) fn prompts(&self) -> Vec<String> {
        let mut ids: Vec<usize> = self
            .expected
            .tensor_names()
            .filter_map(|n| n.strip_suffix(".input_ids")?.strip_prefix("prompt")?.parse().ok())
            .collect();
        ids.sort_unstable();
        ids.into_iter().map(|i| format!("prompt{i}")).collect()
    }

    pub(super) fn tokens(&self, name: &str) -> Result<Vec<u32>> {
        self.ids(name)?
            .into_iter()
            .map(|t| {
                u32::try_from(t).map_err(|_| Error::Fixture {
                    path: self.dir.clone(),
                    reason: format!("{name} holds token id {t}"),
                })
            })
            .collect()
    }
}

fn read_tolerances(cases: &Path) -> Result<Tolerances> {
    let mut tol = Tolerances::default();
    let Ok(text) = std::fs::read_to_string(cases) else {
        return Ok(tol);
    };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Fixture {
        path: cases.to_owned(),
        reason: format!("invalid JSON: {e}"),
    })?;
    let s = &json["suggested_tolerance"];
    let get = |k: &str, d: f64| s[k].as_f64().unwrap_or(d);
    tol = Tolerances {
        logits: get("logits_atol", tol.logits),
        hidden: get("hidden_atol", tol.hidden),
        router_logits: get("router_logits_atol", tol.router_logits),
        topk_weight: get("topk_weight_atol", tol.topk_weight),
        kv_states: get("kv_states_atol", get("hidden_atol", tol.kv_states)),
    };
    Ok(tol)
}
