//! Custom resources (KEDA ScaledObject, cert-manager Certificate and Issuer, LeaderWorkerSet),
//! checked structurally: only fields their CRDs define, required fields present and typed, and
//! every reference (scale target, issuer, CA secret, mounted secret) resolving inside the
//! overlay. Their published CRD schemas are not vendored here.

use std::collections::BTreeSet;

use serde_yaml_ng::Value;

use crate::render::{containers, deploy, kind, name, overlays};

/// Secrets the operator creates (deploy/README.md says how); every other mounted Secret must be
/// written by a cert-manager Certificate of the same overlay.
pub const OPERATOR_SECRETS: &[&str] = &["moe-cluster-token", "moe-client-token", "moe-api-token", "hf-token"];

fn keys(v: &Value) -> Vec<String> {
    v.as_mapping()
        .map(|m| m.keys().map(|k| k.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

fn only(place: &str, v: &Value, allowed: &[&str]) {
    for k in keys(v) {
        assert!(
            allowed.contains(&k.as_str()),
            "{place}: unknown field {k} (allowed: {allowed:?})"
        );
    }
}

fn of_kind<'a>(docs: &'a [Value], k: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| kind(d) == k).collect()
}

#[test]
fn keda_scaled_objects_are_well_formed() {
    let mut seen = 0;
    for o in overlays() {
        let deployments: BTreeSet<&str> = of_kind(&o.docs, "Deployment").into_iter().map(name).collect();
        for so in of_kind(&o.docs, "ScaledObject") {
            seen += 1;
            let place = format!("{}: ScaledObject {}", o.name, name(so));
            assert_eq!(so["apiVersion"].as_str(), Some("keda.sh/v1alpha1"), "{place}");
            let spec = &so["spec"];
            only(
                &place,
                spec,
                &[
                    "scaleTargetRef",
                    "pollingInterval",
                    "cooldownPeriod",
                    "initialCooldownPeriod",
                    "idleReplicaCount",
                    "minReplicaCount",
                    "maxReplicaCount",
                    "fallback",
                    "advanced",
                    "triggers",
                ],
            );
            let target = spec["scaleTargetRef"]["name"].as_str().unwrap_or("");
            assert!(
                deployments.contains(target),
                "{place}: target {target} is not a Deployment here"
            );
            let (min, max) = (
                spec["minReplicaCount"].as_u64().unwrap(),
                spec["maxReplicaCount"].as_u64().unwrap(),
            );
            assert!(1 <= min && min <= max, "{place}: replicas {min}..{max}");
            only(
                &place,
                &spec["advanced"],
                &[
                    "horizontalPodAutoscalerConfig",
                    "restoreToOriginalReplicaCount",
                    "scalingModifiers",
                ],
            );
            only(
                &place,
                &spec["advanced"]["horizontalPodAutoscalerConfig"],
                &["name", "behavior"],
            );
            let triggers = spec["triggers"].as_sequence().unwrap();
            assert!(!triggers.is_empty(), "{place}: no triggers");
            let mut names = BTreeSet::new();
            for t in triggers {
                only(
                    &place,
                    t,
                    &[
                        "type",
                        "name",
                        "metadata",
                        "metricType",
                        "authenticationRef",
                        "useCachedMetrics",
                    ],
                );
                assert_eq!(t["type"].as_str(), Some("prometheus"), "{place}");
                assert!(
                    names.insert(t["name"].as_str().unwrap()),
                    "{place}: trigger names repeat"
                );
                if let Some(m) = t["metricType"].as_str() {
                    assert!(
                        ["AverageValue", "Value", "Utilization"].contains(&m),
                        "{place}: metricType {m}"
                    );
                }
                let md = &t["metadata"];
                only(
                    &place,
                    md,
                    &[
                        "serverAddress",
                        "query",
                        "threshold",
                        "activationThreshold",
                        "namespace",
                        "ignoreNullValues",
                        "unsafeSsl",
                        "customHeaders",
                        "queryParameters",
                    ],
                );
                assert!(md["serverAddress"].as_str().unwrap().starts_with("http"), "{place}");
                assert!(
                    md["query"].as_str().unwrap().contains("moe_"),
                    "{place}: query reads no moe_ metric"
                );
                // KEDA takes thresholds as strings.
                let threshold: f64 = md["threshold"]
                    .as_str()
                    .expect("threshold as a string")
                    .parse()
                    .unwrap();
                assert!(threshold > 0.0, "{place}: threshold {threshold}");
            }
        }
    }
    assert!(seen >= 4, "{seen} ScaledObjects in all overlays");
}

#[test]
fn certificates_issuers_and_mounted_secrets_resolve() {
    let mut certificates_seen = 0;
    for o in overlays() {
        let issuers = of_kind(&o.docs, "Issuer");
        let certs = of_kind(&o.docs, "Certificate");
        let issued: BTreeSet<&str> = certs
            .iter()
            .map(|c| c["spec"]["secretName"].as_str().unwrap())
            .collect();
        for i in &issuers {
            let place = format!("{}: Issuer {}", o.name, name(i));
            assert_eq!(i["apiVersion"].as_str(), Some("cert-manager.io/v1"), "{place}");
            only(&place, &i["spec"], &["selfSigned", "ca"]);
            assert_eq!(keys(&i["spec"]).len(), 1, "{place}: exactly one issuer type");
            if let Some(secret) = i["spec"]["ca"]["secretName"].as_str() {
                let ca = certs.iter().find(|c| c["spec"]["secretName"].as_str() == Some(secret));
                assert!(
                    ca.is_some_and(|c| c["spec"]["isCA"].as_bool() == Some(true)),
                    "{place}: {secret} is not a CA Certificate here"
                );
            }
        }
        for c in &certs {
            certificates_seen += 1;
            let place = format!("{}: Certificate {}", o.name, name(c));
            assert_eq!(c["apiVersion"].as_str(), Some("cert-manager.io/v1"), "{place}");
            let spec = &c["spec"];
            only(
                &place,
                spec,
                &[
                    "secretName",
                    "commonName",
                    "dnsNames",
                    "ipAddresses",
                    "uris",
                    "isCA",
                    "duration",
                    "renewBefore",
                    "privateKey",
                    "usages",
                    "issuerRef",
                    "subject",
                ],
            );
            assert!(!spec["secretName"].as_str().unwrap().is_empty(), "{place}");
            let issuer = spec["issuerRef"]["name"].as_str().unwrap();
            assert!(
                issuers.iter().any(|i| name(i) == issuer),
                "{place}: issuer {issuer} not here"
            );
            assert_eq!(spec["issuerRef"]["kind"].as_str(), Some("Issuer"), "{place}");
            only(
                &place,
                &spec["privateKey"],
                &["algorithm", "size", "encoding", "rotationPolicy"],
            );
            assert!(
                ["RSA", "ECDSA", "Ed25519"].contains(&spec["privateKey"]["algorithm"].as_str().unwrap()),
                "{place}"
            );
            for d in ["duration", "renewBefore"] {
                if let Some(v) = spec[d].as_str() {
                    assert!(
                        v.ends_with('h') && v[..v.len() - 1].parse::<u32>().is_ok(),
                        "{place}: {d} {v}"
                    );
                }
            }
            for u in spec["usages"].as_sequence().into_iter().flatten() {
                let u = u.as_str().unwrap();
                assert!(
                    [
                        "server auth",
                        "client auth",
                        "digital signature",
                        "key encipherment",
                        "cert sign"
                    ]
                    .contains(&u),
                    "{place}: usage {u}"
                );
            }
            if spec["isCA"].as_bool() != Some(true) {
                assert!(
                    spec["dnsNames"].as_sequence().is_some_and(|n| !n.is_empty()),
                    "{place}: no dnsNames"
                );
            }
        }
        // Every Secret a pod mounts exists once deployed.
        let readme = std::fs::read_to_string(deploy().join("README.md")).unwrap();
        for c in containers(o.name, &o.docs) {
            for v in c.pod["volumes"].as_sequence().into_iter().flatten() {
                let Some(secret) = v["secret"]["secretName"].as_str() else {
                    continue;
                };
                let by_operator = OPERATOR_SECRETS.contains(&secret) && readme.contains(secret);
                assert!(
                    issued.contains(secret) || by_operator,
                    "{}: mounts Secret {secret}, which nothing creates (nor deploy/README.md names)",
                    c.place
                );
            }
        }
    }
    assert!(certificates_seen >= 2, "no Certificates in any overlay");
}

#[test]
fn leader_worker_sets_are_well_formed() {
    let o = overlays().iter().find(|o| o.name == "multinode").unwrap();
    let sets = of_kind(&o.docs, "LeaderWorkerSet");
    assert_eq!(sets.len(), 1);
    for lws in sets {
        let place = format!("{}: LeaderWorkerSet {}", o.name, name(lws));
        assert_eq!(
            lws["apiVersion"].as_str(),
            Some("leaderworkerset.x-k8s.io/v1"),
            "{place}"
        );
        let spec = &lws["spec"];
        only(
            &place,
            spec,
            &[
                "replicas",
                "leaderWorkerTemplate",
                "rolloutStrategy",
                "startupPolicy",
                "networkConfig",
            ],
        );
        let t = &spec["leaderWorkerTemplate"];
        only(
            &place,
            t,
            &[
                "size",
                "leaderTemplate",
                "workerTemplate",
                "restartPolicy",
                "subGroupPolicy",
            ],
        );
        assert!(t["size"].as_u64().unwrap() >= 2, "{place}: size");
        assert!(
            ["RecreateGroupOnPodRestart", "None"].contains(&t["restartPolicy"].as_str().unwrap()),
            "{place}"
        );
        assert!(
            ["LeaderCreated", "LeaderReady"].contains(&spec["startupPolicy"].as_str().unwrap()),
            "{place}"
        );
        only(
            &place,
            &spec["rolloutStrategy"],
            &["type", "rollingUpdateConfiguration"],
        );
        // The leader is the attention worker and the workers are expert workers: the pools'
        // PodDisruptionBudgets select them by these labels.
        let component = |tpl: &str| {
            t[tpl]["metadata"]["labels"]["app.kubernetes.io/component"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(component("leaderTemplate"), "attention-worker", "{place}");
        assert_eq!(component("workerTemplate"), "expert-worker", "{place}");
    }
    // The pools it replaces are gone, with their autoscalers.
    for d in &o.docs {
        if ["Deployment", "ScaledObject", "HorizontalPodAutoscaler"].contains(&kind(d)) {
            assert!(
                !name(d).ends_with("-worker"),
                "multinode still has {} {}",
                kind(d),
                name(d)
            );
        }
    }
}
