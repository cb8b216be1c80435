//! The etcd registry against a real etcd (started by the harness from the `etcd` binary, on
//! loopback ports, data in a temporary directory).

use std::time::{Duration, Instant};

use moe_coordinator::Error;
use moe_coordinator::registry::{EtcdOptions, EtcdRegistry, Fence, Member, Registry};
use moe_proto::v1::{Placement, Role};
use moe_tests::etcd::Etcd;

fn options(etcd: &Etcd, prefix: &str) -> EtcdOptions {
    EtcdOptions {
        endpoints: vec![etcd.endpoint.clone()],
        prefix: prefix.to_owned(),
        member_ttl: Duration::from_secs(2),
        request_timeout: Duration::from_secs(2),
        credentials: None,
        tls: None,
    }
}

fn member(seq: u64) -> Member {
    Member {
        id: format!("expert-{seq}"),
        role: Role::Expert,
        address: format!("127.0.0.1:{}", 4000 + seq),
        model_id: "model-a".into(),
        seq,
        nccl: false,
    }
}

/// Retries `f` (bounded) while etcd comes back after a restart.
async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Result<T, Error>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

#[tokio::test]
async fn a_prefix_serves_one_model_only() {
    let etcd = Etcd::start();
    let mut a = EtcdRegistry::connect(options(&etcd, "/t/claim")).await.unwrap();
    a.claim("model-a").await.unwrap();
    // A second coordinator of the same model shares the prefix.
    let mut b = EtcdRegistry::connect(options(&etcd, "/t/claim")).await.unwrap();
    b.claim("model-a").await.unwrap();
    let err = b.claim("model-b").await.unwrap_err().to_string();
    assert!(err.contains("holds a cluster of model model-a, not model-b"), "{err}");
    // Another prefix is another cluster.
    let mut c = EtcdRegistry::connect(options(&etcd, "/t/other")).await.unwrap();
    c.claim("model-b").await.unwrap();
}

#[tokio::test]
async fn a_new_leader_reads_what_the_previous_one_recorded() {
    let etcd = Etcd::start();
    let mut old = EtcdRegistry::connect(options(&etcd, "/t/load")).await.unwrap();
    for seq in [3, 1, 2] {
        old.put_member(&member(seq)).await.unwrap();
    }
    old.remove_member("expert-2").await.unwrap();
    let placement = Placement {
        version: 7,
        ..Default::default()
    };
    old.put_placement(&placement).await.unwrap();
    let mut new = EtcdRegistry::connect(options(&etcd, "/t/load")).await.unwrap();
    let snapshot = new.load().await.unwrap();
    assert_eq!(snapshot.members, vec![member(1), member(3)], "in registration order");
    assert_eq!(snapshot.placement, Some(placement));
}

#[tokio::test]
async fn member_records_expire_once_nobody_renews_them() {
    let etcd = Etcd::start();
    let mut gone = EtcdRegistry::connect(options(&etcd, "/t/expire")).await.unwrap();
    gone.put_member(&member(1)).await.unwrap();
    drop(gone); // the coordinator died: nobody renews the 2 s member lease
    let mut reader = EtcdRegistry::connect(options(&etcd, "/t/expire")).await.unwrap();
    assert_eq!(reader.load().await.unwrap().members.len(), 1);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !reader.load().await.unwrap().members.is_empty() {
        assert!(Instant::now() < deadline, "the record outlived its lease");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn renewal_keeps_records_and_records_them_again_after_etcd_lost_everything() {
    let mut etcd = Etcd::start();
    let mut reg = EtcdRegistry::connect(options(&etcd, "/t/renew")).await.unwrap();
    reg.put_member(&member(1)).await.unwrap();
    reg.put_member(&member(2)).await.unwrap();
    // Renewed for longer than the 2 s TTL: still there.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert!(reg.keep_alive().await.unwrap().is_empty(), "the lease was renewed");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(reg.load().await.unwrap().members.len(), 2);
    etcd.restart_empty();
    let again = eventually("renewing after the restart", async || reg.keep_alive().await).await;
    assert_eq!(again, ["expert-1", "expert-2"], "both members recorded again");
    assert_eq!(reg.load().await.unwrap().members, vec![member(1), member(2)]);
}

#[tokio::test]
async fn a_deposed_leader_cannot_write() {
    let etcd = Etcd::start();
    let mut client = etcd_client::Client::connect([&etcd.endpoint], None).await.unwrap();
    let lease = client.lease_grant(5, None).await.unwrap().id();
    let won = client.campaign("/t/fence/leader", "me", lease).await.unwrap();
    let key = won.leader().unwrap();
    let mut reg = EtcdRegistry::connect(options(&etcd, "/t/fence")).await.unwrap();
    reg.set_fence(Some(Fence {
        key: key.key().to_vec(),
        create_revision: key.rev(),
    }));
    reg.put_member(&member(1)).await.unwrap();
    // Leadership ends (its lease revoked: the election key is deleted).
    client.lease_revoke(lease).await.unwrap();
    let err = reg.put_member(&member(2)).await.unwrap_err();
    assert!(matches!(err, Error::NotLeader(_)), "{err}");
    let err = reg
        .put_placement(&Placement {
            version: 2,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no longer the leader"), "{err}");
    let snapshot = reg.load().await.unwrap();
    assert_eq!(
        snapshot.members,
        vec![member(1)],
        "nothing written after the fence fell"
    );
    assert_eq!(snapshot.placement, None);
}
