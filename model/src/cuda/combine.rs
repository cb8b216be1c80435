//! The weighted combine of routed expert outputs, planned on the host so the GPU adds them up
//! per row in assignment order, the order the CPU path documents
//! ([`crate::experts::ExpertCompute::compute`]), whatever order the experts were computed in.

use crate::router::ExpertAssignment;

/// Per row, the assignments to add: `slots[starts[r]..starts[r + 1]]` index the concatenated
/// expert outputs, with `weights` beside them, in assignment order.
#[derive(Debug, Clone, PartialEq)]
pub struct CombinePlan {
    pub starts: Vec<u32>,
    pub slots: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Plans the combine of `num_rows` rows; `slot_of[i]` is where assignment `i`'s expert output
/// sits among the concatenated outputs. Rows are in range (the caller checked).
pub fn combine_plan(assignments: &[ExpertAssignment], num_rows: usize, slot_of: &[usize]) -> CombinePlan {
    let mut counts = vec![0u32; num_rows + 1];
    for a in assignments {
        counts[a.row as usize + 1] += 1;
    }
    let mut starts = counts;
    for r in 0..num_rows {
        starts[r + 1] += starts[r];
    }
    // A stable fill: within a row, assignments keep their order.
    let mut next: Vec<u32> = starts[..num_rows].to_vec();
    let mut slots = vec![0u32; assignments.len()];
    let mut weights = vec![0f32; assignments.len()];
    for (i, a) in assignments.iter().enumerate() {
        let at = &mut next[a.row as usize];
        slots[*at as usize] = slot_of[i] as u32;
        weights[*at as usize] = a.weight;
        *at += 1;
    }
    CombinePlan { starts, slots, weights }
}

impl CombinePlan {
    /// What the `combine_rows` kernel computes, on the host: for each row and column,
    /// `0 + w0 * y0 + w1 * y1 + ...` in plan order. `outputs` is `[slots, hidden]`.
    pub fn apply(&self, outputs: &[f32], hidden: usize) -> Vec<f32> {
        let num_rows = self.starts.len() - 1;
        let mut out = vec![0f32; num_rows * hidden];
        for r in 0..num_rows {
            let (from, to) = (self.starts[r] as usize, self.starts[r + 1] as usize);
            for c in 0..hidden {
                let mut acc = 0f32;
                for j in from..to {
                    acc += self.weights[j] * outputs[self.slots[j] as usize * hidden + c];
                }
                out[r * hidden + c] = acc;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_add_their_assignments_in_assignment_order_not_expert_order() {
        let a = |row, expert, weight| ExpertAssignment { row, expert, weight };
        // Rows 0 and 2 routed to experts 5 and 1 (in that order), row 1 to nothing.
        let assignments = [a(0, 5, 0.75), a(2, 1, 0.5), a(0, 1, 0.25), a(2, 5, 0.5)];
        // Outputs computed grouped by expert: expert 1's rows first (assignments 1, 2), then
        // expert 5's (assignments 0, 3).
        let slot_of = [2, 0, 1, 3];
        let plan = combine_plan(&assignments, 3, &slot_of);
        assert_eq!(plan.starts, [0, 2, 2, 4]);
        assert_eq!(plan.slots, [2, 1, 0, 3], "row 0: expert 5 then 1, as assigned");
        assert_eq!(plan.weights, [0.75, 0.25, 0.5, 0.5]);

        // Against the CPU's combine (axpy per assignment in order), bit for bit, with values
        // whose sums round differently by order.
        let hidden = 3;
        let outputs: Vec<f32> = (0..4 * hidden)
            .map(|i| 1.0e8 * ((i % 3) as f32) + (i as f32).sqrt())
            .collect();
        let mut want = vec![0f32; 3 * hidden];
        for (i, x) in assignments.iter().enumerate() {
            for c in 0..hidden {
                want[x.row as usize * hidden + c] += x.weight * outputs[slot_of[i] * hidden + c];
            }
        }
        let got = plan.apply(&outputs, hidden);
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert!(
            got[hidden..2 * hidden].iter().all(|&v| v == 0.0),
            "an unrouted row is zero"
        );
    }

    #[test]
    fn no_assignments_plan_nothing() {
        let plan = combine_plan(&[], 2, &[]);
        assert_eq!(plan.starts, [0, 0, 0]);
        assert!(plan.slots.is_empty());
        assert_eq!(plan.apply(&[], 4), vec![0.0; 8]);
    }
}
