//! `--device` on the workers: a GPU that cannot be used is a clear start-up error (which
//! build, which library, which device), never a panic. And, ignored without two GPUs, a
//! cluster on GPUs with its layers over NCCL.

use std::process::Command;

mod common;
use common::*;

/// Runs `moectl args...`; returns whether it succeeded and its stderr.
fn moectl_run(args: &[&str], model: bool) -> (bool, String) {
    let mut cmd = Command::new(moectl());
    cmd.args(args);
    if model {
        cmd.arg("--model").arg(tiny());
    }
    let out = cmd.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn an_unusable_gpu_stops_either_worker_with_the_reason() {
    for role in ["expert-worker", "attention-worker"] {
        let run = |device| moectl_run(&[role, "--coordinator", "127.0.0.1:1", "--device", device], true);
        let (ok, stderr) = run("cuda:0");
        assert!(!ok, "{role}");
        assert!(!stderr.contains("panicked"), "{role}: {stderr}");
        // This build has no CUDA support, or this machine has no driver / no such GPU.
        assert!(
            stderr.contains("--features cuda") || stderr.contains("libcuda") || stderr.contains("GPU 0"),
            "{role}: {stderr}"
        );
        let (ok, stderr) = run("tpu:3");
        assert!(!ok, "{role}");
        assert!(
            stderr.contains("tpu:3") && stderr.contains("cpu, cuda or cuda:N"),
            "{role}: {stderr}"
        );
    }
}

#[test]
fn joining_the_nccl_data_plane_without_a_gpu_and_nccl_stops_a_worker_with_the_reason() {
    for role in ["expert-worker", "attention-worker"] {
        let run = |device| moectl_run(&[role, "--coordinator", "127.0.0.1:1", "--nccl-device", device], true);
        let (ok, stderr) = run("cuda:0");
        assert!(!ok && !stderr.contains("panicked"), "{role}: {stderr}");
        assert!(
            stderr.contains("--features cuda") || stderr.contains("libcuda") || stderr.contains("NCCL"),
            "{role}: {stderr}"
        );
        let (ok, stderr) = run("cpu");
        assert!(!ok, "{role}");
        assert!(stderr.contains("NCCL needs a GPU"), "{role}: {stderr}");
    }
}

#[test]
fn gpu_bench_without_a_usable_gpu_says_why() {
    let run = |device| moectl_run(&["gpu-bench", "--device", device], false);
    let (ok, stderr) = run("cuda:0");
    assert!(!ok && !stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("--features cuda") || stderr.contains("libcuda"),
        "{stderr}"
    );
    let (ok, stderr) = run("cpu");
    assert!(!ok && stderr.contains("use --device cuda:N"), "{stderr}");
}

#[test]
fn a_cluster_on_gpus_that_are_not_usable_does_not_start_and_says_why() {
    let (ok, stderr) = moectl_run(
        &[
            "up",
            "--listen",
            "127.0.0.1:0",
            "--ready-timeout",
            "60",
            "--gpus",
            "cuda:0",
        ],
        true,
    );
    assert!(!ok);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("--features cuda") || stderr.contains("libcuda") || stderr.contains("NCCL"),
        "{stderr}"
    );
    assert!(
        stderr.contains("expert-worker"),
        "names the process that failed: {stderr}"
    );
}

/// The NCCL data plane end to end: one attention worker and one expert worker on two GPUs
/// (NCCL refuses two ranks on one GPU), the layers' rows and answers over NCCL once the group
/// is ready, the engine's first tokens and logits within bf16 tolerance (the expert products
/// run in bf16 on the GPU). `scripts/gpu-check.sh` runs it on hosts with two GPUs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs two NVIDIA GPUs, NCCL and moectl built with --features cuda"]
async fn a_cluster_on_two_gpus_sends_its_layers_over_nccl_and_keeps_the_engines_tokens() {
    use std::time::Duration;

    use moe_model::{Engine, EngineOptions};
    use moe_model_tools::golden::max_abs_diff;
    use moe_runtime::client::ClusterClient;
    use moe_tests::cluster::LocalCluster;

    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 1, &["--gpus", "cuda:0,cuda:1"]);
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    // The group is ready when both workers hold the same epoch's communicator.
    eventually(Duration::from_secs(120), "NCCL group never ready", || {
        let mut client = client.clone();
        async move {
            let s = client.status().await.unwrap();
            let epochs: Vec<u64> = s.workers.iter().map(|w| w.nccl_ready_epoch).collect();
            if epochs.len() == 2 && epochs[0] != 0 && epochs.iter().all(|&e| e == epochs[0]) {
                Ok(())
            } else {
                Err(format!("epochs {epochs:?}"))
            }
        }
    })
    .await;
    // The coordinator tells the attention worker the group is ready in its next heartbeat.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut engine = Engine::load(&tiny(), EngineOptions::default()).unwrap();
    for prompt in [vec![5u32, 100, 200, 300, 17, 9], (7..40).collect()] {
        let want = engine
            .generate_greedy(std::slice::from_ref(&prompt), 4, &[], true)
            .unwrap()
            .remove(0);
        let mut req = greedy(&prompt, 4);
        req.return_token_logits = true;
        let got = client.generate(&req).await.unwrap();
        let scale = want.step_logits[0].iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(&want.step_logits[0], &got.token_logits[0]) as f32;
        eprintln!("first-step logits over NCCL: max |cluster - engine| = {diff:.3e} of scale {scale:.3e}");
        assert!(diff <= 5e-2 * scale, "{diff} vs {scale}");
        assert_eq!(got.tokens[0], want.tokens[0], "first greedy token");
    }
    // The counters arrive with heartbeats.
    eventually(
        Duration::from_secs(10),
        "not every layer dispatch went over NCCL",
        || {
            let mut client = client.clone();
            async move {
                let s = client.status().await.unwrap();
                let (all, nccl): (u64, u64) = s.workers.iter().fold((0, 0), |(a, n), w| {
                    (a + w.layer_dispatches, n + w.nccl_layer_dispatches)
                });
                if all > 0 && nccl == all {
                    eprintln!("{nccl} of {all} layer dispatches went over NCCL");
                    Ok(())
                } else {
                    Err(format!("{nccl} of {all} layer dispatches over NCCL"))
                }
            }
        },
    )
    .await;
}
