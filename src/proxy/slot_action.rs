//! A client's own slot action (`POST /slots/{id}?action=save|restore|erase`):
//! read as llama-server reads it ([`slot_route`]), refused when it names one
//! of kvgate's own files ([`reserved`]), otherwise passed through while
//! kvgate holds the slot, so it never races a generation; then the table
//! learns what happened through the lease.

use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, CONTENT_TYPE};
use hyper::{Method, Request, Response, Uri};
use serde_json::Value;

use crate::http::body::{full, ProxyBody};
use crate::llama::client::strip_hop_by_hop;
use crate::llama::slot_route::{slot_route, without_bom, wrap_slot_id, SlotRoute, Verb};
use crate::session;
use crate::slots::lease::Lease;
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

/// A form body, whose fields httplib adds to the query's. A Content-Type
/// kvgate can't read counts as one: httplib may read it as a form.
fn is_form(headers: &HeaderMap) -> bool {
    headers.get_all(CONTENT_TYPE).iter().any(|v| {
        let media = v.as_bytes().split(|b| *b == b';').next().unwrap_or(&[]);
        let media = media.trim_ascii();
        !v.as_bytes().is_ascii() || media.eq_ignore_ascii_case(b"application/x-www-form-urlencoded")
    })
}

/// Refuses a save or restore whose body names one of kvgate's own files,
/// or that kvgate can't read (llama-server refuses those too, except JSON
/// nested deeper than kvgate reads).
fn check_file_name(body: &[u8]) -> Result<(), Failure> {
    let body = serde_json::from_slice::<Value>(body).map_err(|e| {
        Failure::Client(format!(
            "a slot save or restore needs a JSON body naming the file: {e}"
        ))
    })?;
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

/// With a clients file, a client saves only a slot whose last generation
/// was its own: a save of another's slot, restored into its own, would be
/// a way to another client's cache.
fn check_save_rights(client: &Client, lease: &Lease) -> Result<(), Failure> {
    match client.tag() {
        Some(me) if lease.state().client.as_ref() != Some(&me) => Err(Failure::Forbidden(
            "this slot's last generation was not yours: a client may save only its own slots"
                .into(),
        )),
        _ => Ok(()),
    }
}

/// Passes a client's slot action through while holding the slot, then
/// updates the table: after an erase the slot is empty, after a restore its
/// contents are unknown to kvgate; a save changes nothing. llama-server gets
/// the plain spelling of what kvgate leased: `/slots/{slot}?action={verb}`.
pub(crate) async fn slot_action(
    upstream: &Arc<Upstream>,
    req: Request<Incoming>,
    id: i32,
    verb: Verb,
    client: &Client,
) -> Result<Response<ProxyBody>, Failure> {
    let (mut parts, body) = req.into_parts();
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
    // nlohmann skips a byte-order mark: so does kvgate, for what it checks
    // and for what it forwards.
    let raw = raw.slice(raw.len() - without_bom(&raw).len()..);
    if verb != Verb::Erase {
        check_file_name(&raw)?;
    }
    if !upstream.slots_known(super::completion::SLOTS_WAIT).await {
        // kvgate holds no slot of an upstream whose slots it does not know:
        // nothing to race, so llama-server answers as it would alone.
        parts.uri = plain_uri(id, verb)?;
        return Ok(forward_relay(upstream, parts, full(raw)).await);
    }
    let slot = wrap_slot_id(id, upstream.pool.len());
    parts.uri = plain_uri(slot, verb)?;
    let is_save = verb == Verb::Save;
    let want = if is_save {
        Want::Hold(slot)
    } else {
        Want::Pinned(slot)
    };
    let lease = session::acquire(upstream, want, client.tag()).await?;
    if is_save {
        if let Err(f) = check_save_rights(client, &lease) {
            lease.release(Outcome::Untouched);
            return Err(f);
        }
    }
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

/// `/slots/{slot}?action={verb}`: the one spelling llama-server and kvgate
/// can't read differently.
fn plain_uri(slot: impl std::fmt::Display, verb: Verb) -> Result<Uri, Failure> {
    let action = match verb {
        Verb::Save => "save",
        Verb::Restore => "restore",
        Verb::Erase => "erase",
    };
    format!("/slots/{slot}?action={action}")
        .parse()
        .map_err(|e| Failure::Kvgate(format!("slot action URI: {e}")))
}
