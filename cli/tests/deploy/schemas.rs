//! Every rendered object against the Kubernetes 1.32 schemas, strictly (unknown fields are
//! errors), offline with kubernetes-validate. Custom resources have no schema there; crds.rs
//! checks them, and the pod templates inside a LeaderWorkerSet are validated here as the
//! Deployments they would be.

use serde_yaml_ng::{Mapping, Value};

use crate::render::{kind, overlays};

/// Kinds from CRDs (KEDA, cert-manager, LeaderWorkerSet, Prometheus Operator): checked in
/// crds.rs.
pub const CUSTOM_KINDS: &[&str] = &[
    "ScaledObject",
    "Certificate",
    "Issuer",
    "LeaderWorkerSet",
    "ServiceMonitor",
    "PodMonitor",
    "PrometheusRule",
];

const KUBERNETES: &str = "1.32.0";

/// Runs the validator on `docs`; returns (success, output).
fn validate(docs: &[Value]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("objects.yaml");
    let text: Vec<String> = docs.iter().map(|d| serde_yaml_ng::to_string(d).unwrap()).collect();
    std::fs::write(&path, text.join("---\n")).unwrap();
    let out = std::process::Command::new(crate::tools::kubernetes_validate())
        .args(["--strict", "-k", KUBERNETES])
        .arg(&path)
        .output()
        .expect("running kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A pod template as the Deployment that would carry it, so the validator checks it.
fn as_deployment(template: &Value, name: &str) -> Value {
    let yaml = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec: {{selector: {{matchLabels: {{}}}}}}\n"
    );
    let mut d: Value = serde_yaml_ng::from_str(&yaml).unwrap();
    let spec = d["spec"].as_mapping_mut().unwrap();
    spec.insert("selector".into(), {
        let mut m = Mapping::new();
        m.insert("matchLabels".into(), template["metadata"]["labels"].clone());
        Value::Mapping(m)
    });
    spec.insert("template".into(), template.clone());
    d
}

#[test]
fn every_overlay_validates_against_the_kubernetes_schemas() {
    for o in overlays() {
        let mut docs: Vec<Value> = o
            .docs
            .iter()
            .filter(|d| !CUSTOM_KINDS.contains(&kind(d)))
            .cloned()
            .collect();
        for lws in o.docs.iter().filter(|d| kind(d) == "LeaderWorkerSet") {
            let t = &lws["spec"]["leaderWorkerTemplate"];
            docs.push(as_deployment(&t["leaderTemplate"], "lws-leader-template"));
            docs.push(as_deployment(&t["workerTemplate"], "lws-worker-template"));
        }
        for d in &o.docs {
            let k = kind(d);
            assert!(
                CUSTOM_KINDS.contains(&k)
                    || d["apiVersion"]
                        .as_str()
                        .is_some_and(|v| !v.contains('.') || v.contains(".k8s.io/")),
                "{}: {k} is neither a Kubernetes kind nor a known custom one",
                o.name
            );
        }
        let (ok, out) = validate(&docs);
        assert!(ok, "{}: kubernetes-validate failed:\n{out}", o.name);
        let passed = out.lines().filter(|l| l.contains(" passed for resource ")).count();
        assert_eq!(passed, docs.len(), "{}: not every object was validated:\n{out}", o.name);
    }
    let monitoring: Vec<Value> = crate::monitoring::rendered()
        .into_iter()
        .filter(|d| !CUSTOM_KINDS.contains(&kind(d)))
        .collect();
    let (ok, out) = validate(&monitoring);
    assert!(
        ok && out.matches(" passed for resource ").count() == monitoring.len(),
        "deploy/monitoring:\n{out}"
    );
}

#[test]
fn the_validator_rejects_a_misspelt_field() {
    // The check above can fail: a Deployment with a typo in a container field is refused.
    let o = &overlays()[0];
    let mut d = o.docs.iter().find(|d| kind(d) == "Deployment").unwrap().clone();
    let c = d["spec"]["template"]["spec"]["containers"][0].as_mapping_mut().unwrap();
    c.insert("imagePullPolcy".into(), "Always".into());
    let (ok, out) = validate(&[d]);
    assert!(!ok, "accepted:\n{out}");
    assert!(out.contains("imagePullPolcy"), "{out}");
}
