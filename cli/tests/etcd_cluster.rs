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

/// The flags of a worker started beside the cluster, so it records itself in the same etcd.
fn worker_etcd_flags(etcd: &Etcd) -> Vec<String> {
    vec![
        "--etcd".into(),
        etcd.endpoint.clone(),
        "--etcd-prefix".into(),
        PREFIX.into(),
    ]
}

fn start_recorded_expert_worker(etcd: &Etcd, endpoint: &str, extra: &[&str]) -> Joiner {
    let mut flags = worker_etcd_flags(etcd);
    flags.extend(extra.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    start_expert_worker(endpoint, &flags)
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
    // recorded); (2) etcd restarted empty (its data lost): every lease is gone; each worker
    // records itself again, the coordinator wins again at once (nobody else campaigns),
    // records the placement again, and serves.
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
    let joiner = start_recorded_expert_worker(&etcd, &cluster.endpoint, &[]);
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
    let joiner = start_recorded_expert_worker(&etcd, &cluster.endpoint, &[]);
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

/// Worker ids and the placement version, as the leader reports them.
async fn membership(client: &mut ClusterClient) -> (Vec<String>, u64) {
    let s = client.status().await.unwrap();
    let mut ids: Vec<String> = s.workers.into_iter().map(|w| w.worker_id).collect();
    ids.sort();
    (ids, s.placement_version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_s_etcd_outage_fails_no_request_and_changes_no_id_or_placement() {
    // Proves: serving does not depend on etcd. With etcd killed for 10 s under a steady load,
    // no request fails, the leader keeps leading, no worker changes id and the placement keeps
    // its version; a rebalance asked for meanwhile waits for etcd (UNAVAILABLE); after etcd is
    // back (on its data) every record is still there.
    let mut etcd = Etcd::start();
    let cluster = start(&etcd, 1, 2);
    wait_recorded(&etcd, "members recorded", |s| s.members.len() == 3).await;
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    let before = membership(&mut client).await;
    let prompts = decisive_prompts(&tiny(), &[7], 24);
    let (prompt, want) = prompts[0].clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, mut client) = (stop.clone(), client.clone());
        tokio::spawn(async move {
            let (mut served, mut failed) = (0usize, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match client.generate(&greedy(&prompt, 24)).await {
                    Ok(g) if g.tokens == want => served += 1,
                    Ok(g) => failed.push(format!("wrong tokens {:?}", g.tokens)),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (served, failed)
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    etcd.kill();
    let outage = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(7)).await;
    // Changes wait for etcd: an operator's rebalance is turned away (UNAVAILABLE, saying why).
    let mut control =
        moe_proto::v1::control_client::ControlClient::new(moe_runtime::net::channel(&cluster.endpoint).unwrap());
    let err = control
        .rebalance(moe_proto::v1::RebalanceRequest { force: true })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.message().contains("etcd is unreachable"), "{err}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = membership(&mut client).await;
    etcd.restart();
    let down = outage.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (served, failed) = load.await.unwrap();
    eprintln!(
        "etcd down for {down:?}: {served} requests served, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(
        served > 10,
        "only {served} requests served: the load did not run through the outage"
    );
    assert_eq!(during, before, "ids or placement changed while etcd was down");
    assert_eq!(
        membership(&mut client).await,
        before,
        "ids or placement changed after etcd came back"
    );
    let s = recorded(&etcd).await;
    let mut ids: Vec<String> = s.members.into_iter().map(|m| m.id).collect();
    ids.sort();
    assert_eq!(ids, before.0, "every worker's record survived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_records_come_and_go_with_them_and_a_recorded_worker_gets_experts() {
    // Proves: a worker's etcd record is its own. A new worker's record appears and the worker
    // gets experts; killed (-9), its record vanishes within its TTL (2 s here); a record
    // written in etcd alone makes the leader list the worker, pending (no experts) until it
    // heartbeats.
    let etcd = Etcd::start();
    let cluster = start(&etcd, 1, 1);
    wait_recorded(&etcd, "members recorded", |s| s.members.len() == 2).await;
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    let mut joiner = start_recorded_expert_worker(
        &etcd,
        &cluster.endpoint,
        &["--member-ttl-s", "2", "--worker-id", "expert-joiner"],
    );
    wait_recorded(&etcd, "the joiner recorded", |s| {
        s.members.iter().any(|m| m.id == "expert-joiner")
    })
    .await;
    eventually(Duration::from_secs(60), "the joiner holds experts", || {
        let mut client = client.clone();
        async move {
            let s = client.status().await.unwrap();
            match s.workers.iter().find(|w| w.worker_id == "expert-joiner") {
                Some(w) if !w.expert_slots.is_empty() => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;

    joiner.kill();
    let died = std::time::Instant::now();
    wait_recorded(&etcd, "the killed worker's record gone", |s| {
        s.members.iter().all(|m| m.id != "expert-joiner")
    })
    .await;
    let vanished = died.elapsed();
    eprintln!("a killed worker's record vanished {vanished:?} after kill -9 (TTL 2 s)");
    assert!(vanished < Duration::from_secs(5), "{vanished:?} for a 2 s TTL");

    // A record written straight into etcd (no registration call): the leader takes the worker
    // in as pending: listed, but given no experts until it heartbeats with the cluster
    // credential. Nothing answers at its address, so it then expires for want of heartbeats.
    let version = client.status().await.unwrap().placement_version;
    let mut etcd_client = etcd_client::Client::connect([&etcd.endpoint], None).await.unwrap();
    let model_id = recorded(&etcd).await.members[0].model_id.clone();
    let record = serde_json::json!({
        "id": "expert-recorded-only", "role": "ROLE_EXPERT", "address": "127.0.0.1:9",
        "model_id": model_id, "incarnation": 1,
    });
    etcd_client
        .put(
            format!("{PREFIX}/members/expert-recorded-only"),
            record.to_string(),
            None,
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the leader takes in the recorded worker",
        || {
            let mut client = client.clone();
            async move {
                let ids = membership(&mut client).await.0;
                if ids.iter().any(|id| id == "expert-recorded-only") {
                    Ok(())
                } else {
                    Err(ids)
                }
            }
        },
    )
    .await;
    let s = client.status().await.unwrap();
    let pending = s
        .workers
        .iter()
        .find(|w| w.worker_id == "expert-recorded-only")
        .unwrap();
    assert!(
        pending.expert_slots.is_empty(),
        "experts for a worker that never heartbeated"
    );
    assert_eq!(s.placement_version, version, "a record alone moved the placement");
}
