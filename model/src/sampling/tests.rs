use super::*;

fn tiny_config() -> ModelConfig {
    ModelConfig::from_json_str(include_str!("../../../tests/fixtures/hunyuan-tiny/config.json")).unwrap()
}

fn with(f: impl Fn(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams::greedy(4);
    f(&mut p);
    p
}

/// Logits of a made-up model whose next-token distribution depends on the last token and the
/// position, so a sampler that went astray once would diverge.
fn fake_logits(last: u32, position: usize, vocab: usize) -> Vec<f32> {
    (0..vocab)
        .map(|v| (v as f32 * 0.37 + last as f32 * 1.3 + position as f32 * 0.11).sin() * 2.5)
        .collect()
}

/// Runs `sampler` for `steps` tokens after `history`, feeding back what it chose.
fn run(sampler: &mut Sampler, history: &[u32], steps: usize, vocab: usize) -> Vec<Sampled> {
    let mut seq = history.to_vec();
    (0..steps)
        .map(|_| {
            let s = sampler.sample(&fake_logits(*seq.last().unwrap(), seq.len(), vocab));
            seq.push(s.id);
            s
        })
        .collect()
}

#[test]
fn greedy_is_argmax_and_sampling_is_seeded() {
    let logits = [0.1f32, 3.0, 2.9, -1.0];
    assert_eq!(Sampler::new(SamplingParams::greedy(1)).sample(&logits).id, 1);
    let params = SamplingParams {
        temperature: 1.0,
        seed: 42,
        ..SamplingParams::greedy(1)
    };
    let a: Vec<u32> = {
        let mut s = Sampler::new(params.clone());
        (0..50).map(|_| s.sample(&logits).id).collect()
    };
    let b: Vec<u32> = {
        let mut s = Sampler::new(params);
        (0..50).map(|_| s.sample(&logits).id).collect()
    };
    assert_eq!(a, b);
    assert!(
        a.contains(&1) && a.contains(&2),
        "temperature 1 mixes the two close logits: {a:?}"
    );
}

#[test]
fn top_k_and_top_p_cut_the_tail() {
    let logits = [5.0f32, 4.9, 0.0, -3.0, 4.8];
    let mut s = Sampler::new(SamplingParams {
        temperature: 2.0,
        top_k: 2,
        seed: 1,
        ..SamplingParams::greedy(1)
    });
    assert!((0..200).all(|_| matches!(s.sample(&logits).id, 0 | 1)));
    let mut s = Sampler::new(SamplingParams {
        temperature: 1.0,
        top_p: 0.3,
        seed: 1,
        ..SamplingParams::greedy(1)
    });
    assert!(
        (0..200).all(|_| s.sample(&logits).id == 0),
        "top-p 0.3 keeps only the most likely id"
    );
}

#[test]
fn penalties_change_the_greedy_argmax() {
    let logits = [2.0f32, 1.9, 1.0];
    // The prompt holds id 0: 2.0 / 1.2 = 1.667 < 1.9.
    let req = GenerationRequest::new(vec![0], with(|p| p.repetition_penalty = 1.2));
    assert_eq!(Sampler::for_request(&req).sample(&logits).id, 1);
    assert_eq!(
        Sampler::for_request(&GenerationRequest::new(vec![0], SamplingParams::greedy(4)))
            .sample(&logits)
            .id,
        0
    );
    // Frequency 0.3 over generated ids only (the prompt's 0 is not counted), by hand:
    // [2.0, 1.9] -> 0; [1.7, 1.9] -> 1; [1.7, 1.6] -> 0; [1.4, 1.6] -> 1; [1.4, 1.3] -> 0.
    let req = GenerationRequest::new(vec![0, 0], with(|p| p.frequency_penalty = 0.3));
    let mut s = Sampler::for_request(&req);
    let ids: Vec<u32> = (0..5).map(|_| s.sample(&logits).id).collect();
    assert_eq!(ids, [0, 1, 0, 1, 0]);
    // Presence 0.5 penalises once however often: [2.0, 1.9, 1.0] -> 0; [1.5, 1.9] -> 1;
    // [1.5, 1.4, 1.0] -> 0; and from then on the same.
    let mut s = Sampler::new(with(|p| p.presence_penalty = 0.5));
    let ids: Vec<u32> = (0..4).map(|_| s.sample(&logits).id).collect();
    assert_eq!(ids, [0, 1, 0, 0]);
}

#[test]
fn greedy_logprobs_are_the_log_softmax_of_the_penalised_logits() {
    let req = GenerationRequest::new(
        vec![0],
        with(|p| {
            p.repetition_penalty = 2.0;
            p.logprobs = true;
            p.top_logprobs = 2;
        }),
    );
    let got = Sampler::for_request(&req).sample(&[3.0, 2.0, -1.0]);
    // Penalised [1.5, 2, -1]: chooses 1.
    let z = (1.5f64.exp() + 2f64.exp() + (-1f64).exp()).ln();
    assert_eq!(got.id, 1);
    let lp = got.logprobs.unwrap();
    assert!((lp.logprob as f64 - (2.0 - z)).abs() < 1e-6);
    assert_eq!(lp.top.iter().map(|t| t.id).collect::<Vec<_>>(), [1, 0]);
    assert!((lp.top[1].logprob as f64 - (1.5 - z)).abs() < 1e-6);
}

#[test]
fn sampled_logprobs_use_the_temperature_and_are_absent_unless_asked() {
    let logits = [0.5f32, 1.5, -0.25, 1.0];
    let params = SamplingParams {
        temperature: 0.8,
        seed: 3,
        logprobs: true,
        ..SamplingParams::greedy(1)
    };
    let got = Sampler::new(params.clone()).sample(&logits);
    let z: f64 = logits.iter().map(|&x| (x as f64 / 0.8).exp()).sum::<f64>().ln();
    let want = logits[got.id as usize] as f64 / 0.8 - z;
    let lp = got.logprobs.expect("asked for");
    assert!((lp.logprob as f64 - want).abs() < 1e-6);
    assert!(lp.top.is_empty(), "top_logprobs 0: no alternatives");
    let plain = Sampler::new(SamplingParams {
        logprobs: false,
        ..params
    })
    .sample(&logits);
    assert_eq!(plain.id, got.id, "asking for logprobs does not change the draw");
    assert_eq!(plain.logprobs, None);
}

#[test]
fn a_resumed_request_continues_as_the_uninterrupted_one() {
    let vocab = 40;
    let params = SamplingParams {
        temperature: 0.9,
        top_k: 12,
        top_p: 0.9,
        seed: 11,
        repetition_penalty: 1.4,
        presence_penalty: 0.6,
        frequency_penalty: 0.3,
        logprobs: true,
        top_logprobs: 3,
        ..SamplingParams::greedy(24)
    };
    let prompt = vec![3u32, 17, 3, 25];
    let whole = run(
        &mut Sampler::for_request(&GenerationRequest::new(prompt.clone(), params.clone())),
        &prompt,
        24,
        vocab,
    );
    let ids: Vec<u32> = whole.iter().map(|s| s.id).collect();
    let mut distinct = ids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(distinct.len() > 4, "the run should wander: {ids:?}");
    for cut in [1, 9, 23] {
        let mut resumed_prompt = prompt.clone();
        resumed_prompt.extend_from_slice(&ids[..cut]);
        let req = GenerationRequest {
            resumed: cut as u32,
            ..GenerationRequest::new(resumed_prompt.clone(), params.clone())
        };
        let rest = run(&mut Sampler::for_request(&req), &resumed_prompt, 24 - cut, vocab);
        assert_eq!(rest, whole[cut..], "resumed after {cut} tokens");
    }
    // Treating the resumed tokens as prompt instead would differ (the test can fail).
    let mut as_prompt = prompt.clone();
    as_prompt.extend_from_slice(&ids[..9]);
    let mut wrong = Sampler::for_request(&GenerationRequest::new(as_prompt.clone(), params.clone()));
    wrong.skip(9);
    assert_ne!(run(&mut wrong, &as_prompt, 15, vocab), whole[9..]);
}

#[test]
fn penalty_and_logprob_fields_are_validated_by_name() {
    let config = tiny_config();
    let check = |p: SamplingParams| GenerationRequest::new(vec![5, 6], p).validate(&config);
    for ok in [
        with(|p| p.repetition_penalty = 1.0),
        with(|p| p.repetition_penalty = 0.5),
        with(|p| p.repetition_penalty = MIN_REPETITION_PENALTY),
        with(|p| p.repetition_penalty = MAX_REPETITION_PENALTY),
        with(|p| p.presence_penalty = -2.0),
        with(|p| p.frequency_penalty = 2.0),
        with(|p| p.logprobs = true),
        with(|p| {
            p.logprobs = true;
            p.top_logprobs = MAX_TOP_LOGPROBS;
        }),
    ] {
        check(ok.clone()).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
    }
    let cases: Vec<(SamplingParams, &str)> = vec![
        (
            with(|p| p.repetition_penalty = -1.0),
            "sampling.repetition_penalty = -1",
        ),
        (
            // Would push a seen logit past f32's range (NaN probabilities).
            with(|p| p.repetition_penalty = 1e-40),
            "sampling.repetition_penalty = 0.0000",
        ),
        (
            with(|p| p.repetition_penalty = f32::NAN),
            "sampling.repetition_penalty = NaN",
        ),
        (
            with(|p| p.repetition_penalty = 10.5),
            "sampling.repetition_penalty = 10.5",
        ),
        (with(|p| p.presence_penalty = 2.5), "sampling.presence_penalty = 2.5"),
        (
            with(|p| p.presence_penalty = f32::INFINITY),
            "sampling.presence_penalty = inf",
        ),
        (
            with(|p| p.frequency_penalty = -2.01),
            "sampling.frequency_penalty = -2.01",
        ),
        (
            with(|p| p.frequency_penalty = f32::NAN),
            "sampling.frequency_penalty = NaN",
        ),
        (
            with(|p| {
                p.logprobs = true;
                p.top_logprobs = 21;
            }),
            "sampling.top_logprobs = 21 exceeds the limit 20",
        ),
        (
            with(|p| p.top_logprobs = 3),
            "sampling.top_logprobs = 3 needs sampling.logprobs",
        ),
    ];
    for (p, want) in cases {
        let e = check(p).unwrap_err().to_string();
        assert!(e.contains(want), "`{e}` should contain `{want}`");
    }
}

/// The draw as first written: a full sort of the vocabulary, then the walk. `draw` must choose
/// what it chooses.
fn reference_draw(logits: &[f32], p: &SamplingParams, rng: &mut SplitMix64) -> u32 {
    // Candidates in descending logit order (ties: lower id first), cut by top-k.
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    ids.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    if p.top_k > 0 {
        ids.truncate(p.top_k as usize);
    }
    let max = logits[ids[0] as usize];
    let mut probs: Vec<f64> = ids
        .iter()
        .map(|&i| (((logits[i as usize] - max) / p.temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|v| *v /= total);
    if p.top_p > 0.0 && p.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs
            .iter()
            .position(|&v| {
                acc += v;
                acc >= p.top_p as f64
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        ids.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|v| *v /= total);
    }
    let mut u = rng.unit();
    for (&id, &pr) in ids.iter().zip(&probs) {
        if u <= pr {
            return id;
        }
        u -= pr;
    }
    *ids.last().expect("at least one candidate")
}

/// Logits with ties, a peak, a flat stretch and a long tail, over several vocabulary sizes.
fn shaped_logits(vocab: usize, shape: usize) -> Vec<f32> {
    (0..vocab)
        .map(|v| match shape {
            // Peaked: a few high logits, the rest far below.
            0 => {
                if v % 97 == 3 {
                    8.0 - (v / 97) as f32 * 0.5
                } else {
                    (v as f32 * 0.013).sin()
                }
            }
            // Flat with exact ties (the lower id goes first).
            1 => ((v / 3) % 5) as f32 * 0.01,
            // Smooth.
            _ => (v as f32 * 0.37).sin() * 2.5,
        })
        .collect()
}

#[test]
fn the_prefix_draw_chooses_what_a_full_sort_chooses() {
    let mut draws = 0;
    for vocab in [1usize, 5, 300, 5000] {
        for shape in 0..3 {
            let logits = shaped_logits(vocab, shape);
            for (temperature, top_k, top_p) in [
                (1.0, 0, 0.0),
                (0.3, 0, 1.0),
                (2.0, 0, 0.0),
                (1.0, 0, 0.5),
                (0.7, 0, 0.95),
                (1.0, 1, 0.0),
                (1.0, 3, 0.9),
                (1.5, 50, 0.0),
                (1.0, 400, 0.99),
                (1.0, 6000, 0.0),
            ] {
                let p = SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    ..SamplingParams::greedy(1)
                };
                for seed in 0..40 {
                    let (mut a, mut b) = (SplitMix64::new(seed), SplitMix64::new(seed));
                    let (got, want) = (draw::draw(&logits, &p, &mut a), reference_draw(&logits, &p, &mut b));
                    assert_eq!(
                        got, want,
                        "vocab {vocab} shape {shape} t {temperature} k {top_k} p {top_p} seed {seed}"
                    );
                    draws += 1;
                }
            }
        }
    }
    assert_eq!(draws, 4 * 3 * 10 * 40);
}
