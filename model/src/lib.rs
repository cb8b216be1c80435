//! Hunyuan mixture-of-experts model core, the inference path only: CPU kernels always, CUDA ones
//! with the `cuda` feature.
//!
//! Layout, each layer built on the one before:
//! [`config`] ([`quant`]) / [`checkpoint`] ([`plan`], [`progress`]) / [`weights`] ([`fp8`], [`gptq`], [`names`], [`identity`]) -> [`kernels`] ([`cuda`] on a
//! [`device`]) -> [`attention`] ([`rope`], [`kv_cache`], [`paged_attention`]) / [`router`] ([`capacity`]) / [`mlp`] /
//! [`experts`] -> [`model`] ([`batch`], [`trace`], [`overlap`]) -> [`engine`], [`sampling`] ([`rng`]).
//! Fixture checking and model generation are tools, in the `moe-model-tools` crate.
//!
//! The model is split the way the cluster splits it: [`model::AttentionModel`] is everything an
//! attention worker holds (embeddings, attention, norms, router, shared expert, LM head), and
//! [`experts::ExpertCompute`] is the routed-expert unit an expert worker serves.
//! [`engine::Engine`] puts both in one process: the reference arrangement.

pub mod attention;
pub mod batch;
pub mod capacity;
pub mod checkpoint;
pub mod config;
pub mod cuda;
pub mod device;
pub mod engine;
pub mod error;
pub mod experts;
pub mod fp8;
pub mod gptq;
pub mod identity;
pub mod kernels;
pub mod kv_cache;
pub mod mlp;
pub mod model;
pub mod names;
pub mod overlap;
pub mod paged_attention;
pub mod plan;
pub mod progress;
pub mod quant;
pub mod rng;
pub mod rope;
pub mod router;
pub mod sampling;
pub mod trace;
pub mod weights;

pub use config::{DType, ModelConfig};
pub use engine::{Engine, EngineOptions, LogitsWanted, SeqChunk};
pub use error::{Error, Result};
