//! Properties of the workloads an operator relies on: disruption budgets, autoscalers that
//! wait for the drain, enough expert workers for the coordinator to place experts, files that
//! flags name inside mounted volumes, and the model download that is skipped when done.

use std::collections::BTreeMap;

use serde_yaml_ng::Value;

use crate::render::{containers, kind, name, overlays, pod_templates};

fn labels(template: &Value) -> BTreeMap<String, String> {
    template["metadata"]["labels"]
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.as_str().unwrap().into(), v.as_str().unwrap().into()))
                .collect()
        })
        .unwrap_or_default()
}

fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let m = selector["matchLabels"].as_mapping().unwrap();
    !m.is_empty()
        && m.iter()
            .all(|(k, v)| labels.get(k.as_str().unwrap()).map(String::as_str) == v.as_str())
}

fn config(docs: &[Value], key: &str) -> String {
    let cm = docs
        .iter()
        .find(|d| kind(d) == "ConfigMap" && name(d).starts_with("moe-config"))
        .unwrap();
    cm["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("moe-config has no {key}"))
        .to_owned()
}

#[test]
fn every_pod_has_a_disruption_budget_that_keeps_the_cluster_serving() {
    for o in overlays() {
        let pdbs: Vec<&Value> = o.docs.iter().filter(|d| kind(d) == "PodDisruptionBudget").collect();
        for doc in &o.docs {
            for (template, long_running) in pod_templates(doc) {
                if !long_running {
                    continue;
                }
                let l = labels(template);
                let budget = pdbs
                    .iter()
                    .filter(|p| selects(&p["spec"]["selector"], &l))
                    .collect::<Vec<_>>();
                assert_eq!(
                    budget.len(),
                    1,
                    "{}: {} {} is covered by {} budgets",
                    o.name,
                    kind(doc),
                    name(doc),
                    budget.len()
                );
                let spec = &budget[0]["spec"];
                match l["app.kubernetes.io/component"].as_str() {
                    // One coordinator at a time (both are ready, the leader may go: the
                    // standby takes over), never both.
                    "coordinator" => {
                        assert_eq!(spec["minAvailable"].as_u64(), Some(1), "{}", o.name);
                        assert_eq!(spec["unhealthyPodEvictionPolicy"].as_str(), Some("AlwaysAllow"));
                    }
                    // One expert worker at a time: each moves its experts before leaving.
                    _ => assert_eq!(spec["maxUnavailable"].as_u64(), Some(1), "{}: {}", o.name, name(doc)),
                }
            }
        }
    }
}

#[test]
fn worker_autoscalers_scale_down_no_faster_than_a_drain() {
    // A removed worker drains for up to its terminationGracePeriodSeconds; one at a time and
    // no sooner than that, so two drains never overlap.
    let mut checked = 0;
    for o in overlays() {
        let workloads: BTreeMap<&str, &Value> = o
            .docs
            .iter()
            .filter(|d| kind(d) == "Deployment")
            .map(|d| (name(d), d))
            .collect();
        let mut scaled = Vec::new();
        for a in o
            .docs
            .iter()
            .filter(|d| ["HorizontalPodAutoscaler", "ScaledObject"].contains(&kind(d)))
        {
            let target = a["spec"]["scaleTargetRef"]["name"].as_str().unwrap();
            let workload = workloads
                .get(target)
                .unwrap_or_else(|| panic!("{}: {} scales {target}, not deployed", o.name, name(a)));
            if !target.ends_with("-worker") {
                continue;
            }
            scaled.push(target);
            let grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap();
            let behavior = if kind(a) == "ScaledObject" {
                &a["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
            } else {
                &a["spec"]["behavior"]
            };
            let down = &behavior["scaleDown"];
            let place = format!("{}: {} {}", o.name, kind(a), name(a));
            assert!(down["stabilizationWindowSeconds"].as_u64().unwrap() >= grace, "{place}");
            let policies = down["policies"].as_sequence().unwrap();
            assert!(!policies.is_empty(), "{place}");
            for p in policies {
                assert_eq!(p["type"].as_str(), Some("Pods"), "{place}");
                assert_eq!(p["value"].as_u64(), Some(1), "{place}");
                assert!(
                    p["periodSeconds"].as_u64().unwrap() >= grace,
                    "{place}: period below the {grace} s drain"
                );
            }
            checked += 1;
        }
        if o.name != "multinode" {
            scaled.sort();
            assert_eq!(
                scaled,
                ["moe-attention-worker", "moe-expert-worker"],
                "{}: pools without autoscaling",
                o.name
            );
        }
    }
    assert!(checked >= 6, "{checked}");
}

/// The fewest replicas the autoscaler of Deployment `target` keeps (HPA or KEDA).
fn autoscaler_minimum(docs: &[Value], target: &str) -> Option<u64> {
    docs.iter().find_map(|d| match kind(d) {
        "HorizontalPodAutoscaler" if d["spec"]["scaleTargetRef"]["name"].as_str() == Some(target) => {
            Some(d["spec"]["minReplicas"].as_u64().unwrap_or(1))
        }
        "ScaledObject" if d["spec"]["scaleTargetRef"]["name"].as_str() == Some(target) => {
            Some(d["spec"]["minReplicaCount"].as_u64().unwrap_or(0))
        }
        _ => None,
    })
}

#[test]
fn autoscaled_deployments_leave_the_count_to_their_autoscaler() {
    // A Deployment's replicas field would set the count back on every `kubectl apply`,
    // undoing (and fighting) the autoscaler.
    for o in overlays() {
        let mut autoscaled = 0;
        for d in o.docs.iter().filter(|d| kind(d) == "Deployment") {
            if autoscaler_minimum(&o.docs, name(d)).is_some() {
                autoscaled += 1;
                assert!(d["spec"]["replicas"].is_null(), "{}: {} sets replicas", o.name, name(d));
            }
        }
        // The front end everywhere, and both worker pools where they are Deployments.
        let want = if o.name == "multinode" { 1 } else { 3 };
        assert_eq!(autoscaled, want, "{}: autoscaled Deployments", o.name);
    }
}

#[test]
fn enough_expert_workers_to_place_experts() {
    // The coordinator places experts once --min-expert-workers have joined: the deployed
    // expert workers must reach it.
    for o in overlays() {
        let min: u64 = config(&o.docs, "MOE_MIN_EXPERT_WORKERS").parse().unwrap();
        let experts: u64 = o
            .docs
            .iter()
            .map(|d| match kind(d) {
                "Deployment" if name(d) == "moe-expert-worker" => autoscaler_minimum(&o.docs, name(d))
                    .unwrap_or_else(|| panic!("{}: moe-expert-worker has no autoscaler", o.name)),
                "LeaderWorkerSet" => {
                    (d["spec"]["leaderWorkerTemplate"]["size"].as_u64().unwrap() - 1)
                        * d["spec"]["replicas"].as_u64().unwrap()
                }
                _ => 0,
            })
            .sum();
        assert!(
            experts >= min,
            "{}: {experts} expert workers, the coordinator waits for {min}",
            o.name
        );
    }
}

#[test]
fn files_named_by_flags_are_in_mounted_volumes() {
    for o in overlays() {
        for c in containers(o.name, &o.docs) {
            let mounts: Vec<&str> = c.spec["volumeMounts"]
                .as_sequence()
                .into_iter()
                .flatten()
                .map(|m| m["mountPath"].as_str().unwrap())
                .collect();
            for w in c.args.windows(2) {
                let file_flag = w[0].ends_with("-file")
                    || [
                        "--tls-cert",
                        "--tls-key",
                        "--tls-ca",
                        "--etcd-ca",
                        "--etcd-cert",
                        "--etcd-key",
                        "--model",
                        "--out",
                    ]
                    .contains(&w[0].as_str());
                if file_flag && w[1].starts_with('/') {
                    assert!(
                        mounts.iter().any(|m| w[1].starts_with(&format!("{m}/"))),
                        "{}: {} {} is on no mounted volume ({mounts:?})",
                        c.place,
                        w[0],
                        w[1]
                    );
                }
            }
        }
    }
}

#[test]
fn the_model_download_is_skipped_when_done_and_awaited_by_every_moectl_pod() {
    let o = overlays().iter().find(|o| o.name == "gpu").unwrap();
    let job = o
        .docs
        .iter()
        .find(|d| kind(d) == "Job" && name(d) == "moe-model-download")
        .unwrap();
    let c = &job["spec"]["template"]["spec"]["containers"][0];
    let script = c["command"][2].as_str().unwrap();
    assert!(script.contains("huggingface-cli download"), "{script}");
    // Run it on a volume that already holds this download, with nothing on PATH: pip and
    // huggingface-cli would fail, so success means it stopped before them.
    let run = |dir: &std::path::Path, revision: &str| {
        std::process::Command::new("/bin/sh")
            .args(["-ec", script])
            .env_clear()
            .env("MOE_MODEL_DIR", dir)
            .env("HF_REPO", "tencent/Hunyuan-A13B-Instruct")
            .env("HF_REVISION", revision)
            .env("PATH", "/nonexistent")
            .output()
            .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".download-complete"),
        "tencent/Hunyuan-A13B-Instruct@main\n",
    )
    .unwrap();
    let out = run(dir.path(), "main");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to download"));
    // Another revision goes on to the download (and fails here, with no pip).
    let out = run(dir.path(), "v2");
    assert!(!out.status.success());
    // Without the marker likewise, and no marker is written.
    let empty = tempfile::tempdir().unwrap();
    let out = run(empty.path(), "main");
    assert!(!out.status.success());
    assert!(
        !empty.path().join(".download-complete").exists(),
        "marker written without a download"
    );
    // Every moectl pod of every overlay waits for that marker in the model directory.
    for o in overlays() {
        let model_dir = config(&o.docs, "MOE_MODEL_DIR");
        for doc in o.docs.iter().filter(|d| kind(d) != "Job") {
            for (template, _) in pod_templates(doc) {
                let spec = &template["spec"];
                let runs_moectl = spec["containers"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .any(|c| c["name"].as_str() == Some("moectl"));
                if !runs_moectl {
                    continue;
                }
                let wait = spec["initContainers"]
                    .as_sequence()
                    .and_then(|s| s.iter().find(|c| c["name"].as_str() == Some("wait-for-model")));
                let wait = wait
                    .unwrap_or_else(|| panic!("{}: {} {} does not wait for the model", o.name, kind(doc), name(doc)));
                assert!(
                    wait["command"][2]
                        .as_str()
                        .unwrap()
                        .contains("$MOE_MODEL_DIR/.download-complete")
                );
                assert!(model_dir.starts_with("/models/"), "{}: {model_dir}", o.name);
            }
        }
    }
}
