//! The accept loop behind every server: it hands out [`Connection`]s that hold a slot of a
//! bounded pool, must complete their handshake in time, and can be evicted while they have not.
//! Without it, sockets that connect and never speak pile up until the process runs out of
//! descriptors; then every accept fails, no client is served, and tonic's loop retries
//! without pause.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::Stream;

use super::backoff::{Backoff, Every};
use super::connection::Connection;

/// How long a new connection may take to complete its handshake (see [`Connection`]). A real
/// client on any network does it in well under a second; five leaves room for a loaded host.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);

/// Most connections one listener holds where the open-file limit allows more.
pub const MAX_CONNECTIONS: usize = 4096;

/// Descriptors left for everything else a process opens (model files, outgoing channels, etcd,
/// a second listener) when the bound is derived from the open-file limit.
const RESERVED_FDS: u64 = 64;

/// The fewest connections a listener is bounded to, however low the open-file limit.
const MIN_CONNECTIONS: usize = 16;

/// How a listener bounds its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenConfig {
    pub max_connections: usize,
    pub handshake_deadline: Duration,
    /// Exchanges of the handshake (see [`Connection`]): 1 for plain HTTP/2 (or HTTP/1), 2
    /// under TLS.
    pub handshake_exchanges: u8,
}

impl ListenConfig {
    /// For this process's gRPC servers: bounded by [`MAX_CONNECTIONS`] and by three quarters of
    /// the soft open-file limit less a reserve, so accepting never exhausts the descriptors;
    /// the TLS handshake when this process serves TLS ([`crate::tls::installed`]).
    pub fn for_this_process() -> ListenConfig {
        let tls = crate::tls::installed().is_some_and(|t| t.server.is_some());
        ListenConfig {
            max_connections: connection_bound(crate::fdlimit::soft()),
            handshake_deadline: HANDSHAKE_DEADLINE,
            handshake_exchanges: if tls { 2 } else { 1 },
        }
    }
}

/// The connection bound for a soft open-file limit (`None`: unknown, taken as 1,024).
fn connection_bound(soft_limit: Option<u64>) -> usize {
    let usable = (soft_limit.unwrap_or(1024) * 3 / 4).saturating_sub(RESERVED_FDS);
    usize::try_from(usable)
        .unwrap_or(usize::MAX)
        .clamp(MIN_CONNECTIONS, MAX_CONNECTIONS)
}

/// The connections of one listener, as a stream for `serve_with_incoming_shutdown`. Dropping it
/// stops the accept loop and closes the listening socket.
pub struct Incoming {
    connections: mpsc::Receiver<io::Result<Connection>>,
    accept_loop: JoinHandle<()>,
}

impl Stream for Incoming {
    type Item = io::Result<Connection>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().connections.poll_recv(cx)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

/// Starts the accept loop on `listener`.
pub fn incoming(listener: TcpListener, config: ListenConfig) -> Incoming {
    // Connections wait here only until the server takes them, which it does at once.
    let (tx, rx) = mpsc::channel(16);
    Incoming {
        connections: rx,
        accept_loop: tokio::spawn(accept_loop(listener, config, tx)),
    }
}

async fn accept_loop(listener: TcpListener, config: ListenConfig, tx: mpsc::Sender<io::Result<Connection>>) {
    let local = listener.local_addr().ok();
    let mut slots = Slots::new(config.max_connections, local);
    let mut backoff = Backoff::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff.succeeded();
                accepted
            }
            Err(e) if transient(&e) => {
                tracing::debug!(error = %e, "a connection went away before it was accepted");
                continue;
            }
            Err(e) => {
                tokio::time::sleep(backoff.failed(&e)).await;
                continue;
            }
        };
        // Small per-layer messages must not wait for Nagle (~44 ms per round trip otherwise).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "setting TCP_NODELAY");
        }
        let slot = slots.take(&stream).await;
        let (evict, evicted) = oneshot::channel();
        slots.handshaking(evict);
        let connection = Connection::new(stream, peer, slot, &config, evicted);
        if tx.send(Ok(connection)).await.is_err() {
            return; // the server stopped
        }
    }
}

/// Errors about one connection (its client gave up before the accept), not the listener.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
    )
}

/// A listener's bounded pool of connection slots, and the connections still in their handshake,
/// oldest first, which may be evicted to make room.
struct Slots {
    pool: Arc<Semaphore>,
    max: usize,
    local: Option<SocketAddr>,
    /// Dropping a sender evicts its connection; a closed one's connection completed its
    /// handshake or is gone.
    handshaking: VecDeque<oneshot::Sender<()>>,
    at_bound: Every,
}

impl Slots {
    fn new(max: usize, local: Option<SocketAddr>) -> Slots {
        Slots {
            pool: Arc::new(Semaphore::new(max)),
            max,
            local,
            handshaking: VecDeque::new(),
            at_bound: Every::new(Duration::from_secs(60)),
        }
    }

    /// A slot for the connection just accepted. At the bound, the oldest connection still in
    /// its handshake is evicted for it (so idle sockets cannot lock out a real client queued
    /// behind them); with none to evict, this waits for any connection to close.
    async fn take(&mut self, stream: &TcpStream) -> OwnedSemaphorePermit {
        if let Ok(slot) = self.pool.clone().try_acquire_owned() {
            return slot;
        }
        let evicted = self.evict_oldest();
        if self.at_bound.due() {
            tracing::warn!(
                listener = ?self.local,
                max = self.max,
                evicted,
                peer = ?stream.peer_addr().ok(),
                "at the connection bound: evicting the oldest connection still in its handshake, or waiting for one to close"
            );
        }
        self.pool
            .clone()
            .acquire_owned()
            .await
            .expect("the pool is never closed")
    }

    fn evict_oldest(&mut self) -> bool {
        while let Some(evict) = self.handshaking.pop_front() {
            if !evict.is_closed() {
                drop(evict);
                return true;
            }
        }
        false
    }

    fn handshaking(&mut self, evict: oneshot::Sender<()>) {
        // Senders of finished handshakes are dropped when they reach the front; sweep the rest
        // now and then so the queue stays within a small multiple of the bound.
        while self.handshaking.front().is_some_and(|s| s.is_closed()) {
            self.handshaking.pop_front();
        }
        if self.handshaking.len() >= 2 * self.max {
            self.handshaking.retain(|s| !s.is_closed());
        }
        self.handshaking.push_back(evict);
    }
}

#[cfg(test)]
#[path = "listener_tests.rs"]
mod tests;
