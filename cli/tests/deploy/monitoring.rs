//! deploy/monitoring: the scrape configuration reaches Services that exist, every alert is
//! complete, and the dashboard parses with a query in every panel. (That the metric names
//! exist is proved against a running cluster: cli/tests/cluster/protocol.rs.)

use std::collections::BTreeSet;

use serde_yaml_ng::Value;

use crate::render::{deploy, documents, kind, name, overlays};

pub fn rendered() -> Vec<Value> {
    let dir = deploy().join("monitoring");
    let out = std::process::Command::new(crate::tools::kubectl())
        .arg("kustomize")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    documents(&String::from_utf8(out.stdout).unwrap(), "monitoring")
}

#[test]
fn service_monitors_select_services_with_their_ports() {
    let docs = rendered();
    let monitors: Vec<&Value> = docs.iter().filter(|d| kind(d) == "ServiceMonitor").collect();
    assert_eq!(monitors.len(), 2);
    for o in overlays() {
        for m in &monitors {
            assert_eq!(m["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
            let want = m["spec"]["selector"]["matchLabels"].as_mapping().unwrap();
            let services: Vec<&Value> = o
                .docs
                .iter()
                .filter(|d| kind(d) == "Service")
                .filter(|s| {
                    want.iter()
                        .all(|(k, v)| s["metadata"]["labels"][k.as_str().unwrap()].as_str() == v.as_str())
                })
                .collect();
            assert_eq!(
                services.len(),
                1,
                "{}: ServiceMonitor {} selects {} Services",
                o.name,
                name(m),
                services.len()
            );
            for e in m["spec"]["endpoints"].as_sequence().unwrap() {
                let port = e["port"].as_str().unwrap();
                let ports = services[0]["spec"]["ports"].as_sequence().unwrap();
                assert!(
                    ports.iter().any(|p| p["name"].as_str() == Some(port)),
                    "{}: {} has no port {port}",
                    o.name,
                    name(services[0])
                );
                assert_eq!(e["path"].as_str(), Some("/metrics"));
            }
        }
    }
}

#[test]
fn every_alert_is_complete() {
    let docs = rendered();
    let rules: Vec<&Value> = docs.iter().filter(|d| kind(d) == "PrometheusRule").collect();
    assert_eq!(rules.len(), 1);
    let mut names = BTreeSet::new();
    for group in rules[0]["spec"]["groups"].as_sequence().unwrap() {
        for r in group["rules"].as_sequence().unwrap() {
            let alert = r["alert"].as_str().expect("every rule is an alert");
            assert!(names.insert(alert.to_owned()), "{alert} twice");
            let expr = r["expr"].as_str().unwrap();
            assert!(
                expr.contains("moe_") && expr.contains("namespace=\"hunyuan-moe\""),
                "{alert}: {expr}"
            );
            assert_eq!(
                expr.matches('(').count(),
                expr.matches(')').count(),
                "{alert}: unbalanced parentheses"
            );
            let r#for = r["for"].as_str().unwrap();
            assert!(r#for.ends_with('m') && r#for[..r#for.len() - 1].parse::<u32>().is_ok(), "{alert}: for {for}", for = r#for);
            assert!(
                ["critical", "warning"].contains(&r["labels"]["severity"].as_str().unwrap()),
                "{alert}"
            );
            assert!(!r["annotations"]["summary"].as_str().unwrap().is_empty(), "{alert}");
        }
    }
    // The imbalance alert fires above the threshold the coordinators rebalance at by themselves.
    let imbalance = rules[0]["spec"]["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| r["alert"].as_str() == Some("MoeExpertImbalanceHigh"))
        .unwrap();
    let alert_at: f64 = imbalance["expr"]
        .as_str()
        .unwrap()
        .rsplit('>')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for o in overlays() {
        let coordinator = crate::render::containers(o.name, &o.docs)
            .into_iter()
            .find(|c| c.args.first().map(String::as_str) == Some("coordinator"))
            .unwrap();
        let at = coordinator
            .args
            .iter()
            .position(|a| a == "--rebalance-threshold")
            .expect("--rebalance-threshold");
        let threshold: f64 = coordinator.args[at + 1].parse().unwrap();
        assert_eq!(alert_at, threshold, "{}: alert and rebalance thresholds differ", o.name);
    }
    for want in [
        "MoeNoLeader",
        "MoePlacementStuckLoading",
        "MoeExpertImbalanceHigh",
        "MoeKvCacheNearlyFull",
        "MoeRequestErrors",
        "MoeWorkerFlapping",
    ] {
        assert!(names.contains(want), "no {want}: {names:?}");
    }
}

#[test]
fn the_dashboard_has_a_query_in_every_panel() {
    let docs = rendered();
    let cm = docs
        .iter()
        .find(|d| kind(d) == "ConfigMap" && name(d) == "moe-grafana-dashboard")
        .unwrap();
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"].as_str(), Some("1"));
    let json: serde_json::Value = serde_json::from_str(cm["data"]["hunyuan-moe.json"].as_str().unwrap()).unwrap();
    let panels = json["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "panel ids repeat");
        if p["type"] == "row" {
            continue;
        }
        titles.insert(p["title"].as_str().unwrap().to_owned());
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}: no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            assert!(expr.contains("moe_"), "{}: {expr}", p["title"]);
            assert_eq!(
                expr.matches('(').count(),
                expr.matches(')').count(),
                "{}: {expr}",
                p["title"]
            );
        }
    }
    for want in [
        "Tokens per second",
        "Time to first token",
        "Inter-token latency",
        "KV utilisation",
        "Workers by role",
    ] {
        assert!(titles.contains(want), "no panel {want}");
    }
    assert!(panels.iter().any(|p| p["type"] == "heatmap"), "no expert-load heat map");
}
