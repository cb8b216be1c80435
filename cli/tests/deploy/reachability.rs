//! Whether what the pods dial can be reached when they need it: addresses resolve to Services
//! (and, for pod names, to StatefulSet pods) in the same namespace, the coordinators are
//! reachable before they are ready (a placement needs workers that reached them first), and
//! no probe makes a restart or an unready pod out of a cluster that is only loading.

use std::collections::BTreeSet;

use serde_yaml_ng::Value;

use crate::render::{Overlay, containers, kind, name, overlays, pod_templates};

/// The namespace every namespaced object of an overlay is in.
const NAMESPACE: &str = "hunyuan-moe";

/// Where `host:port` leads in `o`: the Service it names, and the StatefulSet pod when the host
/// is a pod's DNS name (`<statefulset>-<ordinal>.<headless service>`, how the kubelet names it).
pub struct Target<'a> {
    pub service: &'a Value,
    pub pod: Option<(&'a Value, u64)>,
}

pub fn resolve<'a>(o: &'a Overlay, target: &str) -> Result<Target<'a>, String> {
    let (host, port) = target.rsplit_once(':').ok_or_else(|| format!("{target}: no port"))?;
    let port: u64 = port.parse().map_err(|_| format!("{target}: port is not a number"))?;
    let (pod, service_name) = match host.split_once('.') {
        Some((pod, service)) => (Some(pod), service),
        None => (None, host),
    };
    let service = o
        .docs
        .iter()
        .find(|d| kind(d) == "Service" && name(d) == service_name)
        .ok_or_else(|| format!("{target}: no Service {service_name}"))?;
    let served = service["spec"]["ports"]
        .as_sequence()
        .into_iter()
        .flatten()
        .any(|p| p["port"].as_u64() == Some(port));
    if !served {
        return Err(format!("{target}: Service {service_name} does not serve port {port}"));
    }
    let Some(pod) = pod else {
        return Ok(Target { service, pod: None });
    };
    // A pod name resolves only through a headless Service governing a StatefulSet.
    if service["spec"]["clusterIP"].as_str() != Some("None") {
        return Err(format!(
            "{target}: {service_name} is not headless; {pod}.{service_name} does not resolve"
        ));
    }
    let (set, ordinal) = pod
        .rsplit_once('-')
        .ok_or_else(|| format!("{target}: {pod} is not <statefulset>-<ordinal>"))?;
    let ordinal: u64 = ordinal
        .parse()
        .map_err(|_| format!("{target}: {pod} is not <statefulset>-<ordinal>"))?;
    let set = o
        .docs
        .iter()
        .find(|d| kind(d) == "StatefulSet" && name(d) == set)
        .ok_or_else(|| format!("{target}: no StatefulSet {set}"))?;
    if set["spec"]["serviceName"].as_str() != Some(service_name) {
        return Err(format!(
            "{target}: StatefulSet {} is governed by another Service",
            name(set)
        ));
    }
    let replicas = set["spec"]["replicas"].as_u64().unwrap_or(1);
    if ordinal >= replicas {
        return Err(format!("{target}: {} has {replicas} replicas", name(set)));
    }
    Ok(Target {
        service,
        pod: Some((set, ordinal)),
    })
}

#[test]
fn every_coordinator_target_resolves_before_the_coordinator_is_ready() {
    // Workers must reach the coordinators before any placement exists, and a standby must be
    // reachable to take over: every --coordinator address resolves through a Service that
    // publishes not-ready addresses, and together they name every coordinator pod.
    for o in overlays() {
        for c in containers(o.name, &o.docs) {
            let Some(w) = c.args.windows(2).find(|w| w[0] == "--coordinator") else {
                continue;
            };
            let mut named = BTreeSet::new();
            let mut all = BTreeSet::new();
            for target in w[1].split(',') {
                let t = resolve(o, target).unwrap_or_else(|e| panic!("{}: {e}", c.place));
                assert_eq!(
                    t.service["spec"]["publishNotReadyAddresses"].as_bool(),
                    Some(true),
                    "{}: {target} resolves only once a coordinator is ready",
                    c.place
                );
                let (set, ordinal) = t
                    .pod
                    .unwrap_or_else(|| panic!("{}: {target} is not one coordinator's address", c.place));
                named.insert((name(set), ordinal));
                all.extend((0..set["spec"]["replicas"].as_u64().unwrap()).map(|i| (name(set), i)));
            }
            assert_eq!(
                named, all,
                "{}: --coordinator {} leaves coordinators out",
                c.place, w[1]
            );
        }
    }
}

#[test]
fn coordinator_readiness_does_not_wait_for_a_placement() {
    // /healthz is 503 until a placement is active, which needs workers, which need to reach
    // the coordinator: a readiness on it could never become true on a fresh install.
    for o in overlays() {
        let set = o
            .docs
            .iter()
            .find(|d| kind(d) == "StatefulSet" && name(d) == "moe-coordinator")
            .unwrap_or_else(|| panic!("{}: no coordinator StatefulSet", o.name));
        let c = &set["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            c["readinessProbe"]["httpGet"]["path"].as_str(),
            Some("/livez"),
            "{}",
            o.name
        );
    }
}

/// Endpoints that answer according to the cluster (placement, leader, coordinator reachable),
/// not to the process they are asked of.
const CLUSTER_DEPENDENT: &[&str] = &["/health", "/healthz", "/v1/models"];

#[test]
fn no_liveness_probe_depends_on_the_cluster() {
    // A liveness failure restarts the container: while a model loads or the leader changes,
    // that would only add restarts. Readiness may depend on the cluster; liveness may not.
    for o in overlays() {
        for c in containers(o.name, &o.docs).into_iter().filter(|c| c.long_running) {
            let probe = &c.spec["livenessProbe"];
            assert!(!probe.is_null(), "{}: no liveness probe", c.place);
            if let Some(path) = probe["httpGet"]["path"].as_str() {
                let is_etcd = c.image.contains("etcd");
                assert!(
                    is_etcd || !CLUSTER_DEPENDENT.contains(&path),
                    "{}: liveness on {path}, which fails while the cluster does not serve",
                    c.place
                );
            }
        }
    }
}

#[test]
fn every_namespaced_object_is_in_the_namespace() {
    // Objects added by components (autoscalers, certificates) get the namespace only where the
    // kustomization that includes them sets it; without it `kubectl apply` puts them in the
    // default namespace, away from what they refer to.
    const CLUSTER_SCOPED: &[&str] = &["Namespace", "ClusterRole", "ClusterRoleBinding", "ClusterIssuer"];
    for o in overlays() {
        for doc in &o.docs {
            if CLUSTER_SCOPED.contains(&kind(doc)) {
                continue;
            }
            assert_eq!(
                doc["metadata"]["namespace"].as_str(),
                Some(NAMESPACE),
                "{}: {} {}",
                o.name,
                kind(doc),
                name(doc)
            );
        }
        assert!(
            o.docs.iter().any(|d| kind(d) == "Namespace" && name(d) == NAMESPACE),
            "{}: does not create {NAMESPACE}",
            o.name
        );
    }
}

/// The ConfigMaps and Secrets a pod template reads by name.
fn referenced_config_maps(template: &Value) -> Vec<String> {
    let spec = &template["spec"];
    let mut out = Vec::new();
    for list in ["containers", "initContainers"] {
        for c in spec[list].as_sequence().into_iter().flatten() {
            for from in c["envFrom"].as_sequence().into_iter().flatten() {
                out.extend(from["configMapRef"]["name"].as_str().map(str::to_owned));
            }
            for e in c["env"].as_sequence().into_iter().flatten() {
                out.extend(e["valueFrom"]["configMapKeyRef"]["name"].as_str().map(str::to_owned));
            }
        }
    }
    for v in spec["volumes"].as_sequence().into_iter().flatten() {
        out.extend(v["configMap"]["name"].as_str().map(str::to_owned));
    }
    out
}

#[test]
fn jobs_survive_a_config_change() {
    // A Job's pod template is immutable: if it named a hash-suffixed ConfigMap, the next
    // `kubectl apply` after any config change would be refused. Render each overlay again with
    // a changed moe-config and check that the Jobs' templates did not change; and finished
    // Jobs go away (ttlSecondsAfterFinished) so a later apply can run them again.
    for o in overlays() {
        let changed = crate::render::render_with_config_change(o.name);
        for job in o.docs.iter().filter(|d| kind(d) == "Job") {
            assert!(
                job["spec"]["ttlSecondsAfterFinished"].as_u64().is_some(),
                "{}: Job {} stays after it finished",
                o.name,
                name(job)
            );
            let again = changed
                .iter()
                .find(|d| kind(d) == "Job" && name(d) == name(job))
                .unwrap();
            assert_eq!(
                job["spec"]["template"],
                again["spec"]["template"],
                "{}: Job {}'s template changes with moe-config",
                o.name,
                name(job)
            );
            for cm in referenced_config_maps(&job["spec"]["template"]) {
                assert!(
                    o.docs.iter().any(|d| kind(d) == "ConfigMap" && name(d) == cm),
                    "{}: Job {} reads ConfigMap {cm}, which the overlay does not create",
                    o.name,
                    name(job)
                );
            }
        }
        // The Job fills the directory the pods read.
        let value = |prefix: &str| {
            let cm = o
                .docs
                .iter()
                .find(|d| kind(d) == "ConfigMap" && name(d).starts_with(prefix))
                .unwrap_or_else(|| panic!("{}: no ConfigMap {prefix}", o.name));
            cm["data"]["MOE_MODEL_DIR"].as_str().unwrap().to_owned()
        };
        assert_eq!(value("moe-model-source"), value("moe-config-"), "{}", o.name);
    }
}

#[test]
fn the_node_certificate_names_what_is_dialled() {
    // etcd checks a peer's certificate against the reverse DNS of its address (the fully
    // qualified pod name); the front end checks the coordinator pod names it dials; moectl
    // through `kubectl port-forward` dials localhost.
    let o = overlays().iter().find(|o| o.name == "tls").unwrap();
    let cert = o
        .docs
        .iter()
        .find(|d| kind(d) == "Certificate" && name(d) == "moe-node")
        .unwrap();
    let names: BTreeSet<&str> = cert["spec"]["dnsNames"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    let covered = |host: &str| {
        names.contains(host)
            || host
                .split_once('.')
                .is_some_and(|(_, rest)| names.contains(format!("*.{rest}").as_str()))
    };
    for host in [
        "localhost".to_owned(),
        format!("moe-etcd-2.moe-etcd-peers.{NAMESPACE}.svc.cluster.local"),
        "moe-etcd-0.moe-etcd-peers".to_owned(),
        "moe-etcd".to_owned(),
    ] {
        assert!(covered(&host), "moe-node does not name {host}: {names:?}");
    }
    for c in containers(o.name, &o.docs) {
        for w in c.args.windows(2).filter(|w| w[0] == "--coordinator") {
            for target in w[1].split(',') {
                let host = target.rsplit_once(':').unwrap().0;
                assert!(covered(host), "{}: moe-node does not name {host}", c.place);
            }
        }
    }
    // Every workload pod of the overlay mounts it (etcd and moectl alike).
    for doc in &o.docs {
        for (template, long_running) in pod_templates(doc) {
            if long_running {
                let secret = template["spec"]["volumes"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .any(|v| v["secret"]["secretName"].as_str() == Some("moe-node-tls"));
                assert!(secret, "tls: {} {} has no node certificate", kind(doc), name(doc));
            }
        }
    }
}
