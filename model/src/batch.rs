//! The layout of one forward pass: several sequences' new tokens stacked into one `[N, hidden]`
//! activation matrix, each with the position its first new token takes.

use crate::kv_cache::SeqId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqSpan {
    pub id: SeqId,
    /// First row of this sequence in the stacked batch.
    pub start_row: usize,
    /// Number of new tokens (rows).
    pub len: usize,
    /// Position of the first new token (= tokens already cached).
    pub start_pos: usize,
}

impl SeqSpan {
    pub fn rows(&self) -> std::ops::Range<usize> {
        self.start_row..self.start_row + self.len
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchLayout {
    seqs: Vec<SeqSpan>,
    rows: usize,
}

impl BatchLayout {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, id: SeqId, len: usize, start_pos: usize) {
        self.seqs.push(SeqSpan {
            id,
            start_row: self.rows,
            len,
            start_pos,
        });
        self.rows += len;
    }

    pub fn seqs(&self) -> &[SeqSpan] {
        &self.seqs
    }

    pub fn num_rows(&self) -> usize {
        self.rows
    }

    /// Position of every row, in row order.
    pub fn positions(&self) -> impl Iterator<Item = usize> + '_ {
        self.seqs.iter().flat_map(|s| s.start_pos..s.start_pos + s.len)
    }
}
