//! An expert worker's placement loads, run on a blocking thread of their own so that the
//! heartbeats go on meanwhile: they carry the load's progress, and a worker that stopped
//! heartbeating for a load of tens of GB would be dropped by the coordinator mid-load.
//!
//! One load runs at a time and is never cancelled midway (the experts it reads are mostly kept
//! by the next placement). A newer placement seen while one loads waits; only the newest one
//! waiting is loaded next. A version counts as loaded (the heartbeats' `placement_version`)
//! only once its load is done. A failed load of a version is tried again after a pause that
//! doubles per failure in a row (1 s to 60 s); a newer placement is tried at once.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moe_model::progress::{LoadProgress, LoadSize};
use moe_runtime::load_progress::LoadReporter;

use crate::state::ExpertState;

/// A placement to load: this worker's slots of `version`, while `active` serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub version: u64,
    pub slots: Vec<(usize, usize)>,
    pub active: u64,
    /// [`ExpertState::membership`] when the placement was asked for.
    pub membership: u64,
}

/// Starts placement loads one at a time; cheap to call from the heartbeat handler.
pub struct Loader {
    state: Arc<ExpertState>,
    report: Arc<LoadReporter>,
    /// Pause after each expert read (`--load-throttle-ms`, for tests and demos).
    throttle: Duration,
    queue: Arc<Mutex<Queue>>,
}

#[derive(Default)]
struct Queue {
    /// Newest version loading or waiting: not asked for again (0 after a failure, to retry).
    requested: u64,
    running: bool,
    /// The newest placement seen while one loads.
    next: Option<Job>,
    /// When a failed load may be tried again.
    retry: Retry,
}

/// When to try a failed load again: a failure that recurs (a bad tensor, no memory left) would
/// otherwise re-read the checkpoint up to the failure on every heartbeat.
/// Only the version that failed waits: a newer placement is tried at once.
#[derive(Debug, Default)]
struct Retry {
    failures: u32,
    version: u64,
    not_before: Option<Instant>,
}

impl Retry {
    const FIRST: Duration = Duration::from_secs(1);
    const LONGEST: Duration = Duration::from_secs(60);

    /// Records a failure at `now`; returns the pause before the next try (doubling per failure
    /// in a row, at most [`Self::LONGEST`]).
    fn failed(&mut self, version: u64, now: Instant) -> Duration {
        if version != self.version {
            *self = Retry {
                version,
                ..Retry::default()
            };
        }
        let pause = Self::FIRST
            .saturating_mul(1 << self.failures.min(16))
            .min(Self::LONGEST);
        self.failures += 1;
        self.not_before = Some(now + pause);
        pause
    }

    fn succeeded(&mut self) {
        *self = Retry::default();
    }

    fn allows(&self, version: u64, now: Instant) -> bool {
        version != self.version || self.not_before.is_none_or(|t| now >= t)
    }
}

impl Loader {
    pub fn new(state: Arc<ExpertState>, report: Arc<LoadReporter>, throttle: Duration) -> Self {
        Loader {
            state,
            report,
            throttle,
            queue: Arc::default(),
        }
    }

    /// Whether the coordinator's target `version` is neither loaded nor loading nor waiting.
    pub fn wants(&self, version: u64) -> bool {
        let queue = self.queue.lock().expect("lock");
        version > self.state.newest_version()
            && version > queue.requested
            && queue.retry.allows(version, Instant::now())
    }

    /// Loads `job` now, or after the load under way (replacing an older waiting one).
    pub fn submit(&self, job: Job) {
        let mut queue = self.queue.lock().expect("lock");
        if job.version <= queue.requested {
            return;
        }
        queue.requested = job.version;
        if queue.running {
            tracing::info!(version = job.version, "placement waits for the load under way");
            queue.next = Some(job);
            return;
        }
        queue.running = true;
        drop(queue);
        let run = Run {
            state: self.state.clone(),
            report: self.report.clone(),
            throttle: self.throttle,
            queue: self.queue.clone(),
        };
        tokio::task::spawn_blocking(move || run.until_idle(job));
    }

    /// Membership was lost: serve no placement until one is loaded again, and ask for the
    /// target again even if it is the one loading (that load will not be served; see
    /// [`ExpertState::forget_versions`]).
    pub fn forget(&self) {
        self.state.forget_versions();
        let mut queue = self.queue.lock().expect("lock");
        queue.requested = 0;
        // A waiting placement belongs to the lost membership too (a restarted coordinator
        // numbers its placements afresh): never load it.
        queue.next = None;
    }
}

/// What the loading thread owns.
struct Run {
    state: Arc<ExpertState>,
    report: Arc<LoadReporter>,
    throttle: Duration,
    queue: Arc<Mutex<Queue>>,
}

impl Run {
    /// Loads `job`, then whatever waits, until nothing does.
    fn until_idle(self, mut job: Job) {
        loop {
            let version = job.version;
            let ok = self.load(job);
            let mut queue = self.queue.lock().expect("lock");
            if ok {
                queue.retry.succeeded();
            } else {
                let pause = queue.retry.failed(version, Instant::now());
                tracing::warn!(retry_in = ?pause, "the placement load will be tried again");
                if queue.next.is_none() {
                    queue.requested = 0;
                }
            }
            match queue.next.take() {
                Some(next) => job = next,
                None => {
                    queue.running = false;
                    return;
                }
            }
        }
    }

    /// One load, reported; a panic counts as a failure so that later placements still load.
    fn load(&self, job: Job) -> bool {
        let Job {
            version,
            slots,
            active,
            membership,
        } = job;
        self.report
            .begin(format!("placement v{version} ({} expert slots)", slots.len()));
        let progress = Throttled {
            inner: self.report.as_ref(),
            pause: self.throttle,
        };
        let loaded = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.state.load_version(version, slots, active, membership, &progress)
        }));
        let ok = matches!(loaded, Ok(Ok(())));
        self.report.finish(ok);
        match loaded {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(version, error = %e, "loading the target placement failed"),
            Err(_) => tracing::error!(version, "loading the target placement panicked"),
        }
        ok
    }
}

/// Passes progress on, pausing after each unit read: a slow load on demand, so that tests and
/// demos can watch one under way on a small model.
struct Throttled<'a> {
    inner: &'a dyn LoadProgress,
    pause: Duration,
}

impl LoadProgress for Throttled<'_> {
    fn planned(&self, total: LoadSize) {
        self.inner.planned(total);
    }

    fn loaded(&self, unit: LoadSize) {
        self.inner.loaded(unit);
        if !self.pause.is_zero() {
            std::thread::sleep(self.pause);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_loads_are_retried_after_a_doubling_pause_reset_by_a_success() {
        let mut retry = Retry::default();
        let t0 = Instant::now();
        assert!(retry.allows(3, t0), "nothing failed yet");
        let pauses: Vec<u64> = (0..9).map(|_| retry.failed(3, t0).as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert!(!retry.allows(3, t0 + Duration::from_secs(59)));
        assert!(retry.allows(3, t0 + Duration::from_secs(60)));
        assert!(retry.allows(4, t0), "a newer placement does not wait");
        // Many failures in a row do not overflow the pause.
        for _ in 0..100 {
            retry.failed(3, t0);
        }
        assert!(retry.allows(3, t0 + Retry::LONGEST));
        // Another version's failure starts from the first pause.
        assert_eq!(retry.failed(4, t0), Retry::FIRST);
        retry.failed(4, t0);
        retry.succeeded();
        assert!(retry.allows(4, t0));
        assert_eq!(retry.failed(4, t0), Retry::FIRST);
    }
}
