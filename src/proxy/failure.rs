//! Why kvgate answers a front-port request with its own error, classified
//! by who failed: the client, kvgate, or llama-server. The class picks the
//! status, here and nowhere else.

use hyper::StatusCode;

use crate::http::error::{ApiError, ErrorType};
use crate::llama::client::UpstreamError;
use crate::session::{Detached, SiblingError};
use crate::slots::lease::AcquireError;
use crate::slots::table::TableError;

/// A request kvgate could not serve, and who is to blame.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The client's request is wrong (400).
    Client(String),
    /// The client's body is over `--max-body-bytes` (413).
    TooLarge(u64),
    /// The client's key is missing or refused (401).
    Unauthorized(&'static str),
    /// The client may not do this to another client's work (403).
    Forbidden(String),
    /// kvgate can't serve it now: no upstream, no slot in time, slots not
    /// known yet, shutting down (503).
    Busy(String),
    /// kvgate itself broke (500).
    Kvgate(String),
    /// llama-server failed: unreachable or broke the exchange (502), or did
    /// not answer in time (504).
    Llama(UpstreamError),
    /// llama-server broke off an answer kvgate had to read whole (502).
    LlamaBrokeOff(String),
}

impl Failure {
    /// kvgate has no upstream at all (every instance is stopped).
    pub(crate) fn no_upstream() -> Failure {
        Failure::Busy("no llama-server to send this to: every instance is stopped".into())
    }

    /// The llama.cpp-style error the client sees.
    pub(crate) fn into_api_error(self) -> ApiError {
        match self {
            Failure::Client(m) => ApiError::bad_request(m),
            Failure::TooLarge(limit) => ApiError::too_large(limit),
            Failure::Unauthorized(m) => {
                ApiError::new(StatusCode::UNAUTHORIZED, ErrorType::Authentication, m)
            }
            Failure::Forbidden(m) => ApiError::new(StatusCode::FORBIDDEN, ErrorType::Permission, m),
            Failure::Busy(m) => ApiError::unavailable(m),
            Failure::Kvgate(m) => ApiError::internal(m),
            Failure::Llama(e @ UpstreamError::Timeout { .. }) => ApiError::timeout(e.to_string()),
            Failure::Llama(e) => ApiError::bad_gateway(e.to_string()),
            Failure::LlamaBrokeOff(m) => ApiError::bad_gateway(m),
        }
    }
}

impl From<AcquireError> for Failure {
    fn from(e: AcquireError) -> Failure {
        match e {
            AcquireError::Table(TableError::NoSuchSlot(_)) => Failure::Client(e.to_string()),
            _ => Failure::Busy(e.to_string()),
        }
    }
}

impl From<SiblingError> for Failure {
    fn from(e: SiblingError) -> Failure {
        match e {
            SiblingError::Acquire(e) => e.into(),
            SiblingError::Detached(e) => e.into(),
        }
    }
}

impl From<Detached> for Failure {
    fn from(e: Detached) -> Failure {
        Failure::Kvgate(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_failed_picks_the_status() {
        let status = |f: Failure| f.into_api_error().status.as_u16();
        assert_eq!(status(Failure::Client("x".into())), 400);
        assert_eq!(status(Failure::TooLarge(1)), 413);
        assert_eq!(status(Failure::Forbidden("x".into())), 403);
        assert_eq!(status(Failure::Unauthorized("x")), 401);
        assert_eq!(status(Failure::Busy("x".into())), 503);
        assert_eq!(status(Failure::Kvgate("x".into())), 500);
        let timeout = UpstreamError::Timeout {
            what: "x".into(),
            secs: 1.0,
        };
        assert_eq!(status(Failure::Llama(timeout)), 504);
        let broke = UpstreamError::Connection {
            url: "u".into(),
            message: "m".into(),
            connect: true,
        };
        assert_eq!(status(Failure::Llama(broke)), 502);
        let no_slot = AcquireError::Table(TableError::NoSuchSlot(9));
        assert_eq!(status(no_slot.into()), 400);
        assert_eq!(status(AcquireError::Closed.into()), 503);
    }
}
