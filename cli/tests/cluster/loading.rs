//! Weight loading as the cluster shows it: every worker's load in `moectl status --json` and in
//! the coordinator's `/metrics`, finished (done == total, state loaded) and the size of what
//! it holds, as the checkpoint's own headers count it, with each process's resident memory beside
//! the bytes of weights it holds; an expert worker's load seen under way
//! (it heartbeats while loading) and outlasting the heartbeat timeout; and a GPTQ checkpoint,
//! loaded by every worker, serving the engine's tokens.

use std::collections::BTreeMap;
use std::time::Duration;

use moe_model::checkpoint::Checkpoint;
use moe_model::names::is_routed_expert;
use moe_proto::v1::LoadState;
use moe_runtime::client::ClusterClient;
use moe_tests::cluster::LocalCluster;

use crate::common::*;
use crate::http_get;

/// Tensors and bytes of the checkpoint's tensors that `keep` selects.
fn size_of(ckpt: &Checkpoint, keep: impl Fn(&str) -> bool) -> (u64, u64) {
    let size = moe_tests::progress::checkpoint_size(ckpt, keep);
    (size.tensors, size.bytes)
}

/// `name{worker="id"} value` samples of one metric, by worker.
fn per_worker(body: &str, name: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix("{worker=\""))
        .map(|rest| {
            let (id, value) = rest.split_once("\"} ").unwrap();
            (id.to_owned(), value.parse().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workers_load_shows_finished_in_status_and_metrics() {
    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 2, &["--metrics-listen", "127.0.0.1:0"]);
    let client = ClusterClient::new(&cluster.endpoint).unwrap();
    // Loads finish before the placement is active; heartbeats carry them.
    eventually(
        Duration::from_secs(20),
        "a worker never reported a finished load",
        || {
            let mut client = client.clone();
            async move {
                let s = client.status().await.unwrap();
                let pending: Vec<_> = s
                    .workers
                    .iter()
                    .filter(|w| w.load_state != LoadState::Loaded as i32)
                    .map(|w| (w.worker_id.clone(), w.load_state))
                    .collect();
                if s.workers.len() == 3 && pending.is_empty() {
                    Ok(())
                } else {
                    Err(pending)
                }
            }
        },
    )
    .await;

    let ckpt = Checkpoint::open(&tiny()).unwrap();
    let attention = size_of(&ckpt, |n| !is_routed_expert(n));
    let experts = size_of(&ckpt, is_routed_expert);
    let out = std::process::Command::new(moectl())
        .args(["status", "--json", "--endpoint", &cluster.endpoint])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut expert_sum = (0, 0);
    let mut by_worker = BTreeMap::new();
    let mut weight_bytes = BTreeMap::new();
    for w in status["workers"].as_array().unwrap() {
        let load = &w["load"];
        let field = |f: &str| load[f].as_u64().unwrap();
        assert_eq!(load["state"], "loaded", "{w}");
        assert_eq!(field("bytes_done"), field("bytes_total"), "{w}");
        assert_eq!(field("tensors_done"), field("tensors_total"), "{w}");
        let done = (field("tensors_done"), field("bytes_done"));
        // Memory beside the weights: held on the host here, so resident at least them.
        let memory = |f: &str| w["memory"][f].as_u64().unwrap();
        let (resident, peak, weights) = (
            memory("resident_bytes"),
            memory("peak_resident_bytes"),
            memory("weight_bytes"),
        );
        assert!(resident > 0 && peak >= resident && peak >= weights, "{w}");
        weight_bytes.insert(w["worker_id"].as_str().unwrap().to_owned(), weights as f64);
        match w["role"].as_str().unwrap() {
            "ROLE_ATTENTION" => {
                assert_eq!(done, attention, "the attention worker reads every non-expert tensor");
                // It holds the matrices it read (the norms, read too, are not counted).
                assert!(weights > 0 && weights <= done.1, "{w}");
            }
            "ROLE_EXPERT" => {
                assert!(done.1 > 0, "{w}");
                assert_eq!(
                    weights, done.1,
                    "an expert worker holds the experts it read, as stored: {w}"
                );
                expert_sum = (expert_sum.0 + done.0, expert_sum.1 + done.1);
            }
            other => panic!("role {other}"),
        }
        by_worker.insert(w["worker_id"].as_str().unwrap().to_owned(), done.1 as f64);
    }
    assert_eq!(
        expert_sum, experts,
        "without spare slots the expert workers read each expert once"
    );

    let metrics = cluster.metrics.clone().expect("metrics address printed");
    let (code, body) = http_get(&metrics, "/metrics");
    assert_eq!(code, 200);
    assert_eq!(per_worker(&body, "moe_worker_load_bytes"), by_worker, "{body}");
    assert_eq!(per_worker(&body, "moe_worker_load_size_bytes"), by_worker, "{body}");
    let loaded = by_worker.keys().map(|id| (id.clone(), LoadState::Loaded as i32 as f64));
    assert_eq!(per_worker(&body, "moe_worker_load_state"), loaded.collect(), "{body}");
    assert_eq!(per_worker(&body, "moe_worker_weight_bytes"), weight_bytes, "{body}");
    let resident = per_worker(&body, "moe_worker_resident_bytes");
    assert!(resident.len() == 3 && resident.values().all(|&r| r > 0.0), "{body}");
}

/// The coordinator's `--heartbeat-timeout-ms` default, which `moectl up` keeps.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(3000);

/// The joiner's load as status, metrics and `moectl status` show it, if all three show it under
/// way (loading, 0 < done < total); else what was seen.
async fn load_under_way(client: &mut ClusterClient, metrics: &str, endpoint: &str, id: &str) -> Result<(), String> {
    let s = client.status().await.unwrap();
    let w = s
        .workers
        .iter()
        .find(|w| w.worker_id == id)
        .ok_or("not registered yet")?;
    let partial = |done: u64, total: u64| 0 < done && done < total;
    if w.load_state != LoadState::Loading as i32
        || !partial(w.load_bytes_done, w.load_bytes_total)
        || !partial(w.load_tensors_done, w.load_tensors_total)
    {
        return Err(format!(
            "status: state {} bytes {}/{} tensors {}/{}",
            w.load_state, w.load_bytes_done, w.load_bytes_total, w.load_tensors_done, w.load_tensors_total
        ));
    }
    let (_, body) = http_get(metrics, "/metrics");
    let sample = |name: &str| per_worker(&body, name).get(id).copied().unwrap_or(-1.0);
    let (state, done, total) = (
        sample("moe_worker_load_state"),
        sample("moe_worker_load_bytes"),
        sample("moe_worker_load_size_bytes"),
    );
    if state != LoadState::Loading as i32 as f64 || !(0.0 < done && done < total) {
        return Err(format!("metrics: state {state} bytes {done}/{total}"));
    }
    let out = std::process::Command::new(moectl())
        .args(["status", "--endpoint", endpoint])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text.lines().find(|l| l.starts_with(id)).unwrap_or_default();
    if !line.contains(" loading ") || !line.contains("% of ") {
        return Err(format!("moectl status: {line:?}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expert_workers_load_shows_under_way_and_outlasts_the_heartbeat_timeout() {
    // Proves: an expert worker heartbeats while it loads a placement, so `moectl status` and
    // `/metrics` show its load under way, and a load longer than the coordinator's heartbeat
    // timeout does not get it dropped (a drop would make a placement without it, then another
    // with it once it came back). The joiner pauses after each expert it reads.
    const JOINER: &str = "slow-joiner";
    const THROTTLE_MS: u64 = 100;
    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 2, &["--metrics-listen", "127.0.0.1:0"]);
    let metrics = cluster.metrics.clone().expect("metrics address printed");
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    let before = client.status().await.unwrap().placement_version;
    let joiner = start_expert_worker(
        &cluster.endpoint,
        &["--worker-id", JOINER, "--load-throttle-ms", &THROTTLE_MS.to_string()],
    );
    eventually(
        Duration::from_secs(30),
        "the joiner's load was never seen under way",
        || {
            let (mut client, metrics, endpoint) = (client.clone(), metrics.clone(), cluster.endpoint.clone());
            async move { load_under_way(&mut client, &metrics, &endpoint, JOINER).await }
        },
    )
    .await;

    let (active, w) = eventually(
        Duration::from_secs(30),
        "the joiner's placement never became active",
        || {
            let mut client = client.clone();
            async move {
                let s = client.status().await.unwrap();
                let w = s.workers.iter().find(|w| w.worker_id == JOINER).cloned();
                match w {
                    // The version is recorded a moment before the load reports itself done.
                    Some(w)
                        if s.placement_version > before
                            && w.placement_version >= s.placement_version
                            && w.load_state == LoadState::Loaded as i32 =>
                    {
                        Ok((s.placement_version, w))
                    }
                    _ => Err(format!("v{} and the joiner {w:?}", s.placement_version)),
                }
            }
        },
    )
    .await;
    assert_eq!(
        active,
        before + 1,
        "one placement for the join: the joiner was never dropped"
    );
    assert_eq!(
        (w.load_tensors_done, w.load_bytes_done),
        (w.load_tensors_total, w.load_bytes_total)
    );
    // It held nothing before, so it read one expert per slot, each followed by the pause.
    let slots = w.expert_slots.len() as u64;
    assert!(slots > 0);
    assert!(
        Duration::from_millis(THROTTLE_MS * slots) > HEARTBEAT_TIMEOUT,
        "the load ({slots} experts x {THROTTLE_MS} ms) must outlast the heartbeat timeout"
    );
    drop(joiner);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gptq_model_serves_through_a_cluster_as_in_process() {
    let model = moe_tests::fixtures_dir().join("hunyuan-tiny-gptq");
    let prompts = decisive_prompts(&model, &[3, 11], 8);
    let cluster = LocalCluster::start(moectl(), &model, 1, 2, &[]);
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    for (prompt, want) in &prompts {
        assert_eq!(&client.generate(&greedy(prompt, 8)).await.unwrap().tokens, want);
    }
}
