//! deploy/ renders, validates, and names only what exists: every kustomize overlay is rendered
//! with `kubectl kustomize` and validated offline against the Kubernetes schemas
//! (kubernetes-validate; custom resources are checked structurally in crds.rs), and the images,
//! ports, subcommands, flags and Services the manifests and the compose file use exist.

mod crds;
mod monitoring;
mod reachability;
mod render;
mod schemas;
mod tools;
mod workloads;

use std::collections::{BTreeMap, BTreeSet};

use render::{containers, deploy, documents, overlays, strings};

/// Images the project uses but does not build, pinned.
const EXTERNAL_IMAGES: &[&str] = &["quay.io/coreos/etcd:v3.4.23", "busybox:1.36", "python:3.12-slim"];

/// The tag a Dockerfile builds (`docker build ... -t TAG` in its header).
fn built_tag(dockerfile: &str) -> String {
    let text = std::fs::read_to_string(deploy().join("docker").join(dockerfile)).unwrap();
    text.split(" -t ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("{dockerfile}: no build command with -t"))
        .to_owned()
}

fn exposed_ports(dockerfile: &str) -> BTreeSet<u16> {
    let text = std::fs::read_to_string(deploy().join("docker").join(dockerfile)).unwrap();
    let line = text.lines().find(|l| l.starts_with("EXPOSE")).expect("EXPOSE line");
    line.split_whitespace().skip(1).map(|p| p.parse().unwrap()).collect()
}

fn is_project_image(image: &str) -> bool {
    image == built_tag("Dockerfile") || image == built_tag("Dockerfile.cuda")
}

/// (place, image, args) of every container running the project's image: k8s overlays and
/// compose.
fn moectl_invocations() -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    for o in overlays() {
        for c in containers(o.name, &o.docs) {
            if is_project_image(&c.image) {
                out.push((c.place, c.image, c.args));
            }
        }
    }
    let text = std::fs::read_to_string(deploy().join("compose.yaml")).unwrap();
    let compose = &documents(&text, "compose.yaml")[0];
    for (svc_name, svc) in compose["services"].as_mapping().unwrap() {
        let image = svc["image"].as_str().unwrap().to_owned();
        if is_project_image(&image) {
            out.push((
                format!("compose {}", svc_name.as_str().unwrap()),
                image,
                strings(&svc["command"]),
            ));
        }
    }
    out
}

#[test]
fn every_image_is_built_by_the_project_or_pinned() {
    let (cpu, cuda) = (built_tag("Dockerfile"), built_tag("Dockerfile.cuda"));
    for o in overlays() {
        let mut project = 0;
        for c in containers(o.name, &o.docs) {
            assert!(
                is_project_image(&c.image) || EXTERNAL_IMAGES.contains(&c.image.as_str()),
                "{} uses {}: neither built by the project nor a pinned external image",
                c.place,
                c.image
            );
            if is_project_image(&c.image) {
                project += 1;
                // The GPU overlays run the CUDA build everywhere (one image per cluster).
                let want = if o.name == "cpu" { &cpu } else { &cuda };
                assert_eq!(&c.image, want, "{}", c.place);
            }
        }
        assert!(project >= 4, "{}: {project} project containers", o.name);
    }
}

#[test]
fn ports_agree_with_the_images_and_servers_have_probes() {
    for dockerfile in ["Dockerfile", "Dockerfile.cuda"] {
        let exposed = exposed_ports(dockerfile);
        for (place, _, args) in moectl_invocations() {
            for w in args.windows(2) {
                if matches!(w[0].as_str(), "--listen" | "--metrics-listen") {
                    let port: u16 = w[1].rsplit(':').next().unwrap().parse().unwrap();
                    assert!(
                        exposed.contains(&port),
                        "{place}: {} {} not exposed by {dockerfile}",
                        w[0],
                        w[1]
                    );
                }
            }
        }
        for o in overlays() {
            for c in containers(o.name, &o.docs)
                .into_iter()
                .filter(|c| is_project_image(&c.image))
            {
                for p in c.spec["ports"].as_sequence().into_iter().flatten() {
                    let port = p["containerPort"].as_u64().unwrap() as u16;
                    assert!(
                        exposed.contains(&port),
                        "{}: containerPort {port} not exposed by {dockerfile}",
                        c.place
                    );
                }
            }
        }
    }
    for o in overlays() {
        for c in containers(o.name, &o.docs).into_iter().filter(|c| c.long_running) {
            assert!(
                !c.spec["readinessProbe"].is_null() && !c.spec["livenessProbe"].is_null(),
                "{}: probes missing",
                c.place
            );
        }
    }
}

#[test]
fn every_subcommand_and_flag_exists_in_moectl() {
    let moectl = env!("CARGO_BIN_EXE_moectl");
    let mut help: BTreeMap<String, Option<String>> = BTreeMap::new();
    let invocations = moectl_invocations();
    let subcommands: BTreeSet<&str> = invocations.iter().map(|(_, _, a)| a[0].as_str()).collect();
    for want in [
        "coordinator",
        "attention-worker",
        "expert-worker",
        "frontend",
        "gen-model",
    ] {
        assert!(
            subcommands.contains(want),
            "no manifest runs `moectl {want}`: {subcommands:?}"
        );
    }
    for (place, _, args) in &invocations {
        let sub = &args[0];
        let text = help.entry(sub.clone()).or_insert_with(|| {
            let out = std::process::Command::new(moectl)
                .args([sub.as_str(), "--help"])
                .output()
                .unwrap();
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        });
        let text = text
            .as_ref()
            .unwrap_or_else(|| panic!("{place}: `moectl {sub}` does not exist"));
        for flag in args.iter().filter(|a| a.starts_with("--")) {
            assert!(
                text.contains(&format!("{flag} ")) || text.contains(&format!("{flag}\n")),
                "{place}: `moectl {sub}` has no {flag}"
            );
        }
    }
}

#[test]
fn etcd_and_coordinator_targets_are_services() {
    // Every `--etcd` URL and `--coordinator` address names a Service of the same overlay (or a
    // StatefulSet pod through its headless Service), on a port that Service serves.
    for o in overlays() {
        let mut used = BTreeSet::new();
        for c in containers(o.name, &o.docs) {
            for w in c.args.windows(2) {
                if matches!(w[0].as_str(), "--etcd" | "--coordinator") {
                    for target in w[1].split(',') {
                        let target = target.trim_start_matches("http://").trim_start_matches("https://");
                        if let Err(e) = reachability::resolve(o, target) {
                            panic!("{}: {} {e}", c.place, w[0]);
                        }
                        used.insert(w[0].clone());
                    }
                }
            }
        }
        assert_eq!(used.len(), 2, "{}: no --etcd or no --coordinator at all", o.name);
    }
}

#[test]
fn tls_overlay_uses_tls_everywhere() {
    // With TLS on the control plane, a process without it could not join: every coordinator
    // and worker carries the TLS and cluster-token flags, and etcd is reached over https.
    let o = overlays().iter().find(|o| o.name == "tls").unwrap();
    for c in containers(o.name, &o.docs) {
        if !is_project_image(&c.image) || c.init {
            continue;
        }
        let role = c.args[0].as_str();
        let mut want = vec!["--auth-token-file", "--cluster-auth-token-file"];
        if role != "frontend" {
            want = vec![
                "--tls-cert",
                "--tls-key",
                "--tls-ca",
                "--tls-server-name",
                "--cluster-token-file",
                "--etcd-ca",
            ];
        }
        for flag in want {
            assert!(c.args.iter().any(|a| a == flag), "{}: no {flag}", c.place);
        }
        for w in c.args.windows(2).filter(|w| w[0] == "--etcd") {
            assert!(w[1].starts_with("https://"), "{}: etcd over {}", c.place, w[1]);
        }
    }
    let etcd = containers(o.name, &o.docs)
        .into_iter()
        .find(|c| c.image.contains("etcd"))
        .unwrap();
    for flag in ["--client-cert-auth", "--peer-client-cert-auth", "--trusted-ca-file"] {
        assert!(etcd.args.iter().any(|a| a == flag), "etcd: no {flag}");
    }
    assert!(
        etcd.args.iter().any(|a| a.starts_with("https://")),
        "etcd listens without TLS"
    );
}
