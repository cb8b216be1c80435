//! Continuous batching with the experts in process: a KV pool too small for the load forces
//! admission waits and preemption, and every request still gets exactly its solo tokens.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use moe_attention_worker::scheduler::{self, Event, FinishReason, SchedulerConfig, SchedulerHandle};
use moe_model::checkpoint::Checkpoint;
use moe_model::experts::{ExpertSelection, LocalExperts};
use moe_model::kv_cache::{KvCacheConfig, KvDtypeChoice};
use moe_model::model::AttentionModel;
use moe_model::sampling::{GenerationRequest, SamplingParams};
use moe_model::{Engine, EngineOptions, ModelConfig};

fn engine(kv: KvCacheConfig) -> Engine {
    let dir = moe_tests::fixtures_dir().join("hunyuan-tiny");
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let experts = LocalExperts::load(&ckpt, &config, &ExpertSelection::All).unwrap();
    Engine::new(
        AttentionModel::load(&ckpt, config).unwrap(),
        Arc::new(experts),
        EngineOptions {
            kv_cache: kv,
            ..Default::default()
        },
    )
    .unwrap()
}

fn request(prompt: Vec<u32>, sampling: SamplingParams) -> GenerationRequest {
    GenerationRequest::new(prompt, sampling)
}

/// Collects a request's events: tokens, and how it finished.
async fn collect(s: &SchedulerHandle, req: GenerationRequest) -> (Vec<u32>, Option<FinishReason>) {
    drain(s.submit(req)).await
}

async fn drain(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> (Vec<u32>, Option<FinishReason>) {
    let mut tokens = Vec::new();
    while let Some(e) = rx.recv().await {
        match e {
            Event::Token { index, id, .. } => {
                assert_eq!(
                    index as usize,
                    tokens.len(),
                    "tokens arrive in order, none missing or repeated"
                );
                tokens.push(id);
            }
            Event::Finished {
                reason,
                generated_tokens,
                ..
            } => {
                assert_eq!(generated_tokens as usize, tokens.len());
                return (tokens, Some(reason));
            }
            Event::Failed { code, message } => panic!("{code:?}: {message}"),
            Event::PromptLogits { .. } => {}
        }
    }
    (tokens, None)
}

/// Six prompts of 6..=11 tokens that, with 12 new tokens each, overflow `tight_scheduler`.
fn pressure_prompts() -> Vec<Vec<u32>> {
    (0..6)
        .map(|i| (0..6 + i).map(|t| (5 + 37 * t + 101 * i) as u32 % 512).collect())
        .collect()
}

/// 14 blocks of 4 positions: far less than the 6 x ~20 positions `pressure_prompts` need at once.
fn tight_scheduler() -> SchedulerHandle {
    scheduler::spawn(
        engine(KvCacheConfig {
            block_size: 4,
            num_blocks: 14,
            dtype: KvDtypeChoice::Auto,
        }),
        SchedulerConfig {
            max_batch_tokens: 8,
            // Prompts that arrive while others decode take 2 rows a step beyond the decode rows.
            prefill_while_decoding: 2,
            max_running: 8,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_and_admission_waits_do_not_change_tokens() {
    let prompts = pressure_prompts();
    let mut solo = engine(KvCacheConfig::for_tokens(4096, 16));
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            solo.generate_greedy(std::slice::from_ref(p), 12, &[], false)
                .unwrap()
                .remove(0)
                .tokens
        })
        .collect();

    let s = tight_scheduler();
    // Submit everything before reading anything, so the requests compete for the pool.
    let receivers: Vec<_> = prompts
        .iter()
        .map(|p| s.submit(request(p.clone(), SamplingParams::greedy(12))))
        .collect();
    for (rx, want) in receivers.into_iter().zip(want) {
        let (got, reason) = drain(rx).await;
        assert_eq!(got, want);
        assert_eq!(reason, Some(FinishReason::Length));
    }
    assert!(
        s.stats.preemptions.load(Ordering::Relaxed) > 0,
        "the load was meant to force preemption"
    );
    // Counters are published after each step; `Finished` may arrive just before.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while s.stats.kv_blocks_used.load(Ordering::Relaxed) != 0 {
        assert!(std::time::Instant::now() < deadline, "KV blocks were not all returned");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ids_and_seeded_sampling() {
    let s = scheduler::spawn(engine(KvCacheConfig::for_tokens(1024, 16)), SchedulerConfig::default());
    let prompt = vec![5u32, 77, 300, 12];
    let (free, _) = collect(&s, request(prompt.clone(), SamplingParams::greedy(12))).await;
    // Stop on the first token that has not appeared before it: generation ends right there.
    let i = (1..free.len())
        .find(|&i| !free[..i].contains(&free[i]))
        .expect("a fresh token");
    let params = SamplingParams {
        stop_ids: vec![free[i]],
        ..SamplingParams::greedy(12)
    };
    let (stopped, reason) = collect(&s, request(prompt.clone(), params)).await;
    assert_eq!(stopped, free[..=i]);
    assert_eq!(reason, Some(FinishReason::Stop));

    let hot = SamplingParams {
        temperature: 1.5,
        top_k: 50,
        top_p: 0.95,
        seed: 7,
        ..SamplingParams::greedy(16)
    };
    let (a, _) = collect(&s, request(prompt.clone(), hot.clone())).await;
    let (b, _) = collect(&s, request(prompt.clone(), hot)).await;
    assert_eq!(a, b, "same seed, same tokens");
    assert_eq!(a.len(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn penalty_counts_survive_preemption() {
    // A preempted request is recomputed from its prompt and streamed tokens; its sampler (with
    // the penalty counts and the seeded generator) must carry on as if nothing happened.
    let params = [
        SamplingParams {
            repetition_penalty: 1.8,
            frequency_penalty: 0.5,
            ..SamplingParams::greedy(12)
        },
        SamplingParams {
            temperature: 1.0,
            seed: 9,
            repetition_penalty: 1.5,
            presence_penalty: 0.7,
            ..SamplingParams::greedy(12)
        },
    ];
    let requests: Vec<GenerationRequest> = pressure_prompts()
        .into_iter()
        .enumerate()
        .map(|(i, p)| request(p, params[i % 2].clone()))
        .collect();
    let roomy = scheduler::spawn(engine(KvCacheConfig::for_tokens(4096, 16)), SchedulerConfig::default());
    let mut want = Vec::new();
    for r in &requests {
        want.push(collect(&roomy, r.clone()).await.0);
    }
    let plain = collect(&roomy, request(requests[0].prompt.clone(), SamplingParams::greedy(12)))
        .await
        .0;
    assert_ne!(want[0], plain, "the penalties were meant to change the output");
    let s = tight_scheduler();
    let receivers: Vec<_> = requests.iter().map(|r| s.submit(r.clone())).collect();
    for (rx, want) in receivers.into_iter().zip(want) {
        assert_eq!(drain(rx).await.0, want);
    }
    assert!(
        s.stats.preemptions.load(Ordering::Relaxed) > 0,
        "the load was meant to force preemption"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_can_never_fit_is_refused() {
    let s = scheduler::spawn(
        engine(KvCacheConfig {
            block_size: 4,
            num_blocks: 4,
            dtype: KvDtypeChoice::Auto,
        }),
        SchedulerConfig::default(),
    );
    let mut rx = s.submit(request(vec![5; 10], SamplingParams::greedy(10)));
    match rx.recv().await {
        Some(Event::Failed { code, message }) => {
            assert_eq!(code, tonic::Code::InvalidArgument);
            assert!(message.contains("KV blocks"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}
