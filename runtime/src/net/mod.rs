//! Listening sockets and client channels with the settings the cluster needs everywhere:
//! TCP_NODELAY (small per-layer messages must not wait for Nagle, ~44 ms per round trip
//! otherwise), message limits large enough for a layer's activations, and (the accept loop,
//! [`Incoming`]) a bound on connections with a handshake deadline, so idle sockets cannot starve
//! a server.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Server};

use crate::auth::AddBearer;
use crate::tls::ClientTls;

mod backoff;
mod connection;
mod listener;

pub use connection::{Connection, HANDSHAKE_BYTES};
pub use listener::{HANDSHAKE_DEADLINE, Incoming, ListenConfig, MAX_CONNECTIONS};

/// Largest gRPC message (a prefill batch's activations or prompt logits): 1 GiB.
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// The HTTP/2 header list a server takes. Far above any real call's metadata, on purpose: h2
/// answers a header block over this limit that spans CONTINUATION frames with a GOAWAY, which
/// ends every other stream of the connection; below it, [`check_metadata`] refuses an oversize
/// call on its own stream.
pub const MAX_HEADER_LIST_BYTES: u32 = 256 << 10;

/// Request metadata a call may carry (a token and a few tracing headers are well under 1 KiB).
pub const MAX_METADATA_BYTES: usize = 16 << 10;

/// Refuses a call whose metadata is over [`MAX_METADATA_BYTES`], on its own stream
/// (INVALID_ARGUMENT); the connection and its other streams go on.
pub fn check_metadata<T>(req: &tonic::Request<T>) -> Result<(), tonic::Status> {
    let bytes: usize = req
        .metadata()
        .as_ref()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if bytes > MAX_METADATA_BYTES {
        return Err(tonic::Status::invalid_argument(format!(
            "request metadata is {bytes} bytes; at most {MAX_METADATA_BYTES}"
        )));
    }
    Ok(())
}

/// Binds `addr` (port 0 picks a free port) and returns the incoming connections, bounded for
/// this process ([`ListenConfig::for_this_process`]), and the address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(Incoming, SocketAddr)> {
    bind_with(addr, ListenConfig::for_this_process()).await
}

/// [`bind`] with an explicit bound and handshake deadline.
pub async fn bind_with(addr: SocketAddr, config: ListenConfig) -> std::io::Result<(Incoming, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener::incoming(listener, config), local))
}

/// A channel to another component of the cluster: it presents this process's cluster token,
/// when one is installed ([`crate::auth::install_cluster_token`]), on every call.
pub type ClusterChannel = InterceptedService<Channel, AddBearer>;

/// A lazily connecting channel to `addr` (`host:port` or a URL) of another component, with this
/// process's TLS ([`crate::tls::install`]) and cluster token when installed.
pub fn channel(addr: &str) -> Result<ClusterChannel, tonic::transport::Error> {
    let channel = channel_with(addr, crate::tls::installed().map(|t| &t.client))?;
    Ok(InterceptedService::new(channel, crate::auth::present_cluster_token()))
}

/// A channel with explicit TLS settings (`None`: plain HTTP/2).
pub fn channel_with(addr: &str, tls: Option<&ClientTls>) -> Result<Channel, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("{scheme}://{addr}")
    };
    let mut endpoint = Endpoint::from_shared(url)?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.config())?;
    }
    Ok(endpoint
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .connect_lazy())
}

/// A server builder with this process's TLS when one is installed.
pub fn server() -> Result<Server, tonic::transport::Error> {
    let builder = Server::builder().http2_max_header_list_size(MAX_HEADER_LIST_BYTES);
    match crate::tls::installed().and_then(|t| t.server.clone()) {
        Some(config) => builder.tls_config(config),
        None => Ok(builder),
    }
}

/// Announces the bound address on stdout, one line, so a parent process (`moectl up`, tests)
/// can find a server started on port 0.
pub fn announce(role: &str, addr: SocketAddr) {
    println!("LISTENING {role} {addr}");
}
