//! The listener's handshake deadline under TLS against tonic's own TLS server and client: a
//! real TLS connection completes its handshake (both exchanges) and may then stay idle past the
//! deadline without being closed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use moe_proto::v1::GetPlacementRequest;
use moe_proto::v1::control_client::ControlClient;
use moe_runtime::net::{ListenConfig, bind_with};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::service::Routes;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

/// A CA and a certificate for localhost signed by it: (CA, certificate, key), PEM.
fn certificates() -> (String, String, String) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// One call, answered UNIMPLEMENTED by a server without services: served.
async fn call(client: &mut ControlClient<Channel>) {
    let err = client
        .get_placement(GetPlacementRequest { target: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
}

#[tokio::test]
async fn an_established_tls_connection_outlives_the_handshake_deadline() {
    let (ca, cert, key) = certificates();
    let deadline = Duration::from_millis(300);
    let config = ListenConfig {
        max_connections: 8,
        handshake_deadline: deadline,
        handshake_exchanges: 2,
    };
    let (incoming, addr) = bind_with("127.0.0.1:0".parse().unwrap(), config).await.unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let incoming = incoming.map(move |connection| {
        count.fetch_add(1, Ordering::SeqCst);
        connection
    });
    let server = Server::builder()
        .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
        .unwrap()
        .add_routes(Routes::default())
        .serve_with_incoming(incoming);
    tokio::spawn(server);

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Connected eagerly (TLS and HTTP/2 handshakes), then idle past the deadline before any
    // call, and again between calls.
    tokio::time::sleep(deadline * 4).await;
    let mut client = ControlClient::new(channel);
    call(&mut client).await;
    tokio::time::sleep(deadline * 4).await;
    call(&mut client).await;
    // Both calls went over the first connection: it was never closed and reopened.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}
