//! A client's view of llama-server's `GET /slots`. With a clients file,
//! kvgate calls llama-server with its own key, so llama-server would show
//! every client every slot: its task, token counts, sampling parameters and,
//! with `LLAMA_SERVER_SLOTS_DEBUG` set, the prompt and generated text of
//! another client's chat. Each client sees in full only the slots whose
//! last generation or slot action was its own; the others keep their place
//! in the list (clients index it by id) with only `id`, `n_ctx` and
//! `is_processing`.

use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Map, Value};

use crate::http::body::{boxed, full, ProxyBody};
use crate::llama::client::strip_hop_by_hop;
use crate::slots::table::ClientTag;
use crate::upstream::Upstream;

use super::failure::Failure;
use super::passthrough::llama_failed;

/// Whether this is llama-server's slot listing.
pub(crate) fn is_slots_listing<B>(req: &Request<B>) -> bool {
    req.method() == Method::GET && req.uri().path() == "/slots"
}

/// Forwards `GET /slots` and answers with what `client` may see of it.
pub(crate) async fn own_slots(
    upstream: &Arc<Upstream>,
    req: Request<Incoming>,
    client: ClientTag,
) -> Result<Response<ProxyBody>, Failure> {
    let (parts, body) = req.into_parts();
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
    let listing = (parts.status == StatusCode::OK)
        .then(|| serde_json::from_slice::<Value>(&bytes).ok())
        .flatten();
    let Some(listing) = listing else {
        // An error or something unexpected: nothing of a slot's to hide.
        return Ok(Response::from_parts(parts, full(bytes)));
    };
    let users = upstream.pool.read(|t| {
        t.slots()
            .iter()
            .map(|s| s.client.clone())
            .collect::<Vec<_>>()
    });
    let mine = |id: usize| users.get(id).is_some_and(|u| u.as_ref() == Some(&client));
    let view =
        serde_json::to_vec(&redact(listing, mine)).map_err(|e| Failure::Kvgate(e.to_string()))?;
    parts.headers.remove(CONTENT_LENGTH);
    Ok(Response::from_parts(parts, full(view)))
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
