//! Expert placement fitted to the load and what bounds a step: `moectl rebalance`, the automatic
//! rebalance, capacity policies, the per-slot capacity, and bf16 rows on the wire.

use std::time::Duration;

use moe_model::{Engine, EngineOptions};
use moe_model_tools::golden::max_abs_diff;
use moe_proto::v1::{ClusterStatusResponse, Role};
use moe_runtime::client::ClusterClient;
use moe_tests::cluster::LocalCluster;

use crate::common::*;
use crate::http_get;

/// Sum of a per-worker counter in Prometheus text.
fn metric_sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_capacity_policy_is_opt_in_and_counted() {
    // Proves: `drop` is chosen per deployment, changes the computation, and every dropped
    // assignment shows in the metrics; the default cluster drops nothing.
    let prompt: Vec<u32> = (0..40).map(|i| 5 + (i * 37) % 500).collect();
    let mut engine = Engine::load(&tiny(), EngineOptions::default()).unwrap();
    let exact = engine
        .generate_greedy(std::slice::from_ref(&prompt), 4, &[], true)
        .unwrap()
        .remove(0);
    for (policy, lossy) in [("exact", false), ("drop", true)] {
        let cluster = LocalCluster::start(
            moectl(),
            &tiny(),
            1,
            2,
            &["--capacity-policy", policy, "--metrics-listen", "127.0.0.1:0"],
        );
        let metrics = cluster.metrics.clone().unwrap();
        let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
        let mut req = greedy(&prompt, 4);
        req.return_prompt_logits = true;
        let got = client.generate(&req).await.unwrap();
        // The prompt's last row produced the first token: compare it with the exact engine.
        let pl = got.prompt_logits.unwrap();
        let d = max_abs_diff(&pl[(prompt.len() - 1) * 512..], &exact.step_logits[0]);
        let (metrics, prompt) = (&metrics, &prompt);
        let dropped = eventually(Duration::from_secs(10), "counters never arrived", || async move {
            let (_, body) = http_get(metrics, "/metrics");
            let tokens = metric_sum(&body, "moe_tokens_processed_total");
            if tokens >= prompt.len() as f64 {
                Ok(metric_sum(&body, "moe_dropped_assignments_total"))
            } else {
                Err(Text(body))
            }
        })
        .await;
        if lossy {
            assert!(
                dropped > 0.0,
                "40 tokens x top-8 over 64 experts of capacity 8 must overflow somewhere"
            );
            assert!(d > 1e-3, "dropping changed nothing ({d})");
        } else {
            assert_eq!(dropped, 0.0);
            assert!(d < 1e-4, "{d}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_under_load_replicates_hot_experts_and_changes_no_token() {
    // Proves: `moectl rebalance` fits the placement to the load counted from real traffic:
    // hot experts get replicas in the spare slots, the switch happens while requests stream,
    // none fails, the tokens are those of an undisturbed run, and the load window, the expected
    // imbalance and the per-worker shares are visible in `moectl status --json`.
    // Long streams: the switch takes a few heartbeats (200 ms each) and must land mid-stream.
    const STEPS: u32 = 1200;
    let prompts = prompts_with_gap(&tiny(), &[3, 9, 17, 26, 5, 12], STEPS as usize, 5e-5);
    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 2, &["--spare-slots", "8"]);
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    // Traffic to count: one run of every prompt, then the window holds it.
    for (prompt, want) in &prompts {
        assert_eq!(&client.generate(&greedy(prompt, 40)).await.unwrap().tokens, &want[..40]);
    }
    let before = eventually(
        Duration::from_secs(10),
        "no expert load reached the coordinator",
        || {
            let mut client = client.clone();
            async move {
                let s = client.status().await.unwrap();
                if s.load_imbalance > 0.0 {
                    Ok(s)
                } else {
                    Err(s.load_imbalance)
                }
            }
        },
    )
    .await;
    assert_eq!(before.expert_load.len(), 2 * 64);
    assert!(before.expert_load.iter().sum::<u64>() > 0);

    let streams = start_tracked(&cluster.endpoint, &prompts, STEPS).await;
    let out = std::process::Command::new(moectl())
        .args(["rebalance", "--force", "--wait-s", "0", "--endpoint", &cluster.endpoint])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let target = report["target_version"].as_u64().unwrap();
    assert!(target > before.placement_version, "{report}");
    assert!(
        report["imbalance_after"].as_f64().unwrap() <= report["imbalance_before"].as_f64().unwrap(),
        "{report}"
    );
    // The switch must happen while requests are running: the attention worker routes with the
    // new placement (bounded wait) before the streams are done.
    let what = format!("placement {target} never reached the attention worker");
    eventually(Duration::from_secs(20), what, || {
        let mut client = client.clone();
        async move {
            let s = client.status().await.unwrap();
            let attention: Vec<u64> = s
                .workers
                .iter()
                .filter(|w| w.role == Role::Attention as i32)
                .map(|w| w.placement_version)
                .collect();
            if attention.contains(&target) {
                Ok(())
            } else {
                Err(attention)
            }
        }
    })
    .await;
    assert_some_unfinished(&streams, STEPS);
    assert_streams_match(streams, &prompts).await;

    let after = client.status().await.unwrap();
    assert_eq!(after.placement_version, target, "the rebalanced placement is active");
    let held: usize = after.workers.iter().map(|w| w.expert_slots.len()).sum();
    assert!(
        held > 128,
        "hot experts got replicas in the spare slots ({held} slots for 128 experts)"
    );
    for w in after.workers.iter().filter(|w| w.role == Role::Expert as i32) {
        // The rebalanced placement's load (its new slots only) is reported like the first.
        assert_eq!(w.load_state, moe_proto::v1::LoadState::Loaded as i32, "{}", w.worker_id);
        assert_eq!(w.load_bytes_done, w.load_bytes_total, "{}", w.worker_id);
        assert!(
            w.expert_slots.len() <= 2 * (32 + 8),
            "{} holds {} slots",
            w.worker_id,
            w.expert_slots.len()
        );
    }
    for (prompt, want) in &prompts {
        assert_eq!(&client.generate(&greedy(prompt, STEPS)).await.unwrap().tokens, want);
    }
    let out = std::process::Command::new(moectl())
        .args(["status", "--json", "--endpoint", &cluster.endpoint])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(status["expert_load"]["tokens"].as_u64().unwrap() > 0, "{status}");
    let shares: f64 = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["expected_load_share"].as_f64())
        .sum();
    assert!(
        (shares - 1.0).abs() < 1e-9,
        "the expert workers' shares add up to the whole load: {shares}"
    );

    // A worker joining afterwards: the new placement is fitted to the load too, so the
    // replicas survive the membership change.
    let joiner = start_expert_worker(&cluster.endpoint, &["--spare-slots", "8"]);
    eventually(Duration::from_secs(30), "the joiner never got experts", || {
        let mut client = client.clone();
        async move {
            let s = client.status().await.unwrap();
            let experts: Vec<_> = s.workers.iter().filter(|w| w.role == Role::Expert as i32).collect();
            let held: usize = experts.iter().map(|w| w.expert_slots.len()).sum();
            if s.placement_version > target && experts.len() == 3 && experts.iter().all(|w| !w.expert_slots.is_empty())
            {
                assert!(held > 128, "replicas kept after the join ({held} slots)");
                Ok(())
            } else {
                let slots: Vec<usize> = experts.iter().map(|w| w.expert_slots.len()).collect();
                Err(format!(
                    "v{} with expert workers holding {slots:?} slots",
                    s.placement_version
                ))
            }
        }
    })
    .await;
    for (prompt, want) in &prompts {
        assert_eq!(&client.generate(&greedy(prompt, STEPS)).await.unwrap().tokens, want);
    }
    drop(joiner);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_rebalances_by_itself_above_the_threshold() {
    // Proves: with `--rebalance-threshold`, traffic whose expected imbalance passes it makes
    // the coordinator plan and switch to a placement with replicas on its own, and the cluster
    // computes the same tokens on it.
    const STEPS: u32 = 200;
    let prompts = prompts_with_gap(&tiny(), &[4, 10, 18, 27], STEPS as usize, 1e-4);
    let cluster = LocalCluster::start(
        moectl(),
        &tiny(),
        1,
        2,
        &["--spare-slots", "8", "--rebalance-threshold", "1.02"],
    );
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    let mut round = 0;
    let status = eventually(Duration::from_secs(60), "no automatic rebalance", || {
        // Traffic until the window holds enough tokens and the imbalance is seen.
        let (prompt, want) = &prompts[round % prompts.len()];
        round += 1;
        let mut client = client.clone();
        async move {
            assert_eq!(&client.generate(&greedy(prompt, STEPS)).await.unwrap().tokens, want);
            let s = client.status().await.unwrap();
            if s.placement_version > 1 && s.workers.iter().map(|w| w.expert_slots.len()).sum::<usize>() > 128 {
                Ok(s)
            } else {
                Err(format!("imbalance {:.3} at v{}", s.load_imbalance, s.placement_version))
            }
        }
    })
    .await;
    // The new placement is balanced for the traffic that triggered it.
    assert!(
        status.load_imbalance <= 1.1,
        "expected imbalance {:.3} after the automatic rebalance",
        status.load_imbalance
    );
    for (prompt, want) in &prompts {
        assert_eq!(&client.generate(&greedy(prompt, STEPS)).await.unwrap().tokens, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_capacity_splits_steps_into_micro_batches_and_changes_no_token() {
    // Proves: under `exact` with a per-slot capacity of one row, every step whose batch sends
    // an expert more than one row spills into later micro-batches (counted), and concurrent
    // requests still get exactly the engine's tokens: nothing is dropped.
    let prompts = decisive_prompts(&tiny(), &[3, 7, 12, 18, 25, 31], 24);
    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 2, &["--slot-capacity", "1"]);
    let mut tasks = Vec::new();
    for (prompt, want) in prompts.clone() {
        let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
        tasks.push(tokio::spawn(async move {
            let got = client.generate(&greedy(&prompt, 24)).await.unwrap().tokens;
            assert_eq!(got, want, "prompt {prompt:?}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let client = ClusterClient::new(&cluster.endpoint).unwrap();
    eventually(
        Duration::from_secs(10),
        "no step spilled over a capacity of 1 row",
        || {
            let mut client = client.clone();
            async move {
                let s = client.status().await.unwrap();
                let overflow: u64 = s.workers.iter().map(|w| w.overflow_dispatches).sum();
                if overflow > 0 { Ok(()) } else { Err(overflow) }
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_on_the_wire_halves_the_row_bytes_and_moves_logits_by_rounding_only() {
    // Proves: `--wire-dtype bf16` sends rows (and gets answers) as bf16: the dispatch traffic
    // shrinks towards half of f32's (assignment metadata stays as it is), and logits move from
    // the engine's only by bf16 rounding of the expert inputs and outputs, while f32 stays
    // within float noise of the engine.
    let (prompt, want) = prompts_with_gap(&tiny(), &[9], 6, 0.05).remove(0);
    let mut engine = Engine::load(&tiny(), EngineOptions::default()).unwrap();
    let want_logits = engine
        .generate_greedy(std::slice::from_ref(&prompt), 6, &[], true)
        .unwrap()
        .remove(0)
        .step_logits;
    // bf16 keeps ~3 significant digits of each expert input and output: allow 2% of the
    // logits' scale (the GPU tests' bound for bf16 activations is 5%); f32 is float noise.
    let scale = want_logits.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    let mut traffic = Vec::new();
    for (dtype, tolerance) in [("f32", 1e-4), ("bf16", 2e-2 * scale)] {
        let cluster = LocalCluster::start(moectl(), &tiny(), 1, 2, &["--wire-dtype", dtype]);
        let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
        let mut req = greedy(&prompt, 6);
        req.return_token_logits = true;
        let got = client.generate(&req).await.unwrap();
        assert_eq!(got.tokens, want, "{dtype}");
        let diff = got
            .token_logits
            .iter()
            .zip(&want_logits)
            .map(|(g, w)| max_abs_diff(w, g))
            .fold(0.0f64, f64::max);
        eprintln!("{dtype}: max |logit - engine| = {diff:.3e} of scale {scale:.3e}");
        assert!(
            diff < tolerance,
            "{dtype}: logits differ by {diff} (tolerance {tolerance})"
        );
        // Counters arrive with heartbeats: wait (bounded) until they are in and settled.
        // Settled: the same nonzero total 300 ms (more than a heartbeat) apart.
        let what = format!("{dtype}: dispatch bytes never settled");
        let bytes = eventually(Duration::from_secs(10), what, || {
            let mut client = client.clone();
            async move {
                let total = |s: ClusterStatusResponse| s.workers.iter().map(|w| w.dispatch_bytes).sum::<u64>();
                let first = total(client.status().await.unwrap());
                tokio::time::sleep(Duration::from_millis(300)).await;
                let second = total(client.status().await.unwrap());
                if second > 0 && second == first {
                    Ok(second)
                } else {
                    Err((first, second))
                }
            }
        })
        .await;
        traffic.push((diff, bytes));
    }
    let ((f32_diff, f32_bytes), (bf16_diff, bf16_bytes)) = (traffic[0], traffic[1]);
    assert!(
        bf16_diff > f32_diff,
        "bf16 rounding left no trace: {bf16_diff} vs {f32_diff}"
    );
    let ratio = bf16_bytes as f64 / f32_bytes as f64;
    eprintln!("dispatch bytes: f32 {f32_bytes}, bf16 {bf16_bytes} ({ratio:.3})");
    assert!((0.4..0.8).contains(&ratio), "bf16 / f32 dispatch bytes = {ratio}");
}
