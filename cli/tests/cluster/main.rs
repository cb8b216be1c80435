//! The cluster as separate processes on 127.0.0.1 (started by `moectl up`), in one test binary
//! by subject: each module says what it covers. Here: what more than one of them uses.

use std::time::Duration;

use moe_proto::v1::Role;
use moe_runtime::client::ClusterClient;

#[path = "../common/mod.rs"]
mod common;
use common::*;

mod balancing;
mod connections;
mod failures;
mod loading;
mod metric_names;
mod micro_batch;
mod parity;
mod protocol;
mod sampling;

/// Waits (bounded) until no attention worker holds KV blocks or requests; panics with `what`.
async fn wait_idle(client: &ClusterClient, what: &str) {
    eventually(Duration::from_secs(20), what, || {
        let mut client = client.clone();
        async move {
            let s = client.status().await.unwrap();
            let busy: Vec<_> = s
                .workers
                .into_iter()
                .filter(|w| w.role == Role::Attention as i32)
                .filter(|w| w.kv_blocks_used > 0 || w.running > 0 || w.waiting > 0)
                .collect();
            if busy.is_empty() { Ok(()) } else { Err(busy) }
        }
    })
    .await
}

/// GET `path` from a plain HTTP server.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, text.split_once("\r\n\r\n").unwrap().1.to_owned())
}
