//! Checks a model against a golden fixture (the format of `shared/golden/README.md`):
//! `config.json`, `model.safetensors`, `expected.safetensors`, `cases.json`.
//!
//! Nothing here knows a fixture's shapes: prompts, layers, steps and batch rows are discovered
//! from the expected arrays. The model under test is reached through [`GoldenTarget`], so the
//! same checks run on the in-process engine and (without per-layer traces) through a cluster.
//!
//! One purpose per file: `fixture` reads the directory, `target` is what a check runs on and
//! `engine` makes the in-process engine one, `check` and `capacity` run the cases, `compare`
//! holds the element-wise comparisons and `report` the outcome.

mod capacity;
mod check;
mod compare;
mod engine;
mod fixture;
mod report;
mod target;

pub use compare::max_abs_diff;
pub use fixture::{Fixture, Tolerances};
pub use report::{CheckRow, Report};
pub use target::{GoldenTarget, PrefillResult};
