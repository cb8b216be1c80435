//! Bad command-line flags of this session's features are refused at start-up with a message
//! that names the problem (and nothing is started).

use std::process::Command;

mod common;
use common::*;

/// Runs `moectl args...` and returns (succeeded, stderr).
fn moectl_with(args: &[&str]) -> (bool, String) {
    let out = Command::new(moectl()).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn refused(args: &[&str], says: &[&str]) {
    let (ok, stderr) = moectl_with(args);
    assert!(!ok, "{args:?} was accepted");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    for s in says {
        assert!(stderr.contains(s), "{args:?}: `{s}` not in: {stderr}");
    }
}

#[test]
fn bad_flags_are_refused_by_name() {
    let model = tiny();
    let model = model.to_str().unwrap();
    let coordinator = ["coordinator", "--listen", "127.0.0.1:0", "--model", model];
    let with =
        |extra: &[&'static str]| -> Vec<&str> { coordinator.iter().copied().chain(extra.iter().copied()).collect() };
    refused(
        &with(&["--rebalance-threshold", "0.5"]),
        &["--rebalance-threshold", "above 1"],
    );
    refused(&with(&["--rebalance-threshold", "NaN"]), &["--rebalance-threshold"]);
    refused(&with(&["--load-window-s", "0"]), &["--load-window-s"]);
    refused(
        &with(&["--etcd", "http://127.0.0.1:1", "--etcd-prefix", "cluster"]),
        &["must start with `/`"],
    );
    refused(
        &with(&["--etcd", "http://127.0.0.1:1", "--leader-ttl-s", "1"]),
        &["--leader-ttl-s", "at least 2"],
    );
    refused(&with(&["--etcd-user", "root"]), &["--etcd-password-file"]);
    refused(
        &[
            "attention-worker",
            "--coordinator",
            "127.0.0.1:1",
            "--slot-capacity",
            "0",
            "--model",
            model,
        ],
        &["--slot-capacity"],
    );
    let attention = |flag: &'static str, value: &'static str| {
        let set = format!("{flag}={value}");
        refused(
            &[
                "attention-worker",
                "--coordinator",
                "127.0.0.1:1",
                &set,
                "--model",
                model,
            ],
            &[flag],
        )
    };
    attention("--capacity-factor", "-2");
    attention("--capacity-factor", "inf");
    attention("--kv-blocks", "0");
    attention("--block-size", "0");
    attention("--max-batch-tokens", "0");
    attention("--max-running", "0");
    attention("--heartbeat-ms", "0");
    attention("--micro-batches", "0");
    attention("--micro-batches", "3");
    attention("--micro-batch-min-rows", "0");
    refused(
        &[
            "attention-worker",
            "--coordinator",
            "127.0.0.1:1",
            "--micro-batches",
            "2",
            "--capacity-policy",
            "drop",
            "--model",
            model,
        ],
        &["--micro-batches 2 needs --capacity-policy exact"],
    );
    refused(&["up", "--micro-batches", "3", "--model", model], &["--micro-batches"]);
    refused(
        &["up", "--micro-batch-min-rows", "0", "--model", model],
        &["--micro-batch-min-rows"],
    );
    for flag in [
        "--expert-workers",
        "--attention-workers",
        "--coordinators",
        "--kv-blocks",
    ] {
        refused(&["up", flag, "0", "--model", model], &[flag]);
    }
    for flag in ["--concurrency", "--requests", "--prompt-len", "--gen-len"] {
        refused(&["bench", flag, "0", "--model", model], &[flag]);
    }
    refused(&["gpu-bench", "--rows", "8,0"], &["--rows"]);
    refused(
        &["up", "--coordinators", "2", "--model", model],
        &["--coordinators 2 needs --etcd"],
    );
    let out = tempfile::tempdir().unwrap();
    refused(
        &[
            "gen-model",
            "--preset",
            "tiny",
            "--skew=-1",
            "--out",
            out.path().to_str().unwrap(),
        ],
        &["router skew -1"],
    );
    refused(
        &["rebalance", "--endpoint", "127.0.0.1:1", "--wait-s", "x"],
        &["--wait-s"],
    );
}

/// `generate --endpoint` needs no model directory for ids (the built-in model is not built on
/// disk), and refuses `--prompt` without `--model` rather than guessing the cluster's tokenizer.
#[test]
fn generate_through_an_endpoint_builds_no_model() {
    let cache = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(moectl())
            .env("MOECTL_CACHE_DIR", cache.path())
            .arg("generate")
            .args(["--endpoint", "127.0.0.1:1"])
            .args(args)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // Nothing listens on port 1: the call fails, but only after skipping the model.
    let (ok, stderr) = run(&["--prompt-ids", "5,6"]);
    assert!(!ok, "nothing listens on 127.0.0.1:1: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let cached: Vec<_> = std::fs::read_dir(cache.path()).unwrap().collect();
    assert!(cached.is_empty(), "the built-in model was built: {cached:?}");
    let (ok, stderr) = run(&["--prompt", "hello"]);
    assert!(!ok);
    assert!(stderr.contains("--model"), "{stderr}");
    assert!(std::fs::read_dir(cache.path()).unwrap().next().is_none());
}
