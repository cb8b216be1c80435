//! A worker's weight loading as people and the coordinator see it: a progress bar on a
//! terminal (bytes and tensors, rate, ETA), a log line every few seconds otherwise, and the
//! counts its heartbeats carry (`WorkerStatus.load_*`, shown by `moectl status` and in the
//! coordinator's `/metrics`). The model crate only reports; this is where it is shown.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use moe_model::progress::{LoadProgress, LoadSize};
use moe_proto::v1::{LoadState, WorkerStatus};

/// How loading is shown on stderr.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressDisplay {
    /// A progress bar when stderr is a terminal, log lines otherwise.
    #[default]
    Auto,
    /// Log lines only (several processes sharing one terminal: `moectl up`).
    Log,
}

/// While loading, a log line at most this often (and one at the start and at the end).
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Counts one load at a time (an expert worker's next placement starts a new one) and shows it.
///
/// The state and the counts live under one lock with what is shown: a heartbeat reads them
/// together, so it never sees a finished load without its final counts, nor a new load's state
/// beside the last one's counts (atomics read one by one could interleave with `begin`). The
/// lock is taken once per unit read (an expert, a layer) and per heartbeat: no contention.
pub struct LoadReporter {
    display: ProgressDisplay,
    inner: Mutex<Inner>,
}

struct Inner {
    state: LoadState,
    done: LoadSize,
    total: LoadSize,
    what: String,
    started: Instant,
    last_line: Instant,
    bar: Option<ProgressBar>,
}

impl LoadReporter {
    pub fn new(display: ProgressDisplay) -> Self {
        let now = Instant::now();
        LoadReporter {
            display,
            inner: Mutex::new(Inner {
                state: LoadState::None,
                done: LoadSize::default(),
                total: LoadSize::default(),
                what: String::new(),
                started: now,
                last_line: now,
                bar: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding it leaves counts that are still worth showing.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new load of `what` starts: loading, counts from zero.
    pub fn begin(&self, what: impl Into<String>) {
        let mut inner = self.lock();
        let now = Instant::now();
        if let Some(bar) = inner.bar.take() {
            bar.finish_and_clear();
        }
        *inner = Inner {
            state: LoadState::Loading,
            done: LoadSize::default(),
            total: LoadSize::default(),
            what: what.into(),
            started: now,
            last_line: now,
            bar: None,
        };
    }

    /// The load ended, well or not (the caller reports the error).
    pub fn finish(&self, ok: bool) {
        let mut inner = self.lock();
        inner.state = if ok { LoadState::Loaded } else { LoadState::Failed };
        if let Some(bar) = inner.bar.take() {
            bar.finish_and_clear();
        }
        let (done, secs) = (inner.done, inner.started.elapsed().as_secs_f64());
        if ok {
            tracing::info!(
                "loaded {}: {} tensors, {} in {secs:.1} s ({}/s)",
                inner.what,
                done.tensors,
                HumanBytes(done.bytes),
                HumanBytes((done.bytes as f64 / secs.max(1e-3)) as u64)
            );
        }
    }

    /// This reporter's fields of a heartbeat's status, read together.
    pub fn fill(&self, status: &mut WorkerStatus) {
        let inner = self.lock();
        status.load_state = inner.state as i32;
        status.load_bytes_done = inner.done.bytes;
        status.load_bytes_total = inner.total.bytes;
        status.load_tensors_done = inner.done.tensors;
        status.load_tensors_total = inner.total.tensors;
    }

    fn bar(&self, total: LoadSize) -> Option<ProgressBar> {
        if self.display != ProgressDisplay::Auto || !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = ProgressBar::with_draw_target(Some(total.bytes), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {msg} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> ");
        bar.set_style(style);
        Some(bar)
    }
}

impl LoadProgress for LoadReporter {
    fn planned(&self, total: LoadSize) {
        let mut inner = self.lock();
        inner.total += total;
        let total = inner.total;
        tracing::info!(
            "loading {}: {} tensors, {} (checked)",
            inner.what,
            total.tensors,
            HumanBytes(total.bytes)
        );
        match &inner.bar {
            Some(bar) => bar.set_length(total.bytes),
            None => {
                inner.bar = self.bar(total);
                if let Some(bar) = &inner.bar {
                    bar.set_prefix(format!("loading {}", inner.what));
                }
            }
        }
    }

    fn loaded(&self, unit: LoadSize) {
        let mut inner = self.lock();
        inner.done += unit;
        let (done, total) = (inner.done, inner.total);
        if let Some(bar) = &inner.bar {
            bar.set_position(done.bytes);
            bar.set_message(format!("{}/{} tensors", done.tensors, total.tensors));
            return;
        }
        let now = Instant::now();
        if now.duration_since(inner.last_line) < LOG_EVERY || done == total {
            return;
        }
        inner.last_line = now;
        let secs = now.duration_since(inner.started).as_secs_f64().max(1e-3);
        let rate = done.bytes as f64 / secs;
        let eta = total.bytes.saturating_sub(done.bytes) as f64 / rate.max(1.0);
        tracing::info!(
            "loading {}: {}/{} ({:.0}%), {}/{} tensors, {}/s, ETA {eta:.0} s",
            inner.what,
            HumanBytes(done.bytes),
            HumanBytes(total.bytes),
            100.0 * done.bytes as f64 / total.bytes.max(1) as f64,
            done.tensors,
            total.tensors,
            HumanBytes(rate as u64)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(r: &LoadReporter) -> (i32, u64, u64, u64, u64) {
        let mut s = WorkerStatus::default();
        r.fill(&mut s);
        (
            s.load_state,
            s.load_bytes_done,
            s.load_bytes_total,
            s.load_tensors_done,
            s.load_tensors_total,
        )
    }

    #[test]
    fn heartbeat_fields_follow_each_load_from_zero() {
        let r = LoadReporter::new(ProgressDisplay::Log);
        assert_eq!(fields(&r), (LoadState::None as i32, 0, 0, 0, 0));
        r.begin("first");
        r.planned(LoadSize { tensors: 3, bytes: 300 });
        r.loaded(LoadSize { tensors: 2, bytes: 100 });
        assert_eq!(fields(&r), (LoadState::Loading as i32, 100, 300, 2, 3));
        r.loaded(LoadSize { tensors: 1, bytes: 200 });
        r.finish(true);
        assert_eq!(fields(&r), (LoadState::Loaded as i32, 300, 300, 3, 3));
        // The next placement's load counts on its own; a failure is kept until the next.
        r.begin("second");
        assert_eq!(fields(&r), (LoadState::Loading as i32, 0, 0, 0, 0));
        r.planned(LoadSize { tensors: 1, bytes: 50 });
        r.finish(false);
        assert_eq!(fields(&r), (LoadState::Failed as i32, 0, 50, 0, 1));
    }

    #[test]
    fn a_heartbeat_sees_each_load_whole() {
        // Loads run back to back on one thread while this one reads the fields as heartbeats
        // do: one shown loaded shows all it read, one shown loading no more than planned and
        // nothing of the last load. (Read one by one, the fields could show the last load
        // loaded beside the next one's zero counts.)
        const LOADS: u64 = 5_000;
        let unit = LoadSize { tensors: 3, bytes: 100 };
        let whole = LoadSize {
            tensors: 12,
            bytes: 400,
        };
        let r = LoadReporter::new(ProgressDisplay::Log);
        let finished = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..LOADS {
                    r.begin("a placement");
                    r.planned(whole);
                    for _ in 0..4 {
                        r.loaded(unit);
                    }
                    r.finish(true);
                }
                finished.store(true, std::sync::atomic::Ordering::Release);
            });
            while !finished.load(std::sync::atomic::Ordering::Acquire) {
                let (state, bytes_done, bytes_total, tensors_done, tensors_total) = fields(&r);
                if state == LoadState::Loaded as i32 {
                    assert_eq!(
                        (bytes_done, bytes_total, tensors_done, tensors_total),
                        (400, 400, 12, 12)
                    );
                } else if state == LoadState::Loading as i32 {
                    assert!(bytes_total == 0 || bytes_total == 400, "{bytes_total}");
                    assert!(bytes_done <= bytes_total && tensors_done <= tensors_total);
                    assert_eq!(bytes_done / 100 * 3, tensors_done, "bytes and tensors of one load");
                } else {
                    assert_eq!(state, LoadState::None as i32);
                }
            }
        });
    }
}
