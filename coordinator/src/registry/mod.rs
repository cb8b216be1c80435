//! Where membership and the expert placement are recorded so that they outlive a coordinator.
//! One trait, two backends: etcd for a real cluster (a standby coordinator that takes over
//! reads what the previous leader wrote) and an in-memory one, the embedded default, so a single
//! command starts a cluster with nothing else installed.
//!
//! Liveness is decided by the leader from worker heartbeats; the registry records who is a
//! member, each record under a lease the leader keeps alive, so that records of a cluster whose
//! coordinators are all gone expire by themselves.

pub(crate) mod etcd;
mod memory;

pub use etcd::{EtcdOptions, EtcdRegistry};
pub use memory::InMemoryRegistry;

use moe_proto::v1::{Placement, Role};
use serde::{Deserialize, Serialize};

use crate::Result;

/// What a registry refuses or fails at, apart from etcd's own errors.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("no etcd endpoint given")]
    NoEndpoint,
    #[error("etcd prefix `{0}` must start with `/`")]
    Prefix(String),
    #[error("--leader-ttl-s and --member-ttl-s must be at least 2 (etcd leases count seconds)")]
    TtlTooShort,
    #[error("{context}: no answer within {timeout:?}")]
    NoAnswer {
        context: String,
        timeout: std::time::Duration,
    },
    /// Two clusters must not share a prefix.
    #[error("{place} holds a cluster of model {held}, not {wanted}{hint}")]
    OtherModel {
        place: String,
        held: String,
        wanted: String,
        hint: &'static str,
    },
    #[error("encoding a member record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the recorded placement does not decode: {0}")]
    PlacementDecode(#[from] prost::DecodeError),
    #[error("the store task stopped")]
    StoreStopped,
}

/// One member as recorded: what a new leader needs to know it without the worker registering
/// again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    #[serde(with = "role_name")]
    pub role: Role,
    pub address: String,
    pub model_id: String,
    /// Registration order across leaders: placements list workers in this order.
    pub seq: u64,
    /// Joins the NCCL data plane (absent in records written before it existed).
    #[serde(default)]
    pub nccl: bool,
}

/// What a previous leader recorded.
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
    /// Records (or records again, after its lease was lost) a member.
    async fn put_member(&mut self, member: &Member) -> Result<()>;
    /// Renews the leases of every recorded member; returns the members whose record was gone
    /// (its lease expired, or the store lost it), so the caller can record them again.
    async fn keep_alive(&mut self) -> Result<Vec<String>>;
    async fn remove_member(&mut self, id: &str) -> Result<()>;
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

mod role_name {
    use moe_proto::v1::Role;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(role: &Role, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(role.as_str_name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Role, D::Error> {
        let name = String::deserialize(d)?;
        Role::from_str_name(&name).ok_or_else(|| serde::de::Error::custom(format!("unknown role `{name}`")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_records_round_trip_and_name_their_role() {
        let m = Member {
            id: "expert-3".into(),
            role: Role::Expert,
            address: "127.0.0.1:5".into(),
            model_id: "abc".into(),
            seq: 3,
            nccl: true,
        };
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"ROLE_EXPERT\""), "{json}");
        assert_eq!(serde_json::from_str::<Member>(&json).unwrap(), m);
        let bad = json.replace("ROLE_EXPERT", "ROLE_CHEF");
        let err = serde_json::from_str::<Member>(&bad).unwrap_err().to_string();
        assert!(err.contains("unknown role `ROLE_CHEF`"), "{err}");
    }
}
