//! Optional bearer-token authentication of the client API. Off unless a token is configured;
//! then every call must carry `authorization: Bearer <token>`.

use std::sync::Arc;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Server side: refuses calls without the configured token (UNAUTHENTICATED).
#[derive(Clone, Default)]
pub struct RequireBearer {
    expected: Option<Arc<[u8]>>,
}

impl RequireBearer {
    pub fn new(token: Option<String>) -> Self {
        RequireBearer {
            expected: token.map(|t| format!("Bearer {t}").into_bytes().into()),
        }
    }
}

impl Interceptor for RequireBearer {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        crate::net::check_metadata(&req)?;
        let Some(expected) = &self.expected else { return Ok(req) };
        let given = req
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        // Constant-time comparison: the time taken does not depend on where the bytes differ.
        let same = given.len() == expected.len()
            && given.iter().zip(expected.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if same {
            Ok(req)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong bearer token (authorization: Bearer <token>)",
            ))
        }
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
