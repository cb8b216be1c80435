//! `--device` on an expert worker: a GPU that cannot be used is a clear start-up error (which
//! build, which library, which device), never a panic.

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

fn expert_worker_with(device: &str) -> (bool, String) {
    moectl_run(
        &["expert-worker", "--coordinator", "127.0.0.1:1", "--device", device],
        true,
    )
}

#[test]
fn an_unusable_gpu_stops_the_expert_worker_with_the_reason() {
    let (ok, stderr) = expert_worker_with("cuda:0");
    assert!(!ok);
    assert!(!stderr.contains("panicked"), "{stderr}");
    // This build has no CUDA support, or this machine has no driver / no such GPU.
    assert!(
        stderr.contains("--features cuda") || stderr.contains("libcuda") || stderr.contains("GPU 0"),
        "{stderr}"
    );
    let (ok, stderr) = expert_worker_with("tpu:3");
    assert!(!ok);
    assert!(
        stderr.contains("tpu:3") && stderr.contains("cpu, cuda or cuda:N"),
        "{stderr}"
    );
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
