//! A worker's weight loading as people and the coordinator see it: a progress bar on a
//! terminal (bytes and tensors, rate, ETA), a log line every few seconds otherwise, and the
//! counts its heartbeats carry (`WorkerStatus.load_*`, shown by `moectl status` and in the
//! coordinator's `/metrics`). The model crate only reports; this is where it is shown.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
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
pub struct LoadReporter {
    display: ProgressDisplay,
    state: AtomicI32,
    bytes_done: AtomicU64,
    bytes_total: AtomicU64,
    tensors_done: AtomicU64,
    tensors_total: AtomicU64,
    shown: Mutex<Shown>,
}

struct Shown {
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
            state: AtomicI32::new(LoadState::None as i32),
            bytes_done: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            tensors_done: AtomicU64::new(0),
            tensors_total: AtomicU64::new(0),
            shown: Mutex::new(Shown {
                what: String::new(),
                started: now,
                last_line: now,
                bar: None,
            }),
        }
    }

    /// A new load of `what` starts: counts from zero.
    pub fn begin(&self, what: impl Into<String>) {
        for counter in [
            &self.bytes_done,
            &self.bytes_total,
            &self.tensors_done,
            &self.tensors_total,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
        self.state.store(LoadState::Loading as i32, Ordering::Relaxed);
        let mut shown = self.shown.lock().expect("lock");
        let now = Instant::now();
        *shown = Shown {
            what: what.into(),
            started: now,
            last_line: now,
            bar: None,
        };
    }

    /// The load ended, well or not (the caller reports the error).
    pub fn finish(&self, ok: bool) {
        let state = if ok { LoadState::Loaded } else { LoadState::Failed };
        self.state.store(state as i32, Ordering::Relaxed);
        let mut shown = self.shown.lock().expect("lock");
        if let Some(bar) = shown.bar.take() {
            bar.finish_and_clear();
        }
        let (done, secs) = (self.done(), shown.started.elapsed().as_secs_f64());
        if ok {
            tracing::info!(
                "loaded {}: {} tensors, {} in {secs:.1} s ({}/s)",
                shown.what,
                done.tensors,
                HumanBytes(done.bytes),
                HumanBytes((done.bytes as f64 / secs.max(1e-3)) as u64)
            );
        }
    }

    /// This reporter's fields of a heartbeat's status.
    pub fn fill(&self, status: &mut WorkerStatus) {
        status.load_state = self.state.load(Ordering::Relaxed);
        status.load_bytes_done = self.bytes_done.load(Ordering::Relaxed);
        status.load_bytes_total = self.bytes_total.load(Ordering::Relaxed);
        status.load_tensors_done = self.tensors_done.load(Ordering::Relaxed);
        status.load_tensors_total = self.tensors_total.load(Ordering::Relaxed);
    }

    fn done(&self) -> LoadSize {
        LoadSize {
            tensors: self.tensors_done.load(Ordering::Relaxed),
            bytes: self.bytes_done.load(Ordering::Relaxed),
        }
    }

    fn total(&self) -> LoadSize {
        LoadSize {
            tensors: self.tensors_total.load(Ordering::Relaxed),
            bytes: self.bytes_total.load(Ordering::Relaxed),
        }
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
        self.bytes_total.fetch_add(total.bytes, Ordering::Relaxed);
        self.tensors_total.fetch_add(total.tensors, Ordering::Relaxed);
        let total = self.total();
        let mut shown = self.shown.lock().expect("lock");
        tracing::info!(
            "loading {}: {} tensors, {} (checked)",
            shown.what,
            total.tensors,
            HumanBytes(total.bytes)
        );
        match &shown.bar {
            Some(bar) => bar.set_length(total.bytes),
            None => {
                shown.bar = self.bar(total);
                if let Some(bar) = &shown.bar {
                    bar.set_prefix(format!("loading {}", shown.what));
                }
            }
        }
    }

    fn loaded(&self, unit: LoadSize) {
        self.bytes_done.fetch_add(unit.bytes, Ordering::Relaxed);
        self.tensors_done.fetch_add(unit.tensors, Ordering::Relaxed);
        let (done, total) = (self.done(), self.total());
        let mut shown = self.shown.lock().expect("lock");
        if let Some(bar) = &shown.bar {
            bar.set_position(done.bytes);
            bar.set_message(format!("{}/{} tensors", done.tensors, total.tensors));
            return;
        }
        let now = Instant::now();
        if now.duration_since(shown.last_line) < LOG_EVERY || done == total {
            return;
        }
        shown.last_line = now;
        let secs = now.duration_since(shown.started).as_secs_f64().max(1e-3);
        let rate = done.bytes as f64 / secs;
        let eta = total.bytes.saturating_sub(done.bytes) as f64 / rate.max(1.0);
        tracing::info!(
            "loading {}: {}/{} ({:.0}%), {}/{} tensors, {}/s, ETA {eta:.0} s",
            shown.what,
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
}
