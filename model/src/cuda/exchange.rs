//! The device-independent half of an NCCL exchange: how its sends and receives are grouped
//! (both sides of a pair must issue them in mirrored groups), and how a waiting exchange is
//! stopped from another thread. Pure, so it is tested without a GPU; `gpu::nccl` uses it.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Which way one NCCL group moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Send,
    Recv,
}

/// One point-to-point operation: a send to or a receive from `peer` of `len` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub direction: Direction,
    pub peer: usize,
    pub len: usize,
}

/// The operations of one `ncclGroupStart`..`ncclGroupEnd`, in issue order.
pub type Group = Vec<Op>;

/// The groups an exchange issues, in order: every send as one group, then every receive as
/// another. NCCL connects a pair's point-to-point links lazily, per direction, inside a group,
/// and expects the peer's group to hold the matching operations: a group that mixes sends and
/// receives on one side while the other side receives, then sends, in two groups, breaks the
/// connection set-up ("message truncated", short reads, or a hang). One direction per group,
/// sends first, mirrors on both sides: the attention worker sends rows then receives answers;
/// an expert worker receives rows, computes, then sends its answer.
pub fn exchange_groups(sends: &[(usize, usize)], recvs: &[(usize, usize)]) -> Vec<Group> {
    let group = |direction, ops: &[(usize, usize)]| -> Group {
        ops.iter().map(|&(peer, len)| Op { direction, peer, len }).collect()
    };
    [group(Direction::Send, sends), group(Direction::Recv, recvs)]
        .into_iter()
        .filter(|g| !g.is_empty())
        .collect()
}

/// Whether the groups `a` (rank `a_rank`) and `b` (rank `b_rank`) issue toward each other
/// mirror: the same number of groups touching the pair, each group of one direction, a send
/// on one side met by a receive of the same size on the other, in the same order.
pub fn mirrored(a_rank: usize, a: &[Group], b_rank: usize, b: &[Group]) -> bool {
    // Per group, the operations toward the other rank; groups without any are left out.
    let toward = |groups: &[Group], peer: usize| -> Vec<Vec<Op>> {
        groups
            .iter()
            .map(|g| g.iter().filter(|op| op.peer == peer).copied().collect::<Vec<_>>())
            .filter(|ops| !ops.is_empty())
            .collect()
    };
    let one_way = |groups: &[Vec<Op>]| groups.iter().all(|g| g.iter().all(|op| op.direction == g[0].direction));
    let meets = |x: &Op, y: &Op| x.direction != y.direction && x.len == y.len;
    let (a_ops, b_ops) = (toward(a, b_rank), toward(b, a_rank));
    one_way(&a_ops)
        && one_way(&b_ops)
        && a_ops.len() == b_ops.len()
        && a_ops
            .iter()
            .zip(&b_ops)
            .all(|(x, y)| x.len() == y.len() && x.iter().zip(y).all(|(p, q)| meets(p, q)))
}

/// A communicator's abort state, kept outside the lock its NCCL calls are issued under:
/// [`AbortFlag::why`] never waits, and [`AbortFlag::request`] takes effect at once (the thread
/// inside an exchange sees it at its next poll and aborts the communicator itself).
#[derive(Debug, Default)]
pub struct AbortFlag {
    requested: AtomicBool,
    why: OnceLock<String>,
}

impl AbortFlag {
    /// Records the first reason; later ones are ignored.
    pub fn request(&self, why: &str) {
        let _ = self.why.set(why.to_owned());
        self.requested.store(true, Ordering::Release);
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    pub fn why(&self) -> Option<&str> {
        self.is_requested()
            .then(|| self.why.get().map_or("aborted", String::as_str))
    }
}

/// Why a wait ended without its condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// Someone asked for an abort.
    Aborted(String),
    TimedOut,
    /// The poll itself failed.
    Failed(String),
}

/// Polls `done` until it says so, an abort is requested, or `deadline` passes: spinning at
/// first (an exchange takes tens of microseconds), then sleeping 50 us between polls.
pub fn poll_until(
    deadline: Instant,
    abort: &AbortFlag,
    mut done: impl FnMut() -> Result<bool, String>,
) -> Result<(), Stopped> {
    let mut spins = 0u32;
    loop {
        if let Some(why) = abort.why() {
            return Err(Stopped::Aborted(why.to_owned()));
        }
        match done() {
            Ok(true) => return Ok(()),
            Ok(false) if Instant::now() >= deadline => return Err(Stopped::TimedOut),
            Ok(false) => {}
            Err(e) => return Err(Stopped::Failed(e)),
        }
        spins += 1;
        if spins < 2000 {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// One layer over the data plane: attention worker rank 0, expert workers ranks 1 and 2.
    #[test]
    fn a_layer_exchange_mirrors_on_both_sides_of_every_pair() {
        let (rows1, rows2, h) = (3, 5, 4);
        let attention = exchange_groups(&[(1, rows1 * h), (2, rows2 * h)], &[(1, rows1 * h), (2, rows2 * h)]);
        // An expert worker receives its rows, computes, then sends its answer: two exchanges.
        let expert = |rows: usize| {
            let mut g = exchange_groups(&[], &[(0, rows * h)]);
            g.extend(exchange_groups(&[(0, rows * h)], &[]));
            g
        };
        assert!(mirrored(0, &attention, 1, &expert(rows1)));
        assert!(mirrored(0, &attention, 2, &expert(rows2)));
        assert_eq!(attention.len(), 2);
        assert!(
            attention
                .iter()
                .all(|g| g.iter().all(|op| op.direction == g[0].direction))
        );
    }

    #[test]
    fn the_old_mixed_group_is_caught() {
        // Sends and receives in one group on the attention side, against receive then send in
        // two groups on the expert side: what broke NCCL's connection set-up.
        let op = |direction, peer| Op {
            direction,
            peer,
            len: 8,
        };
        let mixed: Vec<Group> = vec![vec![op(Direction::Send, 1), op(Direction::Recv, 1)]];
        let expert: Vec<Group> = vec![vec![op(Direction::Recv, 0)], vec![op(Direction::Send, 0)]];
        assert!(!mirrored(0, &mixed, 1, &expert));
        // Sizes must match too.
        let short = exchange_groups(&[(1, 4)], &[(1, 8)]);
        assert!(!mirrored(0, &short, 1, &expert));
        assert!(mirrored(0, &exchange_groups(&[(1, 8)], &[(1, 8)]), 1, &expert));
    }

    #[test]
    fn an_abort_from_another_thread_stops_a_waiting_exchange_at_once() {
        let flag = Arc::new(AbortFlag::default());
        let waiter = {
            let flag = flag.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let r = poll_until(Instant::now() + Duration::from_secs(60), &flag, || Ok(false));
                (r, started.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(flag.why(), None);
        flag.request("peer gone");
        flag.request("a later reason");
        let (r, waited) = waiter.join().unwrap();
        assert_eq!(r, Err(Stopped::Aborted("peer gone".into())));
        assert!(
            waited < Duration::from_secs(30),
            "stopped by the abort, not the deadline"
        );
        assert_eq!(flag.why(), Some("peer gone"));
    }

    #[test]
    fn a_wait_ends_on_success_on_failure_or_at_its_deadline() {
        let flag = AbortFlag::default();
        let mut n = 0;
        assert_eq!(
            poll_until(Instant::now() + Duration::from_secs(5), &flag, || {
                n += 1;
                Ok(n == 3)
            }),
            Ok(())
        );
        assert_eq!(
            poll_until(Instant::now() + Duration::from_secs(5), &flag, || Err(
                "async error".into()
            )),
            Err(Stopped::Failed("async error".into()))
        );
        assert_eq!(
            poll_until(Instant::now() + Duration::from_millis(5), &flag, || Ok(false)),
            Err(Stopped::TimedOut)
        );
    }
}
