//! `GET /events` and `GET /metrics`: watching kvgate live.

use bytes::Bytes;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::Response;

use crate::app::App;
use crate::http::body::{boxed, full, ProxyBody};
use crate::shared::Shared;

/// `GET /events`: the live event stream (SSE).
pub(crate) fn events(shared: &Shared) -> Response<ProxyBody> {
    let mut resp = Response::new(boxed(shared.events.subscribe()));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// `GET /metrics`: Prometheus text.
pub(crate) fn metrics(app: &App) -> Response<ProxyBody> {
    let text = app.shared.metrics.render(app.gauges());
    let mut resp = Response::new(full(Bytes::from(text)));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}
