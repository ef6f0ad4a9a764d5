//! The admin side port: a JSON API over the cache files (compatible with the
//! seed plugin's), the upstreams and their slots, manual save/load/clear,
//! group preload, the llama-server instances kvgate runs, live settings,
//! events and metrics. See the README's "Admin API" for the
//! contract. Handlers only take slot leases like any request would and never
//! hold the table lock across an `.await`, so nothing here slows the front
//! port beyond the slot it works on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use tracing::info;

use crate::app::{App, Shared};
use crate::body::{boxed, full, json_response, ProxyBody};
use crate::cache_store::{self, SaveKind, SaveMeta, StoreError};
use crate::clients::{constant_time_eq, presented_key};
use crate::config::CacheSettings;
use crate::error::{ApiError, ErrorType};
use crate::fleet::Fleet;
use crate::hooks::Restore;
use crate::instances::{InstanceError, Instances};
use crate::owner_save::{save_owner, OwnerSave};
use crate::proxy::percent_decode;
use crate::slots::{Outcome, Tenant, Want};
use crate::upstream::SlotAction;

/// The seed plugin's mount point, served as an alias of the file routes.
pub const PLUGIN_PREFIX: &str = "/api/plugins/kv-cache-manager";
/// Where live settings are persisted, inside the save directory.
pub const SETTINGS_FILE: &str = "kvgate-settings.json";
/// Largest admin request body.
const MAX_BODY: usize = 1 << 20;

type Answer = Result<Response<ProxyBody>, ApiError>;

/// Serves one admin request.
pub async fn handle(
    fleet: Arc<Fleet>,
    instances: Arc<Instances>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    if let Err(e) = authorize(&fleet, &req) {
        return e.into_response();
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let path = path
        .strip_prefix(PLUGIN_PREFIX)
        .unwrap_or(&path)
        .to_string();
    let query = req.uri().query().map(str::to_string);
    let query = query.as_deref();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let shared = &fleet.shared;
    let result = match (&method, segments.as_slice()) {
        (&Method::GET, ["health"]) => Ok(json_ok(&health(&fleet))),
        (&Method::GET, ["upstreams"]) => Ok(json_ok(&upstreams(&fleet))),
        (&Method::GET, ["slots"]) => query_param(query, "upstream")
            .and_then(|name| selected(&fleet, name))
            .map(|apps| json_ok(&slots(&apps))),
        (&Method::GET, ["saves"]) => saves(&fleet, query),
        (&Method::GET, ["files"]) => files(shared),
        (&Method::DELETE, ["files", name]) => delete_file(shared, name),
        // A raw `/` in the name: never a file of the directory.
        (&Method::DELETE, ["files", _, ..]) => Err(forbidden(path.trim_start_matches("/files/"))),
        (&Method::POST, ["save"]) => match read_json(req).await {
            Ok(b) => save_all(&fleet, query, &b).await,
            Err(e) => Err(e),
        },
        (&Method::POST, ["slots", "clear"]) => match read_json(req).await {
            Ok(b) => clear(&fleet, query, &b).await,
            Err(e) => Err(e),
        },
        (&Method::POST, ["slots", id, "save"]) => {
            let id = id.to_string();
            match read_json(req).await {
                Ok(b) => save_one(&fleet, query, &id, &b).await,
                Err(e) => Err(e),
            }
        }
        (&Method::POST, ["load"]) => match read_json(req).await {
            Ok(b) => load(&fleet, query, &b).await,
            Err(e) => Err(e),
        },
        (&Method::POST, ["preload"]) => match read_json(req).await {
            Ok(b) => start_preload(&fleet, query, &b),
            Err(e) => Err(e),
        },
        (&Method::GET, ["preload", id]) => preload_id(id)
            .and_then(|id| {
                shared
                    .preloads
                    .progress(id)
                    .ok_or_else(|| ApiError::not_found(format!("no preload job {id}")))
            })
            .map(|p| json_ok(&serde_json::to_value(p).unwrap_or(Value::Null))),
        (&Method::DELETE, ["preload", id]) => preload_id(id)
            .and_then(|id| {
                shared
                    .preloads
                    .cancel(id)
                    .ok_or_else(|| ApiError::not_found(format!("no preload job {id}")))
            })
            .map(|p| json_ok(&serde_json::to_value(p).unwrap_or(Value::Null))),
        (_, ["instances", ..]) if fleet.cfg.admin_key.is_none() => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorType::Authentication,
            "the instances API requires an admin key: start kvgate with --admin-key or --admin-key-file",
        )),
        (&Method::GET, ["instances"]) => Ok(json_ok(&instances.all())),
        (&Method::POST, ["instances"]) => match read_json(req).await {
            Ok(b) => instances
                .create(&b)
                .await
                .map(|v| json_response(StatusCode::CREATED, &v))
                .map_err(instance_error),
            Err(e) => Err(e),
        },
        (&Method::GET, ["instances", id]) => instances.show(id).map(|v| json_ok(&v)).map_err(instance_error),
        (&Method::POST, ["instances", id, "start"]) => {
            instances.start(id).await.map(|v| json_ok(&v)).map_err(instance_error)
        }
        (&Method::POST, ["instances", id, "stop"]) => {
            instances.stop(id).await.map(|v| json_ok(&v)).map_err(instance_error)
        }
        (&Method::DELETE, ["instances", id]) => {
            instances.delete(id).await.map(|v| json_ok(&v)).map_err(instance_error)
        }
        (&Method::GET, ["settings"]) => Ok(json_ok(&settings_json(&shared.settings.get()))),
        (&Method::PUT, ["settings"]) => match read_json(req).await {
            Ok(b) => put_settings(shared, &b),
            Err(e) => Err(e),
        },
        (&Method::GET, ["events"]) => Ok(events(shared)),
        (&Method::GET, ["metrics"]) => Ok(metrics(&fleet)),
        (
            _,
            ["health" | "upstreams" | "slots" | "saves" | "files" | "save" | "load" | "preload"
            | "instances" | "settings" | "events" | "metrics", ..],
        ) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorType::InvalidRequest,
            format!("{method} is not allowed on {path}"),
        )),
        _ => Err(ApiError::not_found(format!("no admin endpoint {path}"))),
    };
    result.unwrap_or_else(ApiError::into_response)
}

fn authorize(fleet: &Fleet, req: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(key) = &fleet.cfg.admin_key else {
        return Ok(());
    };
    let given = presented_key(req.headers(), "x-admin-key");
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorType::Authentication,
            "admin key required (X-Admin-Key or Authorization: Bearer)",
        )),
    }
}

fn instance_error(e: InstanceError) -> ApiError {
    let status = match &e {
        InstanceError::BadRequest(_) => StatusCode::BAD_REQUEST,
        InstanceError::NotFound(_) => StatusCode::NOT_FOUND,
        InstanceError::Busy(..) => StatusCode::CONFLICT,
        InstanceError::NoSaveDir => StatusCode::NOT_IMPLEMENTED,
        InstanceError::Closing => StatusCode::SERVICE_UNAVAILABLE,
        InstanceError::Start(_) | InstanceError::Persist(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let kind = match status {
        StatusCode::INTERNAL_SERVER_ERROR => ErrorType::Server,
        StatusCode::NOT_FOUND => ErrorType::NotFound,
        StatusCode::NOT_IMPLEMENTED => ErrorType::NotSupported,
        StatusCode::SERVICE_UNAVAILABLE => ErrorType::Unavailable,
        _ => ErrorType::InvalidRequest,
    };
    ApiError::new(status, kind, e.to_string())
}

/// A query parameter's value, percent-decoded (`+` is a space). A value
/// that is empty or does not decode is a 400, never taken for "not given"
/// (for `upstream`, that would mean every upstream).
fn query_param(query: Option<&str>, key: &str) -> Result<Option<String>, ApiError> {
    let Some(raw) = query.and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }) else {
        return Ok(None);
    };
    match percent_decode(&raw.replace('+', " ")) {
        Some(v) if !v.is_empty() => Ok(Some(v)),
        _ => Err(ApiError::bad_request(format!(
            "the {key} parameter {raw:?} is empty or not percent-encoded UTF-8"
        ))),
    }
}

/// The upstreams an action is about: the one `name`d, or all.
fn selected(fleet: &Fleet, name: Option<String>) -> Result<Vec<Arc<App>>, ApiError> {
    match name {
        None => Ok(fleet.apps()),
        Some(n) => fleet
            .get(&n)
            .map(|a| vec![a])
            .ok_or_else(|| ApiError::not_found(format!("no upstream {n:?} (see GET /upstreams)"))),
    }
}

/// The upstream a request names (`?upstream=` or `"upstream"` in the body).
fn named_upstream(query: Option<&str>, body: &Value) -> Result<Option<String>, ApiError> {
    match (query_param(query, "upstream")?, body.get("upstream")) {
        (Some(q), _) => Ok(Some(q)),
        (None, None | Some(Value::Null)) => Ok(None),
        (None, Some(Value::String(n))) => Ok(Some(n.clone())),
        (None, Some(_)) => Err(ApiError::bad_request("\"upstream\" must be a string")),
    }
}

async fn read_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("could not read the body: {e}")))?
        .to_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(ApiError::bad_request("the body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

fn json_ok(v: &Value) -> Response<ProxyBody> {
    json_response(StatusCode::OK, v)
}

fn store(shared: &Shared) -> Result<&Arc<cache_store::CacheStore>, ApiError> {
    shared.store.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            ErrorType::NotSupported,
            "kvgate runs without --save-dir: there are no cache files",
        )
    })
}

// === health, slots, saves ===

fn health(fleet: &Fleet) -> Value {
    let apps = fleet.apps();
    // `upstream` is the first one, as before kvgate had several.
    let first = apps.first().map(|a| upstream_json(a));
    json!({
        "status": "ok",
        "upstream": first,
        "upstreams": apps.iter().map(|a| upstream_json(a)).collect::<Vec<_>>(),
        "save_dir": fleet.shared.store.as_ref().map(|s| s.dir().display().to_string()),
    })
}

fn upstream_json(app: &App) -> Value {
    let st = app.upstream_state.get();
    let fp = app.fingerprint.get();
    let g = app.gauges();
    json!({
        "name": app.name,
        "url": app.upstream.base().to_string(),
        "up": st.up,
        "slots": app.pool.len(),
        "slots_busy": g.busy,
        "slots_free": g.free,
        "queued": g.queued,
        "model": fp.as_ref().map(|f| f.model.clone()),
        "models": st.models,
        "fingerprint": fp.as_ref().map(|f| f.id.clone()),
    })
}

fn upstreams(fleet: &Fleet) -> Value {
    let list: Vec<Value> = fleet.apps().iter().map(|a| upstream_json(a)).collect();
    json!({ "upstreams": list })
}

fn slots(apps: &[Arc<App>]) -> Value {
    let mut list: Vec<Value> = Vec::new();
    let mut queued = 0;
    for app in apps {
        let upstream = app.upstream_state.get().slots;
        queued += app.pool.with_table(|t| t.queued());
        list.extend(app.pool.snapshot().iter().enumerate().map(|(id, s)| {
            let tokens = upstream
                .iter()
                .find(|u| u.id == id)
                .and_then(|u| u.n_prompt_tokens);
            json!({
                "id": id,
                "upstream": app.name,
                "chat": s.owner.as_ref().and_then(|t| t.chat()),
                "character": s.owner.as_ref().and_then(|t| t.character()),
                "anonymous": s.owner.as_ref().is_some_and(|t| !t.is_character()),
                "usage": s.usage,
                "messages_since_save": s.usage,
                "last_used": app.slot_used_at(id),
                "busy": s.lease.is_some(),
                "live": s.live,
                "tokens_cached": tokens,
                "restored_from": s.restored_from,
            })
        }));
    }
    json!({"slots": list, "queued": queued})
}

/// The model fingerprints the upstreams serve now.
fn current_fingerprints(fleet: &Fleet) -> Vec<String> {
    fleet
        .apps()
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

fn saves(fleet: &Fleet, query: Option<&str>) -> Answer {
    let store = store(&fleet.shared)?;
    let _ = store.rescan();
    // A search that does not decode searches for nothing in particular.
    let q = query_param(query, "q")
        .unwrap_or(None)
        .map(|v| v.to_lowercase());
    let fps = current_fingerprints(fleet);
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

// === files (the seed plugin's API) ===

/// ISO 8601 UTC with milliseconds, as the plugin's `Date` serialised.
fn iso8601(t: std::time::SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let s = cache_store::utc_stamp(d.as_secs());
    format!(
        "{}-{}-{}T{}:{}:{}.{:03}Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[8..10],
        &s[10..12],
        &s[12..14],
        d.subsec_millis()
    )
}

fn files(shared: &Shared) -> Answer {
    let store = store(shared)?;
    let rd = std::fs::read_dir(store.dir())
        .map_err(|e| ApiError::internal(format!("cannot list the save directory: {e}")))?;
    let mut list: Vec<Value> = Vec::new();
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !cache_store::is_cache_file_name(&name) {
            continue;
        }
        // A file deleted (e.g. by rotation) while listing is left out, and so
        // is anything that is not a plain file of the directory (symlinks,
        // directories): the file API never reaches outside it.
        let Ok(md) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if !md.file_type().is_file() {
            continue;
        }
        list.push(json!({
            "name": name,
            "size": md.len(),
            "modified": md.modified().map(iso8601).unwrap_or_default(),
            "isDirectory": false,
        }));
    }
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Ok(json_ok(&json!({ "files": list })))
}

fn forbidden(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        ErrorType::Permission,
        format!("{name:?} is not a cache file of the save directory"),
    )
}

fn delete_file(shared: &Shared, raw: &str) -> Answer {
    let store = store(shared)?;
    let name = percent_decode(raw).ok_or_else(|| forbidden(raw))?;
    // Separators, parent references and NULs never name a file of the
    // directory, however they were encoded.
    if name.contains(['/', '\\', '\0'])
        || name.contains("..")
        || !cache_store::is_cache_file_name(&name)
    {
        return Err(forbidden(&name));
    }
    match store.delete(&name) {
        Ok(()) => {
            info!(file = %name, "deleted by the admin API");
            Ok(json_ok(&json!({
                "success": true,
                "message": format!("File {name} deleted successfully"),
            })))
        }
        Err(StoreError::NotFound(_)) => Err(ApiError::not_found(format!("File {name} not found"))),
        Err(StoreError::BadName(_)) => Err(forbidden(&name)),
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}

// === manual saves, clear, load ===

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

/// Saves one slot's character under a `Hold` lease. `Ok(None)` when the
/// slot holds no character's live cache.
async fn save_slot(app: &Arc<App>, slot: usize, tag: Option<&str>) -> Result<Option<Value>, Value> {
    let lease = app
        .pool
        .acquire(Want::Hold(slot), app.cfg.queue_timeout)
        .await
        .map_err(|e| json!({"slot": slot, "character": Value::Null, "reason": e.to_string()}))?;
    // An untagged save is "save now" (the counters start over); a tagged one
    // is a bookmark that leaves them alone.
    let result = match save_owner(app, &lease, SaveKind::Manual, tag, None, false).await {
        OwnerSave::NoOwner | OwnerSave::Clean(_) => Ok(None),
        OwnerSave::Saved(tenant, file) => Ok(Some(
            json!({"slot": slot, "upstream": app.name, "chat": tenant.chat(), "character": tenant.character(), "file": file}),
        )),
        OwnerSave::Failed(tenant) => Err(
            json!({"slot": slot, "upstream": app.name, "character": tenant.character(), "reason": "the save failed (see the log and the save_failed event)"}),
        ),
    };
    lease.release(Outcome::Untouched);
    result
}

async fn save_all(fleet: &Fleet, query: Option<&str>, body: &Value) -> Answer {
    store(&fleet.shared)?;
    let tag = tag_of(body)?;
    let apps = selected(fleet, named_upstream(query, body)?)?;
    let mut saved = Vec::new();
    let mut failed = Vec::new();
    for app in &apps {
        for slot in 0..app.pool.len() {
            match save_slot(app, slot, tag.as_deref()).await {
                Ok(Some(v)) => saved.push(v),
                Ok(None) => {}
                Err(v) => failed.push(v),
            }
        }
    }
    Ok(json_ok(&json!({"saved": saved, "failed": failed})))
}

/// The one upstream a slot id is about: the one named, or the only one.
fn one_upstream(fleet: &Fleet, query: Option<&str>, body: &Value) -> Result<Arc<App>, ApiError> {
    let mut apps = selected(fleet, named_upstream(query, body)?)?;
    match apps.len() {
        1 => Ok(apps.remove(0)),
        0 => Err(ApiError::unavailable("kvgate has no upstream")),
        _ => Err(ApiError::bad_request(
            "kvgate has several upstreams: name one with ?upstream=NAME (see GET /upstreams)",
        )),
    }
}

fn slot_id(app: &App, raw: &str) -> Result<usize, ApiError> {
    raw.parse::<usize>()
        .ok()
        .filter(|id| *id < app.pool.len())
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no slot {raw} (llama-server has {})",
                app.pool.len()
            ))
        })
}

async fn save_one(fleet: &Fleet, query: Option<&str>, raw: &str, body: &Value) -> Answer {
    let app = &one_upstream(fleet, query, body)?;
    store(&fleet.shared)?;
    let slot = slot_id(app, raw)?;
    let tag = tag_of(body)?;
    match save_slot(app, slot, tag.as_deref()).await {
        Ok(Some(v)) => Ok(json_ok(&json!({"saved": [v], "failed": []}))),
        Ok(None) => Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorType::InvalidRequest,
            format!("slot {slot} holds no character's live cache"),
        )),
        Err(v) => Ok(json_ok(&json!({"saved": [], "failed": [v]}))),
    }
}

async fn clear(fleet: &Fleet, query: Option<&str>, body: &Value) -> Answer {
    let erase = match body.get("erase") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad_request("\"erase\" must be true or false")),
    };
    let apps = selected(fleet, named_upstream(query, body)?)?;
    let several = apps.len() > 1;
    let mut cleared = Vec::new();
    let mut erased = Vec::new();
    for app in &apps {
        let (c, e) = clear_upstream(app, erase).await?;
        // With one upstream the lists stay plain slot ids, as before.
        let tag = |slot: usize| {
            if several {
                json!({"upstream": app.name, "slot": slot})
            } else {
                json!(slot)
            }
        };
        cleared.extend(c.into_iter().map(tag));
        erased.extend(e.into_iter().map(tag));
    }
    Ok(json_ok(&json!({"cleared": cleared, "erased": erased})))
}

/// Releases every slot of `app` (erasing its cache in llama-server too with
/// `erase`); returns the slots cleared and erased.
async fn clear_upstream(app: &App, erase: bool) -> Result<(Vec<usize>, Vec<usize>), ApiError> {
    let mut cleared = Vec::new();
    let mut erased = Vec::new();
    for slot in 0..app.pool.len() {
        let lease = app
            .pool
            .acquire(Want::Hold(slot), app.cfg.queue_timeout)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        if erase {
            match app
                .upstream
                .slot_action(slot, SlotAction::Erase, None, Duration::from_secs(30))
                .await
            {
                Ok(_) => erased.push(slot),
                Err(e) => tracing::warn!(slot, error = %e, "erase failed"),
            }
        }
        lease.release(Outcome::Cleared);
        cleared.push(slot);
    }
    Ok((cleared, erased))
}

async fn load(fleet: &Fleet, query: Option<&str>, body: &Value) -> Answer {
    let store = store(&fleet.shared)?;
    let items = body
        .get("items")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request("\"items\" must be a non-empty array of {\"file\", \"chat\"?}")
        })?;
    let _ = store.rescan();
    let app = &match named_upstream(query, body)? {
        Some(_) => one_upstream(fleet, query, body)?,
        None => load_target(fleet, store, &items[0])?,
    };
    if items.len() > app.pool.len() {
        return Err(ApiError::bad_request(format!(
            "{} saves can't be loaded into {} slots without evicting each other",
            items.len(),
            app.pool.len()
        )));
    }
    let fp = app.fingerprint.get().map(|f| f.id);
    if fp.is_none() {
        // Without it, a save of another model could not be told apart.
        return Err(ApiError::unavailable(format!(
            "upstream {}'s model is not known yet; try again in a moment",
            app.name
        )));
    }
    let mut plan: Vec<(SaveMeta, Tenant)> = Vec::new();
    for item in items {
        let file = item
            .get("file")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_request("each item needs a \"file\""))?;
        let meta = store
            .get(file)
            .ok_or_else(|| ApiError::not_found(format!("no save {file}")))?;
        if let (Some(a), Some(b)) = (&meta.fingerprint, &fp) {
            if a != b {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    ErrorType::InvalidRequest,
                    format!("{file} was saved under another model ({}); loading it would give wrong output", meta.model.as_deref().unwrap_or("unknown")),
                ));
            }
        }
        let chat = match item.get("chat") {
            Some(Value::String(c)) if !c.trim().is_empty() => c.trim().to_string(),
            None | Some(Value::Null) => resident_chat(app, &meta.character)
                .or_else(|| app.memory.last_chat_of(&meta.character))
                .unwrap_or_else(|| meta.chat.clone()),
            Some(_) => return Err(ApiError::bad_request("\"chat\" must be a non-empty string")),
        };
        let tenant = Tenant::Character {
            chat,
            name: meta.character.clone(),
        };
        if plan.iter().any(|(_, t)| *t == tenant) {
            return Err(ApiError::bad_request(format!("two saves for {tenant}")));
        }
        plan.push((meta, tenant));
    }
    // Hold every lease until all are loaded: leased slots are never
    // evicted, so the chosen characters can't evict each other. Characters
    // already in a slot take theirs first, so a newcomer's eviction can't
    // pick a chosen character's slot.
    let table = app.pool.snapshot();
    let mut order: Vec<usize> = (0..plan.len()).collect();
    order.sort_by_key(|&i| !table.iter().any(|s| s.owner.as_ref() == Some(&plan[i].1)));
    let mut leases: Vec<Option<crate::lease::Lease>> = (0..plan.len()).map(|_| None).collect();
    for i in order {
        let lease = app
            .pool
            .acquire(Want::Tenant(plan[i].1.clone()), app.cfg.queue_timeout)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        crate::proxy::take_over(app, &lease).await;
        leases[i] = Some(lease);
    }
    let leases: Vec<crate::lease::Lease> = leases.into_iter().flatten().collect();
    let mut loaded = Vec::new();
    let mut failed = Vec::new();
    for ((meta, tenant), lease) in plan.iter().zip(leases) {
        let slot = lease.slot();
        let r = app.hooks.restore_file(slot, tenant, &meta.file).await;
        crate::proxy::record_restore(app, slot, &r);
        match r {
            Restore::Restored { tokens, .. } => loaded.push(
                json!({"file": meta.file, "slot": slot, "upstream": app.name, "chat": tenant.chat(), "character": tenant.character(), "tokens": tokens}),
            ),
            Restore::Failed(reason) => failed.push(json!({"file": meta.file, "slot": slot, "reason": reason})),
            Restore::Skipped => failed.push(json!({"file": meta.file, "slot": slot, "reason": "kvgate runs without a save directory"})),
        }
        lease.release(Outcome::Untouched);
    }
    Ok(json_ok(&json!({"loaded": loaded, "failed": failed})))
}

/// Where a load goes when no upstream is named: where the first item's
/// character is, else where a request for it would go (among upstreams
/// serving the save's model).
fn load_target(
    fleet: &Fleet,
    store: &cache_store::CacheStore,
    first: &Value,
) -> Result<Arc<App>, ApiError> {
    let meta = first
        .get("file")
        .and_then(Value::as_str)
        .and_then(|f| store.get(f));
    let Some(meta) = meta else {
        // The plan below reports what is wrong with the item.
        return fleet
            .default_app()
            .ok_or_else(|| ApiError::unavailable("kvgate has no upstream"));
    };
    // Only upstreams serving the save's model (by fingerprint, which also
    // covers the per-slot context) can take it.
    let fits = |a: &Arc<App>| match (&meta.fingerprint, a.fingerprint.get()) {
        (Some(want), Some(have)) => *want == have.id,
        _ => true,
    };
    let apps: Vec<Arc<App>> = fleet.apps().into_iter().filter(fits).collect();
    if let Some(app) = apps
        .iter()
        .find(|a| resident_chat(a, &meta.character).is_some())
    {
        return Ok(Arc::clone(app));
    }
    let tenant = Tenant::Character {
        chat: meta.chat.clone(),
        name: meta.character.clone(),
    };
    match fleet.place(&tenant, meta.model.as_deref()) {
        Some(app) if fits(&app) => Ok(app),
        // Placement chose by file name; the fingerprint disagrees.
        other => apps
            .into_iter()
            .next()
            .or(other)
            .ok_or_else(|| ApiError::unavailable("kvgate has no upstream")),
    }
}

fn resident_chat(app: &App, character: &str) -> Option<String> {
    app.pool.snapshot().into_iter().find_map(|s| match s.owner {
        Some(Tenant::Character { chat, name }) if name == character => Some(chat),
        _ => None,
    })
}

// === preload ===

fn preload_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::not_found(format!("no preload job {raw}")))
}

fn start_preload(fleet: &Fleet, query: Option<&str>, body: &Value) -> Answer {
    let chat = body
        .get("chat")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| ApiError::bad_request("\"chat\" must be a non-empty string"))?;
    let characters: Vec<String> = body
        .get("characters")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty() && a.len() <= 256)
        .and_then(|a| {
            a.iter()
                .map(|v| {
                    v.as_str()
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                })
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| {
            ApiError::bad_request("\"characters\" must be a non-empty array of names")
        })?;
    let prompt = match body.get("prompt") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) => Some(p.clone()),
        Some(_) => return Err(ApiError::bad_request("\"prompt\" must be a string")),
    };
    // The group goes where its first character is, or would go.
    let app = match named_upstream(query, body)? {
        Some(_) => one_upstream(fleet, query, body)?,
        None => fleet
            .place(
                &Tenant::Character {
                    chat: chat.to_string(),
                    name: characters[0].clone(),
                },
                None,
            )
            .ok_or_else(|| ApiError::unavailable("kvgate has no upstream"))?,
    };
    let id = app
        .preloads
        .start(&app, chat.to_string(), characters, prompt);
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({ "id": id, "upstream": app.name }),
    ))
}

// === settings ===

/// The settings as the API shows them.
pub fn settings_json(s: &CacheSettings) -> Value {
    json!({
        "autosave": s.autosave,
        "save_every": s.save_every,
        "max_files": s.max_files,
        "clear_on_chat_change": s.clear_on_chat_change,
        "preload_timeout_s": s.preload_timeout_s,
    })
}

/// Applies a partial settings object; unknown keys and bad values are errors.
pub fn apply_settings(s: &mut CacheSettings, body: &Map<String, Value>) -> Result<(), String> {
    for (k, v) in body {
        let positive = |v: &Value| -> Result<u64, String> {
            v.as_u64()
                .filter(|n| *n >= 1)
                .ok_or_else(|| format!("{k} must be a whole number ≥ 1"))
        };
        let boolean = |v: &Value| {
            v.as_bool()
                .ok_or_else(|| format!("{k} must be true or false"))
        };
        match k.as_str() {
            "autosave" => s.autosave = boolean(v)?,
            "clear_on_chat_change" => s.clear_on_chat_change = boolean(v)?,
            "save_every" => {
                s.save_every = u32::try_from(positive(v)?)
                    .map_err(|_| "save_every is too large".to_string())?
            }
            "max_files" => {
                s.max_files =
                    u32::try_from(positive(v)?).map_err(|_| "max_files is too large".to_string())?
            }
            "preload_timeout_s" => s.preload_timeout_s = positive(v)?,
            other => return Err(format!("unknown setting {other:?}")),
        }
    }
    Ok(())
}

fn put_settings(shared: &Shared, body: &Value) -> Answer {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("settings must be a JSON object"))?;
    let mut next = shared.settings.get();
    apply_settings(&mut next, obj).map_err(ApiError::bad_request)?;
    if let Some(store) = &shared.store {
        persist_settings(store.dir(), &next)
            .map_err(|e| ApiError::internal(format!("cannot persist the settings: {e}")))?;
    }
    shared.settings.replace(next.clone());
    info!(settings = %settings_json(&next), "settings changed");
    Ok(json_ok(&settings_json(&next)))
}

/// Writes the settings file atomically.
fn persist_settings(dir: &std::path::Path, s: &CacheSettings) -> std::io::Result<()> {
    let tmp = dir.join(format!("{}{SETTINGS_FILE}", cache_store::TEMP_PREFIX));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&settings_json(s))?)?;
    std::fs::rename(&tmp, dir.join(SETTINGS_FILE))
}

/// Applies settings persisted by an earlier run, if any.
pub fn load_persisted_settings(
    dir: &std::path::Path,
    s: &mut CacheSettings,
) -> Result<bool, String> {
    let path = dir.join(SETTINGS_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let v: Value = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| format!("{}: not a JSON object", path.display()))?;
    apply_settings(s, obj).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(true)
}

// === events, metrics ===

fn events(shared: &Shared) -> Response<ProxyBody> {
    let mut resp = Response::new(boxed(shared.events.subscribe()));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

fn metrics(fleet: &Fleet) -> Response<ProxyBody> {
    let text = fleet.shared.metrics.render(fleet.gauges());
    let mut resp = Response::new(full(Bytes::from(text)));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_apply_and_refuse() {
        let mut s = CacheSettings::default();
        let body = json!({"save_every": 3, "autosave": false});
        apply_settings(&mut s, body.as_object().unwrap()).unwrap();
        assert_eq!((s.save_every, s.autosave), (3, false));
        for bad in [
            json!({"save_every": 0}),
            json!({"max_files": "x"}),
            json!({"autosave": 1}),
            json!({"nope": 1}),
        ] {
            assert!(
                apply_settings(&mut s, bad.as_object().unwrap()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb").as_deref(), Some("a/b"));
        assert_eq!(percent_decode("%D0%90").as_deref(), Some("А"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }

    #[test]
    fn iso_dates() {
        let t = UNIX_EPOCH + Duration::from_millis(1_705_329_022_123);
        assert_eq!(iso8601(t), "2024-01-15T14:30:22.123Z");
    }
}
