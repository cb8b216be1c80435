//! The accept loop against real sockets on 127.0.0.1, with an echo server standing in for
//! HTTP/2: it answers whatever it reads, so a client that sends the preface gets the server's
//! answer that ends its handshake.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_stream::StreamExt;

use super::*;
use crate::net::HANDSHAKE_BYTES;

const PREFACE: &[u8; HANDSHAKE_BYTES] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Far beyond any step here, so a slow machine cannot fail a test; never waited out on success.
const PATIENCE: Duration = Duration::from_secs(20);

/// An echo server behind the accept loop; returns its address and how many connections it took.
async fn echo_server(max_connections: usize, handshake_deadline: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    echo_server_with(ListenConfig {
        max_connections,
        handshake_deadline,
        handshake_exchanges: 1,
    })
    .await
}

async fn echo_server_with(config: ListenConfig) -> (SocketAddr, Arc<AtomicUsize>) {
    let (mut incoming, addr) = crate::net::bind_with("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Some(connection) = incoming.next().await {
            let mut connection = connection.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
                while let Ok(n @ 1..) = connection.read(&mut buf).await {
                    if connection.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

async fn wait_accepted(accepted: &AtomicUsize, n: usize) {
    let start = Instant::now();
    while accepted.load(Ordering::SeqCst) < n {
        assert!(start.elapsed() < PATIENCE, "the server never took connection {n}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Whether the server closed `stream` within `wait` (EOF or a reset); data read is an error.
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(wait, stream.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => true,
        Ok(Ok(n)) => panic!("unexpected {n} bytes"),
        Err(_) => false,
    }
}

/// Sends `bytes` and reads their echo.
async fn round_trip(stream: &mut TcpStream, bytes: &[u8]) {
    stream.write_all(bytes).await.unwrap();
    let mut echo = vec![0u8; bytes.len()];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echo, bytes);
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_at_the_deadline() {
    let deadline = Duration::from_millis(200);
    let (addr, _) = echo_server(8, deadline).await;
    let start = Instant::now();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut silent, PATIENCE).await);
    assert!(start.elapsed() >= deadline);
}

#[tokio::test]
async fn a_partial_preface_even_answered_is_closed_at_the_deadline() {
    let (addr, _) = echo_server(8, Duration::from_millis(200)).await;
    let mut partial = TcpStream::connect(addr).await.unwrap();
    round_trip(&mut partial, &PREFACE[..10]).await;
    assert!(closed_within(&mut partial, PATIENCE).await);
}

#[tokio::test]
async fn a_connection_that_completed_its_handshake_may_stay_idle() {
    let deadline = Duration::from_millis(200);
    let (addr, _) = echo_server(8, deadline).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    round_trip(&mut client, PREFACE).await;
    assert!(!closed_within(&mut client, deadline * 4).await);
    round_trip(&mut client, b"still here").await;
}

#[tokio::test]
async fn under_tls_one_answered_exchange_is_not_enough() {
    // A whole ClientHello answered by the server's flight, then nothing: closed; a client that
    // goes on (its Finished, answered) is established.
    let deadline = Duration::from_millis(200);
    let (addr, _) = echo_server_with(ListenConfig {
        max_connections: 8,
        handshake_deadline: deadline,
        handshake_exchanges: 2,
    })
    .await;
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    round_trip(&mut stalled, PREFACE).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    round_trip(&mut client, PREFACE).await;
    round_trip(&mut client, PREFACE).await;
    assert!(closed_within(&mut stalled, PATIENCE).await);
    assert!(!closed_within(&mut client, deadline * 4).await);
    round_trip(&mut client, b"still here").await;
}

#[tokio::test]
async fn at_the_bound_the_oldest_handshaking_connection_is_evicted_for_a_new_one() {
    let (addr, accepted) = echo_server(2, Duration::from_secs(3600)).await;
    let mut oldest = TcpStream::connect(addr).await.unwrap();
    wait_accepted(&accepted, 1).await;
    let mut second = TcpStream::connect(addr).await.unwrap();
    wait_accepted(&accepted, 2).await;

    let mut client = TcpStream::connect(addr).await.unwrap();
    round_trip(&mut client, PREFACE).await;
    assert!(closed_within(&mut oldest, PATIENCE).await);
    assert!(!closed_within(&mut second, Duration::from_millis(200)).await);
}

#[tokio::test]
async fn at_the_bound_with_nothing_to_evict_a_new_connection_waits_for_a_slot() {
    let (addr, accepted) = echo_server(1, Duration::from_secs(3600)).await;
    let mut first = TcpStream::connect(addr).await.unwrap();
    round_trip(&mut first, PREFACE).await;

    let mut waiting = TcpStream::connect(addr).await.unwrap();
    waiting.write_all(PREFACE).await.unwrap();
    let mut echo = [0u8; HANDSHAKE_BYTES];
    let early = tokio::time::timeout(Duration::from_millis(300), waiting.read_exact(&mut echo)).await;
    assert!(early.is_err(), "served beyond the bound");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    drop(first);
    tokio::time::timeout(PATIENCE, waiting.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, PREFACE);
}

#[test]
fn the_bound_follows_the_open_file_limit() {
    assert_eq!(connection_bound(Some(1024)), 1024 * 3 / 4 - 64);
    assert_eq!(connection_bound(Some(256)), 128);
    assert_eq!(connection_bound(Some(64)), MIN_CONNECTIONS);
    assert_eq!(connection_bound(Some(1 << 20)), MAX_CONNECTIONS);
    assert_eq!(connection_bound(None), connection_bound(Some(1024)));
}
