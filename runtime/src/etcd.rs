//! Reaching etcd, the same way from coordinators and workers: the flags, the connection (TLS,
//! user and password), and single calls bounded by a timeout that name what they were for.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use crate::tls::ClientTls;

/// What talking to etcd can fail with; each names the call or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("no etcd endpoint given")]
    NoEndpoint,
    #[error("etcd prefix `{0}` must start with `/`")]
    Prefix(String),
    #[error("--member-ttl-s must be at least 2 (etcd leases count seconds)")]
    TtlTooShort,
    #[error("{context}: no answer within {timeout:?}")]
    NoAnswer { context: String, timeout: Duration },
    #[error("etcd: {context}: {source}")]
    Call {
        context: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("reading the etcd password file {}: {source}", path.display())]
    PasswordFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

pub type Result<T, E = EtcdError> = std::result::Result<T, E>;

/// Where the cluster lives in etcd and how to reach it; every process of the cluster takes
/// these flags (`--etcd` empty: no etcd).
#[derive(clap::Args, Debug, Clone)]
pub struct EtcdArgs {
    /// etcd client endpoints (comma-separated, e.g. `http://127.0.0.1:2379`).
    #[arg(long, value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Key prefix of this cluster in etcd; clusters sharing an etcd use different prefixes.
    #[arg(long, default_value = "/hunyuan-moe/default")]
    pub etcd_prefix: String,
    /// etcd user, when etcd has authentication on (password from `--etcd-password-file`).
    #[arg(long, requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    #[arg(long, requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
    /// CA certificate (PEM) of etcd's TLS (`https://` endpoints).
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for etcd's client certificate authentication.
    #[arg(long, requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// Lease of a worker's own member record: how long the record outlives a dead worker
    /// (workers; coordinators hold no member records and ignore it).
    #[arg(long, default_value_t = 10)]
    pub member_ttl_s: u64,
}

impl EtcdArgs {
    /// The options these flags describe, or `None` without `--etcd`.
    pub fn options(&self) -> Result<Option<EtcdOptions>> {
        if self.etcd.is_empty() {
            return Ok(None);
        }
        if self.member_ttl_s < 2 {
            return Err(EtcdError::TtlTooShort);
        }
        let credentials = match (&self.etcd_user, &self.etcd_password_file) {
            (Some(user), Some(path)) => {
                let password = crate::auth::read_token_file(path).map_err(|source| EtcdError::PasswordFile {
                    path: path.clone(),
                    source,
                })?;
                Some((user.clone(), password))
            }
            _ => None,
        };
        let tls = match &self.etcd_ca {
            Some(ca) => {
                let pair = self.etcd_cert.as_deref().zip(self.etcd_key.as_deref());
                Some(ClientTls::from_files(ca, pair)?)
            }
            None => None,
        };
        Ok(Some(EtcdOptions {
            endpoints: self.etcd.clone(),
            prefix: self.etcd_prefix.clone(),
            member_ttl: Duration::from_secs(self.member_ttl_s),
            request_timeout: Duration::from_secs(2),
            credentials,
            tls,
        }))
    }
}

/// How to reach etcd and where the cluster lives in it.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Key prefix of this cluster, e.g. `/hunyuan-moe/prod`.
    pub prefix: String,
    /// Lease of a worker's member record.
    pub member_ttl: Duration,
    /// Longest any single etcd call may take.
    pub request_timeout: Duration,
    /// etcd user name and password, when etcd has authentication on.
    pub credentials: Option<(String, String)>,
    /// TLS to etcd (`https://` endpoints): the CA etcd's certificate chains to, and a client
    /// certificate when etcd requires one.
    pub tls: Option<ClientTls>,
}

impl EtcdOptions {
    pub fn key(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.prefix.trim_end_matches('/'))
    }

    /// The key of member `id`'s record.
    pub fn member_key(&self, id: &str) -> String {
        self.key(&format!("members/{id}"))
    }

    /// Connects (lazily: an etcd that is down now is retried by each call).
    pub async fn connect(&self) -> Result<Client> {
        if self.endpoints.is_empty() {
            return Err(EtcdError::NoEndpoint);
        }
        if !self.prefix.starts_with('/') {
            return Err(EtcdError::Prefix(self.prefix.clone()));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.request_timeout)
            .with_keep_alive(Duration::from_secs(2), self.request_timeout);
        if let Some((user, password)) = &self.credentials {
            // etcd's auth tokens expire and do not survive an etcd restart: fetch a new one
            // when refused, or every later call of this long-lived client would fail.
            options = options
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.config());
        }
        let context = format!("connecting to etcd at {}", self.endpoints.join(","));
        call(
            self.request_timeout,
            &context,
            Client::connect(&self.endpoints, Some(options)),
        )
        .await
    }
}

/// Runs one etcd call under `timeout`, naming what it was for in the error.
pub async fn call<T>(
    timeout: Duration,
    context: &str,
    f: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r.map_err(|source| EtcdError::Call {
            context: context.to_owned(),
            source,
        }),
        Err(_) => Err(EtcdError::NoAnswer {
            context: context.to_owned(),
            timeout,
        }),
    }
}

/// Renews `lease` once: `Ok(false)` when etcd answered that it no longer has it (expired or
/// lost), an error when etcd could not be asked.
pub async fn renew(client: &mut Client, lease: i64, timeout: Duration) -> Result<bool> {
    let context = format!("renewing lease {lease:x}");
    match call(timeout, &context, client.lease_keep_alive(lease)).await {
        Ok(_) => Ok(true),
        Err(EtcdError::Call {
            source: etcd_client::Error::LeaseKeepAliveError(_),
            ..
        }) => Ok(false),
        Err(e) => Err(e),
    }
}
