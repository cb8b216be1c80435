//! Membership rules of the cluster state: worker-chosen ids and incarnations, the workers' own
//! etcd records, failure reports, and what waits while etcd is unreachable.

use std::time::Duration;

use moe_model::ModelConfig;
use moe_proto::v1::{Role, WorkerStatus};

use super::{Cluster, ClusterConfig, RegisterError, RegistryAway};
use crate::departures::Departure;
use crate::placements::{BalanceConfig, PlacementError};
use crate::registry::watch::MemberEvent;
use crate::registry::{InMemoryRegistry, Member};
use crate::store::Store;

fn cluster(heartbeat_timeout: Duration) -> Cluster {
    cluster_on(heartbeat_timeout, false)
}

fn cluster_on(heartbeat_timeout: Duration, members_in_etcd: bool) -> Cluster {
    let dir = moe_tests::fixtures_dir().join("hunyuan-tiny");
    let model = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let config = ClusterConfig {
        model,
        model_id: "m".into(),
        min_expert_workers: 1,
        heartbeat_timeout,
        members_in_etcd,
        balance: BalanceConfig::default(),
    };
    Cluster::new(
        config,
        Store::spawn(Box::new(InMemoryRegistry::default()), Duration::from_secs(1)),
    )
}

fn worker(id: &str, role: Role, port: u16, incarnation: u64) -> Member {
    Member {
        id: id.into(),
        role,
        address: format!("127.0.0.1:{port}"),
        model_id: "m".into(),
        seq: 0,
        nccl: false,
        incarnation,
    }
}

fn ids(c: &Cluster) -> Vec<(String, u64)> {
    c.members.iter().map(|w| (w.id.clone(), w.incarnation)).collect()
}

fn beat(c: &mut Cluster, m: &Member) -> bool {
    let status = WorkerStatus {
        address: m.address.clone(),
        ..Default::default()
    };
    c.heartbeat(&m.id, status).known
}

#[tokio::test]
async fn a_worker_keeps_its_id_and_another_process_with_it_replaces_the_member_once_silent() {
    let mut c = cluster(Duration::from_millis(200));
    let e = worker("expert-a", Role::Expert, 1, 7);
    assert_eq!(c.register(e.clone(), true).unwrap(), "expert-a");
    // Registering again (a coordinator that forgot it, a new leader): same member.
    assert_eq!(c.register(e.clone(), true).unwrap(), "expert-a");
    assert_eq!(ids(&c), [("expert-a".to_owned(), 7)]);
    // The same id from a new process while the member heartbeats: refused (two workers given
    // one id would take turns replacing each other).
    let again = Member {
        incarnation: 8,
        ..e.clone()
    };
    let err = c.register(again.clone(), true).unwrap_err();
    assert!(matches!(err, RegisterError::IdInUse { .. }), "{err}");
    assert_eq!(ids(&c), [("expert-a".to_owned(), 7)]);
    // Once the member is silent (the old process died): replaced; it holds nothing yet.
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(c.register(again, true).unwrap(), "expert-a");
    assert_eq!(ids(&c), [("expert-a".to_owned(), 8)]);
    assert_eq!(c.departures().of(Departure::Replaced), 1);
    // No id proposed: one is given.
    let given = c.register(worker("", Role::Attention, 2, 1), true).unwrap();
    assert!(given.starts_with("attn-"), "{given}");
    // A bad id is refused by name.
    let err = c.register(worker("a/b", Role::Expert, 3, 1), true).unwrap_err();
    assert!(matches!(err, RegisterError::Id(_)), "{err}");
}

#[tokio::test]
async fn records_add_workers_and_never_override_one_that_heartbeats() {
    let mut c = cluster(Duration::from_millis(200));
    let e = worker("expert-a", Role::Expert, 1, 7);
    c.member_event(MemberEvent::Recorded(e.clone()));
    assert_eq!(ids(&c), [("expert-a".to_owned(), 7)], "a record is a worker joining");
    assert_eq!(c.members.staying().count(), 0, "pending until it heartbeats");
    assert!(
        c.placements.latest().is_none(),
        "no experts for a worker known only from its record"
    );
    // An older record of the same id (another process) while the member heartbeats: ignored.
    c.member_event(MemberEvent::Recorded(Member {
        incarnation: 6,
        ..e.clone()
    }));
    assert_eq!(ids(&c), [("expert-a".to_owned(), 7)]);
    // Its heartbeat proves it: it serves (the first placement gives it every expert).
    assert!(beat(&mut c, &e));
    assert_eq!(c.members.staying().count(), 1);
    assert!(c.placements.latest().is_some());
    // Its record gone while it heartbeats (lost to an etcd outage): kept.
    c.member_event(MemberEvent::Gone("expert-a".into()));
    assert_eq!(ids(&c).len(), 1);
    assert_eq!(c.departures().of(Departure::LeaseExpired), 0);
    // Silent for longer than the heartbeat timeout, then its record goes: dropped.
    std::thread::sleep(Duration::from_millis(250));
    c.member_event(MemberEvent::Gone("expert-a".into()));
    assert!(ids(&c).is_empty());
    assert_eq!(c.departures().of(Departure::LeaseExpired), 1);
    // A record of another model is refused, not added.
    c.member_event(MemberEvent::Recorded(Member {
        model_id: "other".into(),
        ..worker("expert-b", Role::Expert, 2, 1)
    }));
    assert!(ids(&c).is_empty());
}

#[tokio::test]
async fn only_an_attention_worker_of_the_cluster_can_report_a_failure() {
    let mut c = cluster(Duration::from_secs(60));
    let e1 = c.register(worker("expert-1", Role::Expert, 1, 1), true).unwrap();
    let e2 = c.register(worker("expert-2", Role::Expert, 2, 1), true).unwrap();
    let a = c.register(worker("attn-1", Role::Attention, 3, 1), true).unwrap();
    assert!(
        !c.report_failure(&e1, &e2, "x"),
        "an expert worker's report counts for nothing"
    );
    assert!(!c.report_failure("stranger", &e2, "x"));
    assert_eq!(ids(&c).len(), 3);
    assert_eq!(c.departures().of(Departure::ReportedFailed), 0);
    assert!(c.report_failure(&a, &e2, "x"));
    assert_eq!(ids(&c).len(), 2);
    assert_eq!(c.departures().of(Departure::ReportedFailed), 1);
}

#[tokio::test]
async fn while_etcd_is_away_changes_wait_and_known_workers_stay() {
    let mut c = cluster(Duration::from_secs(60));
    let e = worker("expert-a", Role::Expert, 1, 7);
    c.register(e.clone(), true).unwrap();
    c.register(worker("expert-b", Role::Expert, 2, 1), true).unwrap();
    c.set_registry_reachable(false);
    let err = c.register(worker("expert-new", Role::Expert, 3, 1), true).unwrap_err();
    assert_eq!(err, RegisterError::Away(RegistryAway));
    assert!(err.to_string().contains("etcd is unreachable"), "{err}");
    // A known worker registering again is no change.
    assert_eq!(c.register(e.clone(), true).unwrap(), "expert-a");
    assert!(matches!(
        c.drain("expert-b").unwrap_err(),
        crate::members::DrainError::Away(_)
    ));
    assert!(matches!(c.rebalance(true).unwrap_err(), PlacementError::Away(_)));
    assert_eq!(ids(&c).len(), 2);
    c.set_registry_reachable(true);
    c.register(worker("expert-new", Role::Expert, 3, 1), true).unwrap();
    assert_eq!(ids(&c).len(), 3);
}

#[tokio::test]
async fn a_cluster_on_etcd_refuses_workers_that_keep_no_record() {
    let mut c = cluster_on(Duration::from_secs(60), true);
    let err = c.register(worker("expert-a", Role::Expert, 1, 1), false).unwrap_err();
    assert_eq!(err, RegisterError::NotRecorded);
    assert!(err.to_string().contains("--etcd"), "{err}");
    assert_eq!(
        c.register(worker("expert-a", Role::Expert, 1, 1), true).unwrap(),
        "expert-a"
    );
}

#[tokio::test]
async fn a_stale_record_of_a_dead_worker_changes_nothing() {
    // A worker dropped for silence whose record is listed again (etcd restarted on its data
    // and renewed every lease): pending, no placement change, gone again after the timeout.
    let mut c = cluster(Duration::from_millis(200));
    let live = worker("expert-live", Role::Expert, 1, 1);
    c.register(live.clone(), true).unwrap();
    let version = c.placements.latest().unwrap().version;
    c.member_event(MemberEvent::Recorded(worker("expert-dead", Role::Expert, 2, 1)));
    assert_eq!(c.placements.latest().unwrap().version, version);
    std::thread::sleep(Duration::from_millis(250));
    assert!(beat(&mut c, &live));
    c.tick();
    assert_eq!(ids(&c), [("expert-live".to_owned(), 1)]);
    assert_eq!(
        c.placements.latest().unwrap().version,
        version,
        "the placement never moved"
    );
}
