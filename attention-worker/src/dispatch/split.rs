//! The split of one layer's routed assignments over the expert workers of a placement: pure,
//! so every routing decision is unit-tested without a network.

use std::collections::{BTreeMap, HashMap};

use moe_model::experts::ExpertAssignment;
use moe_runtime::PlacementView;

/// Rows and assignments bound for one worker in one micro-batch, rows renumbered densely.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WorkerBatch {
    /// Index of the worker in the placement.
    pub worker: usize,
    /// 0 for the step itself; 1, 2, ... for rows over a slot's capacity (`exact` policy).
    pub round: usize,
    /// Global row of each local row.
    pub rows: Vec<u32>,
    /// Assignments with local rows.
    pub assignments: Vec<ExpertAssignment>,
}

/// An assignment no worker of the placement can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("expert ({layer}, {expert}) is held by no expert worker of the placement")]
pub struct NotHeld {
    pub layer: usize,
    pub expert: usize,
}

/// Splits one layer's assignments over the expert workers. Each assignment goes to the replica
/// of its expert that is least loaded in this step, among those whose slot still has room
/// under `slot_capacity` (rows per slot per micro-batch); when every replica's slot is full, to
/// the next micro-batch of the least loaded one. Nothing is dropped: the outputs equal an
/// unlimited run's. Batches come out ordered by (micro-batch, worker). Assignments must be in
/// range of the model (the caller checks).
pub(crate) fn split_by_worker(
    placement: &PlacementView,
    layer: usize,
    assignments: &[ExpertAssignment],
    slot_capacity: Option<usize>,
) -> Result<Vec<WorkerBatch>, NotHeld> {
    let mut batches: BTreeMap<(usize, usize), (WorkerBatch, HashMap<u32, u32>)> = BTreeMap::new();
    // Assignments given to each worker, and to each (worker, expert) slot, so far in this step.
    let mut load = vec![0usize; placement.workers.len()];
    let mut taken: HashMap<(usize, u32), usize> = HashMap::new();
    for a in assignments {
        let round_at = |w: usize| {
            let t = taken.get(&(w, a.expert)).copied().unwrap_or(0);
            slot_capacity.map_or(0, |c| t / c.max(1))
        };
        let (round, w) = placement
            .owners(layer, a.expert as usize)
            .iter()
            .map(|&w| (round_at(w), w))
            .min_by_key(|&(round, w)| (round, load[w]))
            .ok_or(NotHeld {
                layer,
                expert: a.expert as usize,
            })?;
        load[w] += 1;
        *taken.entry((w, a.expert)).or_default() += 1;
        let (batch, local) = batches.entry((round, w)).or_insert_with(|| {
            let batch = WorkerBatch {
                worker: w,
                round,
                rows: Vec::new(),
                assignments: Vec::new(),
            };
            (batch, HashMap::new())
        });
        let next = batch.rows.len() as u32;
        let row = *local.entry(a.row).or_insert_with(|| {
            batch.rows.push(a.row);
            next
        });
        batch.assignments.push(ExpertAssignment { row, ..*a });
    }
    Ok(batches.into_values().map(|(b, _)| b).collect())
}

/// Gathers a batch's rows out of the layer's `[rows, hidden]` input, in local row order.
pub(crate) fn gather_rows(rows: &[f32], hidden: usize, batch: &WorkerBatch) -> Vec<f32> {
    let mut packed = Vec::with_capacity(batch.rows.len() * hidden);
    for &r in &batch.rows {
        packed.extend_from_slice(&rows[r as usize * hidden..(r as usize + 1) * hidden]);
    }
    packed
}

/// Adds a batch's answer (`[local rows, hidden]`) onto the rows it came from.
pub(crate) fn scatter_add(out: &mut [f32], hidden: usize, rows: &[u32], values: &[f32]) {
    for (i, &r) in rows.iter().enumerate() {
        let dst = &mut out[r as usize * hidden..(r as usize + 1) * hidden];
        for (d, v) in dst.iter_mut().zip(&values[i * hidden..(i + 1) * hidden]) {
            *d += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_runtime::placement::ExpertWorkerRef;

    fn worker(i: usize) -> ExpertWorkerRef {
        ExpertWorkerRef {
            id: format!("w{i}"),
            address: format!("127.0.0.1:{i}"),
        }
    }

    fn assignment(row: u32, expert: u32) -> ExpertAssignment {
        ExpertAssignment {
            row,
            expert,
            weight: 0.5,
        }
    }

    #[test]
    fn replicas_share_a_hot_expert_and_rows_are_renumbered() {
        // One layer, 2 experts; expert 0 on both workers, expert 1 on worker 1 only.
        let p = PlacementView::from_owners(3, 1, 2, vec![worker(0), worker(1)], vec![vec![0, 1], vec![1]]);
        let a: Vec<_> = (0..6).map(|r| assignment(r, 0)).chain([assignment(0, 1)]).collect();
        let batches = split_by_worker(&p, 0, &a, None).unwrap();
        let per: Vec<(usize, usize)> = batches.iter().map(|b| (b.worker, b.assignments.len())).collect();
        // Six rows of the hot expert alternate between its replicas; expert 1 goes to w1.
        assert_eq!(per, [(0, 3), (1, 4)]);
        let w0 = &batches[0];
        assert_eq!(w0.rows, [0, 2, 4]);
        assert_eq!(
            w0.assignments.iter().map(|a| a.row).collect::<Vec<_>>(),
            [0, 1, 2],
            "dense local rows"
        );
        // Every assignment is sent exactly once.
        let total: usize = batches.iter().map(|b| b.assignments.len()).sum();
        assert_eq!(total, a.len());
    }

    #[test]
    fn an_expert_nobody_holds_is_an_error() {
        let p = PlacementView::from_owners(1, 1, 2, vec![worker(0)], vec![vec![0], vec![]]);
        let err = split_by_worker(&p, 0, &[assignment(0, 1)], None).unwrap_err();
        assert_eq!(err, NotHeld { layer: 0, expert: 1 });
    }

    #[test]
    fn rows_over_a_slot_capacity_go_to_other_replicas_then_to_later_micro_batches() {
        // Expert 0 on both workers, expert 1 on worker 0 only; capacity 2 rows per slot.
        let p = PlacementView::from_owners(1, 1, 2, vec![worker(0), worker(1)], vec![vec![0, 1], vec![0]]);
        let a: Vec<_> = (0..6)
            .map(|r| assignment(r, 0))
            .chain((0..5).map(|r| assignment(r, 1)))
            .collect();
        let batches = split_by_worker(&p, 0, &a, Some(2)).unwrap();
        let mut per_slot_round: HashMap<(usize, usize, u32), usize> = HashMap::new();
        let mut seen = Vec::new();
        for b in &batches {
            for x in &b.assignments {
                *per_slot_round.entry((b.worker, b.round, x.expert)).or_default() += 1;
                seen.push((b.rows[x.row as usize], x.expert));
            }
        }
        assert!(per_slot_round.values().all(|&n| n <= 2), "{per_slot_round:?}");
        // Expert 0's six rows: 2 + 2 on the replicas in round 0, the rest in round 1.
        let expert0_round0: usize = per_slot_round
            .iter()
            .filter(|((_, r, e), _)| *r == 0 && *e == 0)
            .map(|(_, n)| n)
            .sum();
        assert_eq!(expert0_round0, 4);
        // Expert 1 has one replica: 2 + 2 + 1 over three rounds.
        assert_eq!(per_slot_round[&(0, 2, 1)], 1);
        // Every assignment exactly once.
        seen.sort_unstable();
        let mut want: Vec<(u32, u32)> = a.iter().map(|x| (x.row, x.expert)).collect();
        want.sort_unstable();
        assert_eq!(seen, want);
        // Without a capacity everything is one micro-batch.
        assert!(split_by_worker(&p, 0, &a, None).unwrap().iter().all(|b| b.round == 0));
    }

    #[test]
    fn gather_then_scatter_puts_each_answer_back_on_its_row() {
        let p = PlacementView::from_owners(1, 1, 2, vec![worker(0), worker(1)], vec![vec![0], vec![1]]);
        let a = [assignment(2, 1), assignment(0, 0), assignment(2, 0)];
        let hidden = 2;
        let rows: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let mut out = vec![0.0; 6];
        for b in split_by_worker(&p, 0, &a, None).unwrap() {
            let packed = gather_rows(&rows, hidden, &b);
            assert_eq!(packed.len(), b.rows.len() * hidden);
            // An "answer" that echoes the rows: each row comes back once per worker it went to.
            scatter_add(&mut out, hidden, &b.rows, &packed);
        }
        // Row 0 went to w0 only, row 2 to both, row 1 nowhere.
        assert_eq!(out, [0.0, 1.0, 0.0, 0.0, 8.0, 10.0]);
    }
}
