//! A member of the cluster as recorded in etcd, under `{prefix}/members/{id}`. Each worker writes
//! its own record under its own lease ([`crate::record`]), so the record lives exactly as long as
//! the worker keeps it alive; coordinators read and watch them.

use moe_proto::v1::Role;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Chosen by the worker (`--worker-id`, or its role and a random suffix), kept for its life.
    pub id: String,
    #[serde(with = "role_name")]
    pub role: Role,
    pub address: String,
    pub model_id: String,
    /// Registration order, set by the coordinator (in etcd: the record's create revision).
    #[serde(default)]
    pub seq: u64,
    /// Joins the NCCL data plane.
    #[serde(default)]
    pub nccl: bool,
    /// Random per process: the same id from a new process is a new member (it holds nothing yet),
    /// the same id and incarnation again is the same worker registering twice.
    #[serde(default)]
    pub incarnation: u64,
}

/// Why a proposed worker id is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("worker id `{0}` must be 1 to 64 characters of a-z, A-Z, 0-9, `-`, `_` and `.`")]
pub struct BadWorkerId(pub String);

/// Ids become etcd keys, metric labels and log fields: a short, plain alphabet keeps them safe.
pub fn check_worker_id(id: &str) -> Result<(), BadWorkerId> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok { Ok(()) } else { Err(BadWorkerId(id.to_owned())) }
}

/// A fresh random 64-bit value (an incarnation, an id suffix) from the OS.
pub fn random_u64() -> u64 {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)) {
        Ok(()) => u64::from_le_bytes(bytes),
        // No /dev/urandom: the clock and the process id still differ between processes.
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            nanos ^ (u64::from(std::process::id()) << 32)
        }
    }
}

/// The id a worker takes when none is given: its role and 8 random hex digits.
pub fn generated_worker_id(role: Role) -> String {
    let prefix = match role {
        Role::Attention => "attn",
        Role::Expert => "expert",
        Role::Unspecified => "worker",
    };
    format!("{prefix}-{:08x}", random_u64() as u32)
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
            incarnation: 77,
        };
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"ROLE_EXPERT\""), "{json}");
        assert_eq!(serde_json::from_str::<Member>(&json).unwrap(), m);
        let bad = json.replace("ROLE_EXPERT", "ROLE_CHEF");
        let err = serde_json::from_str::<Member>(&bad).unwrap_err().to_string();
        assert!(err.contains("unknown role `ROLE_CHEF`"), "{err}");
        // A record without the later fields still reads.
        let old = r#"{"id":"a","role":"ROLE_ATTENTION","address":"h:1","model_id":"m"}"#;
        let m: Member = serde_json::from_str(old).unwrap();
        assert_eq!((m.seq, m.nccl, m.incarnation), (0, false, 0));
    }

    #[test]
    fn worker_ids_are_short_and_plain() {
        for good in ["expert-0a1b2c3d", "moe-expert-7", "a", "x.y_z", &"a".repeat(64)] {
            assert!(check_worker_id(good).is_ok(), "{good}");
        }
        for bad in ["", "a/b", "a b", "é", "../x", &"a".repeat(65)] {
            let err = check_worker_id(bad).unwrap_err().to_string();
            assert!(err.contains("must be 1 to 64"), "{bad}: {err}");
        }
        let id = generated_worker_id(Role::Expert);
        assert!(
            id.starts_with("expert-") && id.len() == 15 && check_worker_id(&id).is_ok(),
            "{id}"
        );
        assert_ne!(random_u64(), random_u64());
    }
}
