//! HTTP plumbing: the response body (a buffer, or a channel fed by a
//! generator task), response builders with llama.cpp's error shape, and
//! request parsing (query parameters, JSON bodies).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

const JSON_CT: &str = "application/json; charset=utf-8";

const SSE_CT: &str = "text/event-stream";

/// Response body: a full buffer or a channel fed by a generator task. An
/// `Err` from the channel makes hyper abort the connection.
#[derive(Debug)]
pub(super) enum FakeBody {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<Result<Bytes, io::Error>>),
}

impl Body for FakeBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            FakeBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            FakeBody::Channel(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, FakeBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            FakeBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            FakeBody::Full(None) => SizeHint::with_exact(0),
            FakeBody::Channel(_) => SizeHint::default(),
        }
    }
}

pub(super) type Resp = Response<FakeBody>;

pub(super) type Sender = mpsc::Sender<Result<Bytes, io::Error>>;

pub(super) fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(FakeBody::Full(Some(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_str(content_type).expect("content type"),
    );
    r
}

pub(super) fn json_ok(v: &Value) -> Resp {
    full(
        StatusCode::OK,
        JSON_CT,
        serde_json::to_vec(v).expect("json"),
    )
}

fn error_type(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        501 => "not_supported_error",
        503 => "unavailable_error",
        _ => "server_error",
    }
}

/// `{"error":{"code","message","type"}}` with the matching status.
pub(super) fn error_resp(status: u16, message: impl Into<String>) -> Resp {
    error_resp_with(status, error_type(status), message, None)
}

pub(super) fn error_resp_with(
    status: u16,
    typ: &str,
    message: impl Into<String>,
    extra: Option<Value>,
) -> Resp {
    let mut err = json!({ "code": status, "message": message.into(), "type": typ });
    if let (Some(Value::Object(extra)), Some(obj)) = (extra, err.as_object_mut()) {
        obj.extend(extra);
    }
    let body = serde_json::to_vec(&json!({ "error": err })).expect("json");
    full(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        JSON_CT,
        body,
    )
}

pub(super) fn sse_headers(rx: mpsc::Receiver<Result<Bytes, io::Error>>) -> Resp {
    let mut r = Response::new(FakeBody::Channel(rx));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(SSE_CT));
    r
}

pub(super) fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| v.to_string())
    })
}

pub(super) fn parse_json(body: &[u8]) -> Result<Value, Box<Resp>> {
    serde_json::from_slice(body)
        .map_err(|e| Box::new(error_resp(400, format!("[json.exception.parse_error] {e}"))))
}
