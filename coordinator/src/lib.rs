//! The coordinator: the front door for clients, the scheduler of requests onto attention
//! workers, the owner of the expert placement and of membership.
//!
//! All cluster state is one plain value (`cluster`) behind a mutex reached through a cloneable
//! handle ([`state`]); the gRPC services only translate between the wire and that handle
//! (`codes` picks the status of each refusal). The expert placement's lifecycle is its own type
//! (`placements`).

mod cluster;
mod codes;
mod control;
mod departures;
mod dispatch_history;
mod error;
mod inference;
mod latency;
mod leader;
mod load;
mod members;
mod metrics;
mod nccl;
mod placements;
pub mod planner;
pub mod registry;
mod requests;
mod server;
pub mod state;
mod store;

pub use error::{Error, Result};
pub use server::{Args, run};
