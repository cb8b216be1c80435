//! Expert worker: owns a slice of the routed experts of every layer, loads only those tensors,
//! and answers per-layer dispatch messages with a grouped SwiGLU over all rows it received,
//! returning per token the routing-weighted sum over its own experts.

mod error;
mod loader;
mod refusal;
mod service;
mod state;
mod worker;

pub use error::{Error, Result};
pub use worker::{Args, run};
