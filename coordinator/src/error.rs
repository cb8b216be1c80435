#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] moe_model::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Etcd(#[from] moe_runtime::etcd::EtcdError),
    /// A registry write refused because this coordinator lost leadership since.
    #[error("{0}: refused, this coordinator is no longer the leader")]
    NotLeader(String),
    #[error("TLS: {0}")]
    Tls(#[from] moe_runtime::tls::TlsError),
    #[error("cluster token: {0}")]
    Token(#[from] moe_runtime::auth::TokenError),
    #[error("registry: {0}")]
    Registry(#[from] crate::registry::RegistryError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
