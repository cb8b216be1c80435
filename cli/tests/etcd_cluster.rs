//! The cluster with its membership in a real etcd (started by the harness from the `etcd`
//! binary) and, where it matters, two coordinators: real processes on 127.0.0.1. What each test
//! proves is stated at its top.

use std::time::Duration;

use moe_coordinator::registry::{EtcdOptions, EtcdRegistry, Registry, Snapshot};
use moe_proto::v1::Role;
use moe_runtime::client::ClusterClient;
use moe_tests::cluster::LocalCluster;
use moe_tests::etcd::Etcd;

mod common;
use common::*;

const PREFIX: &str = "/hunyuan-moe/test";

/// A registry client of the test cluster's prefix.
async fn registry(etcd: &Etcd) -> EtcdRegistry {
    EtcdRegistry::connect(EtcdOptions {
        endpoints: vec![etcd.endpoint.clone()],
        prefix: PREFIX.into(),
        member_ttl: Duration::from_secs(30),
        request_timeout: Duration::from_secs(2),
        credentials: None,
        tls: None,
    })
    .await
    .unwrap()
}

/// What the cluster has recorded in etcd.
async fn recorded(etcd: &Etcd) -> Snapshot {
    registry(etcd).await.load().await.unwrap()
}

fn up_args(etcd: &Etcd, coordinators: usize) -> Vec<String> {
    vec![
        "--etcd".into(),
        etcd.endpoint.clone(),
        "--etcd-prefix".into(),
        PREFIX.into(),
        "--coordinators".into(),
        coordinators.to_string(),
    ]
}

fn start(etcd: &Etcd, coordinators: usize, experts: usize) -> LocalCluster {
    let args = up_args(etcd, coordinators);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    LocalCluster::start(moectl(), &tiny(), 1, experts, &args)
}

/// The coordinator that answers the client API (the others are standbys: UNAVAILABLE).
async fn leader(cluster: &LocalCluster) -> String {
    for address in cluster.addresses("coordinator") {
        let mut c = ClusterClient::new(&address).unwrap();
        if c.status().await.is_ok() {
            return address;
        }
    }
    panic!("no coordinator leads");
}

/// Waits (bounded) until `check` holds for the recorded state.
async fn wait_recorded(etcd: &Etcd, what: &str, check: impl Fn(&Snapshot) -> bool) -> Snapshot {
    let check = &check;
    eventually(
        Duration::from_secs(30),
        format!("{what}: never seen in etcd"),
        || async move {
            let s = recorded(etcd).await;
            if check(&s) { Ok(s) } else { Err(s) }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_coordinator_mid_stream_loses_no_token() {
    // Proves: with two coordinators, kill -9 of the leader mid-stream is survived end to end:
    // the standby wins the election, takes the members and placement from etcd (no worker
    // registers again, no expert moves), workers follow it, and each client stream continues
    // on it from the tokens already received: no failure, no gap, no repeat, tokens identical
    // to an undisturbed run.
    const STEPS: u32 = 150;
    let etcd = Etcd::start();
    let prompts = prompts_with_gap(&tiny(), &[4, 11, 23], STEPS as usize, 2e-4);
    let cluster = start(&etcd, 2, 2);
    let before = wait_recorded(&etcd, "members recorded", |s| {
        s.members.len() == 3 && s.placement.is_some()
    })
    .await;
    let old = leader(&cluster).await;
    let streams = start_tracked(&cluster.endpoint, &prompts, STEPS).await;
    let index = cluster.addresses("coordinator").iter().position(|a| *a == old).unwrap();
    cluster.kill("coordinator", index);
    assert_some_unfinished(&streams, STEPS);
    assert_streams_match(streams, &prompts).await;
    let new = leader(&cluster).await;
    assert_ne!(new, old, "the standby leads");
    let mut client = ClusterClient::new(&new).unwrap();
    let status = client.status().await.unwrap();
    let ids = |s: &Snapshot| s.members.iter().map(|m| m.id.clone()).collect::<Vec<_>>();
    let mut live: Vec<String> = status.workers.iter().map(|w| w.worker_id.clone()).collect();
    live.sort();
    let mut recorded_ids = ids(&before);
    recorded_ids.sort();
    assert_eq!(live, recorded_ids, "the same members, under the same ids");
    assert_eq!(
        status.placement_version,
        before.placement.unwrap().version,
        "the placement carried over unchanged"
    );
    assert_eq!(
        status
            .workers
            .iter()
            .filter(|w| w.role == Role::Expert as i32)
            .map(|w| w.expert_slots.len())
            .sum::<usize>(),
        128
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarts_and_data_loss_do_not_stop_serving() {
    // Proves: (1) etcd killed and restarted on its data while requests stream: zero failed
    // requests, identical tokens, and the registry works afterwards (a joining worker is
    // recorded); (2) etcd restarted empty (its data lost): the coordinator's lease is gone, it
    // steps down, wins again, records every member and the placement again, and serves.
    const STEPS: u32 = 150;
    let mut etcd = Etcd::start();
    let prompts = prompts_with_gap(&tiny(), &[6, 13, 29], STEPS as usize, 2e-4);
    let cluster = start(&etcd, 1, 2);
    wait_recorded(&etcd, "members recorded", |s| s.members.len() == 3).await;

    let streams = start_tracked(&cluster.endpoint, &prompts, STEPS).await;
    etcd.kill();
    assert_some_unfinished(&streams, STEPS);
    tokio::time::sleep(Duration::from_millis(500)).await; // down for a while, not just a blip
    etcd.restart();
    assert_streams_match(streams, &prompts).await;
    let joiner = start_expert_worker(&cluster.endpoint, &[]);
    wait_recorded(&etcd, "the joiner recorded after the restart", |s| s.members.len() == 4).await;

    etcd.restart_empty();
    let s = wait_recorded(&etcd, "everything recorded again after data loss", |s| {
        s.members.len() == 4 && s.placement.is_some()
    })
    .await;
    assert!(s.members.iter().filter(|m| m.role == Role::Expert).count() == 3);
    // The prefix is claimed for this cluster's model again: another model is refused.
    let err = registry(&etcd)
        .await
        .claim("another-model")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("holds a cluster of model"), "{err}");
    let mut client = ClusterClient::new(&cluster.endpoint)
        .unwrap()
        .with_retry_window(Duration::from_secs(30));
    for (prompt, want) in &prompts {
        assert_eq!(&client.generate(&greedy(prompt, STEPS)).await.unwrap().tokens, want);
    }
    drop(joiner);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_fails_nothing_while_an_expert_worker_dies_and_another_joins() {
    // Proves the acceptance run: `moectl up --etcd` plus `moectl bench` reports
    // `failed: 0` while an expert worker is killed (-9) and another one is started.
    let etcd = Etcd::start();
    let cluster = start(&etcd, 1, 3);
    let bench = std::process::Command::new(moectl())
        .args([
            "bench",
            "--requests",
            "48",
            "--concurrency",
            "6",
            "--prompt-len",
            "12",
            "--gen-len",
            "120",
            "--no-machine",
            "--endpoint",
            &cluster.endpoint,
            "--model",
        ])
        .arg(tiny())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    // Under load: the coordinator has requests running.
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    eventually(Duration::from_secs(60), "bench never got going", || {
        let mut client = client.clone();
        async move {
            match client.status().await.unwrap().running_requests {
                0 => Err("no running request"),
                _ => Ok(()),
            }
        }
    })
    .await;
    cluster.kill("expert-worker", 0);
    let joiner = start_expert_worker(&cluster.endpoint, &[]);
    assert!(
        client.status().await.unwrap().running_requests > 0,
        "bench finished before the disruption; the test proved nothing"
    );
    let out = bench.wait_with_output().unwrap();
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench prints JSON");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["load"]["requests"], 48, "{report}");
    wait_recorded(&etcd, "the dead worker gone and the joiner recorded", |s| {
        s.members.iter().filter(|m| m.role == Role::Expert).count() == 3
    })
    .await;
    drop(joiner);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_on_an_etcd_that_requires_tls_and_client_certificates() {
    // Proves: with etcd serving TLS only and requiring client certificates, the registry
    // connects with the CA and a client certificate (and not without them), and `moectl up`
    // elects its coordinator and serves through it.
    let certs = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(moectl())
        .args(["gen-certs", "--out"])
        .arg(certs.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let files = moe_tests::etcd::EtcdTls {
        ca: certs.path().join("ca.pem"),
        cert: certs.path().join("node.pem"),
        key: certs.path().join("node.key"),
    };
    let etcd = Etcd::start_tls(files.clone());
    assert!(etcd.endpoint.starts_with("https://"));
    let options = |tls| EtcdOptions {
        endpoints: vec![etcd.endpoint.clone()],
        prefix: PREFIX.into(),
        member_ttl: Duration::from_secs(30),
        request_timeout: Duration::from_secs(2),
        credentials: None,
        tls,
    };
    let mutual = moe_runtime::tls::ClientTls::from_files(&files.ca, Some((&files.cert, &files.key))).unwrap();
    let mut reg = eventually(Duration::from_secs(20), "TLS etcd never answered", || {
        let options = options(Some(mutual.clone()));
        async move {
            let mut r = EtcdRegistry::connect(options).await.map_err(|e| e.to_string())?;
            r.claim("probe-model").await.map_err(|e| e.to_string())?;
            Ok::<_, String>(r)
        }
    })
    .await;
    assert!(reg.load().await.unwrap().members.is_empty());
    // Without a client certificate, etcd refuses.
    let ca_only = moe_runtime::tls::ClientTls::from_files(&files.ca, None).unwrap();
    let refused = match EtcdRegistry::connect(options(Some(ca_only))).await {
        Ok(mut r) => r.load().await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "etcd served a client without a certificate");

    let cluster = LocalCluster::start(
        moectl(),
        &tiny(),
        1,
        1,
        &[
            "--etcd",
            &etcd.endpoint,
            "--etcd-prefix",
            "/hunyuan-moe/tls",
            "--etcd-ca",
            files.ca.to_str().unwrap(),
            "--etcd-cert",
            files.cert.to_str().unwrap(),
            "--etcd-key",
            files.key.to_str().unwrap(),
        ],
    );
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    assert_eq!(client.generate(&greedy(&[5, 6, 7], 4)).await.unwrap().tokens.len(), 4);
}
