//! A client's view of llama-server's `GET /slots`. With a clients file,
//! kvgate calls llama-server with its own key, so llama-server would show
//! every client every slot: its task, token counts, sampling parameters and,
//! with `LLAMA_SERVER_SLOTS_DEBUG` set, the prompt and generated text of
//! another client's chat. Each client sees in full only the slots whose
//! last completed generation was its own and where nobody else works now,
//! before and after llama-server answered (`SlotTable::shown_to`); the
//! others keep their place in the list (clients index it by id) with only
//! `id`, `n_ctx` and `is_processing`. An answer kvgate can't read is not
//! passed on: it fails closed.

use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{ACCEPT_ENCODING, CONTENT_LENGTH};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Map, Value};

use crate::http::body::{boxed, full, ProxyBody};
use crate::llama::client::strip_hop_by_hop;
use crate::slots::table::ClientTag;
use crate::upstream::Upstream;

use super::failure::Failure;
use super::passthrough::llama_failed;

/// Whether this is llama-server's slot listing (`path` as llama-server
/// routes it).
pub(crate) fn is_slots_listing(method: &Method, path: &str) -> bool {
    method == Method::GET && path == "/slots"
}

/// Forwards `GET /slots` and answers with what `client` may see of it.
pub(crate) async fn own_slots(
    upstream: &Arc<Upstream>,
    req: Request<Incoming>,
    client: ClientTag,
) -> Result<Response<ProxyBody>, Failure> {
    let (mut parts, body) = req.into_parts();
    // kvgate must read the listing to cut it down.
    parts.headers.remove(ACCEPT_ENCODING);
    // The plain spelling of what kvgate routed (`/%73lots` is `/slots`).
    let plain = match parts.uri.query() {
        Some(q) => format!("/slots?{q}"),
        None => "/slots".to_string(),
    };
    parts.uri = plain
        .parse()
        .map_err(|e| Failure::Kvgate(format!("/slots URI: {e}")))?;
    let before = shown(upstream, &client);
    let resp = upstream
        .client
        .forward(parts, boxed(body))
        .await
        .map_err(|e| llama_failed(upstream, e))?;
    let (mut parts, body) = resp.into_parts();
    let bytes = body
        .collect()
        .await
        .map_err(|e| Failure::LlamaBrokeOff(format!("llama-server broke off /slots: {e}")))?
        .to_bytes();
    strip_hop_by_hop(&mut parts.headers);
    if parts.status != StatusCode::OK {
        // llama-server's own error: nothing of a slot's in it.
        return Ok(Response::from_parts(parts, full(bytes)));
    }
    let Ok(listing) = serde_json::from_slice::<Value>(&bytes) else {
        return Err(Failure::LlamaBrokeOff(
            "llama-server's /slots answer is not JSON kvgate can read".into(),
        ));
    };
    // A slot that changed hands while llama-server answered may show
    // someone else's work: only what held before and after is shown.
    let after = shown(upstream, &client);
    let mine = |id: usize| before.get(id).is_some_and(|b| b.0) && before.get(id) == after.get(id);
    let view =
        serde_json::to_vec(&redact(listing, mine)).map_err(|e| Failure::Kvgate(e.to_string()))?;
    parts.headers.remove(CONTENT_LENGTH);
    Ok(Response::from_parts(parts, full(view)))
}

/// Per slot: whether `client` may see it in full, and the lease and last
/// use that say whether it changed hands since.
fn shown(upstream: &Upstream, client: &ClientTag) -> Vec<(bool, Option<u64>, u64)> {
    upstream.pool.read(|t| {
        t.slots()
            .iter()
            .enumerate()
            .map(|(id, s)| (t.shown_to(id, client), s.lease, s.last_used))
            .collect()
    })
}

/// The listing with every slot that is not `mine` cut down to what says
/// nothing of its work.
fn redact(listing: Value, mine: impl Fn(usize) -> bool) -> Value {
    let Value::Array(slots) = listing else {
        return Value::Array(Vec::new());
    };
    let view = slots.into_iter().map(|slot| {
        let id = slot.get("id").and_then(Value::as_u64);
        match id {
            Some(id) if mine(usize::try_from(id).unwrap_or(usize::MAX)) => slot,
            _ => {
                let keep = ["id", "n_ctx", "is_processing"];
                let shown: Map<String, Value> = keep
                    .iter()
                    .filter_map(|k| slot.get(*k).map(|v| ((*k).to_string(), v.clone())))
                    .collect();
                Value::Object(shown)
            }
        }
    });
    Value::Array(view.collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn other_clients_slots_show_nothing_of_their_work() {
        let listing = json!([
            {"id": 0, "n_ctx": 512, "is_processing": false, "prompt": "Alice's secret",
             "params": {"temperature": 0.7}, "next_token": [{"n_decoded": 9}]},
            {"id": 1, "n_ctx": 512, "is_processing": true, "prompt": "mine"},
        ]);
        let view = redact(listing, |id| id == 1);
        assert_eq!(
            view,
            json!([
                {"id": 0, "n_ctx": 512, "is_processing": false},
                {"id": 1, "n_ctx": 512, "is_processing": true, "prompt": "mine"},
            ])
        );
        assert_eq!(redact(json!({"error": 1}), |_| true), json!([]));
    }
}
