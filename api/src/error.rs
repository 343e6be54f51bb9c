//! The one error body every endpoint returns.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A machine-readable error code; the HTTP status follows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: a field is missing or has a bad value (`field` names it).
    InvalidInput,
    /// 401: no token, or a token the agent does not know.
    Unauthorized,
    /// 403: an operator-only endpoint called with a tenant token.
    Forbidden,
    /// 404: no such resource (also another tenant's resource).
    NotFound,
    /// 405: the path has no operation of that method (`Allow` lists those
    /// it has).
    MethodNotAllowed,
    /// 409: the resource is in the wrong state for the request, or exists.
    Conflict,
    /// 413: the request body is larger than the endpoint takes.
    PayloadTooLarge,
    /// 415: a body of another content type than the endpoint takes.
    UnsupportedMediaType,
    /// 422: valid by the API's document, but cannot be done here: it names
    /// something that does not exist (an image, a network, a VM, a file)
    /// or that this host does not allow (a file outside its image
    /// directories, a host port outside its range, a network its routes
    /// use).
    Unprocessable,
    /// 429: the tenant's quota would be exceeded.
    QuotaExceeded,
    /// 500: the agent failed; the message says how.
    Internal,
    /// 507: the host's disk would fill past the space it keeps for itself.
    HostFull,
    /// 502: a peer host (see `/v1/peers`) failed or could not be reached.
    PeerFailed,
    /// 503: the cluster's store (etcd) cannot be reached; try again.
    Unavailable,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidInput => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::Conflict => 409,
            Self::PayloadTooLarge => 413,
            Self::UnsupportedMediaType => 415,
            Self::Unprocessable => 422,
            Self::QuotaExceeded => 429,
            Self::Internal => 500,
            Self::HostFull => 507,
            Self::PeerFailed => 502,
            Self::Unavailable => 503,
        }
    }
}

/// `{"error": {"code": "...", "message": "...", "field": "..."}}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// The request field at fault, for `invalid_input`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorBody {
                code,
                message: message.into(),
                field: None,
            },
        }
    }

    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        let mut error = Self::new(ErrorCode::InvalidInput, message);
        error.error.field = Some(field.to_string());
        error
    }

    /// Well-formed, but not doable (422), naming `field`.
    pub fn unprocessable(field: &str, message: impl Into<String>) -> Self {
        let mut error = Self::new(ErrorCode::Unprocessable, message);
        error.error.field = Some(field.to_string());
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_serialize_with_their_field() {
        let json = serde_json::to_value(ApiError::invalid("vcpus", "must be 1 to 254")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": {"code": "invalid_input", "message": "must be 1 to 254", "field": "vcpus"}})
        );
        assert_eq!(ErrorCode::QuotaExceeded.http_status(), 429);
        let json = serde_json::to_value(ApiError::new(ErrorCode::NotFound, "no VM vm-1")).unwrap();
        assert!(json["error"].get("field").is_none());
    }
}
