//! `GET /slots`, `POST /save`, `POST /slots/{id}/save`, `POST /slots/clear`:
//! the slots of every upstream, and the slot work the API asks for (done by
//! [`crate::session::manual`]).

use std::sync::Arc;

use hyper::StatusCode;
use serde_json::{json, Value};

use crate::app::App;
use crate::http::error::{ApiError, ErrorType};
use crate::session::{self, OwnerSave};
use crate::upstream::Upstream;

use super::request::{json_ok, named_upstream, one_upstream, selected, store, Answer};

/// `GET /slots`: every slot of the upstreams given.
pub(crate) fn slots(upstreams: &[Arc<Upstream>]) -> Value {
    let mut list: Vec<Value> = Vec::new();
    let mut queued = 0;
    for upstream in upstreams {
        let reported = upstream.state.get().slots;
        queued += upstream.pool.queued();
        list.extend(upstream.pool.snapshot().iter().enumerate().map(|(id, s)| {
            let tokens = reported
                .iter()
                .find(|u| u.id == id)
                .and_then(|u| u.n_prompt_tokens);
            json!({
                "id": id,
                "upstream": upstream.name,
                "chat": s.owner.as_ref().and_then(|t| t.chat()),
                "character": s.owner.as_ref().and_then(|t| t.character()),
                "also_holds": s.members.iter().filter_map(|t| t.character()).collect::<Vec<_>>(),
                "anonymous": s.owner.as_ref().is_some_and(|t| !t.is_character()),
                "usage": s.usage,
                "messages_since_save": s.usage,
                "last_used": s.used_at,
                "busy": s.lease.is_some(),
                "live": s.live,
                "tokens_cached": tokens,
                "restored_from": s.restored_from,
            })
        }));
    }
    json!({"slots": list, "queued": queued})
}

/// The `tag` of a manual save.
fn tag_of(body: &Value) -> Result<Option<String>, ApiError> {
    match body.get("tag") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(t)) if !t.trim().is_empty() && !t.chars().any(char::is_control) => {
            Ok(Some(t.trim().to_string()))
        }
        Some(_) => Err(ApiError::bad_request(
            "\"tag\" must be a non-empty string without control characters",
        )),
    }
}

/// Saves one slot's character (see [`session::manual::save_slot`]), as the
/// API reports it. `Ok(None)` when the slot holds no character's live cache.
async fn save_slot(
    upstream: &Upstream,
    slot: usize,
    tag: Option<&str>,
) -> Result<Option<Value>, Value> {
    let saved = session::manual::save_slot(upstream, slot, tag)
        .await
        .map_err(|e| json!({"slot": slot, "character": Value::Null, "reason": e.to_string()}))?;
    match saved {
        OwnerSave::NoOwner | OwnerSave::Clean(_) => Ok(None),
        OwnerSave::Saved(tenant, file) => Ok(Some(
            json!({"slot": slot, "upstream": upstream.name, "chat": tenant.chat(), "character": tenant.character(), "file": file}),
        )),
        OwnerSave::Failed(tenant) => Err(
            json!({"slot": slot, "upstream": upstream.name, "character": tenant.character(), "reason": "the save failed (see the log and the save_failed event)"}),
        ),
    }
}

/// `POST /save`: saves every slot holding a character's live cache.
pub(crate) async fn save_all(app: &App, query: Option<&str>, body: &Value) -> Answer {
    store(&app.shared)?;
    let tag = tag_of(body)?;
    let upstreams = selected(app, named_upstream(query, body)?)?;
    let mut saved = Vec::new();
    let mut failed = Vec::new();
    for upstream in &upstreams {
        for slot in 0..upstream.pool.len() {
            match save_slot(upstream, slot, tag.as_deref()).await {
                Ok(Some(v)) => saved.push(v),
                Ok(None) => {}
                Err(v) => failed.push(v),
            }
        }
    }
    Ok(json_ok(&json!({"saved": saved, "failed": failed})))
}

/// The slot a path names, if the upstream has it.
fn slot_id(upstream: &Upstream, raw: &str) -> Result<usize, ApiError> {
    raw.parse::<usize>()
        .ok()
        .filter(|id| *id < upstream.pool.len())
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no slot {raw} (llama-server has {})",
                upstream.pool.len()
            ))
        })
}

/// `POST /slots/{id}/save`.
pub(crate) async fn save_one(app: &App, query: Option<&str>, raw: &str, body: &Value) -> Answer {
    let upstream = &one_upstream(app, query, body)?;
    store(&app.shared)?;
    let slot = slot_id(upstream, raw)?;
    let tag = tag_of(body)?;
    match save_slot(upstream, slot, tag.as_deref()).await {
        Ok(Some(v)) => Ok(json_ok(&json!({"saved": [v], "failed": []}))),
        Ok(None) => Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorType::InvalidRequest,
            format!("slot {slot} holds no character's live cache"),
        )),
        Err(v) => Ok(json_ok(&json!({"saved": [], "failed": [v]}))),
    }
}

/// `POST /slots/clear`: releases (and with `erase`, erases) every slot.
pub(crate) async fn clear(app: &App, query: Option<&str>, body: &Value) -> Answer {
    let erase = match body.get("erase") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad_request("\"erase\" must be true or false")),
    };
    let upstreams = selected(app, named_upstream(query, body)?)?;
    let several = upstreams.len() > 1;
    let mut cleared = Vec::new();
    let mut erased = Vec::new();
    for upstream in &upstreams {
        let (c, e) = session::manual::clear(upstream, erase)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        // Other open dashboards and extensions refresh their slots.
        upstream.emit("slots_cleared", || json!({"slots": c, "erased": e}));
        // With one upstream the lists stay plain slot ids, as before.
        let tag = |slot: usize| {
            if several {
                json!({"upstream": upstream.name, "slot": slot})
            } else {
                json!(slot)
            }
        };
        cleared.extend(c.into_iter().map(tag));
        erased.extend(e.into_iter().map(tag));
    }
    Ok(json_ok(&json!({"cleared": cleared, "erased": erased})))
}
