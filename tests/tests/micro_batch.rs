//! Two micro-batches per forward pass give the unsplit pass's tokens and logits, in process,
//! with experts answering at once or from another thread; the overlap counters say what ran
//! at once.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use moe_model::checkpoint::Checkpoint;
use moe_model::engine::Greedy;
use moe_model::experts::{ExpertAssignment, ExpertCompute, ExpertSelection, LocalExperts, Pending};
use moe_model::model::{AttentionModel, DEFAULT_MICRO_BATCH_MIN_ROWS};
use moe_model::overlap::OverlapStats;
use moe_model::{Engine, EngineOptions, Error, ModelConfig};
use moe_model_tools::golden::max_abs_diff;
use moe_tests::fixtures_dir;

/// f32 weights: the halves' products over fewer rows may take another kernel path, which moves
/// logits by float rounding only.
const LOGIT_TOLERANCE: f64 = 1e-4;

/// Prompts of unequal lengths, so the halves' prefill rows differ and the cut is not trivial.
fn prompts() -> Vec<Vec<u32>> {
    [9usize, 3, 14, 1, 6]
        .iter()
        .enumerate()
        .map(|(i, &len)| (0..len).map(|t| (5 + 37 * i + 11 * t) as u32 % 500).collect())
        .collect()
}

fn tiny() -> (Checkpoint, ModelConfig) {
    let dir = fixtures_dir().join("hunyuan-tiny");
    (
        Checkpoint::open(&dir).unwrap(),
        ModelConfig::from_file(&dir.join("config.json")).unwrap(),
    )
}

/// Greedy generation over every prompt at once, and the model's counters afterwards.
fn run(
    micro_batches: usize,
    min_rows: usize,
    experts: impl FnOnce(LocalExperts) -> Arc<dyn ExpertCompute>,
) -> (Vec<Greedy>, Arc<OverlapStats>) {
    let (ckpt, config) = tiny();
    let local = LocalExperts::load(&ckpt, &config, &ExpertSelection::All).unwrap();
    let mut model = AttentionModel::load(&ckpt, config).unwrap();
    model.set_micro_batches(micro_batches).unwrap();
    model.set_micro_batch_min_rows(min_rows).unwrap();
    let stats = model.overlap_stats();
    let mut engine = Engine::new(model, experts(local), EngineOptions::default()).unwrap();
    (engine.generate_greedy(&prompts(), 8, &[], true).unwrap(), stats)
}

fn assert_same(got: &[Greedy], want: &[Greedy]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.tokens, w.tokens, "prompt {i}");
        for (t, (gl, wl)) in g.step_logits.iter().zip(&w.step_logits).enumerate() {
            let d = max_abs_diff(wl, gl);
            assert!(d < LOGIT_TOLERANCE, "prompt {i} token {t}: max |Δlogit| {d}");
        }
    }
}

/// How long [`Threaded`] experts take beyond their products.
const EXPERT_LATENCY: Duration = Duration::from_millis(2);

/// Experts computed on a thread of their own: like expert workers, they are in flight while the
/// caller goes on.
struct Threaded(Arc<LocalExperts>);

impl ExpertCompute for Threaded {
    fn compute(
        &self,
        layer: usize,
        rows: &[f32],
        num_rows: usize,
        assignments: &[ExpertAssignment],
    ) -> moe_model::Result<Vec<f32>> {
        self.0.compute(layer, rows, num_rows, assignments)
    }

    fn begin(
        &self,
        layer: usize,
        rows: &[f32],
        num_rows: usize,
        assignments: &[ExpertAssignment],
    ) -> moe_model::Result<Pending> {
        let (experts, rows, assignments) = (self.0.clone(), rows.to_vec(), assignments.to_vec());
        // The answer takes a while (like a network round trip) and is stamped when it is there,
        // not when the caller asks for it: the overlap is measured against that instant.
        let worker = thread::spawn(move || {
            let out = experts.compute(layer, &rows, num_rows, &assignments);
            thread::sleep(EXPERT_LATENCY);
            out.map(|out| (out, Instant::now()))
        });
        Ok(Pending::arriving(move || {
            worker
                .join()
                .unwrap_or_else(|_| Err(Error::InvalidInput("expert thread panicked".into())))
        }))
    }
}

fn counters(s: &OverlapStats) -> [u64; 4] {
    [&s.steps, &s.split_steps, &s.step_micros, &s.overlap_micros].map(|c| c.load(Ordering::Relaxed))
}

#[test]
fn two_micro_batches_match_one_in_process() {
    let (want, one) = run(1, 1, |l| Arc::new(l));
    let (got, two) = run(2, 1, |l| Arc::new(l));
    assert_same(&got, &want);
    let [steps, split, ..] = counters(&one);
    assert!(steps > 0);
    assert_eq!(split, 0, "one micro-batch never splits");
    // Every step holds all five sequences: every one is split. In-process experts answer
    // before `begin` returns, so nothing is ever in flight while the other half computes.
    let [steps, split, _, overlap] = counters(&two);
    assert_eq!((split, overlap), (steps, 0));
}

#[test]
fn two_micro_batches_overlap_experts_in_flight() {
    let (want, _) = run(1, 1, |l| Arc::new(l));
    let (got, stats) = run(2, 1, |l| Arc::new(Threaded(Arc::new(l))));
    assert_same(&got, &want);
    let [steps, split, step_micros, overlap] = counters(&stats);
    assert_eq!(split, steps);
    // Each half's experts are in flight while the other half's attention runs.
    assert!(overlap > 0, "no overlap counted");
    assert!(
        overlap <= step_micros,
        "overlap {overlap} µs over the steps' {step_micros} µs"
    );
}

/// Under the minimum rows per half, a step runs whole. The prompts' prefill step has 33 rows
/// whose best cut is 12 | 21; every decode step has 5 rows.
#[test]
fn steps_with_a_half_under_the_minimum_run_whole() {
    let (want, _) = run(1, 1, |l| Arc::new(l));
    // The default minimum (16) splits none of these steps.
    let (got, stats) = run(2, DEFAULT_MICRO_BATCH_MIN_ROWS, |l| Arc::new(l));
    assert_same(&got, &want);
    let [steps, split, ..] = counters(&stats);
    assert!(steps > 1);
    assert_eq!(split, 0, "a step was split under the default minimum");
    // A minimum of 12 splits the prefill step (12 | 21) and no decode step (2 | 3).
    let (got, stats) = run(2, 12, |l| Arc::new(l));
    assert_same(&got, &want);
    let [_, split, ..] = counters(&stats);
    assert_eq!(split, 1, "only the prefill step reaches the minimum");
}

#[test]
fn micro_batches_are_one_or_two() {
    let (ckpt, config) = tiny();
    let mut model = AttentionModel::load(&ckpt, config).unwrap();
    for bad in [0, 3] {
        let e = model.set_micro_batches(bad).unwrap_err().to_string();
        assert!(e.contains("micro_batches must be 1 or 2"), "{e}");
    }
    assert_eq!(model.micro_batches(), 1);
    let e = model.set_micro_batch_min_rows(0).unwrap_err().to_string();
    assert!(e.contains("micro_batch_min_rows must be at least 1"), "{e}");
    assert_eq!(model.micro_batch_min_rows(), DEFAULT_MICRO_BATCH_MIN_ROWS);
}
