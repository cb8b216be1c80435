//! Transport security between components: optional TLS, mutual for the control and data planes.
//! Off by default (the local start needs no certificates). Configured once per process from its
//! flags ([`TlsArgs`]) before it serves or connects; [`crate::net`] then applies it to every
//! server it builds and every channel it opens. Clients of the API (`moectl`, tests) can instead
//! pass a [`ClientTls`] explicitly.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// TLS flags every component takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// PEM certificate this process presents: as a server, and as a client of other components
    /// (mutual TLS). Needs `--tls-key` and `--tls-ca`.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) that peers' certificates must chain to.
    #[arg(long, requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Check the certificates of the components this process connects to against this name
    /// instead of the host in the address it dials. For clusters whose workers advertise
    /// addresses no certificate can name ahead of time (Kubernetes pod IPs) under one node
    /// certificate that names this (deploy/k8s/components/tls).
    #[arg(long, requires = "tls_cert")]
    pub tls_server_name: Option<String>,
}

/// Environment variables a client (`moectl`) reads its TLS settings from.
pub const CA_ENV: &str = "MOECTL_TLS_CA";
pub const CERT_ENV: &str = "MOECTL_TLS_CERT";
pub const KEY_ENV: &str = "MOECTL_TLS_KEY";

/// A process's transport security: how it serves (components) and how it connects.
#[derive(Clone)]
pub struct Tls {
    pub server: Option<ServerTlsConfig>,
    pub client: ClientTls,
}

/// Why TLS could not be set up; each names the file or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading the {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the {what} {} is not PEM", path.display())]
    NotPem { what: &'static str, path: PathBuf },
    #[error("set both {CERT_ENV} and {KEY_ENV}, or neither")]
    HalfIdentity,
    #[error("TLS was already configured in this process")]
    AlreadyInstalled,
}

/// How a client connects: the CA it trusts, and its own certificate for mutual TLS.
#[derive(Clone, Debug)]
pub struct ClientTls {
    config: ClientTlsConfig,
}

impl ClientTls {
    pub fn config(&self) -> ClientTlsConfig {
        self.config.clone()
    }

    /// From `MOECTL_TLS_CA` (and optionally `MOECTL_TLS_CERT` + `MOECTL_TLS_KEY`); `None` when
    /// `MOECTL_TLS_CA` is unset.
    pub fn from_env() -> Result<Option<ClientTls>, TlsError> {
        let Some(ca) = std::env::var_os(CA_ENV) else {
            return Ok(None);
        };
        let identity = match (std::env::var_os(CERT_ENV), std::env::var_os(KEY_ENV)) {
            (Some(c), Some(k)) => Some(identity(Path::new(&c), Path::new(&k))?),
            (None, None) => None,
            _ => return Err(TlsError::HalfIdentity),
        };
        Ok(Some(ClientTls::new(Path::new(&ca), identity)?))
    }

    /// Trusting the CA in `ca`, presenting `cert_key` (PEM certificate and key) if given.
    pub fn from_files(ca: &Path, cert_key: Option<(&Path, &Path)>) -> Result<ClientTls, TlsError> {
        let id = match cert_key {
            Some((c, k)) => Some(identity(c, k)?),
            None => None,
        };
        ClientTls::new(ca, id)
    }

    fn new(ca: &Path, identity: Option<Identity>) -> Result<ClientTls, TlsError> {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "CA certificate")?));
        if let Some(id) = identity {
            config = config.identity(id);
        }
        Ok(ClientTls { config })
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    if !bytes.starts_with(b"-----BEGIN") {
        return Err(TlsError::NotPem {
            what,
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

fn identity(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    Ok(Identity::from_pem(
        read(cert, "certificate")?,
        read(key, "private key")?,
    ))
}

impl TlsArgs {
    /// The configuration these flags describe, or `None` when TLS is off. With
    /// `clients_must_prove` the server requires client certificates on every connection;
    /// without it they are optional (the coordinator: API clients may come with only a token,
    /// and [`crate::auth::RequireCluster`] guards its control plane).
    pub fn load(&self, clients_must_prove: bool) -> Result<Option<Tls>, TlsError> {
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca) else {
            return Ok(None);
        };
        let id = identity(cert, key)?;
        let ca_pem = Certificate::from_pem(read(ca, "CA certificate")?);
        let server = ServerTlsConfig::new()
            .identity(id.clone())
            .client_ca_root(ca_pem)
            .client_auth_optional(!clients_must_prove);
        let mut client = ClientTls::new(ca, Some(id))?;
        if let Some(name) = &self.tls_server_name {
            client.config = client.config.domain_name(name.clone());
        }
        Ok(Some(Tls {
            server: Some(server),
            client,
        }))
    }
}

static PROCESS_TLS: OnceLock<Tls> = OnceLock::new();

/// Makes `tls` this process's transport security (once, at start-up).
pub fn install(tls: Tls) -> Result<(), TlsError> {
    PROCESS_TLS.set(tls).map_err(|_| TlsError::AlreadyInstalled)
}

/// The process's TLS, when installed.
pub fn installed() -> Option<&'static Tls> {
    PROCESS_TLS.get()
}
