//! OpenAI's error object (`{"error": {"message", "type", "param", "code"}}`) with the HTTP
//! status clients map to exception classes: 400 names the field at fault in `param`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tonic::Code;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
}

impl ApiError {
    /// A bad request naming the field (`messages[1].role`, `temperature`).
    pub fn field(param: impl Into<String>, message: impl Into<String>) -> Self {
        let param = param.into();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!("{param}: {}", message.into()),
            kind: "invalid_request_error",
            param: Some(param),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
        }
    }

    pub fn unauthorized() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or wrong bearer token (Authorization: Bearer <token>)".into(),
            kind: "authentication_error",
            param: None,
        }
    }

    pub fn not_found(path: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("no endpoint {path}"),
            kind: "not_found_error",
            param: None,
        }
    }

    /// A body over the size this model's context can use.
    pub fn too_large(limit: usize) -> Self {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "the request body is over {limit} bytes, more than a prompt of this model's context can need"
            ),
            kind: "invalid_request_error",
            param: None,
        }
    }

    pub fn method_not_allowed(path: &str) -> Self {
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: format!("{path} does not take this method"),
            kind: "invalid_request_error",
            param: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
        }
    }

    /// A cluster answer as an HTTP error: RESOURCE_EXHAUSTED (admission full, KV cache full)
    /// is 429 so clients back off and retry; no coordinator serving is 503; a request the
    /// cluster refused as invalid is 400; a cluster that refuses the front end's own token is a
    /// misconfiguration here, 502.
    pub fn from_status(status: &tonic::Status) -> Self {
        let (code, kind) = match status.code() {
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
            Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => {
                (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable")
            }
            Code::InvalidArgument | Code::OutOfRange => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            Code::Unauthenticated | Code::PermissionDenied => (StatusCode::BAD_GATEWAY, "server_error"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        };
        ApiError {
            status: code,
            message: format!("cluster: {}", status.message()),
            kind,
            param: None,
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.status.as_u16(),
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_statuses_map_to_http_statuses() {
        let cases = [
            (Code::ResourceExhausted, 429),
            (Code::Unavailable, 503),
            (Code::InvalidArgument, 400),
            (Code::Unauthenticated, 502),
            (Code::Internal, 500),
        ];
        for (code, http) in cases {
            let e = ApiError::from_status(&tonic::Status::new(code, "x"));
            assert_eq!(e.status.as_u16(), http, "{code:?}");
        }
    }

    #[test]
    fn field_errors_name_the_field() {
        let e = ApiError::field("temperature", "must be in [0, 2], got 3");
        assert_eq!(
            e.body(),
            serde_json::json!({"error": {"message": "temperature: must be in [0, 2], got 3",
                "type": "invalid_request_error", "param": "temperature", "code": 400}})
        );
    }
}
