//! Loading progress, as the loaders see it: what a load will read (counted once every tensor in
//! it has been checked) and each unit (a layer, an expert) as it is read. How progress is shown
//! (a bar, log lines, heartbeat fields) is the binaries' business: they implement
//! [`LoadProgress`].

use std::iter::Sum;
use std::ops::{Add, AddAssign};

/// An amount of checkpoint data: safetensors tensors and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadSize {
    pub tensors: u64,
    pub bytes: u64,
}

impl LoadSize {
    pub fn tensor(bytes: usize) -> Self {
        LoadSize {
            tensors: 1,
            bytes: bytes as u64,
        }
    }
}

impl Add for LoadSize {
    type Output = LoadSize;
    fn add(self, o: LoadSize) -> LoadSize {
        LoadSize {
            tensors: self.tensors + o.tensors,
            bytes: self.bytes + o.bytes,
        }
    }
}

impl AddAssign for LoadSize {
    fn add_assign(&mut self, o: LoadSize) {
        *self = *self + o;
    }
}

impl Sum for LoadSize {
    fn sum<I: Iterator<Item = LoadSize>>(iter: I) -> LoadSize {
        iter.fold(LoadSize::default(), Add::add)
    }
}

/// Receives a load's progress. Calls come from the loading thread, in order: `planned` once per
/// load (before any weight is read), then `loaded` per unit read; the units add up to the plan.
pub trait LoadProgress: Sync {
    /// Everything this load will read; every tensor in it has been checked.
    fn planned(&self, total: LoadSize);
    /// One more unit read (not cumulative: the sink adds them up).
    fn loaded(&self, unit: LoadSize);
}

/// Reports nothing.
pub struct NoProgress;

impl LoadProgress for NoProgress {
    fn planned(&self, _: LoadSize) {}
    fn loaded(&self, _: LoadSize) {}
}
