//! Authentication by bearer token. Two credentials, each optional:
//!
//! * the **client token** guards the client API (`Inference` on the coordinator);
//! * the **cluster token** guards everything else: the coordinator's control plane and the
//!   workers' own ports. Every component of the cluster is given it (`--cluster-token-file`),
//!   installs it once ([`install_cluster_token`]) and [`crate::net::channel`] then presents it
//!   on every call to another component, as TLS is installed and presented.
//!
//! With TLS on, a client certificate from the cluster CA is required on the control plane as
//! well ([`RequireCluster`]); the token is then a second factor.

use std::sync::{Arc, OnceLock};

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Server side: refuses calls without the configured token (UNAUTHENTICATED).
#[derive(Clone, Default)]
pub struct RequireBearer {
    expected: Option<Arc<[u8]>>,
    /// Which token is missing, for the refusal.
    what: &'static str,
}

impl RequireBearer {
    /// The client API's check: `authorization: Bearer <token>` when a token is configured.
    pub fn new(token: Option<String>) -> Self {
        Self::named(token, "bearer token (authorization: Bearer <token>)")
    }

    fn named(token: Option<String>, what: &'static str) -> Self {
        RequireBearer {
            expected: token.map(|t| format!("Bearer {t}").into_bytes().into()),
            what,
        }
    }

    fn check(&self, req: &Request<()>) -> Result<(), Status> {
        let Some(expected) = &self.expected else { return Ok(()) };
        let given = req
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if constant_time_eq(given, expected.as_ref()) {
            Ok(())
        } else {
            Err(Status::unauthenticated(format!("missing or wrong {}", self.what)))
        }
    }
}

impl Interceptor for RequireBearer {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        crate::net::check_metadata(&req)?;
        self.check(&req)?;
        Ok(req)
    }
}

/// Guards the ports only members of the cluster and its operators may call: the control plane
/// and the workers. Asks for the cluster token when one is configured and, with `cert`, for a
/// client certificate the TLS layer verified against the cluster CA (the coordinator's TLS lets
/// API clients in without one, so the control plane checks it per call).
#[derive(Clone, Default)]
pub struct RequireCluster {
    token: RequireBearer,
    cert: bool,
}

impl RequireCluster {
    pub fn new(token: Option<String>, cert: bool) -> Self {
        RequireCluster {
            token: RequireBearer::named(token, "cluster token (--cluster-token-file, or MOECTL_CLUSTER_TOKEN)"),
            cert,
        }
    }

    /// Whether any credential is asked for.
    pub fn is_open(&self) -> bool {
        self.token.expected.is_none() && !self.cert
    }
}

impl Interceptor for RequireCluster {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        crate::net::check_metadata(&req)?;
        if self.cert && req.peer_certs().is_none_or(|c| c.is_empty()) {
            return Err(Status::unauthenticated(
                "this port needs a client certificate signed by the cluster CA (mutual TLS)",
            ));
        }
        self.token.check(&req)?;
        Ok(req)
    }
}

/// Client side: adds the token to every call, when there is one.
#[derive(Clone, Default)]
pub struct AddBearer {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl AddBearer {
    pub fn new(token: Option<&str>) -> Result<Self, Status> {
        let header = token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| Status::invalid_argument("the token must be printable ASCII"))
            })
            .transpose()?;
        Ok(AddBearer { header })
    }
}

impl Interceptor for AddBearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

/// Environment variable holding the cluster token for operator commands (`moectl drain`,
/// `moectl rebalance`).
pub const CLUSTER_TOKEN_ENV: &str = "MOECTL_CLUSTER_TOKEN";

static CLUSTER_TOKEN: OnceLock<String> = OnceLock::new();

/// Why the cluster token could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the cluster token must be printable ASCII")]
    NotAscii,
    #[error("the cluster token was already installed in this process")]
    AlreadyInstalled,
}

/// Makes `token` the credential this process presents to other components (once, at start-up).
pub fn install_cluster_token(token: String) -> Result<(), TokenError> {
    AddBearer::new(Some(&token)).map_err(|_| TokenError::NotAscii)?;
    CLUSTER_TOKEN.set(token).map_err(|_| TokenError::AlreadyInstalled)
}

/// The installed cluster token, if any.
pub fn cluster_token() -> Option<&'static str> {
    CLUSTER_TOKEN.get().map(String::as_str)
}

/// What [`crate::net::channel`] adds to each call: the installed cluster token.
pub fn present_cluster_token() -> AddBearer {
    AddBearer::new(cluster_token()).unwrap_or_default()
}

/// Reads a token file (one line; surrounding white space ignored). An empty file is an error.
pub fn read_token_file(path: &std::path::Path) -> std::io::Result<String> {
    let token = std::fs::read_to_string(path)?.trim().to_owned();
    if token.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(token)
}

/// Compares without stopping at the first difference, so timing does not reveal a prefix.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call_with(interceptor: &mut impl Interceptor, header: Option<&str>) -> Result<(), Status> {
        let mut req = Request::new(());
        if let Some(h) = header {
            req.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        interceptor.call(req).map(|_| ())
    }

    #[test]
    fn the_cluster_check_asks_for_the_token_by_name() {
        let mut guard = RequireCluster::new(Some("s3cret".into()), false);
        assert!(!guard.is_open());
        assert!(call_with(&mut guard, Some("Bearer s3cret")).is_ok());
        for wrong in [None, Some("Bearer s3cres"), Some("Bearer s3cret2"), Some("s3cret")] {
            let err = call_with(&mut guard, wrong).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{wrong:?}");
            assert!(err.message().contains("cluster token"), "{}", err.message());
        }
        assert!(RequireCluster::new(None, false).is_open());
        assert!(call_with(&mut RequireCluster::new(None, false), None).is_ok());
    }

    #[test]
    fn the_cluster_check_asks_for_a_certificate_when_tls_is_on() {
        // A call that came in without TLS carries no peer certificate.
        let err = call_with(&mut RequireCluster::new(None, true), None).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("client certificate"), "{}", err.message());
    }

    #[test]
    fn the_client_check_names_the_bearer_token() {
        let err = call_with(&mut RequireBearer::new(Some("t".into())), None).unwrap_err();
        assert!(err.message().contains("bearer token"), "{}", err.message());
        assert!(call_with(&mut RequireBearer::new(Some("t".into())), Some("Bearer t")).is_ok());
    }
}
