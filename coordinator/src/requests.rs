//! Which attention worker takes the next request: the least busy one that routes with a
//! placement. The coordinator counts the requests it handed out and has not seen finish, because
//! a worker's own counts arrive only with its next heartbeat and a burst would otherwise all go
//! to the same worker.

use std::collections::HashMap;

use moe_proto::v1::Role;

use crate::members::Members;

/// Why no attention worker can take a request now; both pass once workers have loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    #[error("no expert placement is active yet (waiting for expert workers to load)")]
    NoPlacement,
    #[error("no attention worker has received the expert placement yet")]
    NoAttentionWorker,
}

/// Requests handed to each attention worker and not seen finish.
#[derive(Debug, Default)]
pub struct InFlight {
    by_worker: HashMap<String, usize>,
}

impl InFlight {
    /// The least busy attention worker not in `exclude` that routes with a placement and is
    /// not draining, as `(id, address)`; counts the request against it.
    pub fn pick(&mut self, members: &Members, exclude: &[String]) -> Result<(String, String), PickError> {
        let best = members
            .staying()
            // Only workers that already route with a placement can serve.
            .filter(|w| w.role == Role::Attention && w.status.placement_version > 0 && !exclude.contains(&w.id))
            .min_by_key(|w| {
                let s = &w.status;
                let inflight = self.of(&w.id);
                let kv_permille = (s.kv_blocks_used as u64 * 1000)
                    .checked_div(s.kv_blocks_total as u64)
                    .unwrap_or(0);
                (inflight.max((s.running + s.waiting) as usize), kv_permille)
            })
            .ok_or(PickError::NoAttentionWorker)?;
        *self.by_worker.entry(best.id.clone()).or_default() += 1;
        Ok((best.id.clone(), best.address.clone()))
    }

    /// A request handed to `worker` finished (or failed).
    pub fn done(&mut self, worker: &str) {
        if let Some(n) = self.by_worker.get_mut(worker) {
            *n = n.saturating_sub(1);
        }
    }

    pub fn of(&self, worker: &str) -> usize {
        self.by_worker.get(worker).copied().unwrap_or(0)
    }

    pub fn forget(&mut self, worker: &str) {
        self.by_worker.remove(worker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_proto::v1::WorkerStatus;

    #[test]
    fn the_least_busy_routing_worker_is_picked_and_counted() {
        let mut m = Members::default();
        let a1 = m.add(crate::members::joining(Role::Attention, "h:1")).id;
        let a2 = m.add(crate::members::joining(Role::Attention, "h:2")).id;
        let mut inflight = InFlight::default();
        assert_eq!(inflight.pick(&m, &[]), Err(PickError::NoAttentionWorker));
        let routing = WorkerStatus {
            placement_version: 1,
            ..Default::default()
        };
        assert!(m.heartbeat(&a1, "h:1", routing.clone()));
        assert!(m.heartbeat(&a2, "h:2", routing));
        assert_eq!(inflight.pick(&m, &[]).unwrap().0, a1);
        // a1 now has one request the coordinator knows of; a2 has none.
        assert_eq!(inflight.pick(&m, &[]).unwrap(), (a2.clone(), "h:2".into()));
        assert_eq!(inflight.pick(&m, std::slice::from_ref(&a1)).unwrap().0, a2);
        inflight.done(&a1);
        assert_eq!((inflight.of(&a1), inflight.of(&a2)), (0, 2));
        m.drain(&a1).unwrap();
        assert_eq!(
            inflight.pick(&m, &[]).unwrap().0,
            a2,
            "a draining worker takes nothing new"
        );
    }
}
