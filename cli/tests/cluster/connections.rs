//! Idle connections do not starve the servers: sockets that connect and never send a byte,
//! more of them than the process has descriptors, do not lock out a real client.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use moe_proto::v1::DispatchRequest;
use moe_proto::v1::expert_client::ExpertClient;
use moe_runtime::client::ClusterClient;
use moe_tests::cluster::LocalCluster;

use crate::common::*;

/// Open files every process of the cluster may have (soft and hard).
const FD_LIMIT: u64 = 256;
/// Idle sockets opened against one server: far more than it could hold at once.
const IDLE: usize = 600;
/// How long a step may take before the test fails: generous for a loaded 2-core machine; the
/// servers close idle sockets after 5 s.
const PATIENCE: Duration = Duration::from_secs(60);

/// Opens up to `n` TCP connections to `addr` that never send anything. The kernel completes
/// them from the listen backlog whether or not the server accepts; once a connect times out,
/// the backlog is full because the server accepts nothing any more, and opening stops there.
fn idle_connections(addr: &str, n: usize) -> Vec<TcpStream> {
    let addr: SocketAddr = addr.parse().unwrap();
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(s) => held.push(s),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                eprintln!("idle connection {i} to {addr} timed out: the server no longer accepts");
                break;
            }
            Err(e) => panic!("idle connection {i} to {addr}: {e}"),
        }
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_beyond_the_open_file_limit_do_not_lock_out_clients() {
    // This test holds 2 x IDLE sockets itself.
    moe_runtime::fdlimit::raise();
    let cluster = LocalCluster::start_with_fd_limit(FD_LIMIT, moectl(), &tiny(), 1, 1, &[]);
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    client.status().await.unwrap();

    // The coordinator: a new client's status call and a generation are served.
    let idle = idle_connections(&cluster.endpoint, IDLE);
    let start = Instant::now();
    let mut fresh = ClusterClient::new(&cluster.endpoint).unwrap();
    let status = tokio::time::timeout(PATIENCE, fresh.status())
        .await
        .expect("a new client's status call was not served beside the idle connections")
        .unwrap();
    eprintln!(
        "coordinator under `ulimit -n {FD_LIMIT}` with {} idle connections: a new client's status served in {:?}",
        idle.len(),
        start.elapsed()
    );
    assert_eq!(status.workers.len(), 2);
    assert!(idle.len() as u64 > FD_LIMIT, "only {} idle connections", idle.len());
    let generated = tokio::time::timeout(PATIENCE, fresh.generate(&greedy(&[5, 6, 7], 4)))
        .await
        .expect("a generation was not served beside the idle connections")
        .unwrap();
    assert_eq!(generated.tokens.len(), 4);

    // An expert worker: a new data-plane connection opens a dispatch stream.
    let expert = cluster.addresses("expert-worker").remove(0);
    let idle_on_worker = idle_connections(&expert, IDLE);
    let start = Instant::now();
    let mut dispatch = ExpertClient::new(moe_runtime::net::channel(&expert).unwrap());
    tokio::time::timeout(PATIENCE, dispatch.dispatch(tokio_stream::pending::<DispatchRequest>()))
        .await
        .expect("a new dispatch stream was not served beside the idle connections")
        .unwrap();
    eprintln!(
        "expert worker under `ulimit -n {FD_LIMIT}` with {} idle connections: a new dispatch stream opened in {:?}",
        idle_on_worker.len(),
        start.elapsed()
    );
    assert!(
        idle_on_worker.len() as u64 > FD_LIMIT,
        "only {} idle connections",
        idle_on_worker.len()
    );

    // And the cluster as a whole still serves, with every idle socket still held by this side.
    let generated = tokio::time::timeout(PATIENCE, client.generate(&greedy(&[5, 6, 7], 4)))
        .await
        .expect("the first client was not served after the floods")
        .unwrap();
    assert_eq!(generated.tokens.len(), 4);
    drop((idle, idle_on_worker));
}
