//! Authentication without TLS (`--auth-token-file`, `--cluster-token-file`): the client API asks
//! for the client token; every control-plane call and every call to a worker asks for the
//! cluster token, and the client token does not stand in for it. Workers and operators
//! (`moectl drain`, `moectl rebalance`) present the cluster token; a worker without it cannot join.

use std::path::Path;
use std::time::Duration;

use moe_proto::v1::attention_client::AttentionClient;
use moe_proto::v1::control_client::ControlClient;
use moe_proto::v1::expert_client::ExpertClient;
use moe_proto::v1::{
    DrainRequest, GetPlacementRequest, HeartbeatRequest, PublishNcclIdRequest, RebalanceRequest, RegisterRequest,
    ReportFailureRequest, Role,
};
use moe_runtime::auth::AddBearer;
use moe_runtime::client::ClusterClient;
use moe_tests::cluster::LocalCluster;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

mod common;
use common::*;

const CLIENT_TOKEN: &str = "client-secret-1";
const CLUSTER_TOKEN: &str = "cluster-secret-2";

type Control = ControlClient<InterceptedService<Channel, AddBearer>>;

fn control(endpoint: &str, token: Option<&str>) -> Control {
    let channel = moe_runtime::net::channel_with(endpoint, None).unwrap();
    ControlClient::with_interceptor(channel, AddBearer::new(token).unwrap())
}

/// Each Control call once, with requests the coordinator refuses or answers harmlessly when
/// the caller is let in (a wrong model, unknown workers), so the cluster is left as it was.
async fn every_control_call(c: &mut Control) -> Vec<(&'static str, Result<(), Status>)> {
    let register = RegisterRequest {
        protocol_version: moe_proto::PROTOCOL_VERSION,
        role: Role::Expert as i32,
        address: "127.0.0.1:9".into(),
        model_id: "not-this-model".into(),
        nccl: false,
        worker_id: "expert-intruder".into(),
        incarnation: 1,
        recorded: false,
    };
    let heartbeat = HeartbeatRequest {
        worker_id: "nobody".into(),
        status: None,
    };
    let report = ReportFailureRequest {
        reporter_id: "nobody".into(),
        worker_id: "nobody-else".into(),
        reason: "test".into(),
    };
    let nccl = PublishNcclIdRequest {
        worker_id: "nobody".into(),
        epoch: 1,
        unique_id: vec![0; 128],
    };
    vec![
        ("Register", c.register(register).await.map(drop)),
        ("Heartbeat", c.heartbeat(heartbeat).await.map(drop)),
        (
            "GetPlacement",
            c.get_placement(GetPlacementRequest { target: false }).await.map(drop),
        ),
        ("ReportFailure", c.report_failure(report).await.map(drop)),
        (
            "Drain",
            c.drain(DrainRequest {
                worker_id: "nobody".into(),
            })
            .await
            .map(drop),
        ),
        (
            "Rebalance",
            c.rebalance(RebalanceRequest { force: false }).await.map(drop),
        ),
        ("PublishNcclId", c.publish_nccl_id(nccl).await.map(drop)),
    ]
}

fn write_token(dir: &Path, name: &str, token: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_and_the_workers_ask_for_the_cluster_token() {
    let dir = tempfile::tempdir().unwrap();
    let client_file = write_token(dir.path(), "client.token", CLIENT_TOKEN);
    let cluster_file = write_token(dir.path(), "cluster.token", CLUSTER_TOKEN);
    let cluster = LocalCluster::start(
        moectl(),
        &tiny(),
        1,
        2,
        &["--auth-token-file", &client_file, "--cluster-token-file", &cluster_file],
    );

    // The cluster formed (its workers presented the token) and serves clients with theirs.
    let mut client = ClusterClient::with_options(&cluster.endpoint, Some(CLIENT_TOKEN), None).unwrap();
    let prompts = decisive_prompts(&tiny(), &[5], 8);
    for (prompt, want) in &prompts {
        assert_eq!(&client.generate(&greedy(prompt, 8)).await.unwrap().tokens, want);
    }

    // Every Control call: refused without the cluster token, with a wrong one and with the
    // client token; let in (whatever it then answers) with the cluster token.
    for token in [None, Some("wrong"), Some(CLIENT_TOKEN)] {
        for (call, result) in every_control_call(&mut control(&cluster.endpoint, token)).await {
            let err = result.expect_err(&format!("{call} answered with token {token:?}"));
            assert_eq!(err.code(), Code::Unauthenticated, "{call} with {token:?}: {err}");
            assert!(err.message().contains("cluster token"), "{call}: {err}");
        }
    }
    for (call, result) in every_control_call(&mut control(&cluster.endpoint, Some(CLUSTER_TOKEN))).await {
        if let Err(err) = result {
            assert_ne!(
                err.code(),
                Code::Unauthenticated,
                "{call} refused the cluster token: {err}"
            );
        }
    }
    let placement = control(&cluster.endpoint, Some(CLUSTER_TOKEN))
        .get_placement(GetPlacementRequest { target: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(placement.workers.len(), 2, "nothing registered by the refused calls");

    // Even with the token, a failure report counts only from an attention worker of the
    // cluster: an expert worker (or a stranger) cannot drop its peers.
    let experts: Vec<String> = client
        .status()
        .await
        .unwrap()
        .workers
        .into_iter()
        .filter(|w| w.role == Role::Expert as i32)
        .map(|w| w.worker_id)
        .collect();
    for reporter in [experts[0].as_str(), "stranger"] {
        let report = ReportFailureRequest {
            reporter_id: reporter.into(),
            worker_id: experts[1].clone(),
            reason: "test".into(),
        };
        let answer = control(&cluster.endpoint, Some(CLUSTER_TOKEN))
            .report_failure(report)
            .await
            .unwrap()
            .into_inner();
        assert!(!answer.removed, "a report from {reporter} dropped {}", experts[1]);
    }
    let after = control(&cluster.endpoint, Some(CLUSTER_TOKEN))
        .get_placement(GetPlacementRequest { target: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.version, placement.version, "the placement did not move");

    // The workers' own ports: refused without the cluster token.
    let expert = cluster.addresses("expert-worker")[0].clone();
    let channel = moe_runtime::net::channel_with(&expert, None).unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    drop(tx);
    let err = ExpertClient::new(channel)
        .dispatch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "expert worker: {err}");
    let attention = cluster.addresses("attention-worker")[0].clone();
    let channel = moe_runtime::net::channel_with(&attention, None).unwrap();
    let err = AttentionClient::new(channel)
        .serve(moe_runtime::convert::generate_request(&greedy(&[5, 6], 2)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "attention worker: {err}");

    // A worker without the token cannot join: it stops, naming the cluster token.
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(moectl())
            .args(["expert-worker", "--coordinator", &cluster.endpoint, "--model"])
            .arg(tiny())
            .env("RUST_LOG", "warn")
            .output(),
    )
    .await
    .expect("a worker without the cluster token did not stop")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cluster token"), "{stderr}");

    // Operators: `moectl rebalance` and `moectl drain` without MOECTL_CLUSTER_TOKEN are refused;
    // with it, a drain is carried out.
    let expert_id = client
        .status()
        .await
        .unwrap()
        .workers
        .into_iter()
        .find(|w| w.role == Role::Expert as i32)
        .unwrap()
        .worker_id;
    let operator = |args: &[&str], token: Option<&str>| {
        let mut cmd = std::process::Command::new(moectl());
        cmd.args(args).args(["--wait-s", "0", "--endpoint", &cluster.endpoint]);
        cmd.env_remove("MOECTL_CLUSTER_TOKEN");
        if let Some(t) = token {
            cmd.env("MOECTL_CLUSTER_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    for args in [&["rebalance", "--force"][..], &["drain", "--worker", &expert_id]] {
        for token in [None, Some(CLIENT_TOKEN)] {
            let refused = operator(args, token);
            assert!(!refused.status.success(), "{args:?} with {token:?}");
            let stderr = String::from_utf8_lossy(&refused.stderr);
            assert!(stderr.contains("cluster token"), "{args:?}: {stderr}");
        }
    }
    let drained = operator(&["drain", "--worker", &expert_id], Some(CLUSTER_TOKEN));
    assert!(drained.status.success(), "{}", String::from_utf8_lossy(&drained.stderr));
    eventually(Duration::from_secs(60), "the drained worker leaves", || {
        let mut client = client.clone();
        let id = expert_id.clone();
        async move {
            let workers = client.status().await.unwrap().workers;
            if workers.iter().any(|w| w.worker_id == id) {
                Err(workers.len())
            } else {
                Ok(())
            }
        }
    })
    .await;
    // Still serving the same tokens, on the remaining expert worker.
    for (prompt, want) in &prompts {
        assert_eq!(&client.generate(&greedy(prompt, 8)).await.unwrap().tokens, want);
    }
}
