//! Correctness: the same tokens and logits as the single-process engine and the golden
//! fixtures, for several worker counts and model shapes; concurrent clients; bench's output.

use std::path::Path;

use moe_model::{Engine, EngineOptions};
use moe_model_tools::golden::max_abs_diff;
use moe_runtime::client::ClusterClient;
use moe_tests::cluster::LocalCluster;
use moe_tests::fixtures_dir;

use crate::common::*;

fn check_golden_through(endpoint: &str, fixture: &Path) {
    let out = std::process::Command::new(moectl())
        .args(["check-golden", "--endpoint", endpoint, "--fixture"])
        .arg(fixture)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        out.status.success(),
        "check-golden through the cluster failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("0 failed: PASS"));
    for q in ["prefill_logits", "decode_logits", "gen_ids"] {
        assert!(text.contains(q), "no {q} check ran");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_matches_engine_and_golden_for_several_shapes() {
    let prompts = decisive_prompts(&tiny(), &[1, 4, 11, 29], 12);
    for (attention, experts) in [(1, 1), (2, 3), (1, 4)] {
        let cluster = LocalCluster::start(moectl(), &tiny(), attention, experts, &[]);
        assert_eq!(cluster.addresses("expert-worker").len(), experts);
        let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
        for (prompt, want) in &prompts {
            let got = client.generate(&greedy(prompt, 12)).await.unwrap();
            assert_eq!(&got.tokens, want, "{attention}+{experts}: prompt {prompt:?}");
        }
        check_golden_through(&cluster.endpoint, &tiny());
        // Uneven slices: 64 experts over 3 workers are 22/21/21 per layer.
        let sizes = experts_per_layer(&client.status().await.unwrap(), 2);
        let want: Vec<usize> = match experts {
            1 => vec![64],
            3 => vec![21, 21, 22],
            4 => vec![16, 16, 16, 16],
            _ => unreachable!(),
        };
        assert_eq!(sizes, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_passes_fixtures_it_was_not_built_around() {
    // Other shapes: top-4 with an untied LM head and 3 layers; CLA with top-1 (Hunyuan-Large).
    for name in ["odd-layers-untied", "hunyuan-large-tiny"] {
        let fixture = fixtures_dir().join(name);
        let cluster = LocalCluster::start(moectl(), &fixture, 2, 3, &[]);
        check_golden_through(&cluster.endpoint, &fixture);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fp8_fixture_passes_through_a_cluster() {
    // Static per-tensor FP8 (Tencent's FP8 layout): each expert worker loads its experts'
    // F8_E4M3 weights and scales from the checkpoint, the attention workers theirs, and both
    // compute with them as FP8; the result must match the FP8 fixture at the f32 tolerances.
    let fixture = fixtures_dir().join("hunyuan-tiny-fp8");
    let cluster = LocalCluster::start(moectl(), &fixture, 2, 3, &[]);
    assert_eq!(cluster.addresses("expert-worker").len(), 3);
    check_golden_through(&cluster.endpoint, &fixture);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_each_get_what_they_get_alone() {
    let lens: Vec<usize> = (0..16).map(|i| 1 + (i * 7) % 40).collect();
    let prompts = decisive_prompts(&tiny(), &lens, 10);
    // A small KV pool and batch budget so admission waits, chunked prefill and preemption run.
    let cluster = LocalCluster::start(moectl(), &tiny(), 2, 2, &["--kv-blocks", "24", "--block-size", "4"]);
    let mut tasks = Vec::new();
    for (prompt, want) in prompts.clone() {
        let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
        tasks.push(tokio::spawn(async move {
            let got = client.generate(&greedy(&prompt, 10)).await.unwrap();
            (prompt, want, got.tokens)
        }));
    }
    for t in tasks {
        let (prompt, want, got) = t.await.unwrap();
        assert_eq!(got, want, "prompt of {} tokens", prompt.len());
    }
    // And through SubmitBatch: one call, results per prompt.
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    let reqs: Vec<_> = prompts.iter().map(|(p, _)| greedy(p, 10)).collect();
    let out = client.generate_batch(&reqs).await.unwrap();
    for ((_, want), got) in prompts.iter().zip(out) {
        assert_eq!(&got.tokens, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_and_token_logits_match_the_engine() {
    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 3, &[]);
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    let prompt = vec![5u32, 100, 200, 300, 17, 9];
    let mut req = greedy(&prompt, 5);
    req.return_prompt_logits = true;
    req.return_token_logits = true;
    let got = client.generate(&req).await.unwrap();
    let mut engine = Engine::load(&tiny(), EngineOptions::default()).unwrap();
    let want = engine
        .generate_greedy(std::slice::from_ref(&prompt), 5, &[], true)
        .unwrap()
        .remove(0);
    assert_eq!(got.tokens, want.tokens);
    for (g, w) in got.token_logits.iter().zip(&want.step_logits) {
        assert!(max_abs_diff(w, g) < 1e-4);
    }
    let pl = got.prompt_logits.expect("prompt logits");
    assert_eq!(pl.len(), prompt.len() * 512);
    // The last prompt row produced the first token.
    assert!(max_abs_diff(&pl[(prompt.len() - 1) * 512..], &want.step_logits[0]) < 1e-4);
}

fn bench(extra: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(moectl())
        .args([
            "bench",
            "--requests",
            "6",
            "--concurrency",
            "3",
            "--prompt-len",
            "9",
            "--gen-len",
            "5",
            "--no-machine",
            "--model",
        ])
        .arg(tiny())
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bench prints one JSON object")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_prints_json_for_the_engine_and_a_cluster() {
    let engine = bench(&[]);
    assert_eq!(engine["failed"], 0);
    assert!(engine["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(engine["ttft_ms"]["p99"].as_f64().unwrap() >= engine["ttft_ms"]["p50"].as_f64().unwrap());
    // Each phase counts its own tokens (6 requests of 9 prompt tokens, 5 new tokens of which 4
    // are decoded) over a time within the run.
    let phases = &engine["phases"];
    assert_eq!(phases["prefill"]["prompt_tokens"], 6 * 9, "{phases}");
    assert_eq!(phases["decode"]["tokens"], 6 * 4, "{phases}");
    let wall = engine["wall_s"].as_f64().unwrap();
    for phase in ["prefill", "decode"] {
        let busy = phases[phase]["busy_s"].as_f64().unwrap();
        assert!(busy > 0.0 && busy <= wall, "{phase}: {busy} s in a {wall} s run");
    }
    assert!(
        engine["dispatch_bytes_per_token_per_layer"].is_null(),
        "nothing crosses a wire in process"
    );

    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 2, &[]);
    let remote = bench(&["--endpoint", &cluster.endpoint, "--rebalance"]);
    assert_eq!(remote["failed"], 0);
    // --rebalance: the load ran before and after a rebalance, each measured.
    let balance = &remote["balance"];
    for phase in ["before", "after"] {
        assert_eq!(balance[phase]["failed"], 0, "{balance}");
        let step = balance[phase]["step_imbalance"].as_f64().unwrap();
        assert!(step >= 1.0, "max/mean is at least 1: {balance}");
        assert!(
            balance[phase]["expected_imbalance"].as_f64().unwrap() >= 1.0,
            "{balance}"
        );
    }
    let target = balance["rebalance"]["target_version"].as_u64().unwrap();
    if target > 0 {
        assert_eq!(balance["after"]["placement_version"], target, "{balance}");
    }
    assert!(remote["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    // Each routed row crosses as 64 f32 each way (plus framing), to at most two workers.
    let per_layer = remote["dispatch_bytes_per_token_per_layer"].as_f64().unwrap();
    assert!(
        per_layer > 2.0 * 64.0 * 4.0 && per_layer < 8.0 * 64.0 * 4.0 * 2.0,
        "{per_layer}"
    );
    // Per layer dispatch round trips were counted and timed (values are not compared: speed is
    // not asserted in tests).
    let dispatch = &remote["dispatch"];
    assert!(dispatch["layer_dispatches"].as_u64().unwrap() > 0, "{dispatch}");
    assert!(dispatch["layer_round_trip_ms"].as_f64().unwrap() > 0.0, "{dispatch}");
    assert!(dispatch["expert_ms_per_message"].as_f64().unwrap() > 0.0, "{dispatch}");
    assert!(engine["dispatch"].is_null(), "no dispatches in process");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_layer_cla_model_through_the_cluster_matches_the_engine() {
    // Hunyuan-Large architecture with 5 layers: K/V computed in layers 0, 2, 4; layer 4's group
    // has no cross layer. No reference fixture of this shape exists here, so the cluster is
    // held to the engine, which passes the Large fixture.
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(moectl())
        .args([
            "gen-model",
            "--preset",
            "tiny-large",
            "--layers",
            "5",
            "--seed",
            "21",
            "--dtype",
            "f32",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let engine = Engine::load(dir.path(), EngineOptions::default()).unwrap();
    assert_eq!(engine.cache().num_slots(), 3);
    drop(engine);
    let prompts = decisive_prompts(dir.path(), &[1, 6, 17], 10);
    let cluster = LocalCluster::start(moectl(), dir.path(), 2, 3, &[]);
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    for (prompt, want) in &prompts {
        assert_eq!(&client.generate(&greedy(prompt, 10)).await.unwrap().tokens, want);
    }
}
