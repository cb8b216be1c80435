//! The NCCL data plane's control plane through a real coordinator: which workers form the
//! group, in which ranks and epochs, and how rank 0's unique id reaches the others. The
//! "workers" here are real gRPC clients registering as NCCL-capable (as a worker started with
//! `--nccl-device` does); the communicator itself needs GPUs and NCCL (not on CI machines), so
//! this checks what the coordinator decides and tells, not NCCL.

use std::time::Duration;

use moe_model::checkpoint::Checkpoint;
use moe_proto::v1::{HeartbeatResponse, NcclGroup, Role, WorkerStatus};
use moe_runtime::control::Membership;
use moe_runtime::member::Member;
use moe_tests::cluster::LocalCluster;

mod common;
use common::*;

async fn join(endpoint: &str, model_id: &str, role: Role, port: u16) -> Membership {
    let me = Member {
        id: moe_runtime::member::generated_worker_id(role),
        role,
        address: format!("127.0.0.1:{port}"),
        model_id: model_id.to_owned(),
        seq: 0,
        nccl: true,
        incarnation: moe_runtime::member::random_u64(),
    };
    Membership::register(&[endpoint.to_owned()], me, false, Duration::from_secs(10))
        .await
        .expect("registering")
}

async fn beat(m: &mut Membership, ready_epoch: u64) -> HeartbeatResponse {
    let status = WorkerStatus {
        nccl_ready_epoch: ready_epoch,
        ..Default::default()
    };
    m.heartbeat(status).await.expect("heartbeat")
}

async fn group(m: &mut Membership) -> NcclGroup {
    beat(m, 0).await.nccl.expect("an NCCL group")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_forms_nccl_groups_relays_rank_0s_id_and_starts_over_on_membership_changes() {
    // The cluster's own workers are not NCCL-capable: they never appear in a group. The test's
    // members heartbeat well within the coordinator's timeout (3 s), but for the one it lets expire.
    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 1, &[]);
    let ep = cluster.endpoint.clone();
    let model = moe_model::identity::model_identity(&tiny(), &Checkpoint::open(&tiny()).unwrap()).unwrap();

    let mut attention = join(&ep, &model, Role::Attention, 1).await;
    assert!(
        beat(&mut attention, 0).await.nccl.is_none(),
        "no group without an expert worker"
    );
    let mut expert = join(&ep, &model, Role::Expert, 2).await;
    let g = group(&mut expert).await;
    assert_eq!((g.rank, g.world_size), (1, 2));
    assert!(g.unique_id.is_empty() && !g.ready);
    let ranks: Vec<&str> = g.peers.iter().map(|p| p.worker_id.as_str()).collect();
    assert_eq!(ranks, [attention.worker_id(), expert.worker_id()]);
    let epoch = g.epoch;
    assert_eq!(group(&mut attention).await.rank, 0);

    // Only rank 0, only for this epoch, only a 128-byte id; refusals name the reason.
    let id = vec![42u8; 128];
    let refused = expert.publish_nccl_id(epoch, id.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("not rank 0"), "{refused:?}");
    let refused = attention.publish_nccl_id(epoch, vec![1; 12]).await.unwrap_err();
    assert!(refused.message().contains("128 bytes, got 12"), "{refused:?}");
    let refused = attention.publish_nccl_id(epoch + 5, id.clone()).await.unwrap_err();
    assert!(refused.message().contains("not the current"), "{refused:?}");
    attention
        .publish_nccl_id(epoch, id.clone())
        .await
        .expect("rank 0 publishes");
    let g = group(&mut expert).await;
    assert_eq!((g.epoch, &g.unique_id), (epoch, &id), "the id reaches rank 1");
    assert!(!g.ready);

    // Ready once every member reports this epoch's communicator.
    beat(&mut attention, epoch).await;
    let g = beat(&mut expert, epoch).await.nccl.unwrap();
    assert!(g.ready, "both members reported epoch {epoch}");

    // A second NCCL-capable expert worker joins: a new epoch, no id yet, nobody ready.
    let mut second = join(&ep, &model, Role::Expert, 3).await;
    let g = group(&mut second).await;
    assert_eq!((g.epoch, g.rank, g.world_size), (epoch + 1, 2, 3));
    let g = beat(&mut attention, epoch).await.nccl.unwrap();
    assert!(g.unique_id.is_empty() && !g.ready && g.epoch == epoch + 1);

    // It goes silent: after the heartbeat timeout the group is rebuilt without it.
    // Both members beat on every poll: the check needs them `&mut`, so they are shared with it.
    let members = std::sync::Arc::new(tokio::sync::Mutex::new((attention, expert)));
    let g = eventually(Duration::from_secs(30), "the silent member was never dropped", || {
        let members = members.clone();
        async move {
            let (attention, expert) = &mut *members.lock().await;
            let g = group(attention).await;
            beat(expert, 0).await;
            if g.world_size == 2 { Ok(g) } else { Err(g) }
        }
    })
    .await;
    assert_eq!(g.epoch, epoch + 2);
    assert!(g.unique_id.is_empty() && !g.ready);
}
