//! The etcd registry and the workers' own member records against a real etcd (started by the
//! harness from the `etcd` binary, on loopback ports, data in a temporary directory).

use std::time::{Duration, Instant};

use moe_coordinator::Error;
use moe_coordinator::registry::watch::{MemberEvent, follow};
use moe_coordinator::registry::{EtcdOptions, EtcdRegistry, Fence, Member, Registry};
use moe_proto::v1::{Placement, Role};
use moe_runtime::record::RecordKeeper;
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
        incarnation: seq * 10,
    }
}

/// What is recorded under the prefix, without the coordinator-side `seq`.
async fn members(reg: &mut EtcdRegistry) -> Vec<Member> {
    let mut ms = reg.load().await.unwrap().members;
    for m in &mut ms {
        m.seq = 0;
    }
    ms
}

fn unsequenced(mut m: Member) -> Member {
    m.seq = 0;
    m
}

/// Waits (bounded, `limit`) until `check` holds for what is recorded; returns how long it took.
async fn until_recorded(
    reg: &mut EtcdRegistry,
    limit: Duration,
    what: &str,
    check: impl Fn(&[Member]) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        if let Ok(s) = reg.load().await
            && check(&s.members)
        {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
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
async fn a_new_leader_reads_the_workers_records_and_the_placement() {
    let etcd = Etcd::start();
    let keepers: Vec<RecordKeeper> = [3, 1]
        .into_iter()
        .map(|seq| RecordKeeper::spawn(options(&etcd, "/t/load"), member(seq)))
        .collect();
    let mut old = EtcdRegistry::connect(options(&etcd, "/t/load")).await.unwrap();
    until_recorded(&mut old, Duration::from_secs(10), "both records", |m| m.len() == 2).await;
    let placement = Placement {
        version: 7,
        ..Default::default()
    };
    old.put_placement(&placement).await.unwrap();
    let mut new = EtcdRegistry::connect(options(&etcd, "/t/load")).await.unwrap();
    let snapshot = new.load().await.unwrap();
    assert_eq!(snapshot.placement, Some(placement));
    let ids: Vec<&str> = snapshot.members.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids.len(), 2);
    assert!(
        snapshot.members[0].seq < snapshot.members[1].seq,
        "in the order they were written"
    );
    assert_eq!(
        members(&mut new)
            .await
            .into_iter()
            .map(|m| m.incarnation)
            .collect::<std::collections::BTreeSet<_>>(),
        [10, 30].into()
    );
    drop(keepers);
}

#[tokio::test]
async fn a_dead_workers_record_goes_within_its_ttl_and_a_leaving_one_at_once() {
    let etcd = Etcd::start();
    let mut reader = EtcdRegistry::connect(options(&etcd, "/t/expire")).await.unwrap();
    let dying = RecordKeeper::spawn(options(&etcd, "/t/expire"), member(1));
    let leaving = RecordKeeper::spawn(options(&etcd, "/t/expire"), member(2));
    until_recorded(&mut reader, Duration::from_secs(10), "both records", |m| m.len() == 2).await;
    // Kept alive for longer than the 2 s TTL: still there.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(members(&mut reader).await.len(), 2, "renewed records stay");
    // The worker dies (its task stops without revoking anything): gone within the TTL.
    dying.abort();
    let took = until_recorded(
        &mut reader,
        Duration::from_secs(10),
        "the dead worker's record gone",
        |m| m.iter().all(|m| m.id != "expert-1"),
    )
    .await;
    eprintln!("a dead worker's record vanished {took:?} after it died (TTL 2 s)");
    assert!(
        took <= Duration::from_secs(4),
        "took {took:?}, TTL 2 s (+ etcd's expiry check)"
    );
    // A worker leaving revokes its lease: gone at once.
    leaving.remove().await;
    assert!(members(&mut reader).await.is_empty());
}

#[tokio::test]
async fn a_worker_records_itself_again_after_etcd_lost_everything() {
    let mut etcd = Etcd::start();
    let keeper = RecordKeeper::spawn(options(&etcd, "/t/renew"), member(1));
    let mut reader = EtcdRegistry::connect(options(&etcd, "/t/renew")).await.unwrap();
    until_recorded(&mut reader, Duration::from_secs(10), "recorded", |m| m.len() == 1).await;
    etcd.restart_empty();
    let mut reader = EtcdRegistry::connect(options(&etcd, "/t/renew")).await.unwrap();
    until_recorded(&mut reader, Duration::from_secs(20), "recorded again", |m| m.len() == 1).await;
    assert_eq!(members(&mut reader).await, vec![unsequenced(member(1))]);
    keeper.remove().await;
}

#[tokio::test]
async fn following_the_records_sees_workers_come_and_go() {
    let etcd = Etcd::start();
    let early = RecordKeeper::spawn(options(&etcd, "/t/follow"), member(1));
    let mut reader = EtcdRegistry::connect(options(&etcd, "/t/follow")).await.unwrap();
    until_recorded(&mut reader, Duration::from_secs(10), "recorded", |m| m.len() == 1).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let follower = tokio::spawn(follow(options(&etcd, "/t/follow"), move |e| {
        let _ = tx.send(e);
    }));
    let next = async |rx: &mut tokio::sync::mpsc::UnboundedReceiver<MemberEvent>| {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("no member event within 10 s")
            .unwrap()
    };
    // What was there before: listed.
    match next(&mut rx).await {
        MemberEvent::Recorded(m) => assert_eq!(unsequenced(m), unsequenced(member(1))),
        other => panic!("{other:?}"),
    }
    // A worker joining, then leaving.
    let late = RecordKeeper::spawn(options(&etcd, "/t/follow"), member(2));
    match next(&mut rx).await {
        MemberEvent::Recorded(m) => assert_eq!(unsequenced(m), unsequenced(member(2))),
        other => panic!("{other:?}"),
    }
    late.remove().await;
    assert_eq!(next(&mut rx).await, MemberEvent::Gone("expert-2".into()));
    early.remove().await;
    assert_eq!(next(&mut rx).await, MemberEvent::Gone("expert-1".into()));
    follower.abort();
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
    let first = Placement {
        version: 1,
        ..Default::default()
    };
    reg.put_placement(&first).await.unwrap();
    // Leadership ends (its lease revoked: the election key is deleted).
    client.lease_revoke(lease).await.unwrap();
    let err = reg
        .put_placement(&Placement {
            version: 2,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotLeader(_)), "{err}");
    assert!(err.to_string().contains("no longer the leader"), "{err}");
    let snapshot = reg.load().await.unwrap();
    assert_eq!(snapshot.placement, Some(first), "nothing written after the fence fell");
}
