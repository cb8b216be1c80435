//! Which rows the next engine step carries: every decoding sequence's one row first, then
//! prefill chunks in admission order, within two budgets.
//!
//! `max_rows` bounds the whole step. The prefill of prompts that arrived while others were
//! already decoding (*throttled*) is also held, all of them together, to
//! `prefill_while_decoding` rows a step plus one per decoding sequence, given out in admission
//! order: a decode step's cost is mostly reading every weight once, and each prefill row adds
//! about a row's worth of products on top, so capping the added rows near what that read is
//! worth aims to keep a running sequence's inter-token gap near twice a plain decode step at
//! most while new prompts keep arriving (measured: docs/perf.md v8). Prompts that arrived together with the
//! decoding ones (a burst) prefill at full speed, as an engine without chunking would.

use std::num::NonZeroUsize;

/// Default prefill rows a step may add beyond one per decoding sequence
/// (`--prefill-rows-while-decoding`). Measured on the medium model with 8 running and one
/// prompt arriving a second (docs/perf.md v8): ITL p99/p50 median 1.81 at 16, 2.44 at 24, 2.39
/// at 32, 3.55 at 64 and 4.56 without the cap, for 0.62x the prefill rate of arriving prompts
/// at 16.
pub const DEFAULT_PREFILL_WHILE_DECODING: NonZeroUsize = NonZeroUsize::new(16).unwrap();

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepBudget {
    /// Rows per step, decode and prefill together (`--max-batch-tokens`).
    pub max_rows: usize,
    /// Prefill rows a step with decoding sequences may add beyond one per decoding sequence.
    pub prefill_while_decoding: usize,
}

/// What one running sequence needs from the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    /// Rows still to run: 1 is a decode row (or a prompt's last token).
    pub rows: usize,
    /// A prompt that arrived after some decoding sequence had its first token.
    pub throttled: bool,
}

/// The next step: `(sequence index, rows)` in the order the rows go. Sequences that get no rows
/// are left out.
pub fn plan_step(needs: &[Need], budget: &StepBudget) -> Vec<(usize, usize)> {
    let decoding: Vec<usize> = (0..needs.len()).filter(|&i| needs[i].rows == 1).collect();
    let prefilling = (0..needs.len()).filter(|&i| needs[i].rows > 1);
    let mut rows_left = budget.max_rows.max(1);
    let mut throttled_left = budget.prefill_while_decoding.saturating_add(decoding.len());
    let mut plan = Vec::new();
    for i in decoding {
        if rows_left == 0 {
            return plan;
        }
        plan.push((i, 1));
        rows_left -= 1;
    }
    for i in prefilling {
        let mut take = needs[i].rows.min(rows_left);
        if needs[i].throttled {
            take = take.min(throttled_left);
            throttled_left -= take;
        }
        if take > 0 {
            plan.push((i, take));
            rows_left -= take;
        }
    }
    plan
}

/// Steps until `batch` prompts of `prompt_len` tokens, all arriving at once, have each had
/// their first token, when every sequence keeps decoding once it has (a bench sizes its
/// requests with this so that all of them decode together for a while). `None` when prefill
/// cannot progress (decode rows fill every step).
pub fn steps_to_prefill(batch: usize, prompt_len: usize, budget: &StepBudget) -> Option<usize> {
    // Prompt rows each sequence has still to run; at 0 it has its first token and decodes.
    let mut prompt_left = vec![prompt_len.max(1); batch];
    let mut steps = 0;
    while prompt_left.iter().any(|&r| r > 0) {
        // Arriving together, none is throttled.
        let needs: Vec<Need> = prompt_left
            .iter()
            .map(|&r| Need {
                rows: r.max(1),
                throttled: false,
            })
            .collect();
        let plan = plan_step(&needs, budget);
        if plan.iter().all(|&(i, _)| prompt_left[i] == 0) {
            return None;
        }
        for (i, rows) in plan {
            prompt_left[i] = prompt_left[i].saturating_sub(rows);
        }
        steps += 1;
    }
    Some(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: StepBudget = StepBudget {
        max_rows: 512,
        prefill_while_decoding: 32,
    };

    fn needs(rows: &[usize], throttled: bool) -> Vec<Need> {
        rows.iter().map(|&rows| Need { rows, throttled }).collect()
    }

    #[test]
    fn decode_rows_go_first_then_prefill_in_admission_order() {
        // Two decoding, three prefilling, all arrived together: only the step budget counts.
        let plan = plan_step(&needs(&[20, 1, 500, 1, 7], false), &BUDGET);
        assert_eq!(plan, [(1, 1), (3, 1), (0, 20), (2, 490)]);
    }

    #[test]
    fn prompts_arriving_while_others_decode_add_a_bounded_chunk() {
        // Throttled: at most 32 + 2 decoding = 34 prefill rows: 20 of the first, 14 of the second.
        let plan = plan_step(&needs(&[20, 1, 50, 1, 7], true), &BUDGET);
        assert_eq!(plan, [(1, 1), (3, 1), (0, 20), (2, 14)]);
        // An unthrottled prompt after throttled ones still gets the rest of the step.
        let mut mixed = needs(&[1, 100, 300], true);
        mixed[2].throttled = false;
        assert_eq!(plan_step(&mixed, &BUDGET), [(0, 1), (1, 33), (2, 300)]);
    }

    #[test]
    fn with_nothing_decoding_prefill_takes_the_whole_budget() {
        assert_eq!(plan_step(&needs(&[300, 300], false), &BUDGET), [(0, 300), (1, 212)]);
        assert_eq!(plan_step(&needs(&[], false), &BUDGET), []);
    }

    #[test]
    fn the_step_budget_bounds_decode_rows_too() {
        let budget = StepBudget {
            max_rows: 3,
            prefill_while_decoding: 32,
        };
        assert_eq!(
            plan_step(&needs(&[1, 1, 1, 1, 9], false), &budget),
            [(0, 1), (1, 1), (2, 1)]
        );
        // One row left after two decode rows: the prefill gets it.
        assert_eq!(plan_step(&needs(&[1, 9, 1], false), &budget), [(0, 1), (2, 1), (1, 1)]);
    }

    #[test]
    fn prefill_steps_count_the_decode_rows_that_share_them() {
        assert_eq!(steps_to_prefill(0, 128, &BUDGET), Some(0));
        // One prompt, or four (512 rows): one step.
        assert_eq!(steps_to_prefill(1, 128, &BUDGET), Some(1));
        assert_eq!(steps_to_prefill(4, 128, &BUDGET), Some(1));
        // 128 x 128: 512 rows, then 508, 504, ... as more decode (not 16384 / 512 = 32).
        assert_eq!(steps_to_prefill(128, 128, &BUDGET), Some(37));
        // A prompt left with its last token takes one more step (as a decode-first row).
        let small = StepBudget {
            max_rows: 8,
            prefill_while_decoding: 32,
        };
        assert_eq!(steps_to_prefill(1, 9, &small), Some(2));
        assert_eq!(steps_to_prefill(1, 8, &small), Some(1));
        // A step budget decode rows fill entirely: prefill never progresses.
        let tight = StepBudget {
            max_rows: 4,
            prefill_while_decoding: 32,
        };
        assert_eq!(steps_to_prefill(8, 128, &tight), None);
    }
}
