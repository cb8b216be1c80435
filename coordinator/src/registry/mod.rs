//! Where the cluster's lasting facts are kept so that they outlive a coordinator: the model it
//! serves, its expert placement, and (with etcd) its members. One trait, two backends: etcd for a
//! real cluster (a standby coordinator that takes over reads what the previous leader wrote) and
//! an in-memory one, the embedded default, so a single command starts a cluster with nothing else
//! installed.
//!
//! Member records belong to the workers: each writes its own under its own lease
//! ([`moe_runtime::record`]); coordinators only read them ([`Registry::load`]) and follow them
//! ([`watch`]). Liveness for serving is still decided by the leader from heartbeats.

pub(crate) mod etcd;
mod memory;
pub mod watch;

pub use etcd::EtcdRegistry;
pub use memory::InMemoryRegistry;
pub use moe_runtime::etcd::EtcdOptions;
pub use moe_runtime::member::Member;

use moe_proto::v1::Placement;

use crate::Result;

/// What a registry refuses or fails at, apart from etcd's own errors.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("--leader-ttl-s must be at least 2 (etcd leases count seconds)")]
    TtlTooShort,
    /// Two clusters must not share a prefix.
    #[error("{place} holds a cluster of model {held}, not {wanted}{hint}")]
    OtherModel {
        place: String,
        held: String,
        wanted: String,
        hint: &'static str,
    },
    #[error("the recorded placement does not decode: {0}")]
    PlacementDecode(#[from] prost::DecodeError),
    #[error("the store task stopped")]
    StoreStopped,
}

/// What is recorded: the members' own records (in etcd; in `seq` order, which is the order
/// they were first written) and the placement the last leader made active.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub members: Vec<Member>,
    pub placement: Option<Placement>,
}

#[tonic::async_trait]
pub trait Registry: Send + 'static {
    /// Binds the registry to a cluster of `model_id`; a registry already holding a cluster of
    /// another model is refused (two clusters must not share a prefix).
    async fn claim(&mut self, model_id: &str) -> Result<()>;
    /// Everything recorded, members in `seq` order.
    async fn load(&mut self) -> Result<Snapshot>;
    async fn put_placement(&mut self, placement: &Placement) -> Result<()>;
    /// Writes from now on succeed only while `fence` still holds leadership (the etcd election
    /// key of this coordinator), so a deposed leader cannot overwrite its successor.
    fn set_fence(&mut self, fence: Option<Fence>);
}

/// An etcd election key and the revision it was created at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: Vec<u8>,
    pub create_revision: i64,
}
