//! `GET /saves` and `POST /load`: the saves by chat and character, and
//! loading chosen saves into slots (done by [`crate::session::manual`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use hyper::StatusCode;
use serde_json::{json, Value};

use crate::app::App;
use crate::http::error::{ApiError, ErrorType};
use crate::session;
use crate::store::hooks::Restore;
use crate::store::index::CacheStore;
use crate::store::meta::SaveMeta;
use crate::tenant::Tenant;
use crate::upstream::Upstream;

use super::request::{json_ok, named_upstream, one_upstream, query_param, store, Answer};

/// The model fingerprints the upstreams serve now.
fn current_fingerprints(app: &App) -> Vec<String> {
    app.upstreams()
        .iter()
        .filter_map(|a| a.fingerprint.get().map(|f| f.id))
        .collect()
}

/// A save as the API shows it; `model_match`: whether an upstream serves
/// its model now (null when either is unknown).
fn save_json(m: &SaveMeta, fps: &[String]) -> Value {
    json!({
        "file": m.file,
        "created": m.created,
        "tag": m.tag,
        "kind": m.kind.as_str(),
        "tokens": m.n_tokens,
        "bytes": m.bytes,
        "model": m.model,
        "model_match": match &m.fingerprint {
            Some(a) if !fps.is_empty() => Value::from(fps.contains(a)),
            _ => Value::Null,
        },
    })
}

/// `GET /saves[?q=]`: saves grouped by chat and character, newest first.
pub(crate) fn saves(app: &App, query: Option<&str>) -> Answer {
    let store = store(&app.shared)?;
    let _ = store.rescan();
    // A search that does not decode searches for nothing in particular.
    let q = query_param(query, "q")
        .unwrap_or(None)
        .map(|v| v.to_lowercase());
    let fps = current_fingerprints(app);
    let mut chats: BTreeMap<String, BTreeMap<String, Vec<SaveMeta>>> = BTreeMap::new();
    for m in store.list() {
        if let Some(q) = &q {
            if !m.chat.to_lowercase().contains(q) && !m.character.to_lowercase().contains(q) {
                continue;
            }
        }
        chats
            .entry(m.chat.clone())
            .or_default()
            .entry(m.character.clone())
            .or_default()
            .push(m);
    }
    let chats: Vec<Value> = chats
        .into_iter()
        .map(|(chat, chars)| {
            let characters: Vec<Value> = chars
                .into_iter()
                .map(|(character, mut list)| {
                    list.sort_by(|a, b| b.created.cmp(&a.created).then(b.file.cmp(&a.file)));
                    let saves: Vec<Value> = list.iter().map(|m| save_json(m, &fps)).collect();
                    json!({"character": character, "saves": saves})
                })
                .collect();
            json!({"chat": chat, "characters": characters})
        })
        .collect();
    Ok(json_ok(&json!({ "chats": chats })))
}

/// `POST /load`: loads chosen saves into slots of one upstream.
pub(crate) async fn load(app: &App, query: Option<&str>, body: &Value) -> Answer {
    let store = store(&app.shared)?;
    let items = body
        .get("items")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request("\"items\" must be a non-empty array of {\"file\", \"chat\"?}")
        })?;
    let _ = store.rescan();
    let upstream = &match named_upstream(query, body)? {
        Some(_) => one_upstream(app, query, body)?,
        None => load_target(app, store, &items[0])?,
    };
    let plan = load_plan(upstream, store, items)?;
    let files: Vec<(String, Tenant)> = plan
        .iter()
        .map(|(meta, tenant)| (meta.file.clone(), tenant.clone()))
        .collect();
    let results = session::manual::load_saves(upstream, &files)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    let mut loaded = Vec::new();
    let mut failed = Vec::new();
    for ((meta, tenant), (slot, restored)) in plan.iter().zip(results) {
        match restored {
            Restore::Restored { tokens, .. } => loaded.push(
                json!({"file": meta.file, "slot": slot, "upstream": upstream.name, "chat": tenant.chat(), "character": tenant.character(), "tokens": tokens}),
            ),
            Restore::Failed(reason) => failed.push(json!({"file": meta.file, "slot": slot, "reason": reason})),
            Restore::Skipped => failed.push(json!({"file": meta.file, "slot": slot, "reason": "kvgate runs without a save directory"})),
        }
    }
    Ok(json_ok(&json!({"loaded": loaded, "failed": failed})))
}

/// Checks a load's items against `upstream` and the store: each names a
/// save of the model it serves, for a distinct tenant, and they fit in its
/// slots without evicting each other.
fn load_plan(
    upstream: &Upstream,
    store: &CacheStore,
    items: &[Value],
) -> Result<Vec<(SaveMeta, Tenant)>, ApiError> {
    if items.len() > upstream.pool.len() {
        return Err(ApiError::bad_request(format!(
            "{} saves can't be loaded into {} slots without evicting each other",
            items.len(),
            upstream.pool.len()
        )));
    }
    let Some(fp) = upstream.fingerprint.get().map(|f| f.id) else {
        // Without it, a save of another model could not be told apart.
        return Err(ApiError::unavailable(format!(
            "upstream {}'s model is not known yet; try again in a moment",
            upstream.name
        )));
    };
    let mut plan: Vec<(SaveMeta, Tenant)> = Vec::new();
    for item in items {
        let (meta, tenant) = plan_item(upstream, store, item, &fp)?;
        if plan.iter().any(|(_, t)| *t == tenant) {
            return Err(ApiError::bad_request(format!("two saves for {tenant}")));
        }
        plan.push((meta, tenant));
    }
    Ok(plan)
}

/// One load item: its save (of the model `fp`) and the tenant it loads
/// for: the chat given, else the one the character is in, was last seen
/// in, or was saved in.
fn plan_item(
    upstream: &Upstream,
    store: &CacheStore,
    item: &Value,
    fp: &str,
) -> Result<(SaveMeta, Tenant), ApiError> {
    let file = item
        .get("file")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("each item needs a \"file\""))?;
    let meta = store
        .get(file)
        .ok_or_else(|| ApiError::not_found(format!("no save {file}")))?;
    if meta.fingerprint.as_deref().is_some_and(|a| a != fp) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorType::InvalidRequest,
            format!(
                "{file} was saved under another model ({}); loading it would give wrong output",
                meta.model.as_deref().unwrap_or("unknown")
            ),
        ));
    }
    let chat = match item.get("chat") {
        Some(Value::String(c)) if !c.trim().is_empty() => c.trim().to_string(),
        None | Some(Value::Null) => resident_chat(upstream, &meta.character)
            .or_else(|| upstream.shared.memory.last_chat_of(&meta.character))
            .unwrap_or_else(|| meta.chat.clone()),
        Some(_) => return Err(ApiError::bad_request("\"chat\" must be a non-empty string")),
    };
    let tenant = Tenant::Character {
        chat,
        name: meta.character.clone(),
    };
    Ok((meta, tenant))
}

/// Where a load goes when no upstream is named: where the first item's
/// character is, else where a request for it would go (among upstreams
/// serving the save's model).
fn load_target(app: &App, store: &CacheStore, first: &Value) -> Result<Arc<Upstream>, ApiError> {
    let meta = first
        .get("file")
        .and_then(Value::as_str)
        .and_then(|f| store.get(f));
    let Some(meta) = meta else {
        // The plan below reports what is wrong with the item.
        return app
            .default_upstream()
            .ok_or_else(|| ApiError::unavailable("kvgate has no upstream"));
    };
    // Only upstreams serving the save's model (by fingerprint, which also
    // covers the per-slot context) can take it.
    let fits = |a: &Arc<Upstream>| match (&meta.fingerprint, a.fingerprint.get()) {
        (Some(want), Some(have)) => *want == have.id,
        _ => true,
    };
    let upstreams: Vec<Arc<Upstream>> = app.upstreams().into_iter().filter(fits).collect();
    if let Some(upstream) = upstreams
        .iter()
        .find(|a| resident_chat(a, &meta.character).is_some())
    {
        return Ok(Arc::clone(upstream));
    }
    let tenant = Tenant::Character {
        chat: meta.chat.clone(),
        name: meta.character.clone(),
    };
    match app.place(&tenant, meta.model.as_deref()) {
        Some(upstream) if fits(&upstream) => Ok(upstream),
        // Placement chose by file name; the fingerprint disagrees.
        other => upstreams
            .into_iter()
            .next()
            .or(other)
            .ok_or_else(|| ApiError::unavailable("kvgate has no upstream")),
    }
}

/// The chat a character holds a slot in, on `upstream`.
fn resident_chat(upstream: &Upstream, character: &str) -> Option<String> {
    upstream
        .pool
        .snapshot()
        .into_iter()
        .find_map(|s| match s.owner {
            Some(Tenant::Character { chat, name }) if name == character => Some(chat),
            _ => None,
        })
}
