//! A client's own slot action (`POST /slots/{id}?action=save|restore|erase`):
//! passed through while kvgate holds the slot, so it never races a
//! generation, then the table learns what happened through the lease.

use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response};

use crate::http::body::{boxed, full, ProxyBody};
use crate::llama::client::strip_hop_by_hop;
use crate::session;
use crate::slots::table::{Outcome, Want};
use crate::upstream::Upstream;

use super::failure::Failure;
use super::passthrough::{llama_failed, passthrough};

/// `POST /slots/{id}`: the slot a client's own slot action targets.
pub(crate) fn slot_action_target(method: &Method, path: &str) -> Option<usize> {
    if method != Method::POST {
        return None;
    }
    path.strip_prefix("/slots/")?.parse().ok()
}

/// Passes a client's slot action through while holding the slot, then
/// updates the table: after an erase the slot is empty, after a restore its
/// contents are unknown to kvgate; a save changes nothing.
pub(crate) async fn slot_action(
    upstream: &Arc<Upstream>,
    req: Request<Incoming>,
    id: usize,
) -> Result<Response<ProxyBody>, Failure> {
    let n = upstream.pool.len();
    if n == 0 {
        return Ok(passthrough(upstream, req).await);
    }
    let slot = id % n;
    let is_save = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "action=save"));
    let want = if is_save {
        Want::Hold(slot)
    } else {
        Want::Pinned(slot)
    };
    let lease = session::acquire(upstream, want).await?;
    // The owner's unsaved messages go to disk before its cache is replaced,
    // in a task of its own so a client leaving can't cut the save short.
    let holder = Arc::clone(upstream);
    let lease = session::detached(upstream, async move {
        session::take_over(&holder, &lease).await;
        lease
    })
    .await?;
    let (parts, body) = req.into_parts();
    let resp = match upstream.client.forward(parts, boxed(body)).await {
        Ok(resp) => resp,
        Err(e) => {
            lease.release(Outcome::Cleared);
            return Err(llama_failed(upstream, e));
        }
    };
    // llama-server answers a slot action once it is done: read the answer
    // before releasing the slot.
    let (mut parts, body) = resp.into_parts();
    let bytes = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            lease.release(Outcome::Cleared);
            return Err(Failure::LlamaBrokeOff(format!(
                "llama-server broke off its answer: {e}"
            )));
        }
    };
    lease.release(if is_save {
        Outcome::Untouched
    } else {
        Outcome::Cleared
    });
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, full(bytes)))
}
