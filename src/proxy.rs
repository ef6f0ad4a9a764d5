//! The front port. Completions go through the named steps
//! `classify → read → resolve → place → acquire → evict-save → restore →
//! forward → relay → (autosave) → release`; everything else passes through
//! untouched, to the first upstream that is up.
//!
//! Once response headers are sent, a lifecycle task owns the slot's lease
//! until the relayed body reports its end; only then does it autosave and
//! release, so a save never races the generation it saves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, ACCEPT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use crate::app::App;
use crate::body::{boxed, full, ProxyBody};
use crate::cache_store::SaveKind;
use crate::clients::Refusal;
use crate::error::ApiError;
use crate::error::ErrorType;
use crate::fleet::Fleet;
use crate::hooks::{Generation, Restore};
use crate::identity::{self, Api, Explicit, Identity};
use crate::lease::{AcquireError, Lease};
use crate::metrics;
use crate::owner_save::{save_owner, save_slots, OwnerSave};
use crate::slots::{Outcome, Tenant, Want};
use crate::sse::{Observed, StreamEnd};
use crate::upstream::{strip_hop_by_hop, UpstreamError};

/// Response header: the slot kvgate used.
pub const H_SLOT: &str = "x-kvgate-slot";
/// Response header: the character (percent-encoded UTF-8) when known.
pub const H_CHARACTER: &str = "x-kvgate-character";
/// Response header: the upstream (its name) that served the completion.
pub const H_UPSTREAM: &str = "x-kvgate-upstream";
/// Response header: the file restored before the generation.
pub const H_RESTORED: &str = "x-kvgate-restored";

/// Which completion API a path is, if kvgate intercepts it.
pub fn completion_api(method: &Method, path: &str) -> Option<Api> {
    if method != Method::POST {
        return None;
    }
    match path {
        "/completion" | "/completions" | "/v1/completions" => Some(Api::Text),
        "/chat/completions" | "/v1/chat/completions" => Some(Api::Chat),
        _ => None,
    }
}

/// Serves one front-port request from `peer`.
pub async fn handle(
    fleet: Arc<Fleet>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    let route = metrics::route_label(req.uri().path());
    let resp = route_request(&fleet, req, peer).await;
    fleet.shared.metrics.request(route, resp.status().as_u16());
    resp
}

/// Who sent a request, as kvgate tracks clients.
struct Client {
    /// The key chat switches and per-client metrics use.
    key: String,
    /// Authenticated against the clients file: kvgate talks to llama-server
    /// with its own key, not the client's.
    gatekept: bool,
}

impl Client {
    /// Puts kvgate's upstream key in place of the client's, when kvgate is
    /// the gatekeeper.
    fn credentials_for(&self, app: &App, headers: &mut HeaderMap) {
        if self.gatekept {
            app.upstream.substitute_credentials(headers);
        }
    }
}

async fn route_request(
    fleet: &Arc<Fleet>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    // With a clients file kvgate is the gatekeeper: it checks the client's
    // key and talks to llama-server with its own.
    let client = match &fleet.clients {
        Some(clients) => match clients.authenticate(req.headers()) {
            Ok(c) => Client {
                key: format!("client-{}", c.id),
                gatekept: true,
            },
            Err(refusal) => {
                let why = match refusal {
                    Refusal::Missing => {
                        "an API key is required (Authorization: Bearer or X-Api-Key)"
                    }
                    Refusal::Unknown => "Invalid API Key",
                    Refusal::Untrusted => "this client is not trusted",
                };
                return ApiError::new(StatusCode::UNAUTHORIZED, ErrorType::Authentication, why)
                    .into_response();
            }
        },
        None => Client {
            key: client_key(req.headers(), peer),
            gatekept: false,
        },
    };
    if let Some(api) = completion_api(req.method(), req.uri().path()) {
        return match completion(fleet, req, api, &client).await {
            Ok(resp) => resp,
            Err(e) => e.into_response(),
        };
    }
    let Some(app) = fleet.default_app() else {
        return no_upstream().into_response();
    };
    client.credentials_for(&app, req.headers_mut());
    if let Some(slot) = slot_action_target(req.method(), req.uri().path()) {
        return slot_action(&app, req, slot).await;
    }
    passthrough(&app, req).await
}

/// kvgate has no upstream at all (every instance is stopped).
fn no_upstream() -> ApiError {
    ApiError::unavailable("no llama-server to send this to: every instance is stopped")
}

/// `POST /slots/{id}`: a client's own slot action (save, restore, erase).
fn slot_action_target(method: &Method, path: &str) -> Option<usize> {
    if method != Method::POST {
        return None;
    }
    path.strip_prefix("/slots/")?.parse().ok()
}

/// Passes a client's slot action through while holding the slot, then
/// updates the table: after an erase the slot is empty, after a restore its
/// contents are unknown to kvgate; a save changes nothing.
async fn slot_action(app: &Arc<App>, req: Request<Incoming>, id: usize) -> Response<ProxyBody> {
    let n = app.pool.len();
    if n == 0 {
        return passthrough(app, req).await;
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
    let lease = match acquire(app, want).await {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    // The owner's unsaved messages go to disk before its cache is replaced,
    // in a task of its own so a client leaving can't cut the save short.
    let app2 = Arc::clone(app);
    let lease = match detached(app, async move {
        take_over(&app2, &lease).await;
        lease
    })
    .await
    {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    let (parts, body) = req.into_parts();
    let resp = app.upstream.forward(parts, boxed(body)).await;
    let outcome = if is_save {
        Outcome::Untouched
    } else {
        Outcome::Cleared
    };
    match resp {
        Ok(resp) => {
            // llama-server answers a slot action once it is done: read the
            // answer before releasing the slot.
            let (mut parts, body) = resp.into_parts();
            let bytes = match body.collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    lease.release(Outcome::Cleared);
                    return ApiError::bad_gateway(format!(
                        "llama-server broke off its answer: {e}"
                    ))
                    .into_response();
                }
            };
            lease.release(outcome);
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, full(bytes))
        }
        Err(e) => {
            lease.release(Outcome::Cleared);
            upstream_failure(app, e).into_response()
        }
    }
}

/// Forwards a request as is and relays the response as it arrives.
async fn passthrough(app: &Arc<App>, req: Request<Incoming>) -> Response<ProxyBody> {
    let (parts, body) = req.into_parts();
    forward_relay(app, parts, boxed(body)).await
}

/// Forwards `parts` and `body` unchanged and relays the answer, or the
/// error kvgate gives when llama-server can't be reached.
async fn forward_relay(
    app: &App,
    parts: hyper::http::request::Parts,
    body: ProxyBody,
) -> Response<ProxyBody> {
    match app.upstream.forward(parts, body).await {
        Ok(resp) => relay(resp),
        Err(e) => upstream_failure(app, e).into_response(),
    }
}

/// Copies status and end-to-end headers; the body streams through.
fn relay(resp: Response<Incoming>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, boxed(body))
}

fn upstream_failure(app: &App, e: UpstreamError) -> ApiError {
    metrics::inc(&app.metrics.upstream_errors);
    if e.is_connect() {
        app.monitor_kick.notify_one();
    }
    warn!(error = %e, "upstream request failed");
    match e {
        UpstreamError::Timeout { .. } => ApiError::timeout(e.to_string()),
        _ => ApiError::bad_gateway(e.to_string()),
    }
}

/// Reads the body within `limit` bytes.
async fn read_body(limit: u64, headers: &HeaderMap, body: Incoming) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit));
    }
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit_usize).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::too_large(limit))
        }
        Err(e) => Err(ApiError::bad_request(format!(
            "could not read the request body: {e}"
        ))),
    }
}

/// What the client asked for regarding slots.
#[derive(Clone, Copy)]
enum SlotRequest {
    /// kvgate chooses.
    Ours,
    /// The client chose this slot (`id_slot` ≥ 0).
    Client(usize),
}

fn slot_request(body: &Value) -> SlotRequest {
    match body.get("id_slot").and_then(Value::as_i64) {
        Some(n) if n >= 0 => SlotRequest::Client(usize::try_from(n).unwrap_or(usize::MAX)),
        _ => SlotRequest::Ours,
    }
}

async fn completion(
    fleet: &Arc<Fleet>,
    req: Request<Incoming>,
    api: Api,
    client: &Client,
) -> Result<Response<ProxyBody>, ApiError> {
    let started = Instant::now();
    fleet.shared.metrics.client_completion(&client.key);
    let (mut parts, body) = req.into_parts();
    let raw = read_body(fleet.cfg.max_body_bytes, &parts.headers, body).await?;

    // A body that is not a JSON object, or whose `id_slot` has the wrong
    // type, goes through untouched: the client sees llama-server's own
    // error, and kvgate guesses no slot for it.
    let bad_id_slot = |v: &Value| {
        v.get("id_slot")
            .is_some_and(|s| !s.is_null() && !s.is_i64() && !s.is_u64())
    };
    let json = serde_json::from_slice::<Value>(&raw)
        .ok()
        .filter(|v| v.is_object() && !bad_id_slot(v));
    let Some(mut json) = json else {
        debug!("completion body kvgate can't use; forwarding untouched");
        let app = fleet.default_app().ok_or_else(no_upstream)?;
        client.credentials_for(&app, &mut parts.headers);
        return Ok(forward_relay(&app, parts, full(raw)).await);
    };

    let explicit = explicit_identity(&parts.headers, &mut json)?;
    let identity = identity::resolve(api, &json, &explicit, &fleet.policy, |t| {
        fleet.shared.memory.previous_prompt(t)
    });
    // The character stays where its cache is; a newcomer goes where slots
    // are free (see `fleet`). A client choosing its own slot works with the
    // upstream its own slot actions go to.
    let model = json.get("model").and_then(Value::as_str);
    let request = slot_request(&json);
    let app = &match request {
        SlotRequest::Ours => fleet.place(&identity.tenant, model),
        SlotRequest::Client(_) => fleet.default_app(),
    }
    .ok_or_else(no_upstream)?;
    client.credentials_for(app, &mut parts.headers);
    let want = match request {
        SlotRequest::Ours => Want::Tenant(identity.tenant.clone()),
        SlotRequest::Client(n) => {
            // llama-server wraps large ids around (id % n_slots); serialise on
            // the slot it will really use.
            let len = app.pool.len();
            if len == 0 {
                return Err(ApiError::unavailable(
                    "llama-server's slots are not known yet",
                ));
            }
            Want::Pinned(n % len)
        }
    };
    let pinned = matches!(want, Want::Pinned(_));
    if let (Tenant::Character { chat, .. }, false) = (&identity.tenant, pinned) {
        if let Some(previous) = app.memory.note_client_chat(&client.key, chat) {
            if app.settings.get().clear_on_chat_change {
                // Saves in a task of their own: a client leaving can't cut
                // them short. The previous chat may be on any upstream.
                let (fleet2, client2) = (Arc::clone(fleet), client.key.clone());
                detached(app, async move {
                    for app in fleet2.apps() {
                        chat_switch(&app, &client2, &previous).await;
                    }
                })
                .await?;
            }
        }
    }

    let mut lease = acquire(app, want).await?;
    app.metrics.queue_wait.observe(started.elapsed());
    let slot = lease.slot();
    app.touch_slot(slot);
    app.memory.remember_prompt(
        &identity.tenant,
        identity.prompt_hash,
        json.get("prompt").and_then(Value::as_str),
    );
    app.emit("slot_assigned", || {
        json!({
            "slot": slot,
            "chat": identity.tenant.chat(),
            "character": identity.tenant.character(),
            "kind": identity.kind.as_str(),
            "resident": lease.grant().resident,
            "client": client.key,
        })
    });
    info!(
        slot,
        tenant = %identity.tenant,
        kind = %identity.kind,
        source = ?identity.source,
        resident = lease.grant().resident,
        "completion"
    );

    // Evict-save, then restore: the previous owner's unsaved messages go to
    // disk, then the tenant's best save comes in, right before the
    // generation. Both run in a task that owns the lease, so a client that
    // goes away meanwhile can't cut a save or restore short.
    let needs_restore = !lease.grant().resident && !pinned && identity.tenant.is_character();
    if lease.grant().resident {
        metrics::inc(&app.metrics.resident_hits);
    }
    let mut restored = None;
    if lease.grant().evicted.is_some() || needs_restore {
        // The task borrows the body for the restore decision and hands it
        // back with the lease: nothing is copied.
        let tenant = identity.tenant.clone();
        let app2 = Arc::clone(app);
        let (l, j, r) = detached(app, async move {
            let app = app2;
            take_over(&app, &lease).await;
            let mut restored = None;
            if needs_restore {
                let prompt = json.get("prompt").and_then(Value::as_str);
                let r = restore(&app, &lease, &tenant, prompt, json.get("messages")).await;
                if let Restore::Restored { file, .. } = r {
                    restored = Some(file);
                }
            }
            (lease, json, restored)
        })
        .await?;
        (lease, json, restored) = (l, j, r);
    }

    if !pinned {
        json["id_slot"] = Value::from(slot);
    }
    let bytes =
        Bytes::from(serde_json::to_vec(&json).map_err(|e| ApiError::internal(e.to_string()))?);
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    // kvgate reads the stream: it must not arrive compressed.
    parts.headers.remove(ACCEPT_ENCODING);

    let resp = match app.upstream.forward_completion(parts, full(bytes)).await {
        Ok(r) => r,
        Err(e) => {
            let outcome = if e.is_connect() {
                Outcome::Untouched
            } else {
                Outcome::Failed
            };
            lease.release(outcome);
            return Err(upstream_failure(app, e));
        }
    };

    let (mut rparts, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    let sse = rparts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let status = rparts.status;
    let (mut observed, end) =
        Observed::with_idle_timeout(rbody, sse, Some(app.cfg.stream_idle_timeout));
    // Once the first token is out, the prompt is processed: a good moment
    // for background saves of other slots (see `save_behind`).
    observed.notify_on_first_byte(Arc::clone(&app.save_behind_kick));
    add_identity_headers(&mut rparts.headers, slot, &identity, restored.as_deref());
    // kvgate names its upstreams in ASCII (`upstream-1`, `llama-1`, `main`).
    if let Ok(v) = HeaderValue::from_str(&app.name) {
        // Slot ids are per upstream.
        rparts.headers.insert(H_UPSTREAM, v);
    }
    app.emit(
        "generation_started",
        || json!({"slot": slot, "chat": identity.tenant.chat(), "character": identity.tenant.character(), "status": status.as_u16()}),
    );
    let guard = app.tasks.start();
    let app2 = Arc::clone(app);
    tokio::spawn(async move {
        let _guard = guard;
        let end = end
            .await
            .unwrap_or(StreamEnd::ClientGone(Default::default()));
        finish(&app2, lease, &identity, pinned, status, end, started).await;
    });
    Ok(Response::from_parts(rparts, boxed(observed)))
}

/// After the body's end: decide what the slot holds, autosave, release.
async fn finish(
    app: &App,
    lease: Lease,
    identity: &Identity,
    pinned: bool,
    status: StatusCode,
    end: StreamEnd,
    started: Instant,
) {
    let slot = lease.slot();
    let outcome = if pinned {
        // A client-managed slot: kvgate no longer knows what it holds.
        Outcome::Cleared
    } else if status.is_client_error() {
        // Refused before any work (bad parameters, context too small).
        Outcome::Untouched
    } else if status.is_server_error() {
        Outcome::Failed
    } else {
        match &end {
            StreamEnd::Complete(s) if s.error.is_none() => Outcome::Generated(identity.kind),
            StreamEnd::Complete(_) => Outcome::Failed,
            // A stopped generation (SillyTavern's Stop button) leaves a valid
            // prefix in the slot, and the partial message is kept by the client.
            StreamEnd::ClientGone(_) => Outcome::Generated(identity.kind),
            StreamEnd::UpstreamError(e, _) => {
                metrics::inc(&app.metrics.upstream_errors);
                warn!(slot, error = %e, "upstream broke off the stream");
                app.monitor_kick.notify_one();
                Outcome::Failed
            }
        }
    };
    let summary = end.summary();
    let ttft = summary
        .first_byte
        .map(|t| t.saturating_duration_since(started));
    if let Some(t) = ttft {
        app.metrics.ttft.observe(t);
    }
    if let (Some(c), Some(p)) = (summary.cache_n(), summary.prompt_n()) {
        metrics::add(&app.metrics.prompt_cached, c);
        metrics::add(&app.metrics.prompt_evaluated, p);
    }
    app.emit("generation_finished", || {
        json!({
            "slot": slot,
            "chat": identity.tenant.chat(),
            "character": identity.tenant.character(),
            "kind": identity.kind.as_str(),
            "outcome": match (&end, outcome) {
                (StreamEnd::ClientGone(_), Outcome::Generated(_)) => "stopped",
                (_, Outcome::Generated(_)) => "completed",
                _ => "failed",
            },
            "cache_n": summary.cache_n(),
            "prompt_n": summary.prompt_n(),
            "ttft_ms": ttft.map(|t| t.as_secs_f64() * 1000.0),
        })
    });
    debug!(
        slot,
        ?outcome,
        cache_n = summary.cache_n(),
        prompt_n = summary.prompt_n(),
        bytes = summary.bytes,
        "generation ended"
    );
    lease.apply(outcome);
    if let (Outcome::Generated(_), Tenant::Character { .. }) = (outcome, &identity.tenant) {
        // The client already has its last byte; the slot stays leased until
        // the save is done, so the next request for this character can't
        // race it.
        if app.hooks.autosave_due(lease.usage()) {
            let tenant = Some(&identity.tenant);
            save_owner(app, &lease, SaveKind::Autosave, None, tenant, true).await;
        }
    }
    lease.release(Outcome::Untouched);
}

/// Runs `work` in a task of its own, so that the request future being
/// dropped (the client went away) cannot interrupt a save or a restore half
/// way; counted so shutdown waits for it.
async fn detached<T: Send + 'static>(
    app: &App,
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, ApiError> {
    let guard = app.tasks.start();
    tokio::spawn(async move {
        let _guard = guard;
        work.await
    })
    .await
    .map_err(|e| ApiError::internal(format!("slot preparation failed: {e}")))
}

/// Restores the tenant's best save into the leased slot, right before its
/// generation, and records what happened to the slot.
pub(crate) async fn restore(
    app: &App,
    lease: &Lease,
    tenant: &Tenant,
    prompt: Option<&str>,
    messages: Option<&Value>,
) -> Restore {
    let gen = Generation {
        slot: lease.slot(),
        tenant,
        prompt,
        messages,
    };
    let r = app.hooks.restore(gen).await;
    record_restore(app, lease.slot(), &r);
    r
}

/// What a restore means for the slot: it holds the restored cache (nothing
/// unsaved), or, after a failure, nothing (llama-server cleared it).
pub(crate) fn record_restore(app: &App, slot: usize, r: &Restore) {
    match r {
        Restore::Restored { file, .. } => {
            app.pool.with_table(|t| t.mark_restored(slot, file));
        }
        Restore::Failed(reason) => {
            warn!(slot, %reason, "restore failed; the slot is empty");
            app.pool.with_table(|t| t.mark_empty(slot));
        }
        Restore::Skipped => {}
    }
}

/// A grant that takes a slot from another tenant: count it, tell the
/// monitors, and save the previous owner's unsaved messages first (inside the
/// new owner's lease, so nothing can run on the slot meanwhile).
pub(crate) async fn take_over(app: &App, lease: &Lease) {
    let Some(ev) = lease.grant().evicted.clone() else {
        return;
    };
    let slot = lease.slot();
    metrics::inc(&app.metrics.evictions);
    app.note_eviction();
    app.emit(
        "evicted",
        || json!({"slot": slot, "chat": ev.tenant.chat(), "character": ev.tenant.character(), "usage": ev.usage}),
    );
    if ev.usage >= 1 && ev.tenant.is_character() && ev.live {
        app.hooks
            .save(slot, &ev.tenant, SaveKind::Eviction, None)
            .await;
    }
}

async fn acquire(app: &Arc<App>, want: Want) -> Result<Lease, ApiError> {
    match app.pool.acquire(want, app.cfg.queue_timeout).await {
        Ok(l) => Ok(l),
        Err(e) => {
            metrics::inc(&app.metrics.queue_rejections);
            Err(match e {
                AcquireError::Table(crate::slots::TableError::NoSuchSlot(_)) => {
                    ApiError::bad_request(e.to_string())
                }
                _ => ApiError::unavailable(e.to_string()),
            })
        }
    }
}

/// Who a client is, for chat-switch tracking: its API key when it sends one
/// (hashed, never logged), else its address.
fn client_key(headers: &HeaderMap, peer: SocketAddr) -> String {
    let key = headers
        .get(hyper::header::AUTHORIZATION)
        .or_else(|| headers.get("x-api-key"))
        .map(|v| v.as_bytes());
    match key {
        Some(k) => format!("key-{:016x}", crate::hash::fnv1a64(k)),
        None => format!("addr-{}", peer.ip()),
    }
}

/// The client moved from `previous` to another chat: save every slot of the
/// previous chat that has unsaved messages, and release those slots.
async fn chat_switch(app: &Arc<App>, client: &str, previous: &str) {
    let slots: Vec<(usize, Tenant)> = app
        .pool
        .snapshot()
        .into_iter()
        .enumerate()
        .filter_map(|(id, s)| {
            s.owner
                .filter(|t| t.chat() == Some(previous))
                .map(|t| (id, t))
        })
        .collect();
    if slots.is_empty() {
        return;
    }
    info!(
        client,
        previous_chat = previous,
        slots = slots.len(),
        "chat switch: saving and releasing the previous chat's slots"
    );
    // A slot someone else took meanwhile, or whose save failed, is kept (with
    // its unsaved messages); the others are the previous chat's no more.
    save_slots(
        app,
        slots,
        SaveKind::ChatSwitch,
        app.cfg.queue_timeout,
        |r| match r {
            OwnerSave::NoOwner | OwnerSave::Failed(_) => Outcome::Untouched,
            OwnerSave::Clean(_) | OwnerSave::Saved(..) => Outcome::Cleared,
        },
    )
    .await;
}

fn explicit_identity(headers: &HeaderMap, json: &mut Value) -> Result<Explicit, ApiError> {
    // Header values arrive as bytes: raw UTF-8 is accepted, and so is
    // percent-encoded UTF-8 (what clients that can only send Latin-1 header
    // values, like Node's fetch, must use for "Алиса"). Anything else is a
    // clear 400, never a silent fallback to inference.
    let mut decoded: Vec<(&'static str, String)> = Vec::new();
    for name in ["x-kvgate-chat", "x-kvgate-character", "x-kvgate-kind"] {
        if let Some(v) = headers.get(name) {
            let text = std::str::from_utf8(v.as_bytes())
                .ok()
                .map(|s| {
                    if s.contains('%') {
                        percent_decode(s).unwrap_or_else(|| s.to_string())
                    } else {
                        s.to_string()
                    }
                })
                .ok_or_else(|| {
                    ApiError::bad_request(format!("{name} must be UTF-8 (raw or percent-encoded)"))
                })?;
            decoded.push((name, text));
        }
    }
    let from_headers = Explicit::from_headers(|k| {
        decoded
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.as_str())
    })
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let from_body =
        Explicit::take_from_body(json).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(from_headers.or(from_body))
}

fn add_identity_headers(
    headers: &mut HeaderMap,
    slot: usize,
    identity: &Identity,
    restored: Option<&str>,
) {
    headers.insert(H_SLOT, HeaderValue::from(slot));
    if let Some(name) = identity.tenant.character() {
        if let Ok(v) = HeaderValue::from_str(&percent_encode(name)) {
            headers.insert(H_CHARACTER, v);
        }
    }
    if let Some(file) = restored {
        if let Ok(v) = HeaderValue::from_str(&percent_encode(file)) {
            headers.insert(H_RESTORED, v);
        }
    }
}

/// Decodes `%XX` escapes; `None` when malformed or not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes everything but visible ASCII (and `%` itself), so any
/// name fits a header value and decodes back to the exact UTF-8.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x21..0x7f).contains(&b) && b != b'%' || b == b' ' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intercepted_paths() {
        for p in ["/completion", "/completions", "/v1/completions"] {
            assert_eq!(completion_api(&Method::POST, p), Some(Api::Text));
        }
        for p in ["/chat/completions", "/v1/chat/completions"] {
            assert_eq!(completion_api(&Method::POST, p), Some(Api::Chat));
        }
        assert_eq!(completion_api(&Method::GET, "/completion"), None);
        assert_eq!(completion_api(&Method::POST, "/tokenize"), None);
        assert_eq!(
            completion_api(&Method::POST, "/v1/chat/completions/control"),
            None
        );
    }

    #[test]
    fn percent_encoding_round_trips_utf8() {
        assert_eq!(percent_encode("Alice Marlowe"), "Alice Marlowe");
        assert_eq!(percent_encode("Алиса"), "%D0%90%D0%BB%D0%B8%D1%81%D0%B0");
        assert_eq!(percent_encode("50%\n"), "50%25%0A");
    }
}
