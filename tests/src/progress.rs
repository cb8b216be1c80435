//! A loading-progress sink that records what the loader told it, and the checks every load's
//! reports must pass.

use std::path::Path;
use std::sync::Mutex;

use moe_model::checkpoint::Checkpoint;
use moe_model::progress::{LoadProgress, LoadSize};
use moe_model::{Engine, EngineOptions};

/// The tensors of the checkpoint that `keep` selects and their bytes, from the headers: what a
/// load of exactly those tensors reads.
pub fn checkpoint_size(ckpt: &Checkpoint, keep: impl Fn(&str) -> bool) -> LoadSize {
    ckpt.tensor_names()
        .filter(|n| keep(n))
        .map(|n| {
            let info = ckpt.info(n).unwrap();
            LoadSize::tensor(info.shape.iter().product::<usize>() * info.dtype.size_in_bytes())
        })
        .sum()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Planned(LoadSize),
    Loaded(LoadSize),
}

#[derive(Default)]
pub struct Recorder(Mutex<Vec<Event>>);

impl LoadProgress for Recorder {
    fn planned(&self, total: LoadSize) {
        self.0.lock().unwrap().push(Event::Planned(total));
    }
    fn loaded(&self, unit: LoadSize) {
        self.0.lock().unwrap().push(Event::Loaded(unit));
    }
}

impl Recorder {
    pub fn events(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
    }

    /// Checks the reports of one finished load: one plan first, then units whose running sum
    /// grows monotonically, in tensors and bytes, and ends exactly at the plan. Returns the
    /// total.
    pub fn finished_load(&self) -> LoadSize {
        let events = self.events();
        let Some((Event::Planned(total), units)) = events.split_first() else {
            panic!("the first report is not the plan: {events:?}");
        };
        let mut done = LoadSize::default();
        for event in units {
            let Event::Loaded(unit) = event else {
                panic!("a second plan in one load: {events:?}");
            };
            assert!(unit.tensors > 0 && unit.bytes > 0, "an empty unit: {events:?}");
            done += *unit;
            assert!(
                done.tensors <= total.tensors && done.bytes <= total.bytes,
                "past the plan: {done:?} of {total:?}"
            );
        }
        assert_eq!(done, *total, "the units add up to the plan");
        *total
    }
}

/// Loads `dir` into an engine, which must fail; asserts that it failed before any weight was
/// read (no unit loaded, no plan announced) and returns the error.
pub fn refused_before_reading(dir: &Path) -> String {
    let recorder = Recorder::default();
    match Engine::load_with(dir, EngineOptions::default(), &recorder) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => {
            assert_eq!(recorder.events(), vec![], "weights were read before the refusal: {e}");
            e.to_string()
        }
    }
}
