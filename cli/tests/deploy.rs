//! deploy/ parses, and what it names exists in the project: the image the Dockerfile builds,
//! the ports the images expose, and every moectl subcommand and flag the manifests use.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml_ng::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// Images the project uses but does not build, pinned.
const EXTERNAL_IMAGES: &[&str] = &["quay.io/coreos/etcd:v3.4.23"];

/// Every container of the project's image (place, image, args) in the k8s manifests and the
/// compose file.
fn containers() -> Vec<(String, String, Vec<String>)> {
    all_containers()
        .into_iter()
        .filter(|(_, image, _)| !EXTERNAL_IMAGES.contains(&image.as_str()))
        .collect()
}

fn all_containers() -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(deploy().join("k8s")).unwrap() {
        let path = entry.unwrap().path();
        for doc in documents(&path) {
            let spec = &doc["spec"]["template"]["spec"];
            for c in spec["containers"].as_sequence().into_iter().flatten() {
                out.push((
                    path.display().to_string(),
                    c["image"].as_str().unwrap().to_owned(),
                    strings(&c["args"]),
                ));
            }
        }
    }
    let compose = &documents(&deploy().join("compose.yaml"))[0];
    for (name, svc) in compose["services"].as_mapping().unwrap() {
        out.push((
            format!("compose {}", name.as_str().unwrap()),
            svc["image"].as_str().unwrap().to_owned(),
            strings(&svc["command"]),
        ));
    }
    out
}

fn exposed_ports() -> BTreeSet<u16> {
    let dockerfile = std::fs::read_to_string(deploy().join("docker/Dockerfile")).unwrap();
    let line = dockerfile
        .lines()
        .find(|l| l.starts_with("EXPOSE"))
        .expect("EXPOSE line");
    line.split_whitespace().skip(1).map(|p| p.parse().unwrap()).collect()
}

#[test]
fn manifests_use_the_image_the_dockerfile_builds() {
    let dockerfile = std::fs::read_to_string(deploy().join("docker/Dockerfile")).unwrap();
    let tag = dockerfile
        .split("-t ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("build command with -t in the Dockerfile");
    let all = all_containers();
    assert!(all.len() >= 10, "{all:?}");
    for (place, image, _) in &all {
        assert!(
            image == tag || EXTERNAL_IMAGES.contains(&image.as_str()),
            "{place} uses {image}: neither built by the project nor a pinned external image"
        );
    }
    assert!(containers().len() >= 8);
}

#[test]
fn ports_agree_with_the_image() {
    let exposed = exposed_ports();
    for (place, _, args) in containers() {
        for w in args.windows(2) {
            if matches!(w[0].as_str(), "--listen" | "--metrics-listen") {
                let port: u16 = w[1].rsplit(':').next().unwrap().parse().unwrap();
                assert!(
                    exposed.contains(&port),
                    "{place}: {} {} is not exposed by the image ({exposed:?})",
                    w[0],
                    w[1]
                );
            }
        }
    }
    for entry in std::fs::read_dir(deploy().join("k8s")).unwrap() {
        let path = entry.unwrap().path();
        for doc in documents(&path) {
            for c in doc["spec"]["template"]["spec"]["containers"]
                .as_sequence()
                .into_iter()
                .flatten()
                .filter(|c| !EXTERNAL_IMAGES.contains(&c["image"].as_str().unwrap_or("")))
            {
                for p in c["ports"].as_sequence().into_iter().flatten() {
                    let port = p["containerPort"].as_u64().unwrap() as u16;
                    assert!(
                        exposed.contains(&port),
                        "{}: containerPort {port} not exposed",
                        path.display()
                    );
                }
                assert!(
                    !c["readinessProbe"].is_null() && !c["livenessProbe"].is_null(),
                    "{}: probes missing",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn every_subcommand_and_flag_exists_in_moectl() {
    let moectl = env!("CARGO_BIN_EXE_moectl");
    for (place, _, args) in containers() {
        let sub = &args[0];
        let out = std::process::Command::new(moectl)
            .args([sub.as_str(), "--help"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{place}: `moectl {sub}` does not exist");
        let help = String::from_utf8_lossy(&out.stdout);
        for flag in args.iter().filter(|a| a.starts_with("--")) {
            assert!(
                help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                "{place}: `moectl {sub}` has no {flag}"
            );
        }
    }
}

#[test]
fn autoscalers_target_existing_pools() {
    let mut deployments = BTreeSet::new();
    let mut targets = Vec::new();
    for entry in std::fs::read_dir(deploy().join("k8s")).unwrap() {
        for doc in documents(&entry.unwrap().path()) {
            match doc["kind"].as_str() {
                Some("Deployment") => {
                    deployments.insert(doc["metadata"]["name"].as_str().unwrap().to_owned());
                }
                Some("HorizontalPodAutoscaler") => {
                    targets.push(doc["spec"]["scaleTargetRef"]["name"].as_str().unwrap().to_owned());
                    for m in doc["spec"]["metrics"].as_sequence().unwrap() {
                        let name = m["external"]["metric"]["name"].as_str().unwrap();
                        assert!(name.starts_with("moe_"), "{name}");
                    }
                }
                _ => {}
            }
        }
    }
    assert_eq!(targets.len(), 2);
    for t in targets {
        assert!(deployments.contains(&t), "HPA targets {t}, which is not deployed");
    }
}

#[test]
fn coordinators_and_workers_reach_services_that_exist() {
    // Every `--etcd` URL and `--coordinator` address in the k8s manifests names a Service of
    // the manifests, on a port that Service serves.
    let mut services = BTreeSet::new();
    let mut uses = Vec::new();
    for entry in std::fs::read_dir(deploy().join("k8s")).unwrap() {
        let path = entry.unwrap().path();
        for doc in documents(&path) {
            if doc["kind"].as_str() == Some("Service") {
                let name = doc["metadata"]["name"].as_str().unwrap();
                for p in doc["spec"]["ports"].as_sequence().unwrap() {
                    services.insert(format!("{name}:{}", p["port"].as_u64().unwrap()));
                }
            }
            for c in doc["spec"]["template"]["spec"]["containers"]
                .as_sequence()
                .into_iter()
                .flatten()
            {
                let args = strings(&c["args"]);
                for w in args.windows(2) {
                    if matches!(w[0].as_str(), "--etcd" | "--coordinator") {
                        for target in w[1].split(',') {
                            uses.push((
                                path.display().to_string(),
                                target.trim_start_matches("http://").to_owned(),
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(
        uses.iter().any(|(_, t)| t.starts_with("moe-etcd")),
        "no coordinator uses etcd"
    );
    for (place, target) in uses {
        assert!(
            services.contains(&target),
            "{place}: {target} is not a Service port ({services:?})"
        );
    }
}
