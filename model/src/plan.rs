//! Checking a load before it starts. Every tensor a loader will read is looked up in the
//! safetensors headers first (present, the shape the model expects, a supported dtype, its
//! quantisation tensors present and shaped), so a broken checkpoint is refused before any weight
//! is read, naming the tensor and its file, instead of after the tens of GB before it. The
//! sizes found are what loading progress counts.

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::progress::LoadSize;

/// A tensor a loader will read, with the shape the model expects of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub name: String,
    pub shape: Vec<usize>,
}

impl Want {
    /// A `[rows, cols]` weight (with its scales when it is quantised).
    pub fn matrix(name: impl Into<String>, rows: usize, cols: usize) -> Self {
        Want {
            name: name.into(),
            shape: vec![rows, cols],
        }
    }

    pub fn vector(name: impl Into<String>, len: usize) -> Self {
        Want {
            name: name.into(),
            shape: vec![len],
        }
    }
}

/// A checked load: the size of each unit it reads (a layer, an expert), in reading order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadPlan {
    pub units: Vec<LoadSize>,
}

impl LoadPlan {
    /// Checks every wanted tensor against the headers; `units[i]` are the tensors of unit `i`.
    pub fn check(ckpt: &Checkpoint, units: &[Vec<Want>]) -> Result<Self> {
        let units = units
            .iter()
            .map(|wants| wants.iter().map(|w| ckpt.check(w)).sum::<Result<LoadSize>>())
            .collect::<Result<_>>()?;
        Ok(LoadPlan { units })
    }

    pub fn total(&self) -> LoadSize {
        self.units.iter().copied().sum()
    }
}
