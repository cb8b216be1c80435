//! Plumbing shared by the coordinator, attention workers and expert workers.

pub mod auth;
pub mod buckets;
pub mod client;
pub mod control;
pub mod convert;
pub mod dispatch;
pub mod etcd;
pub mod failover;
pub mod fdlimit;
pub mod histogram;
pub mod load_progress;
pub mod member;
pub mod memory;
pub mod nccl;
pub mod net;
pub mod placement;
pub mod record;
pub mod resume;
pub mod shutdown;
pub mod tls;
pub mod worker;

pub use placement::PlacementView;
