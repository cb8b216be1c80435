//! Disruptions survived without a failed request or a changed token: a client that goes away,
//! kill -9 of a worker, a frozen worker, a worker joining, drain and SIGTERM.

use std::time::Duration;

use moe_proto::v1::Role;
use moe_runtime::client::ClusterClient;
use moe_tests::cluster::LocalCluster;
use tokio_stream::StreamExt;

use crate::common::*;
use crate::{http_get, wait_idle};

/// moe_worker_departures_total by reason, from the coordinator's metrics at `addr`.
fn departures(addr: &str) -> std::collections::BTreeMap<String, f64> {
    let (code, body) = http_get(addr, "/metrics");
    assert_eq!(code, 200);
    let prefix = "moe_worker_departures_total{reason=\"";
    body.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|l| {
            let (reason, value) = l.split_once("\"} ").unwrap();
            (reason.to_owned(), value.parse().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_frees_its_kv_blocks() {
    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 2, &[]);
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    let mut stream = client.generate_stream(&greedy(&[5, 6, 7, 8, 9], 2000)).await.unwrap();
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    // Heartbeats carry the worker's counters: wait (bounded) until one shows the request.
    eventually(Duration::from_secs(10), "the request never showed as running", || {
        let mut client = client.clone();
        async move {
            let s = client.status().await.unwrap();
            let attn = s
                .workers
                .into_iter()
                .find(|w| w.role == Role::Attention as i32)
                .unwrap();
            if attn.kv_blocks_used > 0 && attn.running == 1 {
                Ok(())
            } else {
                Err(attn)
            }
        }
    })
    .await;
    drop(stream);
    wait_idle(&client, "KV blocks were not freed after the client went away").await;
    // The cluster still serves.
    assert_eq!(client.generate(&greedy(&[5, 6, 7], 4)).await.unwrap().tokens.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_an_expert_worker_under_load_fails_no_request() {
    // Proves: a dead expert worker is routed around (its experts re-loaded on the survivors from
    // the checkpoint, the interrupted layer steps retried on the new placement) with zero failed
    // requests and tokens identical to a run without the failure.
    const STEPS: u32 = 150;
    // Re-placement changes how each row's expert sum is split over workers (float rounding
    // ~1e-6), so only prompts whose greedy choices are clear by 2e-4 are used.
    let prompts = prompts_with_gap(&tiny(), &[3, 8, 15, 21, 30, 5], STEPS as usize, 2e-4);
    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 3, &["--metrics-listen", "127.0.0.1:0"]);
    let streams = start_tracked(&cluster.endpoint, &prompts, STEPS).await;
    let killed = cluster.kill("expert-worker", 1);
    assert_some_unfinished(&streams, STEPS);
    assert_streams_match(streams, &prompts).await;
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    let status = client.status().await.unwrap();
    let experts: Vec<_> = status
        .workers
        .iter()
        .filter(|w| w.role == Role::Expert as i32)
        .collect();
    assert_eq!(experts.len(), 2, "the dead worker is gone from membership");
    assert!(experts.iter().all(|w| w.address != killed.address));
    assert!(status.placement_version >= 2, "a new placement was made");
    // The two survivors hold all 64 experts of both layers between them.
    assert_eq!(experts.iter().map(|w| w.expert_slots.len()).sum::<usize>(), 128);
    // Counted as a departure without a drain (what MoeWorkerFlapping alerts on).
    let d = departures(cluster.metrics.as_deref().expect("metrics address printed"));
    assert_eq!(d["drained"], 0.0, "{d:?}");
    assert_eq!(d.values().sum::<f64>(), 1.0, "{d:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_an_attention_worker_mid_stream_loses_no_token() {
    // Proves: requests of a dead attention worker resume on another one from prompt + streamed
    // tokens; each client's stream continues with no token missing or repeated, and the tokens
    // are those of an undisturbed run.
    const STEPS: u32 = 150;
    let prompts = prompts_with_gap(&tiny(), &[4, 9, 14, 25], STEPS as usize, 2e-4);
    let cluster = LocalCluster::start(moectl(), &tiny(), 2, 2, &[]);
    let streams = start_tracked(&cluster.endpoint, &prompts, STEPS).await;
    cluster.kill("attention-worker", 0);
    assert_some_unfinished(&streams, STEPS);
    assert_streams_match(streams, &prompts).await;
    // New requests keep working on the survivor.
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    assert_eq!(client.generate(&greedy(&[5, 6], 3)).await.unwrap().tokens.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expert_worker_joining_under_load_changes_nothing_but_the_placement() {
    // Proves: a new expert worker gets a share of the experts through a new placement version
    // that is switched to only after it has loaded them; requests running across the switch
    // neither fail nor change.
    const STEPS: u32 = 150;
    let prompts = prompts_with_gap(&tiny(), &[3, 10, 19, 27], STEPS as usize, 2e-4);
    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 2, &[]);
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    let before = client.status().await.unwrap().placement_version;
    let streams = start_tracked(&cluster.endpoint, &prompts, STEPS).await;
    let joiner = start_expert_worker(&cluster.endpoint, &[]);
    assert_streams_match(streams, &prompts).await;
    // The switch happens (bounded wait): three workers share the experts 22/21/21.
    eventually(Duration::from_secs(20), "the new worker never got experts", || {
        let mut client = client.clone();
        async move {
            let s = client.status().await.unwrap();
            let sizes = experts_per_layer(&s, 2);
            if s.placement_version > before && sizes == [21, 21, 22] {
                Ok(())
            } else {
                Err(format!("{sizes:?} at v{}", s.placement_version))
            }
        }
    })
    .await;
    // And the cluster computes the same tokens on the new placement.
    for (prompt, want) in &prompts {
        assert_eq!(&client.generate(&greedy(prompt, STEPS)).await.unwrap().tokens, want);
    }
    drop(joiner);
}

fn worker_id_at(status: &moe_proto::v1::ClusterStatusResponse, address: &str) -> String {
    status
        .workers
        .iter()
        .find(|w| w.address == address)
        .map(|w| w.worker_id.clone())
        .expect("worker registered")
}

/// Waits (bounded) for a process to exit by itself; panics with `what` if it does not.
fn wait_exit(pid: u32, what: &str) {
    eventually_blocking(Duration::from_secs(30), what, || {
        // `kill -0` fails once the process is gone (our own children are reaped by `moectl up`).
        let alive = std::process::Command::new("kill")
            .args(["-0", &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(false);
        if !alive || zombie {
            Ok(())
        } else {
            Err(format!("process {pid} still running"))
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_workers_leave_without_failing_a_request() {
    // Proves: `moectl drain` of an expert worker moves its experts first and of an attention
    // worker lets its requests finish; both processes then exit by themselves, and no request
    // fails or changes. The last worker of a kind cannot be drained.
    const STEPS: u32 = 150;
    let prompts = prompts_with_gap(&tiny(), &[2, 7, 13, 22], STEPS as usize, 2e-4);
    let cluster = LocalCluster::start(moectl(), &tiny(), 2, 3, &[]);
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    let status = client.status().await.unwrap();
    let expert = cluster
        .processes
        .iter()
        .find(|p| p.role == "expert-worker")
        .unwrap()
        .clone();
    let attention = cluster
        .processes
        .iter()
        .find(|p| p.role == "attention-worker")
        .unwrap()
        .clone();
    let (expert_id, attention_id) = (
        worker_id_at(&status, &expert.address),
        worker_id_at(&status, &attention.address),
    );

    let streams = start_tracked(&cluster.endpoint, &prompts, STEPS).await;
    for id in [&expert_id, &attention_id] {
        let out = std::process::Command::new(moectl())
            .args([
                "drain",
                "--endpoint",
                &cluster.endpoint,
                "--worker",
                id,
                "--wait-s",
                "0",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "drain {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_streams_match(streams, &prompts).await;
    wait_exit(expert.pid, "the drained expert worker did not leave");
    wait_exit(attention.pid, "the drained attention worker did not leave");
    let status = client.status().await.unwrap();
    assert!(
        status
            .workers
            .iter()
            .all(|w| w.worker_id != expert_id && w.worker_id != attention_id)
    );
    // The remaining attention worker cannot be drained: it is the last one.
    let last = status
        .workers
        .iter()
        .find(|w| w.role == Role::Attention as i32)
        .unwrap()
        .worker_id
        .clone();
    let out = std::process::Command::new(moectl())
        .args([
            "drain",
            "--endpoint",
            &cluster.endpoint,
            "--worker",
            &last,
            "--wait-s",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("last attention worker"));
    // The cluster still serves the same tokens.
    for (prompt, want) in &prompts {
        assert_eq!(&client.generate(&greedy(prompt, STEPS)).await.unwrap().tokens, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_expert_worker_under_load() {
    // Proves: SIGTERM makes an expert worker drain itself (its experts move first), then exit;
    // no request fails or changes. This is a Kubernetes scale-down of the expert pool from 3
    // to 2 (deploy/k8s: the pod gets SIGTERM, no preStop hook), under load.
    const STEPS: u32 = 150;
    let prompts = prompts_with_gap(&tiny(), &[6, 11, 18], STEPS as usize, 2e-4);
    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 3, &["--metrics-listen", "127.0.0.1:0"]);
    let streams = start_tracked(&cluster.endpoint, &prompts, STEPS).await;
    let expert = cluster
        .processes
        .iter()
        .find(|p| p.role == "expert-worker")
        .unwrap()
        .clone();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &expert.pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert_some_unfinished(&streams, STEPS);
    assert_streams_match(streams, &prompts).await;
    wait_exit(expert.pid, "the expert worker did not leave after SIGTERM");
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    let status = client.status().await.unwrap();
    assert!(status.workers.iter().all(|w| w.address != expert.address));
    let experts: Vec<_> = status
        .workers
        .iter()
        .filter(|w| w.role == Role::Expert as i32)
        .collect();
    assert_eq!(experts.len(), 2);
    // The two survivors hold every (layer, expert) slot between them, each a share.
    let held: std::collections::BTreeSet<u32> = experts.iter().flat_map(|w| w.expert_slots.iter().copied()).collect();
    assert_eq!(held.len(), 128, "every expert is still held");
    assert!(
        experts.iter().all(|w| !w.expert_slots.is_empty()),
        "both survivors hold experts"
    );
    // A scale-down is a drain, not a failure: MoeWorkerFlapping does not count it.
    let d = departures(cluster.metrics.as_deref().expect("metrics address printed"));
    assert_eq!(d["drained"], 1.0, "{d:?}");
    assert_eq!(d.values().sum::<f64>(), 1.0, "{d:?}");
    // The cluster still serves the same tokens.
    for (prompt, want) in &prompts {
        assert_eq!(&client.generate(&greedy(prompt, STEPS)).await.unwrap().tokens, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_expert_worker_loses_its_lease_and_rejoins() {
    // Proves: an expert worker that stops heartbeating (SIGSTOP: its connections stay open but
    // nothing answers) is dropped when its lease runs out (3 s); requests waiting on it move to
    // the new placement and complete unchanged; once it runs again it finds itself forgotten,
    // registers anew and gets experts again.
    const STEPS: u32 = 150;
    let prompts = prompts_with_gap(&tiny(), &[5, 12, 20], STEPS as usize, 2e-4);
    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 2, &[]);
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    let streams = start_tracked(&cluster.endpoint, &prompts, STEPS).await;
    let frozen = cluster
        .processes
        .iter()
        .find(|p| p.role == "expert-worker")
        .unwrap()
        .clone();
    let signal = |sig: &str| {
        assert!(
            std::process::Command::new("kill")
                .args([sig, &frozen.pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    assert_some_unfinished(&streams, STEPS);
    assert_streams_match(streams, &prompts).await;
    let status = client.status().await.unwrap();
    assert!(
        status.workers.iter().all(|w| w.address != frozen.address),
        "the frozen worker is still a member"
    );
    signal("-CONT");
    eventually(
        Duration::from_secs(30),
        "the worker did not rejoin with experts",
        || {
            let mut client = client.clone();
            let address = frozen.address.clone();
            async move {
                let s = client.status().await.unwrap();
                let back = s.workers.into_iter().find(|w| w.address == address);
                match back {
                    Some(w) if !w.expert_slots.is_empty() => Ok(()),
                    other => Err(other),
                }
            }
        },
    )
    .await;
    for (prompt, want) in &prompts {
        assert_eq!(&client.generate(&greedy(prompt, STEPS)).await.unwrap().tokens, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moectl_up_reaps_and_reports_a_dead_worker_and_restarts_it_when_asked() {
    // Proves: `moectl up` notices a child's death at once (an EXITED line naming it, how and
    // when), leaves no zombie, and with --restart-workers starts a replacement that rejoins, so
    // the cluster is whole again and serves.
    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 2, &["--restart-workers"]);
    let killed = cluster.kill("expert-worker", 0);
    let exited = cluster
        .wait_for_line("EXITED ", Duration::from_secs(20))
        .expect("no EXITED line for the killed worker");
    assert!(
        exited.starts_with(&format!("EXITED expert-worker pid={} signal 9 after=", killed.pid)),
        "{exited}"
    );
    // Reaped: no zombie left behind (a zombie keeps its /proc entry).
    assert!(
        !std::path::Path::new(&format!("/proc/{}", killed.pid)).exists(),
        "pid {} left a zombie",
        killed.pid
    );
    let restarted = cluster
        .wait_for_line("PROCESS expert-worker ", Duration::from_secs(60))
        .expect("no replacement was started");
    assert!(!restarted.contains(&format!("pid={} ", killed.pid)), "{restarted}");
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    eventually(Duration::from_secs(60), "the replacement never got experts", || {
        let mut client = client.clone();
        async move {
            let s = client.status().await.unwrap();
            let sizes = experts_per_layer(&s, 2);
            if sizes.len() == 2 && sizes.iter().all(|&n| n > 0) {
                Ok(())
            } else {
                Err(format!("{sizes:?} at v{}", s.placement_version))
            }
        }
    })
    .await;
    assert_eq!(client.generate(&greedy(&[5, 6], 3)).await.unwrap().tokens.len(), 3);
}
