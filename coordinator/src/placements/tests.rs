//! The placement lifecycle driven by hand: members join, report loaded versions, leave and
//! drain; the load window is filled directly. No runtime, no network, no clock but `Instant`.

use std::time::{Duration, Instant};

use moe_proto::v1::Role;

use super::*;
use crate::members::DrainError;

const LAYERS: usize = 2;
const EXPERTS: usize = 8;

fn placements(min_expert_workers: usize, balance: BalanceConfig) -> Placements {
    Placements::new(PlacementConfig {
        num_layers: LAYERS,
        num_experts: EXPERTS,
        min_expert_workers,
        balance,
    })
}

fn empty_window() -> LoadWindow {
    LoadWindow::new(Duration::from_secs(30), LAYERS, EXPERTS)
}

/// A window holding `tokens` per layer, routed to `hot[layer]`.
fn window_with(tokens: u64, hot: &[usize]) -> LoadWindow {
    let mut w = empty_window();
    let mut counts = vec![0; LAYERS * EXPERTS];
    w.observe("attn-0", &counts).unwrap(); // the baseline
    for (l, &e) in hot.iter().enumerate() {
        counts[l * EXPERTS + e] = tokens;
    }
    w.observe("attn-0", &counts).unwrap();
    w
}

/// An expert worker joins; returns its id.
fn join(m: &mut Members) -> String {
    let address = format!("127.0.0.1:{}", 7000 + m.iter().count());
    m.add(crate::members::joining(Role::Expert, &address)).id
}

/// `worker`'s heartbeat, changed by `f`.
fn report(m: &mut Members, worker: &str, f: impl FnOnce(&mut moe_proto::v1::WorkerStatus)) {
    let mut status = m.get(worker).unwrap().status.clone();
    f(&mut status);
    assert!(m.heartbeat(worker, "", status));
}

fn loaded(m: &mut Members, worker: &str, version: u64) {
    report(m, worker, |s| s.placement_version = version);
}

/// Every worker of the target reports it loaded; returns the version that became active.
fn load_target(p: &mut Placements, m: &mut Members, load: &LoadWindow) -> u64 {
    let target = p.latest().expect("a target").clone();
    assert_ne!(p.active().map(|a| a.version), Some(target.version), "no target loading");
    for w in &target.workers {
        loaded(m, &w.id, target.version);
    }
    p.reconcile(m, load).expect("activated once all loaded").version
}

fn ids(p: &PlacementView) -> Vec<&str> {
    p.workers.iter().map(|w| w.id.as_str()).collect()
}

#[test]
fn joining_workers_get_a_target_that_becomes_active_once_all_loaded_it() {
    let mut m = Members::default();
    let load = empty_window();
    let mut p = placements(2, BalanceConfig::default());
    let e1 = join(&mut m);
    assert!(p.reconcile(&m, &load).is_none());
    assert!(p.latest().is_none(), "waits for --min-expert-workers");

    let e2 = join(&mut m);
    assert!(p.reconcile(&m, &load).is_none());
    let target = p.latest().unwrap();
    assert_eq!((target.version, ids(target)), (1, vec![e1.as_str(), e2.as_str()]));
    assert!(p.active().is_none());

    loaded(&mut m, &e1, 1);
    assert!(p.reconcile(&m, &load).is_none(), "one worker has not loaded it yet");
    loaded(&mut m, &e2, 1);
    assert_eq!(p.reconcile(&m, &load).map(|a| a.version), Some(1));
    assert_eq!(p.latest().unwrap().version, 1, "nothing left loading");
    assert!(
        p.reconcile(&m, &load).is_none(),
        "no change without a membership change"
    );

    // A third worker: a new target; the old placement serves until the new one is loaded.
    let e3 = join(&mut m);
    assert!(p.reconcile(&m, &load).is_none());
    assert_eq!(ids(p.latest().unwrap()), [e1.as_str(), e2.as_str(), e3.as_str()]);
    assert_eq!(p.active().unwrap().version, 1);
    assert_eq!(load_target(&mut p, &mut m, &load), 2);
}

#[test]
fn a_worker_lost_while_loading_is_left_out_of_a_new_target() {
    let mut m = Members::default();
    let load = empty_window();
    let mut p = placements(1, BalanceConfig::default());
    let (e1, e2) = (join(&mut m), join(&mut m));
    p.reconcile(&m, &load);
    assert_eq!(load_target(&mut p, &mut m, &load), 1);

    let e3 = join(&mut m);
    p.reconcile(&m, &load);
    assert_eq!(p.latest().unwrap().version, 2);
    loaded(&mut m, &e1, 2);
    loaded(&mut m, &e2, 2);
    m.remove(&e3).unwrap(); // lost before it loaded its slots

    // Version 2 can never be complete: replaced by version 3 without the lost worker.
    assert!(p.reconcile(&m, &load).is_none());
    let target = p.latest().unwrap();
    assert_eq!((target.version, ids(target)), (3, vec![e1.as_str(), e2.as_str()]));
    assert_eq!(p.active().unwrap().version, 1, "the old placement keeps serving");
    assert_eq!(load_target(&mut p, &mut m, &load), 3);
}

#[test]
fn a_rebalance_is_refused_before_a_placement_while_one_loads_and_without_load() {
    let mut m = Members::default();
    let hot = window_with(1000, &[0, 0]);
    let mut p = placements(1, BalanceConfig::default());
    let now = Instant::now();
    let err = p.rebalance(false, &m, &hot, now).unwrap_err();
    assert!(matches!(err, PlacementError::NoPlacement), "{err}");

    join(&mut m);
    join(&mut m);
    p.reconcile(&m, &hot);
    let err = p.rebalance(true, &m, &hot, now).unwrap_err();
    assert_eq!(
        err.to_string(),
        "placement 1 is still loading; rebalance once it is active"
    );
    load_target(&mut p, &mut m, &hot);

    let err = p.rebalance(true, &m, &empty_window(), now).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no expert load seen in the last 30s: nothing to balance on"
    );
    assert_eq!(p.latest().unwrap().version, 1, "refusals change nothing");
}

#[test]
fn a_plan_that_does_not_improve_is_not_applied() {
    let mut m = Members::default();
    let hot = window_with(1000, &[0, 0]);
    let mut p = placements(1, BalanceConfig::default());
    let (e1, e2) = (join(&mut m), join(&mut m));
    p.reconcile(&m, &empty_window());
    load_target(&mut p, &mut m, &hot);

    // Expert 0 takes all the load and no worker has a spare slot for a replica: whatever
    // worker holds it carries everything.
    let r = p.rebalance(false, &m, &hot, Instant::now()).unwrap();
    assert_eq!(r.target_version, 0);
    assert_eq!((r.imbalance_before, r.imbalance_after), (2.0, 2.0));
    assert_eq!(
        r.detail,
        "placement 1 kept: imbalance 2.000 is as good as planning gets"
    );
    assert_eq!(p.latest().unwrap().version, 1, "no target");

    // One spare slot each: expert 0 gets a replica on both workers.
    for w in [&e1, &e2] {
        report(&mut m, w, |s| s.spare_slots = 1);
    }
    let r = p.rebalance(false, &m, &hot, Instant::now()).unwrap();
    assert_eq!(r.target_version, 2, "the kept plan's version was not used");
    assert!(r.imbalance_after < 1.05, "{r:?}");
    assert_eq!(p.active().unwrap().version, 1);
    assert_eq!(load_target(&mut p, &mut m, &hot), 2);
    assert_eq!(p.active().unwrap().owners(0, 0).len(), 2);
}

#[test]
fn draining_expert_worker_is_released_once_a_placement_without_it_is_active() {
    let mut m = Members::default();
    let load = empty_window();
    let mut p = placements(1, BalanceConfig::default());
    let (e1, e2) = (join(&mut m), join(&mut m));
    p.reconcile(&m, &load);
    load_target(&mut p, &mut m, &load);
    assert!(!p.releases(&e1), "not draining: in the active placement");

    assert_eq!(m.drain(&e1), Ok(Role::Expert));
    assert!(matches!(m.drain(&e2), Err(DrainError::LastWorker { .. })));
    p.reconcile(&m, &load);
    assert_eq!(ids(p.latest().unwrap()), [e2.as_str()]);
    assert!(!p.releases(&e1), "its replacement is still loading");
    assert_eq!(load_target(&mut p, &mut m, &load), 2);
    assert!(p.releases(&e1));
}

#[test]
fn automatic_rebalance_respects_threshold_min_tokens_and_interval() {
    let balance = BalanceConfig {
        window: Duration::from_secs(30),
        threshold: 1.5,
        min_interval: Duration::from_secs(60),
        min_tokens: 1000,
    };
    let mut m = Members::default();
    for _ in 0..2 {
        let w = join(&mut m);
        report(&mut m, &w, |s| s.spare_slots = 1);
    }
    let mut p = placements(1, balance.clone());
    p.reconcile(&m, &empty_window());
    load_target(&mut p, &mut m, &empty_window());
    let t0 = Instant::now();

    // Imbalance 2.0 over the threshold, but 2 x 400 tokens are fewer than min_tokens.
    assert!(!p.auto_rebalance(&m, &window_with(400, &[0, 0]), t0));
    let hot = window_with(1000, &[0, 0]);
    let mut off = placements(
        1,
        BalanceConfig {
            threshold: 0.0,
            ..balance
        },
    );
    // The workers already report version 1: the same even slices are active at once.
    assert_eq!(off.reconcile(&m, &empty_window()).map(|a| a.version), Some(1));
    assert!(off.imbalance(&hot.matrix()) > 1.5);
    assert!(!off.auto_rebalance(&m, &hot, t0), "threshold 0: only on request");

    assert!(p.auto_rebalance(&m, &hot, t0));
    assert_eq!(p.latest().unwrap().version, 2);
    assert!(
        !p.auto_rebalance(&m, &hot, t0 + Duration::from_secs(120)),
        "not while a target loads"
    );
    load_target(&mut p, &mut m, &hot);
    assert!(p.imbalance(&hot.matrix()) < 1.05);

    // The load moves to an expert that only one worker holds in each layer.
    let active = p.active().unwrap();
    let lone: Vec<usize> = (0..LAYERS)
        .map(|l| (0..EXPERTS).find(|&e| active.owners(l, e).len() == 1).unwrap())
        .collect();
    let moved = window_with(1000, &lone);
    assert!(p.imbalance(&moved.matrix()) > 1.5);
    assert!(
        !p.auto_rebalance(&m, &moved, t0 + Duration::from_secs(10)),
        "within the interval"
    );
    assert!(p.auto_rebalance(&m, &moved, t0 + Duration::from_secs(61)));
    assert_eq!(p.latest().unwrap().version, 3);
}
