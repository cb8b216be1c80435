//! TLS between components (`moectl gen-certs`, `--tls-*`): the cluster serves correct tokens over
//! TLS; plaintext clients are turned away; the control plane and the expert workers' data plane
//! require a client certificate from the cluster CA, the client API only the CA (plus its
//! bearer token when configured).

use std::path::Path;

use moe_proto::v1::GetPlacementRequest;
use moe_proto::v1::control_client::ControlClient;
use moe_proto::v1::expert_client::ExpertClient;
use moe_runtime::client::ClusterClient;
use moe_runtime::tls::ClientTls;
use moe_tests::cluster::LocalCluster;
use tonic::Code;

mod common;
use common::*;

fn gen_certs(dir: &Path) {
    let out = std::process::Command::new(moectl())
        .args(["gen-certs", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["ca.pem", "node.pem", "node.key"] {
        assert!(dir.join(f).exists(), "{f} written");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_serves_tls_clients_and_turns_the_others_away() {
    let dir = tempfile::tempdir().unwrap();
    gen_certs(dir.path());
    let (ca, cert, key) = (
        dir.path().join("ca.pem"),
        dir.path().join("node.pem"),
        dir.path().join("node.key"),
    );
    let flags = [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--tls-ca",
        ca.to_str().unwrap(),
    ];
    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 2, &flags);
    let prompts = prompts_with_gap(&tiny(), &[5, 11], 20, 2e-3);

    // API client trusting the CA, without a certificate of its own: served, same tokens.
    let ca_only = ClientTls::from_files(&ca, None).unwrap();
    let mut client = ClusterClient::with_options(&cluster.endpoint, None, Some(&ca_only)).unwrap();
    for (prompt, want) in &prompts {
        assert_eq!(&client.generate(&greedy(prompt, 20)).await.unwrap().tokens, want);
    }

    // Plaintext: refused (the server speaks only TLS).
    let mut plain = ClusterClient::with_options(&cluster.endpoint, None, None).unwrap();
    assert!(plain.status().await.is_err(), "a plaintext client was served");

    // Control plane without a client certificate: UNAUTHENTICATED, naming mutual TLS.
    let channel = moe_runtime::net::channel_with(&cluster.endpoint, Some(&ca_only)).unwrap();
    let err = ControlClient::new(channel)
        .get_placement(GetPlacementRequest { target: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.message().contains("mutual TLS"), "{err}");
    // With the cluster's certificate: answered.
    let mutual = ClientTls::from_files(&ca, Some((&cert, &key))).unwrap();
    let channel = moe_runtime::net::channel_with(&cluster.endpoint, Some(&mutual)).unwrap();
    let placement = ControlClient::new(channel)
        .get_placement(GetPlacementRequest { target: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(placement.workers.len(), 2);

    // An expert worker's data plane without a client certificate: the handshake fails.
    let expert = cluster.addresses("expert-worker")[0].clone();
    let channel = moe_runtime::net::channel_with(&expert, Some(&ca_only)).unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    drop(tx);
    let result = ExpertClient::new(channel)
        .dispatch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    assert!(
        result.is_err(),
        "an expert worker accepted a client without a certificate"
    );

    // `moectl status` takes the CA from MOECTL_TLS_CA.
    let out = std::process::Command::new(moectl())
        .args(["status", "--json", "--endpoint", &cluster.endpoint])
        .env("MOECTL_TLS_CA", &ca)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["workers"].as_array().unwrap().len(), 3);
}

#[test]
fn unreadable_or_non_pem_tls_files_are_refused_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("ca.pem");
    std::fs::write(&bogus, "not a certificate").unwrap();
    let err = ClientTls::from_files(&bogus, None).unwrap_err().to_string();
    assert!(err.contains("is not PEM") && err.contains("ca.pem"), "{err}");
    let err = ClientTls::from_files(&dir.path().join("missing.pem"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.pem"), "{err}");
    // A coordinator given a broken CA refuses to start, saying why.
    let out = std::process::Command::new(moectl())
        .args(["coordinator", "--listen", "127.0.0.1:0", "--model"])
        .arg(tiny())
        .args(["--tls-cert"])
        .arg(&bogus)
        .args(["--tls-key"])
        .arg(&bogus)
        .args(["--tls-ca"])
        .arg(&bogus)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not PEM"), "{stderr}");
}
