//! Errors kvgate itself answers with, in llama.cpp's shape
//! `{"error":{"code","message","type"}}`, so clients (SillyTavern shows
//! `error.message`) display them like llama-server's own.

use hyper::{Response, StatusCode};

use crate::http::body::{json_response, ProxyBody};

/// llama.cpp's error types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorType {
    /// 400, 413: the request is wrong.
    InvalidRequest,
    /// 401.
    Authentication,
    /// 403.
    Permission,
    /// 404.
    NotFound,
    /// 500, 502.
    Server,
    /// 501.
    NotSupported,
    /// 503, 504: try again later.
    Unavailable,
}

impl ErrorType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::InvalidRequest => "invalid_request_error",
            ErrorType::Authentication => "authentication_error",
            ErrorType::Permission => "permission_error",
            ErrorType::NotFound => "not_found_error",
            ErrorType::Server => "server_error",
            ErrorType::NotSupported => "not_supported_error",
            ErrorType::Unavailable => "unavailable_error",
        }
    }
}

/// An error response kvgate produces.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// llama.cpp error type.
    pub kind: ErrorType,
    /// Human-readable message.
    pub message: String,
}

impl ApiError {
    /// An error with an explicit status and type.
    pub fn new(status: StatusCode, kind: ErrorType, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorType::InvalidRequest, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorType::NotFound, message)
    }

    /// 413.
    pub fn too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorType::InvalidRequest,
            format!("request body exceeds kvgate's limit of {limit} bytes (--max-body-bytes)"),
        )
    }

    /// 502: llama-server could not be reached or broke the exchange.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, ErrorType::Server, message)
    }

    /// 503.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorType::Unavailable,
            message,
        )
    }

    /// 504.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, ErrorType::Unavailable, message)
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorType::Server,
            message,
        )
    }

    /// The JSON body.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "code": self.status.as_u16(),
                "message": self.message,
                "type": self.kind.as_str(),
            }
        })
    }

    /// The whole HTTP response.
    pub fn into_response(self) -> Response<ProxyBody> {
        json_response(self.status, &self.to_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_cpp_shape() {
        let e = ApiError::too_large(10);
        let v = e.to_json();
        assert_eq!(v["error"]["code"], 413);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("10 bytes"));
    }
}
