//! The NCCL data plane's control: which workers form the communicator, in which ranks, under
//! which epoch, and its unique id. NCCL needs every rank to call `ncclCommInitRank` with the
//! same id; the id comes from rank 0 (`ncclGetUniqueId` needs NCCL, which the coordinator does
//! not have), travels over gRPC (`Control.PublishNcclId`) and reaches the other members in
//! their heartbeat responses. Any change of the capable members makes a new epoch: the old
//! communicator is dropped everywhere and a new one is built, so the cluster scales without
//! restarts; until every member reports the new epoch ready, dispatches go over gRPC.

use std::time::{Duration, Instant};

use moe_proto::v1::{NcclGroup, NcclPeer, Role};

/// Size of `ncclUniqueId`.
pub const UNIQUE_ID_BYTES: usize = 128;

/// How long after its id was published a group may take to become ready before it starts
/// over (a member's join failed or hung). Longer than a worker's own join timeout.
pub const JOIN_DEADLINE: Duration = Duration::from_secs(90);

/// Why rank 0's unique id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("NCCL group epoch {epoch} is not the current one ({current})")]
    NotCurrent { epoch: u64, current: u64 },
    #[error("{worker} is not rank 0 of NCCL group epoch {epoch}")]
    NotRankZero { worker: String, epoch: u64 },
    #[error("an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {0}")]
    WrongLength(usize),
    #[error("NCCL group epoch {0} already has a different unique id")]
    DifferentId(u64),
}

#[derive(Debug, Default)]
pub struct NcclPlane {
    epoch: u64,
    /// Worker ids in rank order.
    ranks: Vec<String>,
    unique_id: Option<Vec<u8>>,
    /// When the current epoch's id was published.
    published_at: Option<Instant>,
    /// Per rank, the newest epoch it reported ready.
    ready: Vec<u64>,
}

impl NcclPlane {
    /// A plane whose first group gets epoch `after + 1`. Workers keep their communicator
    /// across a change of leader, so a new leader must not reuse an epoch an old one gave
    /// out: the state starts from the wall clock in milliseconds, beyond any earlier leader's
    /// epochs unless it made more groups than milliseconds have passed since it started.
    pub fn starting_after(after: u64) -> Self {
        NcclPlane {
            epoch: after,
            ..Default::default()
        }
    }

    /// Sets the group to the NCCL-capable workers, `(id, role)` in registration order. A group
    /// needs an attention worker and an expert worker; a change of members starts a new epoch.
    pub fn set_members<'a>(&mut self, capable: impl IntoIterator<Item = (&'a str, Role)>) {
        let capable: Vec<(&str, Role)> = capable.into_iter().collect();
        let has = |role| capable.iter().any(|&(_, r)| r == role);
        let ranks: Vec<String> = if has(Role::Attention) && has(Role::Expert) {
            let of = |role| {
                capable
                    .iter()
                    .filter(move |&&(_, r)| r == role)
                    .map(|&(id, _)| id.to_owned())
            };
            of(Role::Attention).chain(of(Role::Expert)).collect()
        } else {
            Vec::new()
        };
        if ranks != self.ranks {
            self.ranks = ranks;
            self.new_epoch();
        }
    }

    /// Starts the group over under a new epoch: every member drops its communicator, rank 0
    /// makes a new id, everyone joins again.
    fn new_epoch(&mut self) {
        self.epoch += 1;
        self.ready = vec![0; self.ranks.len()];
        self.unique_id = None;
        self.published_at = None;
        if !self.ranks.is_empty() {
            tracing::info!(epoch = self.epoch, world = self.ranks.len(), "new NCCL group");
        }
    }

    fn rank_of(&self, worker: &str) -> Option<usize> {
        self.ranks.iter().position(|id| id == worker)
    }

    /// Rank 0 publishes the unique id of `epoch`. Refused, with the reason, from another rank,
    /// for another epoch, with a malformed id, or when a different id is already published.
    pub fn publish(&mut self, worker: &str, epoch: u64, unique_id: Vec<u8>) -> Result<(), PublishError> {
        if epoch != self.epoch || self.ranks.is_empty() {
            return Err(PublishError::NotCurrent {
                epoch,
                current: self.epoch,
            });
        }
        if self.rank_of(worker) != Some(0) {
            return Err(PublishError::NotRankZero {
                worker: worker.to_owned(),
                epoch,
            });
        }
        if unique_id.len() != UNIQUE_ID_BYTES {
            return Err(PublishError::WrongLength(unique_id.len()));
        }
        match &self.unique_id {
            Some(id) if *id != unique_id => Err(PublishError::DifferentId(epoch)),
            Some(_) => Ok(()),
            None => {
                self.unique_id = Some(unique_id);
                self.published_at = Some(Instant::now());
                Ok(())
            }
        }
    }

    /// A member's heartbeat: the epoch whose communicator it has created. A member that held
    /// the current epoch's communicator and no longer does (it aborted it: a peer failed or
    /// timed out mid-exchange) leaves the others with a communicator missing a rank, so the
    /// group starts over under a new epoch. So does a group not ready [`JOIN_DEADLINE`] after
    /// its id was published (`now`): a member's join failed, and members try an epoch once.
    pub fn report(&mut self, worker: &str, ready_epoch: u64, now: Instant) {
        if let Some(r) = self.rank_of(worker) {
            let lost = self.ready[r] == self.epoch && ready_epoch != self.epoch;
            self.ready[r] = ready_epoch;
            if lost {
                tracing::warn!(%worker, epoch = self.epoch, "an NCCL member lost its communicator");
                self.new_epoch();
            }
        }
        if !self.ready()
            && self
                .published_at
                .is_some_and(|t| now.saturating_duration_since(t) > JOIN_DEADLINE)
        {
            tracing::warn!(
                epoch = self.epoch,
                "NCCL group not ready {JOIN_DEADLINE:?} after its id: starting over"
            );
            self.new_epoch();
        }
    }

    /// Every member has the current epoch's communicator.
    pub fn ready(&self) -> bool {
        !self.ranks.is_empty() && self.ready.iter().all(|&e| e == self.epoch)
    }

    /// What `worker` is told in its heartbeat response; `None` outside the group.
    pub fn view(&self, worker: &str) -> Option<NcclGroup> {
        let rank = self.rank_of(worker)?;
        Some(NcclGroup {
            epoch: self.epoch,
            rank: rank as u32,
            world_size: self.ranks.len() as u32,
            unique_id: self.unique_id.clone().unwrap_or_default(),
            peers: self
                .ranks
                .iter()
                .enumerate()
                .map(|(rank, id)| NcclPeer {
                    worker_id: id.clone(),
                    rank: rank as u32,
                })
                .collect(),
            ready: self.ready(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(plane: &mut NcclPlane, members: &[(&str, Role)]) {
        plane.set_members(members.iter().copied());
    }

    /// A plane grouping `attention-1` (rank 0) and `expert-1`.
    fn pair() -> NcclPlane {
        let mut plane = NcclPlane::default();
        group(
            &mut plane,
            &[("attention-1", Role::Attention), ("expert-1", Role::Expert)],
        );
        plane
    }

    #[test]
    fn epochs_continue_after_the_starting_point() {
        let mut plane = NcclPlane::starting_after(1_000);
        group(
            &mut plane,
            &[("attention-1", Role::Attention), ("expert-1", Role::Expert)],
        );
        assert_eq!(plane.view("expert-1").unwrap().epoch, 1_001);
    }

    #[test]
    fn ranks_put_attention_workers_first_and_need_both_roles() {
        let mut plane = NcclPlane::default();
        group(&mut plane, &[("expert-1", Role::Expert)]);
        assert!(plane.view("expert-1").is_none(), "no group without an attention worker");
        group(
            &mut plane,
            &[
                ("expert-1", Role::Expert),
                ("attention-1", Role::Attention),
                ("expert-2", Role::Expert),
            ],
        );
        let view = plane.view("expert-2").unwrap();
        assert_eq!((view.rank, view.world_size), (2, 3));
        let order: Vec<_> = view.peers.iter().map(|p| p.worker_id.as_str()).collect();
        assert_eq!(order, ["attention-1", "expert-1", "expert-2"]);
        assert!(view.unique_id.is_empty() && !view.ready);
    }

    #[test]
    fn only_rank_0_publishes_a_well_formed_id_for_the_current_epoch() {
        let mut plane = pair();
        let epoch = plane.view("expert-1").unwrap().epoch;
        let id = vec![7u8; UNIQUE_ID_BYTES];
        let err = plane.publish("expert-1", epoch, id.clone()).unwrap_err().to_string();
        assert!(err.contains("not rank 0"), "{err}");
        let err = plane
            .publish("attention-1", epoch + 1, id.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not the current"), "{err}");
        let err = plane
            .publish("attention-1", epoch, vec![1; 12])
            .unwrap_err()
            .to_string();
        assert!(err.contains("128 bytes, got 12"), "{err}");
        plane.publish("attention-1", epoch, id.clone()).unwrap();
        plane
            .publish("attention-1", epoch, id.clone())
            .expect("publishing again is harmless");
        let err = plane
            .publish("attention-1", epoch, vec![8; UNIQUE_ID_BYTES])
            .unwrap_err()
            .to_string();
        assert!(err.contains("different unique id"), "{err}");
        assert_eq!(plane.view("expert-1").unwrap().unique_id, id);
    }

    #[test]
    fn the_group_is_ready_once_every_member_reports_the_epoch_and_a_change_starts_over() {
        let mut plane = NcclPlane::default();
        let two = [("attention-1", Role::Attention), ("expert-1", Role::Expert)];
        group(&mut plane, &two);
        let epoch = plane.view("attention-1").unwrap().epoch;
        plane.publish("attention-1", epoch, vec![1; UNIQUE_ID_BYTES]).unwrap();
        plane.report("attention-1", epoch, Instant::now());
        assert!(!plane.ready());
        plane.report("expert-1", epoch, Instant::now());
        assert!(plane.ready() && plane.view("expert-1").unwrap().ready);

        group(&mut plane, &two);
        assert_eq!(
            plane.view("attention-1").unwrap().epoch,
            epoch,
            "same members, same epoch"
        );

        // A joining expert worker: new epoch, no id, nobody ready.
        group(&mut plane, &[two[0], two[1], ("expert-2", Role::Expert)]);
        let view = plane.view("expert-2").unwrap();
        assert_eq!(view.epoch, epoch + 1);
        assert!(view.unique_id.is_empty() && !view.ready);
        plane.report("attention-1", epoch, Instant::now());
        assert!(!plane.ready(), "a report of the old epoch does not count");
        let err = plane
            .publish("attention-1", epoch, vec![1; UNIQUE_ID_BYTES])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not the current"), "{err}");

        // The last attention worker leaves: no group at all.
        group(&mut plane, &[two[1], ("expert-2", Role::Expert)]);
        assert!(plane.view("expert-1").is_none());
        assert!(!plane.ready());
    }

    #[test]
    fn a_member_that_aborts_its_communicator_starts_the_group_over() {
        let mut plane = pair();
        let epoch = plane.view("attention-1").unwrap().epoch;
        // Members report 0 until they have joined: that is not a loss.
        plane.report("expert-1", 0, Instant::now());
        assert_eq!(plane.view("expert-1").unwrap().epoch, epoch);
        plane.publish("attention-1", epoch, vec![1; UNIQUE_ID_BYTES]).unwrap();
        plane.report("attention-1", epoch, Instant::now());
        plane.report("expert-1", epoch, Instant::now());
        assert!(plane.ready());
        // The expert worker aborted its communicator (a peer timed out mid-exchange).
        plane.report("expert-1", 0, Instant::now());
        let view = plane.view("attention-1").unwrap();
        assert_eq!(view.epoch, epoch + 1, "same members, new epoch");
        assert!(view.unique_id.is_empty() && !view.ready && !plane.ready());
        // The attention worker's report of the old epoch is stale, not another loss.
        plane.report("attention-1", epoch, Instant::now());
        assert_eq!(plane.view("attention-1").unwrap().epoch, epoch + 1);
    }

    #[test]
    fn a_group_not_ready_long_after_its_id_starts_over() {
        let mut plane = pair();
        let epoch = plane.view("attention-1").unwrap().epoch;
        let now = Instant::now();
        plane.report("expert-1", 0, now + JOIN_DEADLINE * 2);
        assert_eq!(
            plane.view("expert-1").unwrap().epoch,
            epoch,
            "no id yet: nothing to time out"
        );
        plane.publish("attention-1", epoch, vec![1; UNIQUE_ID_BYTES]).unwrap();
        plane.report("attention-1", epoch, now);
        plane.report("expert-1", 0, now + JOIN_DEADLINE / 2);
        assert_eq!(
            plane.view("expert-1").unwrap().epoch,
            epoch,
            "still within the deadline"
        );
        plane.report("expert-1", 0, now + JOIN_DEADLINE * 2);
        let view = plane.view("expert-1").unwrap();
        assert_eq!(view.epoch, epoch + 1);
        assert!(view.unique_id.is_empty());
    }
}
