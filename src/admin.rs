//! The admin side port: a JSON API over the cache files (compatible with the
//! seed plugin's), the slots, manual save/load/clear, group preload, live
//! settings, events and metrics. See the README's "Admin API" for the
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

use crate::app::App;
use crate::body::{boxed, full, json_response, ProxyBody};
use crate::cache_store::{self, SaveKind, SaveMeta, StoreError};
use crate::clients::{constant_time_eq, presented_key};
use crate::config::CacheSettings;
use crate::error::{ApiError, ErrorType};
use crate::hooks::Restore;
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
pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<ProxyBody> {
    if let Err(e) = authorize(&app, &req) {
        return e.into_response();
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let path = path
        .strip_prefix(PLUGIN_PREFIX)
        .unwrap_or(&path)
        .to_string();
    let query = req.uri().query().map(str::to_string);
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let result = match (&method, segments.as_slice()) {
        (&Method::GET, ["health"]) => Ok(json_ok(&health(&app))),
        (&Method::GET, ["slots"]) => Ok(json_ok(&slots(&app))),
        (&Method::GET, ["saves"]) => saves(&app, query.as_deref()),
        (&Method::GET, ["files"]) => files(&app),
        (&Method::DELETE, ["files", name]) => delete_file(&app, name),
        // A raw `/` in the name: never a file of the directory.
        (&Method::DELETE, ["files", _, ..]) => Err(forbidden(path.trim_start_matches("/files/"))),
        (&Method::POST, ["save"]) => match read_json(req).await {
            Ok(b) => save_all(&app, &b).await,
            Err(e) => Err(e),
        },
        (&Method::POST, ["slots", "clear"]) => match read_json(req).await {
            Ok(b) => clear(&app, &b).await,
            Err(e) => Err(e),
        },
        (&Method::POST, ["slots", id, "save"]) => {
            let id = id.to_string();
            match read_json(req).await {
                Ok(b) => save_one(&app, &id, &b).await,
                Err(e) => Err(e),
            }
        }
        (&Method::POST, ["load"]) => match read_json(req).await {
            Ok(b) => load(&app, &b).await,
            Err(e) => Err(e),
        },
        (&Method::POST, ["preload"]) => match read_json(req).await {
            Ok(b) => start_preload(&app, &b),
            Err(e) => Err(e),
        },
        (&Method::GET, ["preload", id]) => preload_id(id)
            .and_then(|id| {
                app.preloads
                    .progress(id)
                    .ok_or_else(|| ApiError::not_found(format!("no preload job {id}")))
            })
            .map(|p| json_ok(&serde_json::to_value(p).unwrap_or(Value::Null))),
        (&Method::DELETE, ["preload", id]) => preload_id(id)
            .and_then(|id| {
                app.preloads
                    .cancel(id)
                    .ok_or_else(|| ApiError::not_found(format!("no preload job {id}")))
            })
            .map(|p| json_ok(&serde_json::to_value(p).unwrap_or(Value::Null))),
        (&Method::GET, ["settings"]) => Ok(json_ok(&settings_json(&app.settings.get()))),
        (&Method::PUT, ["settings"]) => match read_json(req).await {
            Ok(b) => put_settings(&app, &b),
            Err(e) => Err(e),
        },
        (&Method::GET, ["events"]) => Ok(events(&app)),
        (&Method::GET, ["metrics"]) => Ok(metrics(&app)),
        (
            _,
            ["health" | "slots" | "saves" | "files" | "save" | "load" | "preload" | "settings"
            | "events" | "metrics", ..],
        ) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorType::InvalidRequest,
            format!("{method} is not allowed on {path}"),
        )),
        _ => Err(ApiError::not_found(format!("no admin endpoint {path}"))),
    };
    result.unwrap_or_else(ApiError::into_response)
}

fn authorize(app: &App, req: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(key) = &app.cfg.admin_key else {
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

fn store(app: &App) -> Result<&Arc<cache_store::CacheStore>, ApiError> {
    app.store.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            ErrorType::NotSupported,
            "kvgate runs without --save-dir: there are no cache files",
        )
    })
}

// === health, slots, saves ===

fn health(app: &App) -> Value {
    let up = app.upstream_state.get();
    let fp = app.fingerprint.get();
    json!({
        "status": "ok",
        "upstream": {
            "url": app.upstream.base().to_string(),
            "up": up.up,
            "slots": app.pool.len(),
            "model": fp.as_ref().map(|f| f.model.clone()),
            "fingerprint": fp.as_ref().map(|f| f.id.clone()),
        },
        "save_dir": app.store.as_ref().map(|s| s.dir().display().to_string()),
    })
}

fn slots(app: &App) -> Value {
    let upstream = app.upstream_state.get().slots;
    let list: Vec<Value> = app
        .pool
        .snapshot()
        .iter()
        .enumerate()
        .map(|(id, s)| {
            let tokens = upstream
                .iter()
                .find(|u| u.id == id)
                .and_then(|u| u.n_prompt_tokens);
            json!({
                "id": id,
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
        })
        .collect();
    json!({"slots": list, "queued": app.pool.with_table(|t| t.queued())})
}

fn current_fingerprint(app: &App) -> Option<String> {
    app.fingerprint.get().map(|f| f.id)
}

fn save_json(m: &SaveMeta, fp: Option<&str>) -> Value {
    json!({
        "file": m.file,
        "created": m.created,
        "tag": m.tag,
        "kind": m.kind.as_str(),
        "tokens": m.n_tokens,
        "bytes": m.bytes,
        "model": m.model,
        "model_match": match (&m.fingerprint, fp) {
            (Some(a), Some(b)) => Value::from(a == b),
            _ => Value::Null,
        },
    })
}

fn saves(app: &App, query: Option<&str>) -> Answer {
    let store = store(app)?;
    let _ = store.rescan();
    let q = query
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("q=")))
        .map(|v| {
            percent_decode(v)
                .unwrap_or_default()
                .replace('+', " ")
                .to_lowercase()
        })
        .filter(|v| !v.is_empty());
    let fp = current_fingerprint(app);
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
                    let saves: Vec<Value> =
                        list.iter().map(|m| save_json(m, fp.as_deref())).collect();
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

fn files(app: &App) -> Answer {
    let store = store(app)?;
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

fn delete_file(app: &App, raw: &str) -> Answer {
    let store = store(app)?;
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
            json!({"slot": slot, "chat": tenant.chat(), "character": tenant.character(), "file": file}),
        )),
        OwnerSave::Failed(tenant) => Err(
            json!({"slot": slot, "character": tenant.character(), "reason": "the save failed (see the log and the save_failed event)"}),
        ),
    };
    lease.release(Outcome::Untouched);
    result
}

async fn save_all(app: &Arc<App>, body: &Value) -> Answer {
    store(app)?;
    let tag = tag_of(body)?;
    let mut saved = Vec::new();
    let mut failed = Vec::new();
    for slot in 0..app.pool.len() {
        match save_slot(app, slot, tag.as_deref()).await {
            Ok(Some(v)) => saved.push(v),
            Ok(None) => {}
            Err(v) => failed.push(v),
        }
    }
    Ok(json_ok(&json!({"saved": saved, "failed": failed})))
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

async fn save_one(app: &Arc<App>, raw: &str, body: &Value) -> Answer {
    store(app)?;
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

async fn clear(app: &Arc<App>, body: &Value) -> Answer {
    let erase = match body.get("erase") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad_request("\"erase\" must be true or false")),
    };
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
    Ok(json_ok(&json!({"cleared": cleared, "erased": erased})))
}

async fn load(app: &Arc<App>, body: &Value) -> Answer {
    let store = store(app)?;
    let items = body
        .get("items")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request("\"items\" must be a non-empty array of {\"file\", \"chat\"?}")
        })?;
    if items.len() > app.pool.len() {
        return Err(ApiError::bad_request(format!(
            "{} saves can't be loaded into {} slots without evicting each other",
            items.len(),
            app.pool.len()
        )));
    }
    let _ = store.rescan();
    let fp = current_fingerprint(app);
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
                .or_else(|| app.last_chat_of(&meta.character))
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
                json!({"file": meta.file, "slot": slot, "chat": tenant.chat(), "character": tenant.character(), "tokens": tokens}),
            ),
            Restore::Failed(reason) => failed.push(json!({"file": meta.file, "slot": slot, "reason": reason})),
            Restore::Skipped => failed.push(json!({"file": meta.file, "slot": slot, "reason": "kvgate runs without a save directory"})),
        }
        lease.release(Outcome::Untouched);
    }
    Ok(json_ok(&json!({"loaded": loaded, "failed": failed})))
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

fn start_preload(app: &Arc<App>, body: &Value) -> Answer {
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
    let id = app
        .preloads
        .start(app, chat.to_string(), characters, prompt);
    Ok(json_response(StatusCode::ACCEPTED, &json!({ "id": id })))
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

fn put_settings(app: &App, body: &Value) -> Answer {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("settings must be a JSON object"))?;
    let mut next = app.settings.get();
    apply_settings(&mut next, obj).map_err(ApiError::bad_request)?;
    if let Some(store) = &app.store {
        persist_settings(store.dir(), &next)
            .map_err(|e| ApiError::internal(format!("cannot persist the settings: {e}")))?;
    }
    app.settings.replace(next.clone());
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

fn events(app: &App) -> Response<ProxyBody> {
    let mut resp = Response::new(boxed(app.events.subscribe()));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

fn metrics(app: &App) -> Response<ProxyBody> {
    let text = app.metrics.render(app.gauges());
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
