//! Attention worker: holds embeddings, every layer's attention with a paged KV cache, norms,
//! router, shared expert and LM head; runs continuous batching and sends each layer's routed
//! rows to the expert workers (one message per expert worker per layer).

pub mod dispatch;
mod error;
pub mod events;
pub mod scheduler;
mod service;
pub mod step_plan;
mod worker;

pub use error::{Error, Result};
pub use worker::{Args, run};
