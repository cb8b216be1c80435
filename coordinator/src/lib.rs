//! The coordinator: the front door for clients, the scheduler of requests onto attention
//! workers, the owner of the expert placement and of membership.
//!
//! All cluster state lives in one task ([`state`]) reached through a cloneable handle; the gRPC
//! services only translate between the wire and that handle.

mod control;
mod error;
mod inference;
mod leader;
mod load;
mod members;
mod metrics;
mod nccl;
pub mod planner;
pub mod registry;
mod server;
pub mod state;
mod store;

pub use error::{Error, Result};
pub use server::{Args, run};
