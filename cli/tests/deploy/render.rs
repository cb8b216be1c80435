//! deploy/ as the tests see it: every kustomize overlay rendered by `kubectl kustomize`, the
//! compose file, and the containers in them with their `$(VAR)` arguments resolved the way the
//! kubelet resolves them (from the container's env and the ConfigMaps it reads).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Deserialize;
use serde_yaml_ng::Value;

pub fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The overlays an operator applies; the test fails when the directory holds others, so a new
/// overlay cannot go untested.
pub const OVERLAYS: &[&str] = &["cpu", "gpu", "tls", "multinode"];

pub fn documents(text: &str, place: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{place}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

pub struct Overlay {
    pub name: &'static str,
    pub docs: Vec<Value>,
}

/// Every overlay, rendered once per test binary.
pub fn overlays() -> &'static [Overlay] {
    static RENDERED: OnceLock<Vec<Overlay>> = OnceLock::new();
    RENDERED.get_or_init(|| {
        let mut present: Vec<String> = std::fs::read_dir(deploy().join("k8s/overlays"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        present.sort();
        let mut want: Vec<String> = OVERLAYS.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(
            present, want,
            "deploy/k8s/overlays holds overlays the tests do not know"
        );
        OVERLAYS
            .iter()
            .map(|&name| {
                let docs = kustomize(&deploy().join("k8s"), name);
                assert!(docs.len() >= 15, "{name}: only {} objects", docs.len());
                Overlay { name, docs }
            })
            .collect()
    })
}

/// `kubectl kustomize` of overlay `name` in the tree `k8s` (deploy/k8s or a changed copy).
fn kustomize(k8s: &Path, name: &str) -> Vec<Value> {
    let dir = k8s.join("overlays").join(name);
    let out = std::process::Command::new(super::tools::kubectl())
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("running kubectl");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    documents(&String::from_utf8(out.stdout).unwrap(), name)
}

/// Overlay `name` rendered from a copy of deploy/k8s whose base configuration has other values
/// (what an operator's edit does): for checking what a config change touches.
pub fn render_with_config_change(name: &str) -> Vec<Value> {
    let copy = tempfile::tempdir().unwrap();
    copy_tree(&deploy().join("k8s"), copy.path());
    let base = copy.path().join("base/kustomization.yaml");
    let text = std::fs::read_to_string(&base).unwrap();
    let mut changed = text.clone();
    for (from, to) in [
        (
            "MOE_ETCD_PREFIX=/hunyuan-moe/prod",
            "MOE_ETCD_PREFIX=/hunyuan-moe/changed",
        ),
        ("HF_REVISION=main", "HF_REVISION=changed"),
    ] {
        assert!(changed.contains(from), "base/kustomization.yaml no longer sets {from}");
        changed = changed.replace(from, to);
    }
    std::fs::write(&base, changed).unwrap();
    kustomize(copy.path(), name)
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

pub fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

pub fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or("")
}

/// The pod templates of a workload: (template, long-running), where a Job's pods run to
/// completion and need no probes.
pub fn pod_templates(doc: &Value) -> Vec<(&Value, bool)> {
    match kind(doc) {
        "Deployment" | "StatefulSet" => vec![(&doc["spec"]["template"], true)],
        "Job" => vec![(&doc["spec"]["template"], false)],
        "LeaderWorkerSet" => {
            let t = &doc["spec"]["leaderWorkerTemplate"];
            vec![(&t["leaderTemplate"], true), (&t["workerTemplate"], true)]
        }
        _ => vec![],
    }
}

pub fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().map(|x| x.as_str().expect("a string").to_owned()).collect())
        .unwrap_or_default()
}

/// A container as deployed: where it is, and its arguments after `$(VAR)` expansion.
pub struct Container<'a> {
    pub place: String,
    pub spec: &'a Value,
    pub image: String,
    pub args: Vec<String>,
    pub init: bool,
    pub long_running: bool,
    pub pod: &'a Value,
}

/// Containers of every workload in `docs` (init containers included).
pub fn containers<'a>(overlay: &str, docs: &'a [Value]) -> Vec<Container<'a>> {
    let config_maps: BTreeMap<&str, &Value> = docs
        .iter()
        .filter(|d| kind(d) == "ConfigMap")
        .map(|d| (name(d), &d["data"]))
        .collect();
    let mut out = Vec::new();
    for doc in docs {
        for (template, long_running) in pod_templates(doc) {
            let pod = &template["spec"];
            for (list, init) in [("containers", false), ("initContainers", true)] {
                for c in pod[list].as_sequence().into_iter().flatten() {
                    let place = format!(
                        "{overlay}: {} {} container {}",
                        kind(doc),
                        name(doc),
                        c["name"].as_str().unwrap()
                    );
                    let env = environment(&place, c, &config_maps);
                    let args = strings(&c["args"]).iter().map(|a| expand(&place, a, &env)).collect();
                    out.push(Container {
                        place,
                        spec: c,
                        image: c["image"].as_str().unwrap().to_owned(),
                        args,
                        init,
                        long_running: long_running && !init,
                        pod,
                    });
                }
            }
        }
    }
    out
}

/// A field reference stands for a value known only in the pod; tests see it as `<field>`.
fn environment(place: &str, c: &Value, config_maps: &BTreeMap<&str, &Value>) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for from in c["envFrom"].as_sequence().into_iter().flatten() {
        let cm = from["configMapRef"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("{place}: envFrom without a ConfigMap"));
        let data = config_maps
            .get(cm)
            .unwrap_or_else(|| panic!("{place}: reads ConfigMap {cm}, which the overlay does not create"));
        for (k, v) in data.as_mapping().unwrap() {
            env.insert(k.as_str().unwrap().to_owned(), v.as_str().unwrap().to_owned());
        }
    }
    for e in c["env"].as_sequence().into_iter().flatten() {
        let key = e["name"].as_str().unwrap().to_owned();
        let value = if let Some(v) = e["value"].as_str() {
            v.to_owned()
        } else if let Some(f) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            format!("<{f}>")
        } else if let Some(cm) = e["valueFrom"]["configMapKeyRef"]["name"].as_str() {
            let key = e["valueFrom"]["configMapKeyRef"]["key"].as_str().unwrap();
            config_maps
                .get(cm)
                .and_then(|d| d[key].as_str())
                .unwrap_or_else(|| panic!("{place}: ConfigMap {cm} has no {key}"))
                .to_owned()
        } else {
            continue; // secrets: not used in arguments
        };
        env.insert(key, value);
    }
    env
}

/// `$(VAR)` as the kubelet expands it; an unknown variable is an error here (the kubelet would
/// pass it through literally, which is never what a manifest means).
fn expand(place: &str, arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(start) = rest.find("$(") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find(')')
            .unwrap_or_else(|| panic!("{place}: unclosed $( in {arg}"))
            + start;
        let var = &rest[start + 2..end];
        out.push_str(
            env.get(var)
                .unwrap_or_else(|| panic!("{place}: {arg} uses $({var}), which is not set")),
        );
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}
