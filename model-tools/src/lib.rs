//! Tools around the Hunyuan MoE model core (`moe-model`), not part of inference: checking a
//! model against golden fixtures ([`golden`]), generating seeded random models in the
//! HuggingFace layout ([`synthetic`]) and the streaming safetensors writer behind it
//! ([`safetensors_writer`]). Used by `moectl` and the tests.

pub mod error;
pub mod golden;
pub mod safetensors_writer;
pub mod synthetic;

pub use error::{Error, Result};
