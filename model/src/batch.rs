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

    /// Where to cut the batch into two micro-batches of whole sequences with row counts as
    /// close as can be: the number of sequences of the first. `None` under two sequences, or
    /// when the best cut leaves a half with fewer than `min_rows` rows (a small half reads the
    /// same dense weights as a whole step for a fraction of its rows).
    pub fn balanced_cut(&self, min_rows: usize) -> Option<usize> {
        if self.seqs.len() < 2 {
            return None;
        }
        // Rows before sequence k are seqs[k].start_row; the cut nearest half the rows wins,
        // the earlier one on a tie.
        let k = (1..self.seqs.len()).min_by_key(|&k| (2 * self.seqs[k].start_row).abs_diff(self.rows))?;
        let first = self.seqs[k].start_row;
        (first.min(self.rows - first) >= min_rows).then_some(k)
    }

    /// The first `k` sequences and the rest, each a layout of its own (rows counted from 0).
    pub fn split_at(&self, k: usize) -> (BatchLayout, BatchLayout) {
        let part = |seqs: &[SeqSpan]| {
            let mut out = BatchLayout::new();
            for s in seqs {
                out.push(s.id, s.len, s.start_pos);
            }
            out
        };
        (part(&self.seqs[..k]), part(&self.seqs[k..]))
    }

    /// Position of every row, in row order.
    pub fn positions(&self) -> impl Iterator<Item = usize> + '_ {
        self.seqs.iter().flat_map(|s| s.start_pos..s.start_pos + s.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(lens: &[usize]) -> BatchLayout {
        let mut b = BatchLayout::new();
        for (i, &len) in lens.iter().enumerate() {
            b.push(i as SeqId + 1, len, 3 * i);
        }
        b
    }

    #[test]
    fn the_cut_balances_rows_over_whole_sequences() {
        assert_eq!(layout(&[]).balanced_cut(1), None);
        assert_eq!(layout(&[7]).balanced_cut(1), None);
        assert_eq!(layout(&[1, 1]).balanced_cut(1), Some(1));
        // Eight decode rows: four and four.
        assert_eq!(layout(&[1; 8]).balanced_cut(1), Some(4));
        // A long prefill first: it takes a half by itself.
        assert_eq!(layout(&[20, 1, 1, 1]).balanced_cut(1), Some(1));
        // 3 | 4 + 2 is 3 against 6; 3 + 4 | 2 is 7 against 2; 3 | 6 is the nearer.
        assert_eq!(layout(&[3, 4, 2]).balanced_cut(1), Some(1));
        // 2 + 1 | 1 + 2 is exactly half.
        assert_eq!(layout(&[2, 1, 1, 2]).balanced_cut(1), Some(2));
        // 1 | 2 + 1 and 1 + 2 | 1 are both one row off: the earlier cut.
        assert_eq!(layout(&[1, 2, 1]).balanced_cut(1), Some(1));
    }

    #[test]
    fn no_cut_leaves_a_half_under_the_minimum() {
        // Eight decode rows cut four and four: at a minimum of 4 yes, of 5 no.
        assert_eq!(layout(&[1; 8]).balanced_cut(4), Some(4));
        assert_eq!(layout(&[1; 8]).balanced_cut(5), None);
        // The best cut of 20 | 3 leaves 3 rows, under 4, though the rows number 23.
        assert_eq!(layout(&[20, 1, 1, 1]).balanced_cut(3), Some(1));
        assert_eq!(layout(&[20, 1, 1, 1]).balanced_cut(4), None);
        // 64 decode rows at the default minimum of 16: 32 and 32.
        assert_eq!(layout(&[1; 64]).balanced_cut(16), Some(32));
    }

    #[test]
    fn a_split_keeps_ids_positions_and_restarts_rows() {
        let (a, b) = layout(&[2, 5, 1]).split_at(1);
        assert_eq!(a, layout(&[2]));
        assert_eq!(b.num_rows(), 6);
        let spans: Vec<_> = b
            .seqs()
            .iter()
            .map(|s| (s.id, s.start_row, s.len, s.start_pos))
            .collect();
        assert_eq!(spans, [(2, 0, 5, 3), (3, 5, 1, 6)]);
    }
}
