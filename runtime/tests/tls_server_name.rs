//! `--tls-server-name`: a process checks the certificates of the components it dials against
//! that name instead of the dialled host, so a cluster reached at addresses its certificate
//! does not name (pod IPs) still verifies every peer against the cluster CA.

use std::path::Path;

use moe_proto::v1::GetPlacementRequest;
use moe_proto::v1::control_client::ControlClient;
use moe_runtime::tls::TlsArgs;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tonic::Code;
use tonic::service::Routes;
use tonic::transport::{Endpoint, Identity, Server, ServerTlsConfig};

/// Writes a CA and a node certificate naming only `moe-node` (not 127.0.0.1) into `dir`.
fn write_certificates(dir: &Path) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["moe-node".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("node.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("node.key"), key.serialize_pem()).unwrap();
}

/// Dials `addr` with the client side of `args`: Ok when a call reaches the server (which has
/// no services and answers UNIMPLEMENTED), the transport error otherwise.
async fn dial(args: &TlsArgs, addr: std::net::SocketAddr) -> Result<(), String> {
    let tls = args.load(true).unwrap().expect("TLS on");
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls.client.config())
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let err = ControlClient::new(channel)
        .get_placement(GetPlacementRequest { target: false })
        .await
        .unwrap_err();
    if err.code() == Code::Unimplemented {
        Ok(())
    } else {
        Err(format!("{err:?}"))
    }
}

#[tokio::test]
async fn peers_are_checked_against_the_configured_name() {
    let dir = tempfile::tempdir().unwrap();
    write_certificates(dir.path());
    let file = |f: &str| Some(dir.path().join(f));
    let identity = Identity::from_pem(
        std::fs::read(dir.path().join("node.pem")).unwrap(),
        std::fs::read(dir.path().join("node.key")).unwrap(),
    );
    let (incoming, addr) = moe_runtime::net::bind_with(
        "127.0.0.1:0".parse().unwrap(),
        moe_runtime::net::ListenConfig {
            max_connections: 8,
            handshake_deadline: std::time::Duration::from_secs(5),
            handshake_exchanges: 2,
        },
    )
    .await
    .unwrap();
    let server = Server::builder()
        .tls_config(ServerTlsConfig::new().identity(identity))
        .unwrap()
        .add_routes(Routes::default())
        .serve_with_incoming(incoming);
    tokio::spawn(server);

    let mut args = TlsArgs {
        tls_cert: file("node.pem"),
        tls_key: file("node.key"),
        tls_ca: file("ca.pem"),
        tls_server_name: None,
    };
    // Checked against 127.0.0.1, which the certificate does not name: refused.
    let err = dial(&args, addr).await.unwrap_err();
    assert!(
        err.contains("NotValidForName") || err.contains("not valid for name"),
        "{err}"
    );
    // Checked against moe-node: served.
    args.tls_server_name = Some("moe-node".into());
    dial(&args, addr).await.unwrap();
    // Another name the certificate lacks: refused again (the name is really checked).
    args.tls_server_name = Some("other-node".into());
    assert!(dial(&args, addr).await.is_err());
}
