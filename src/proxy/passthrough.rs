//! Requests kvgate does not act on go to llama-server untouched (method,
//! path, query, end-to-end headers, body) and the answer streams back as it
//! arrives. Also the two reads every front-port path shares: a body within
//! the limit, and what a failed call to llama-server means.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, CONTENT_LENGTH};
use hyper::http::request::Parts;
use hyper::{Request, Response};
use tracing::warn;

use crate::http::body::{boxed, ProxyBody};
use crate::http::budget::{BodyBudget, BodyPermit};
use crate::llama::client::{strip_hop_by_hop, UpstreamError};
use crate::observe::metrics;
use crate::upstream::Upstream;

use super::failure::Failure;

/// Forwards a request as is and relays the response as it arrives.
pub(crate) async fn passthrough(
    upstream: &Upstream,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let (parts, body) = req.into_parts();
    forward_relay(upstream, parts, boxed(body)).await
}

/// Forwards `parts` and `body` unchanged and relays the answer, or the
/// error kvgate gives when llama-server can't be reached.
pub(crate) async fn forward_relay(
    upstream: &Upstream,
    parts: Parts,
    body: ProxyBody,
) -> Response<ProxyBody> {
    match upstream.client.forward(parts, body).await {
        Ok(resp) => relay(resp),
        Err(e) => llama_failed(upstream, e).into_api_error().into_response(),
    }
}

/// Copies status and end-to-end headers; the body streams through.
fn relay(resp: Response<Incoming>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, boxed(body))
}

/// A call to llama-server failed: count it, have the monitor look at once
/// when it could not even connect, and say so to the client.
pub(crate) fn llama_failed(upstream: &Upstream, e: UpstreamError) -> Failure {
    metrics::inc(&upstream.shared.metrics.upstream_errors);
    if e.is_connect() {
        upstream.monitor_kick.notify_one();
    }
    warn!(error = %e, "upstream request failed");
    Failure::Llama(e)
}

/// Reads the body within `limit` bytes, holding its bytes in `budget`
/// (declared ones up front, the rest as they arrive); the permit goes back
/// when the caller drops it. A body the budget can't hold now: 503. A body
/// silent for `stall` is refused (400): a trickling client must not hold
/// its share of the budget forever.
pub(crate) async fn read_body(
    limit: u64,
    budget: &BodyBudget,
    stall: Duration,
    headers: &HeaderMap,
    body: Incoming,
) -> Result<(Bytes, BodyPermit), Failure> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(Failure::TooLarge(limit));
    }
    let over_budget = || {
        Failure::Busy(
            "kvgate holds too many request bodies right now (--max-body-bytes-in-flight); retry shortly"
                .into(),
        )
    };
    let mut permit = budget.permit();
    if !permit.cover(declared.unwrap_or(0)) {
        return Err(over_budget());
    }
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    let declared_usize = declared.and_then(|n| usize::try_from(n).ok()).unwrap_or(0);
    let mut buf = BytesMut::with_capacity(declared_usize.min(limit_usize));
    let mut body = Limited::new(body, limit_usize);
    loop {
        let Ok(next) = tokio::time::timeout(stall, body.frame()).await else {
            return Err(Failure::Client(format!(
                "the request body stalled: nothing arrived for {} s",
                stall.as_secs_f64()
            )));
        };
        let Some(frame) = next else {
            break;
        };
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    if !permit.cover((buf.len() + data.len()) as u64) {
                        return Err(over_budget());
                    }
                    buf.extend_from_slice(&data);
                }
            }
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return Err(Failure::TooLarge(limit));
            }
            Err(e) => {
                return Err(Failure::Client(format!(
                    "could not read the request body: {e}"
                )))
            }
        }
    }
    Ok((buf.freeze(), permit))
}
