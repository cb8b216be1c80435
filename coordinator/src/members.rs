//! The leader's live view of membership: who is in the cluster, what each last reported, when
//! it was last heard from, and whether it is draining. Heartbeats land here, never in etcd; in
//! etcd each worker keeps its own record of who it is.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use moe_proto::v1::{Role, WorkerStatus};

use crate::registry::Member;

#[derive(Debug, Clone)]
pub struct Live {
    pub id: String,
    pub role: Role,
    pub address: String,
    pub model_id: String,
    pub seq: u64,
    pub nccl: bool,
    /// Which process of this id (see [`Member::incarnation`]).
    pub incarnation: u64,
    pub last_seen: Instant,
    pub status: WorkerStatus,
    /// Leaving: takes no new requests (attention) or no slots in new placements (expert).
    pub draining: bool,
    /// Has proven itself on the control plane (registered or heartbeated with the cluster
    /// credential). A worker known only from its etcd record waits for that before it is given
    /// requests or experts: a record may be stale (a dead worker's, re-listed before its lease
    /// expired) or written by something that cannot call the control plane.
    pub proven: bool,
}

impl Live {
    pub fn member(&self) -> Member {
        Member {
            id: self.id.clone(),
            role: self.role,
            address: self.address.clone(),
            model_id: self.model_id.clone(),
            seq: self.seq,
            nccl: self.nccl,
            incarnation: self.incarnation,
        }
    }
}

/// Why a worker cannot be drained.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrainError {
    #[error("no worker `{0}` in the cluster")]
    Unknown(String),
    #[error("`{worker}` is the last {} worker; draining it would stop the cluster", role_noun(.role))]
    LastWorker { worker: String, role: Role },
    #[error(transparent)]
    Away(#[from] crate::cluster::RegistryAway),
}

fn role_noun(role: &Role) -> &'static str {
    if *role == Role::Expert { "expert" } else { "attention" }
}

/// Members in registration order.
#[derive(Debug, Default)]
pub struct Members {
    by_seq: BTreeMap<u64, Live>,
    next_seq: u64,
}

fn role_prefix(role: Role) -> &'static str {
    match role {
        Role::Attention => "attn",
        Role::Expert => "expert",
        Role::Unspecified => "worker",
    }
}

impl Members {
    /// Adds a new member (its id unknown here) in the next place of the registration order and
    /// returns its record. A member that proposes no id is given `{role}-{seq}`.
    pub fn add(&mut self, m: Member) -> Member {
        self.insert(m, true)
    }

    /// Adds a member known only from its record: it serves once it heartbeats.
    pub fn add_pending(&mut self, m: Member) -> Member {
        self.insert(m, false)
    }

    fn insert(&mut self, m: Member, proven: bool) -> Member {
        self.next_seq += 1;
        let seq = self.next_seq;
        let id = if m.id.is_empty() {
            format!("{}-{seq}", role_prefix(m.role))
        } else {
            m.id
        };
        let live = Live {
            id,
            role: m.role,
            address: m.address,
            model_id: m.model_id,
            seq,
            nccl: m.nccl,
            incarnation: m.incarnation,
            last_seen: Instant::now(),
            status: WorkerStatus::default(),
            draining: false,
            proven,
        };
        let member = live.member();
        self.by_seq.insert(seq, live);
        member
    }

    /// Takes in a member recorded by an earlier leader or by the worker itself, as if it had
    /// just been heard from (it has a heartbeat timeout to show up); false when already known.
    pub fn adopt(&mut self, m: Member) -> bool {
        if self.get(&m.id).is_some() {
            return false;
        }
        self.add(m);
        true
    }

    /// Records a heartbeat; false when no member has this id *and* address (expired, never
    /// registered, or an id a previous leader gave to someone else before it crashed).
    pub fn heartbeat(&mut self, id: &str, address: &str, status: WorkerStatus) -> bool {
        match self.by_seq.values_mut().find(|w| w.id == id) {
            Some(w) if address.is_empty() || w.address == address => {
                w.last_seen = Instant::now();
                w.status = status;
                w.proven = true;
                true
            }
            _ => false,
        }
    }

    /// A member known from its record proved itself (it registered).
    pub fn prove(&mut self, id: &str) {
        if let Some(w) = self.by_seq.values_mut().find(|w| w.id == id) {
            w.proven = true;
        }
    }

    pub fn get(&self, id: &str) -> Option<&Live> {
        self.by_seq.values().find(|w| w.id == id)
    }

    pub fn remove(&mut self, id: &str) -> Option<Live> {
        let seq = self.get(id)?.seq;
        self.by_seq.remove(&seq)
    }

    /// Drops members not heard from within `timeout`; returns them.
    pub fn expire(&mut self, timeout: Duration) -> Vec<Live> {
        let now = Instant::now();
        let dead: Vec<u64> = self
            .by_seq
            .values()
            .filter(|w| now.duration_since(w.last_seen) > timeout)
            .map(|w| w.seq)
            .collect();
        dead.into_iter().filter_map(|s| self.by_seq.remove(&s)).collect()
    }

    /// Live members in registration order.
    pub fn iter(&self) -> impl Iterator<Item = &Live> {
        self.by_seq.values()
    }

    /// Members that serve: proven and not draining, in registration order.
    pub fn staying(&self) -> impl Iterator<Item = &Live> {
        self.iter().filter(|w| w.proven && !w.draining)
    }

    /// Marks `id` as draining and returns its role. Refused for the last staying worker of its
    /// role: the cluster cannot serve without one of each.
    pub fn drain(&mut self, id: &str) -> Result<Role, DrainError> {
        let role = self.get(id).ok_or_else(|| DrainError::Unknown(id.to_owned()))?.role;
        if !self.staying().any(|w| w.role == role && w.id != id) {
            return Err(DrainError::LastWorker {
                worker: id.to_owned(),
                role,
            });
        }
        if let Some(w) = self.by_seq.values_mut().find(|w| w.id == id) {
            w.draining = true;
        }
        Ok(role)
    }
}

/// A worker of model `x` joining at `address`, no id proposed (tests).
#[cfg(test)]
pub(crate) fn joining(role: Role, address: &str) -> Member {
    Member {
        id: String::new(),
        role,
        address: address.into(),
        model_id: "x".into(),
        seq: 0,
        nccl: false,
        incarnation: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_keep_their_own_ids_in_registration_order_and_heartbeats_check_the_address() {
        let mut m = Members::default();
        let adopted = Member {
            id: "expert-7".into(),
            seq: 900,
            ..joining(Role::Expert, "10.0.0.1:1")
        };
        assert!(m.adopt(adopted.clone()));
        assert!(!m.adopt(adopted), "adopting twice adds nothing");
        let new = m.add(joining(Role::Attention, "10.0.0.2:1"));
        assert_eq!(new.id, "attn-2", "no id proposed: one is given");
        let own = m.add(Member {
            id: "moe-expert-0".into(),
            ..joining(Role::Expert, "10.0.0.3:1")
        });
        assert_eq!((own.id.as_str(), own.seq), ("moe-expert-0", 3));
        assert!(m.heartbeat("expert-7", "10.0.0.1:1", WorkerStatus::default()));
        // Same id, another address: not the member this id names.
        assert!(!m.heartbeat("expert-7", "10.0.0.9:1", WorkerStatus::default()));
        assert!(!m.heartbeat("expert-1", "10.0.0.1:1", WorkerStatus::default()));
        let order: Vec<_> = m.iter().map(|w| w.id.as_str()).collect();
        assert_eq!(order, ["expert-7", "attn-2", "moe-expert-0"]);
    }

    #[test]
    fn the_last_staying_worker_of_a_role_cannot_drain() {
        let mut m = Members::default();
        let e1 = m.add(joining(Role::Expert, "a:1")).id;
        let e2 = m.add(joining(Role::Expert, "a:2")).id;
        let a = m.add(joining(Role::Attention, "a:3")).id;
        let err = m.drain(&a).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`attn-3` is the last attention worker; draining it would stop the cluster"
        );
        assert_eq!(m.drain(&e1), Ok(Role::Expert));
        // e1 is leaving, so e2 is now the last expert worker that stays.
        let err = m.drain(&e2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`expert-2` is the last expert worker; draining it would stop the cluster"
        );
        assert_eq!(
            m.drain("expert-9").unwrap_err().to_string(),
            "no worker `expert-9` in the cluster"
        );
        let staying: Vec<_> = m.staying().map(|w| w.id.as_str()).collect();
        assert_eq!(staying, ["expert-2", "attn-3"]);
    }

    #[test]
    fn a_member_known_from_its_record_serves_once_it_heartbeats() {
        let mut m = Members::default();
        let e = m.add_pending(Member {
            id: "expert-r".into(),
            ..joining(Role::Expert, "a:1")
        });
        assert_eq!(m.iter().count(), 1);
        assert_eq!(m.staying().count(), 0, "no experts or requests before a heartbeat");
        assert!(m.heartbeat(&e.id, "a:1", WorkerStatus::default()));
        assert_eq!(m.staying().count(), 1);
    }

    #[test]
    fn members_not_heard_from_expire() {
        let mut m = Members::default();
        m.add(joining(Role::Expert, "a:1"));
        assert!(m.expire(Duration::from_secs(60)).is_empty());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(m.expire(Duration::from_millis(1)).len(), 1);
        assert_eq!(m.iter().count(), 0);
    }
}
