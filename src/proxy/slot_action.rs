//! A client's own slot action (`POST /slots/{id}?action=save|restore|erase`):
//! read as llama-server reads it ([`slot_route`]), refused when it names one
//! of kvgate's own files ([`reserved`]), otherwise passed through while
//! kvgate holds the slot, so it never races a generation; then the table
//! learns what happened through the lease.

use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, CONTENT_TYPE};
use hyper::{Method, Request, Response};
use serde_json::Value;

use crate::http::body::{full, ProxyBody};
use crate::llama::client::strip_hop_by_hop;
use crate::llama::slot_route::{beyond_kvgate, slot_route, wrap_slot_id, SlotRoute, Verb};
use crate::session;
use crate::slots::table::{Outcome, Want};
use crate::store::reserved::reserved;
use crate::upstream::Upstream;

use super::client::Client;
use super::failure::Failure;
use super::passthrough::{forward_relay, llama_failed, read_body};

/// How llama-server will read this request's slot, if it names one.
pub(crate) fn slot_route_of<B>(req: &Request<B>) -> SlotRoute {
    slot_route(
        req.method() == Method::POST,
        req.uri().path(),
        req.uri().query(),
        is_form(req.headers()),
    )
}

/// A form body, whose fields httplib adds to the query's.
fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| {
            t.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// Refuses a save or restore whose body names one of kvgate's own files.
/// A body llama-server can't read either passes for its own error; one
/// nested too deeply for kvgate to read is refused, since llama-server
/// would read it.
fn check_file_name(raw: &[u8]) -> Result<(), Failure> {
    let body = match serde_json::from_slice::<Value>(raw) {
        Ok(body) => body,
        Err(e) if beyond_kvgate(&e) => {
            return Err(Failure::Client(format!(
                "kvgate can't read this slot action's body ({e}); send plain JSON"
            )))
        }
        Err(_) => return Ok(()),
    };
    let Some(name) = body.get("filename").and_then(Value::as_str) else {
        return Ok(());
    };
    match reserved(name) {
        Some(why) => Err(Failure::Client(format!(
            "the file name {name:?} is refused: {why}"
        ))),
        None => Ok(()),
    }
}

/// Passes a client's slot action through while holding the slot, then
/// updates the table: after an erase the slot is empty, after a restore its
/// contents are unknown to kvgate; a save changes nothing.
pub(crate) async fn slot_action(
    upstream: &Arc<Upstream>,
    req: Request<Incoming>,
    id: i32,
    verb: Verb,
    client: &Client,
) -> Result<Response<ProxyBody>, Failure> {
    let (parts, body) = req.into_parts();
    // A slot action's body is small (a file name); its budget share is held
    // until llama-server has it.
    let shared = &upstream.shared;
    let (raw, _held) = read_body(
        shared.cfg.max_body_bytes,
        &shared.body_budget,
        shared.cfg.idle_timeout,
        &parts.headers,
        body,
    )
    .await?;
    if verb != Verb::Erase {
        check_file_name(&raw)?;
    }
    let n = upstream.pool.len();
    if n == 0 {
        // No slot is known, so kvgate holds none: nothing to race.
        return Ok(forward_relay(upstream, parts, full(raw)).await);
    }
    let slot = wrap_slot_id(id, n);
    let is_save = verb == Verb::Save;
    let want = if is_save {
        Want::Hold(slot)
    } else {
        Want::Pinned(slot)
    };
    let lease = session::acquire(upstream, want, client.tag()).await?;
    // The owner's unsaved messages go to disk before its cache is replaced,
    // in a task of its own so a client leaving can't cut the save short.
    let holder = Arc::clone(upstream);
    let lease = session::detached(upstream, async move {
        session::take_over(&holder, &lease).await;
        lease
    })
    .await?;
    let resp = match upstream.client.forward(parts, full(raw)).await {
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
