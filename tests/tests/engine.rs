//! The single-process engine and the expert unit: the expert interface gives the same result
//! called directly or through the engine, split over several holders, and against a naive
//! per-row loop; the KV cache reproduces full recomputation; bad input changes nothing.

use std::sync::Arc;

use moe_model::checkpoint::Checkpoint;
use moe_model::engine::LogitsWanted;
use moe_model::experts::{ExpertAssignment, ExpertCompute, ExpertSelection, LocalExperts};
use moe_model::kv_cache::{KvCacheConfig, KvDtypeChoice};
use moe_model::model::AttentionModel;
use moe_model::{Engine, EngineOptions, Error, ModelConfig, SeqChunk};
use moe_model_tools::golden::max_abs_diff;
use moe_tests::fixtures_dir;

fn tiny() -> (Checkpoint, ModelConfig) {
    let dir = fixtures_dir().join("hunyuan-tiny");
    (
        Checkpoint::open(&dir).unwrap(),
        ModelConfig::from_file(&dir.join("config.json")).unwrap(),
    )
}

fn engine_with(experts: Arc<dyn ExpertCompute>, kv: KvCacheConfig) -> Engine {
    let (ckpt, config) = tiny();
    Engine::new(
        AttentionModel::load(&ckpt, config).unwrap(),
        experts,
        EngineOptions {
            kv_cache: kv,
            ..Default::default()
        },
    )
    .unwrap()
}

const PROMPT: [u32; 9] = [5, 77, 300, 12, 12, 9, 480, 33, 101];

/// Naive reference: per assignment, gate/up/down with scalar loops in f64.
fn naive_experts(
    ckpt: &Checkpoint,
    layer: usize,
    rows: &[f32],
    h: usize,
    assignments: &[ExpertAssignment],
) -> Vec<f32> {
    let mut out = vec![0.0f64; rows.len()];
    for a in assignments {
        let name = |p: &str| format!("model.layers.{layer}.mlp.experts.{}.{p}.weight", a.expert);
        let inter = ckpt.shape(&name("gate_proj")).unwrap()[0];
        let g = ckpt.f32_tensor(&name("gate_proj"), &[inter, h]).unwrap();
        let u = ckpt.f32_tensor(&name("up_proj"), &[inter, h]).unwrap();
        let d = ckpt.f32_tensor(&name("down_proj"), &[h, inter]).unwrap();
        let x = &rows[a.row as usize * h..(a.row as usize + 1) * h];
        let act: Vec<f64> = (0..inter)
            .map(|i| {
                let gv: f64 = (0..h).map(|j| g[i * h + j] as f64 * x[j] as f64).sum();
                let uv: f64 = (0..h).map(|j| u[i * h + j] as f64 * x[j] as f64).sum();
                gv / (1.0 + (-gv).exp()) * uv
            })
            .collect();
        for o in 0..h {
            let y: f64 = (0..inter).map(|i| d[o * inter + i] as f64 * act[i]).sum();
            out[a.row as usize * h + o] += a.weight as f64 * y;
        }
    }
    out.into_iter().map(|v| v as f32).collect()
}

#[test]
fn expert_unit_direct_equals_engine_and_naive_and_split() {
    let (ckpt, config) = tiny();
    let h = config.hidden_size;
    let all = Arc::new(LocalExperts::load(&ckpt, &config, &ExpertSelection::All).unwrap());
    let mut engine = engine_with(all.clone(), KvCacheConfig::for_tokens(256, 16));
    let seq = engine.new_sequence();
    let out = engine
        .step(
            &[SeqChunk {
                seq,
                tokens: PROMPT.to_vec(),
                logits: LogitsWanted::Last,
            }],
            true,
        )
        .unwrap();
    let trace = out.trace.unwrap();

    // Two holders with disjoint halves (even / odd experts), as two expert workers would be.
    let half = |parity: usize| {
        let pairs = (0..config.num_layers)
            .flat_map(|l| (0..64).filter(move |e| e % 2 == parity).map(move |e| (l, e)))
            .collect();
        LocalExperts::load(&ckpt, &config, &ExpertSelection::Only(pairs)).unwrap()
    };
    let (even, odd) = (half(0), half(1));

    for (l, lt) in trace.layers.iter().enumerate() {
        let n = lt.moe_input.len() / h;
        let assignments = lt.routing.assignments();
        assert_eq!(assignments.len(), n * 8);
        let direct = all.compute(l, &lt.moe_input, n, &assignments).unwrap();
        assert_eq!(
            direct, lt.routed_out,
            "layer {l}: direct call differs from the engine's"
        );

        let naive = naive_experts(&ckpt, l, &lt.moe_input, h, &assignments);
        let d = max_abs_diff(&naive, &direct);
        assert!(d < 1e-4, "layer {l}: {d} from the naive loop");

        let (a_even, a_odd): (Vec<_>, Vec<_>) = assignments.iter().partition(|a| a.expert % 2 == 0);
        let mut split = even.compute(l, &lt.moe_input, n, &a_even).unwrap();
        let part = odd.compute(l, &lt.moe_input, n, &a_odd).unwrap();
        for (s, p) in split.iter_mut().zip(&part) {
            *s += p;
        }
        let d = max_abs_diff(&split, &direct);
        assert!(d < 1e-5, "layer {l}: split over two holders differs by {d}");
        // And each half refuses what it does not hold.
        assert!(matches!(
            even.compute(l, &lt.moe_input, n, &a_odd),
            Err(Error::ExpertNotHeld { .. })
        ));
    }
}

#[test]
fn expert_unit_refuses_bad_assignments() {
    let (ckpt, config) = tiny();
    let experts = LocalExperts::load(&ckpt, &config, &ExpertSelection::Only(vec![(0, 1)])).unwrap();
    let rows = vec![0.5f32; 2 * 64];
    let ok = ExpertAssignment {
        row: 1,
        expert: 1,
        weight: 0.5,
    };
    assert!(experts.compute(0, &rows, 2, &[ok]).is_ok());
    let bad_row = ExpertAssignment { row: 2, ..ok };
    assert!(matches!(
        experts.compute(0, &rows, 2, &[bad_row]),
        Err(Error::InvalidInput(_))
    ));
    let nan = ExpertAssignment { weight: f32::NAN, ..ok };
    assert!(matches!(
        experts.compute(0, &rows, 2, &[nan]),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        experts.compute(0, &rows[..100], 2, &[ok]),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        experts.compute(1, &rows, 2, &[ok]),
        Err(Error::ExpertNotHeld { layer: 1, expert: 1 })
    ));
}

#[test]
fn kv_cache_decode_matches_full_recompute_across_block_boundaries() {
    let (ckpt, config) = tiny();
    let experts = Arc::new(LocalExperts::load(&ckpt, &config, &ExpertSelection::All).unwrap());
    // Block size 4: the prompt and the decode steps cross several blocks.
    let mut engine = engine_with(
        experts,
        KvCacheConfig {
            block_size: 4,
            num_blocks: 64,
            dtype: KvDtypeChoice::Auto,
        },
    );
    let out = engine
        .generate_greedy(&[PROMPT.to_vec()], 10, &[], true)
        .unwrap()
        .remove(0);
    let mut full = PROMPT.to_vec();
    full.extend_from_slice(&out.tokens[..9]);
    let seq = engine.new_sequence();
    let all = engine
        .step(
            &[SeqChunk {
                seq,
                tokens: full.clone(),
                logits: LogitsWanted::All,
            }],
            false,
        )
        .unwrap()
        .logits
        .remove(0);
    let v = config.vocab_size;
    for t in 0..10 {
        let row = PROMPT.len() - 1 + t;
        let d = max_abs_diff(&all[row * v..(row + 1) * v], &out.step_logits[t]);
        assert!(d < 1e-4, "step {t}: cached decode differs from recompute by {d}");
    }
    // All blocks come back when sequences end.
    engine.release(seq);
    assert_eq!(engine.cache().free_blocks(), 64);
}

#[test]
fn chunked_prefill_matches_one_shot() {
    let (ckpt, config) = tiny();
    let experts = Arc::new(LocalExperts::load(&ckpt, &config, &ExpertSelection::All).unwrap());
    let mut engine = engine_with(experts, KvCacheConfig::for_tokens(256, 8));
    let one = engine.new_sequence();
    let whole = engine
        .step(
            &[SeqChunk {
                seq: one,
                tokens: PROMPT.to_vec(),
                logits: LogitsWanted::Last,
            }],
            false,
        )
        .unwrap()
        .logits
        .remove(0);
    let two = engine.new_sequence();
    engine
        .step(
            &[SeqChunk {
                seq: two,
                tokens: PROMPT[..4].to_vec(),
                logits: LogitsWanted::None,
            }],
            false,
        )
        .unwrap();
    let last = engine
        .step(
            &[SeqChunk {
                seq: two,
                tokens: PROMPT[4..].to_vec(),
                logits: LogitsWanted::Last,
            }],
            false,
        )
        .unwrap()
        .logits
        .remove(0);
    assert!(max_abs_diff(&whole, &last) < 1e-4);
}

/// One step over sequences asking for no logits, the last row's and every row's gives each
/// exactly its rows (one LM-head product over all of them, split back), equal to each
/// sequence run alone, in every position of the batch and with one asker only.
#[test]
fn a_step_mixing_logit_requests_gives_each_sequence_its_rows() {
    let (ckpt, config) = tiny();
    let vocab = config.vocab_size;
    let experts: Arc<dyn ExpertCompute> = Arc::new(LocalExperts::load(&ckpt, &config, &ExpertSelection::All).unwrap());
    let prompts: [&[u32]; 3] = [&PROMPT[..5], &PROMPT[2..], &PROMPT[..3]];
    let wanted_orders = [
        [LogitsWanted::None, LogitsWanted::Last, LogitsWanted::All],
        [LogitsWanted::All, LogitsWanted::None, LogitsWanted::Last],
        [LogitsWanted::None, LogitsWanted::None, LogitsWanted::Last],
        [LogitsWanted::Last, LogitsWanted::None, LogitsWanted::None],
    ];
    for wanted in wanted_orders {
        let mut together = engine_with(experts.clone(), KvCacheConfig::for_tokens(256, 8));
        let chunks: Vec<SeqChunk> = prompts
            .iter()
            .zip(wanted)
            .map(|(p, logits)| SeqChunk {
                seq: together.new_sequence(),
                tokens: p.to_vec(),
                logits,
            })
            .collect();
        let got = together.step(&chunks, false).unwrap().logits;
        assert_eq!(got.len(), chunks.len());
        for (chunk, got) in chunks.iter().zip(&got) {
            let rows = match chunk.logits {
                LogitsWanted::None => 0,
                LogitsWanted::Last => 1,
                LogitsWanted::All => chunk.tokens.len(),
            };
            assert_eq!(got.len(), rows * vocab, "{:?} of {wanted:?}", chunk.logits);
            let mut alone = engine_with(experts.clone(), KvCacheConfig::for_tokens(256, 8));
            let seq = alone.new_sequence();
            let want = alone
                .step(&[SeqChunk { seq, ..chunk.clone() }], false)
                .unwrap()
                .logits
                .remove(0);
            assert!(max_abs_diff(&want, got) < 1e-4, "{:?} of {wanted:?}", chunk.logits);
        }
    }
}

#[test]
fn bad_steps_are_refused_and_change_nothing() {
    let (ckpt, config) = tiny();
    let experts = Arc::new(LocalExperts::load(&ckpt, &config, &ExpertSelection::All).unwrap());
    let mut engine = engine_with(
        experts,
        KvCacheConfig {
            block_size: 4,
            num_blocks: 5,
            dtype: KvDtypeChoice::Auto,
        },
    );
    let good = engine.new_sequence();
    engine
        .step(
            &[SeqChunk {
                seq: good,
                tokens: vec![5, 6, 7],
                logits: LogitsWanted::None,
            }],
            false,
        )
        .unwrap();
    let free = engine.cache().free_blocks();

    let other = engine.new_sequence();
    let cases: Vec<(Vec<SeqChunk>, &str)> = vec![
        (
            vec![SeqChunk {
                seq: other,
                tokens: vec![5, 512],
                logits: LogitsWanted::Last,
            }],
            "outside the vocabulary",
        ),
        (
            vec![SeqChunk {
                seq: other,
                tokens: vec![],
                logits: LogitsWanted::Last,
            }],
            "no tokens",
        ),
        (
            vec![
                SeqChunk {
                    seq: other,
                    tokens: vec![5],
                    logits: LogitsWanted::Last,
                },
                SeqChunk {
                    seq: other,
                    tokens: vec![6],
                    logits: LogitsWanted::Last,
                },
            ],
            "twice",
        ),
        // Fits the pool only if `good` gave its blocks up: all-or-nothing reservation.
        (
            vec![
                SeqChunk {
                    seq: good,
                    tokens: vec![8],
                    logits: LogitsWanted::Last,
                },
                SeqChunk {
                    seq: other,
                    tokens: vec![9; 17],
                    logits: LogitsWanted::Last,
                },
            ],
            "KV cache full",
        ),
    ];
    for (chunks, want) in cases {
        let err = engine.step(&chunks, false).unwrap_err().to_string();
        assert!(err.contains(want), "expected `{want}` in `{err}`");
        assert_eq!(
            engine.cache().free_blocks(),
            free,
            "a refused step leaked or took blocks"
        );
        assert_eq!(engine.cache().seq_len(good), 3);
        assert!(!engine.cache().contains(other));
    }
    // The good sequence still continues exactly as if nothing had happened.
    engine
        .step(
            &[SeqChunk {
                seq: good,
                tokens: vec![8],
                logits: LogitsWanted::Last,
            }],
            false,
        )
        .unwrap();
    assert_eq!(engine.cache().seq_len(good), 4);
}

#[test]
fn cla_cache_holds_one_entry_per_layer_group() {
    use moe_model::kv_cache::KvCache;
    let dir = fixtures_dir().join("hunyuan-large-tiny");
    let cla = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    assert_eq!((cla.num_layers, cla.cla_share_factor), (4, 2));
    let kv = KvCacheConfig {
        block_size: 16,
        num_blocks: 8,
        dtype: KvDtypeChoice::Auto,
    };
    let shared = KvCache::new(&cla, kv).unwrap();
    let mut per_layer = cla.clone();
    per_layer.cla_share_factor = 1;
    for (l, layer) in per_layer.layers.iter_mut().enumerate() {
        layer.kv_source_layer = l;
    }
    let unshared = KvCache::new(&per_layer, kv).unwrap();
    assert_eq!((shared.num_slots(), unshared.num_slots()), (2, 4));
    assert_eq!(shared.size_in_bytes() * 2, unshared.size_in_bytes());
    assert_eq!(cla.kv_bytes_per_token(2) * 2, per_layer.kv_bytes_per_token(2));
    // Odd layer counts: 5 layers with f = 2 keep 3 entries (layers 0, 2, 4 compute K/V).
    let mut odd = cla.clone();
    odd.num_layers = 5;
    odd.layers.push(moe_model::config::LayerConfig {
        kv_source_layer: 4,
        ..odd.layers[0].clone()
    });
    assert_eq!(odd.num_kv_cache_slots(), 3);
    assert_eq!((odd.kv_cache_slot(3), odd.kv_cache_slot(4)), (1, 2));

    // And the engine really runs on the halved cache: its greedy tokens match the fixture.
    let mut engine = Engine::load(&dir, EngineOptions::default()).unwrap();
    assert_eq!(engine.cache().num_slots(), 2);
    let fixture = moe_model_tools::golden::Fixture::open(&dir).unwrap();
    assert!(fixture.check(&mut engine).unwrap().passed());
}

#[test]
fn block_tables_follow_reservations_truncation_and_release() {
    use moe_model::kv_cache::KvCache;
    let (_, config) = tiny();
    let kv = KvCacheConfig {
        block_size: 4,
        num_blocks: 8,
        dtype: KvDtypeChoice::Auto,
    };
    let mut cache = KvCache::new(&config, kv).unwrap();
    assert!(cache.block_table(1).is_empty(), "unknown sequence");
    cache.reserve(1, 6).unwrap();
    cache.reserve(2, 3).unwrap();
    cache.reserve(1, 9).unwrap();
    let (one, two) = (cache.block_table(1).to_vec(), cache.block_table(2).to_vec());
    assert_eq!((one.len(), two.len()), (3, 1), "ceil(9/4) and ceil(3/4) blocks");
    assert!(one.iter().all(|b| !two.contains(b)), "no block shared: {one:?} {two:?}");
    assert!(one.iter().chain(&two).all(|&b| (b as usize) < kv.num_blocks));
    cache.truncate(1, 4);
    assert_eq!(
        cache.block_table(1),
        &one[..1],
        "whole blocks past the length are freed"
    );
    cache.release(1);
    assert!(cache.block_table(1).is_empty());
    assert_eq!(cache.free_blocks(), kv.num_blocks - 1);
}
