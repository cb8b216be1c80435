//! One accepted connection as the servers see it: a TCP stream that must complete its
//! handshake before a deadline, may be evicted while it has not, and holds a slot of its
//! listener's connection bound until it is dropped.
//!
//! "Handshake" here is protocol-agnostic: one *exchange* is the client sending at least
//! [`HANDSHAKE_BYTES`] (the HTTP/2 client preface; a TLS ClientHello is longer) and the server
//! answering (writing) after that. Plain HTTP/2 needs one: the preface and the client's
//! SETTINGS, then the server's SETTINGS ack. TLS needs two: a whole ClientHello, the server's
//! flight; the client's Finished, then the server's tickets or HTTP/2 SETTINGS. A socket that
//! sends nothing, a partial preface, or stops anywhere in the TLS handshake never gets the last
//! answer and is closed at the deadline. Afterwards the wrapper is a plain pass-through: an idle
//! but established connection (a client's pooled channel) is legitimate and is never timed out
//! here.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::ListenConfig;

/// Bytes a client must send before the handshake can count as done: the HTTP/2 client preface
/// (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
pub const HANDSHAKE_BYTES: usize = 24;

/// A connection still in its handshake phase.
struct Handshake {
    deadline: Pin<Box<Sleep>>,
    limit: Duration,
    /// Resolves (with an error) when the accept loop drops the sender to evict this connection.
    evicted: oneshot::Receiver<()>,
    /// Exchanges still to complete.
    exchanges: u8,
    /// Bytes read since the last completed exchange.
    read: usize,
}

/// An accepted connection; see the module documentation.
pub struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    handshake: Option<Handshake>,
    /// Why the handshake failed (deadline, eviction): every later read or write fails alike.
    failed: Option<(io::ErrorKind, String)>,
    _slot: OwnedSemaphorePermit,
}

impl Connection {
    pub(super) fn new(
        stream: TcpStream,
        peer: SocketAddr,
        slot: OwnedSemaphorePermit,
        config: &ListenConfig,
        evicted: oneshot::Receiver<()>,
    ) -> Connection {
        Connection {
            stream,
            peer,
            handshake: Some(Handshake {
                deadline: Box::pin(tokio::time::sleep(config.handshake_deadline)),
                limit: config.handshake_deadline,
                evicted,
                exchanges: config.handshake_exchanges,
                read: 0,
            }),
            failed: None,
            _slot: slot,
        }
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// An error once the deadline has passed or the connection was evicted (from then on);
    /// registers `cx` for both otherwise.
    fn check_handshake(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Some((kind, why)) = &self.failed {
            return Err(io::Error::new(*kind, why.clone()));
        }
        let Some(h) = &mut self.handshake else { return Ok(()) };
        let failure = if h.deadline.as_mut().poll(cx).is_ready() {
            tracing::debug!(peer = %self.peer, limit = ?h.limit, read = h.read, "closing a connection that did not complete its handshake in time");
            (io::ErrorKind::TimedOut, format!("no handshake within {:?}", h.limit))
        } else if Pin::new(&mut h.evicted).poll(cx).is_ready() {
            tracing::debug!(peer = %self.peer, read = h.read, "evicting a connection still in its handshake: the listener is at its bound");
            (
                io::ErrorKind::ConnectionAborted,
                "evicted before completing the handshake: the server is at its connection bound".to_owned(),
            )
        } else {
            return Ok(());
        };
        // Neither the timer nor the receiver is polled again (a finished oneshot must not be).
        self.handshake = None;
        self.failed = Some(failure);
        self.check_handshake(cx)
    }

    /// The server wrote: once the client has sent enough, that answer completes an exchange,
    /// and the last one ends the handshake.
    fn wrote(&mut self, n: usize) {
        let Some(h) = &mut self.handshake else { return };
        if n == 0 || h.read < HANDSHAKE_BYTES {
            return;
        }
        h.read = 0;
        h.exchanges = h.exchanges.saturating_sub(1);
        if h.exchanges == 0 {
            // Dropping the receiver tells the accept loop this one is no longer evictable.
            self.handshake = None;
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.failed.is_some() {
            return Poll::Ready(this.check_handshake(cx));
        }
        let before = buf.filled().len();
        // Data already there wins over the deadline; the deadline is checked whenever a read
        // would wait, so a client trickling bytes cannot outlast it either.
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if let Some(h) = &mut this.handshake {
                    h.read += buf.filled().len() - before;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                this.check_handshake(cx)?;
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.stream).poll_write(cx, buf))?;
        this.wrote(n);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.stream).poll_write_vectored(cx, bufs))?;
        this.wrote(n);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The TCP connect info tonic expects: `Request::remote_addr` and, under TLS,
/// `Request::peer_certs` (client certificates) look for exactly `TcpConnectInfo`.
impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}
