//! A completion through kvgate, as its phases over one [`Turn`]:
//!
//! read → resolve → place → chat switch → acquire → prepare (save the
//! evicted owner, restore) → forward → relay → finish.
//!
//! Once response headers are sent, a lifecycle task owns the slot's lease
//! until the relayed body reports its end; only then does it record the
//! outcome, autosave and release, so a save never races the generation it
//! saves.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, ACCEPT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use crate::app::App;
use crate::http::body::{boxed, full, ProxyBody};
use crate::http::sse::{Observed, StreamEnd};
use crate::identity::{self, Api, Identity};
use crate::llama::client::Driven;
use crate::llama::slot_route::{beyond_kvgate, body_id_slot, without_bom, wrap_slot_id};
use crate::lookahead as ahead;
use crate::observe::metrics;
use crate::session;
use crate::slots::lease::Lease;
use crate::slots::table::{Outcome, Want};
use crate::store::hooks::Restore;
use crate::store::meta::now_unix;
use crate::tenant::{Kind, Tenant};
use crate::upstream::Upstream;

use super::client::Client;
use super::failure::Failure;
use super::headers::{add_identity_headers, explicit_identity};
use super::outcome;
use super::passthrough::{forward_relay, llama_failed, read_body};
use super::pin;

/// One completion on its way through kvgate.
struct Turn {
    /// When kvgate received it.
    started: Instant,
    /// The request body, parsed; kvgate adds `id_slot` before forwarding
    /// (and the turn lets go of it then).
    body: Value,
    /// Who it is for, and what kind of generation.
    identity: Identity,
    /// `Some(id)` when the client chose its slot itself (any `id_slot` but
    /// -1), as llama-server reads it.
    client_slot: Option<i32>,
    /// Whether the body is large enough to be handled off the async workers
    /// (over [`INLINE_PARSE_BYTES`] as received).
    large: bool,
    /// The body as the client sent it, when kvgate changes nothing in it
    /// but the pin (no `kvgate` member to take out, no `id_slot` to
    /// rewrite): it goes to llama-server as it came (see [`pin`]).
    verbatim: Option<Bytes>,
    /// How many answers the client asks for (`n_cmpl`/`n`), as llama-server
    /// will run them: each beyond the first takes a slot of its own.
    answers: usize,
    /// The leases on those further slots, held until the answer ends.
    siblings: Vec<Lease>,
    /// Whether what the grant took from an owner is already saved (done at
    /// once for several answers).
    taken_over: bool,
    /// The prefill ahead this turn may set off once its first token is out.
    ahead: Option<ahead::Job>,
}

/// Serves one completion: the top of the phases.
pub(crate) async fn completion(
    app: &Arc<App>,
    req: Request<Incoming>,
    api: Api,
    client: &Client,
) -> Result<Response<ProxyBody>, Failure> {
    let started = Instant::now();
    app.shared.metrics.client_completion(&client.key);
    let (mut parts, body) = req.into_parts();
    // The body's share of the byte budget is held until llama-server has
    // it (the answer's headers are in), or the request fails.
    let (raw, held) = read_body(
        app.shared.cfg.max_body_bytes,
        &app.shared.body_budget,
        app.shared.cfg.idle_timeout,
        &parts.headers,
        body,
    )
    .await?;
    let turn = match read_turn(app, api, &parts.headers, raw, started).await? {
        Read::Turn(turn) => *turn,
        Read::Unusable(raw) => {
            debug!("completion body that is no JSON object; forwarding untouched");
            let resp = pass_untouched(app, parts, raw, client).await;
            drop(held);
            return resp;
        }
    };
    let upstream = turn.place(app)?;
    client.credentials_for(&upstream, &mut parts.headers);
    if !upstream.slots_known(SLOTS_WAIT).await {
        // kvgate holds no slot it does not know of, so nothing can race:
        // llama-server chooses, as it would without kvgate.
        warn!("llama-server's slots are not known (is --upstream-api-key missing?); passing the completion through unpinned");
        return turn.pass_unpinned(&upstream, parts).await;
    }
    let want = turn.want(&upstream)?;
    turn.chat_switch(app, &upstream, client).await?;
    let (lease, mut turn) = turn.acquire(&upstream, want, client).await?;
    upstream
        .shared
        .metrics
        .queue_wait
        .observe(started.elapsed());
    turn.begin(&upstream, &lease, client);
    let (mut turn, lease, restored) = turn.prepare(&upstream, lease).await?;
    let resp = match forward(&upstream, &mut turn, &lease, parts).await {
        Ok(resp) => resp,
        Err(f) => {
            upstream.note_activity(true);
            let untouched = matches!(&f, Failure::Llama(e) if e.is_connect());
            let outcome = if untouched {
                Outcome::Untouched
            } else {
                Outcome::Failed
            };
            for sibling in std::mem::take(&mut turn.siblings) {
                sibling.release(outcome);
            }
            let slot = lease.slot();
            lease.release(outcome);
            released(&upstream, slot, &turn);
            return Err(f);
        }
    };
    drop(held);
    Ok(relay(&upstream, turn, lease, resp, restored.as_deref()))
}

/// How long a completion waits for kvgate to learn a new llama-server's
/// slots before it passes through unpinned.
pub(crate) const SLOTS_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Bodies larger than this are parsed, and their identity inferred, on a
/// blocking thread: megabytes of JSON would hold an async worker (and every
/// connection waiting on it, the admin port's too) for tens of milliseconds.
const INLINE_PARSE_BYTES: usize = 256 * 1024;

/// A completion body, read.
enum Read {
    /// Usable: the turn it starts (boxed: a turn is large, and moved
    /// between threads for large bodies).
    Turn(Box<Turn>),
    /// Not for kvgate to interpret (see [`usable_body`]).
    Unusable(Bytes),
}

/// Read → resolve, off the async workers when the body is large.
async fn read_turn(
    app: &Arc<App>,
    api: Api,
    headers: &HeaderMap,
    raw: Bytes,
    started: Instant,
) -> Result<Read, Failure> {
    if raw.len() <= INLINE_PARSE_BYTES {
        return parse_turn(app, api, headers, raw, started);
    }
    let (app, headers) = (Arc::clone(app), headers.clone());
    tokio::task::spawn_blocking(move || parse_turn(&app, api, &headers, raw, started))
        .await
        .map_err(|e| Failure::Kvgate(format!("reading the request body failed: {e}")))?
}

fn parse_turn(
    app: &App,
    api: Api,
    headers: &HeaderMap,
    raw: Bytes,
    started: Instant,
) -> Result<Read, Failure> {
    match usable_body(&raw)? {
        Some(body) => {
            let untouched = body.get("kvgate").is_none() && body.get("id_slot").is_none();
            Turn::resolve(app, api, headers, body, started).map(|mut turn| {
                turn.large = raw.len() > INLINE_PARSE_BYTES;
                turn.verbatim = untouched.then_some(raw);
                Read::Turn(Box::new(turn))
            })
        }
        None => Ok(Read::Unusable(raw)),
    }
}

/// The body as kvgate can use it: a JSON object. Anything llama-server
/// can't read either goes through untouched for its own error (it touches
/// no slot then). JSON llama-server reads but kvgate can't (nested deeper
/// than 128 levels) is refused: passed through, it would reach a slot
/// without a lease.
fn usable_body(raw: &[u8]) -> Result<Option<Value>, Failure> {
    // nlohmann skips a byte-order mark; kvgate must read such a body too.
    match serde_json::from_slice::<Value>(without_bom(raw)) {
        Ok(v) if v.is_object() => Ok(Some(v)),
        Ok(_) => Ok(None),
        Err(e) if beyond_kvgate(&e) => Err(Failure::Client(format!(
            "kvgate can't read this request's JSON ({e}); llama-server would read it, so it is refused rather than sent past kvgate's slot lease"
        ))),
        Err(_) => Ok(None),
    }
}

/// A body kvgate can't use goes to the default upstream unchanged.
async fn pass_untouched(
    app: &App,
    mut parts: Parts,
    raw: Bytes,
    client: &Client,
) -> Result<Response<ProxyBody>, Failure> {
    let upstream = app.default_upstream().ok_or_else(Failure::no_upstream)?;
    client.credentials_for(&upstream, &mut parts.headers);
    Ok(forward_relay(&upstream, parts, full(raw)).await)
}

// === impl Turn ===

impl Turn {
    /// Resolve: who the completion is for (explicit identity first, else
    /// the policy's inference), and whether the client chose its slot.
    fn resolve(
        app: &App,
        api: Api,
        headers: &HeaderMap,
        mut body: Value,
        started: Instant,
    ) -> Result<Turn, Failure> {
        let explicit = explicit_identity(headers, &mut body)?;
        let answers = answers(&body);
        let identity = identity::resolve(api, &body, &explicit, &app.policy, |t| {
            app.shared.memory.previous_prompt(t)
        });
        // Read as llama-server reads it (`"1"` is any slot, `true` is 1);
        // kvgate then writes the slot it leased back as a plain number.
        let client_slot = Some(body_id_slot(&body)).filter(|id| *id != -1);
        Ok(Turn {
            started,
            body,
            identity,
            client_slot,
            large: false,
            verbatim: None,
            answers,
            siblings: Vec::new(),
            taken_over: false,
            ahead: None,
        })
    }

    /// Acquire: the slot the table grants; for several answers also the
    /// slots llama-server will run the others in, with what those grants
    /// took from owners saved at once (see `session::siblings`). A count
    /// llama-server refuses
    /// (more than its slots) takes one slot: it is refused before any
    /// slot is touched.
    async fn acquire(
        mut self,
        upstream: &Arc<Upstream>,
        want: Want,
        client: &Client,
    ) -> Result<(Lease, Turn), Failure> {
        let extra = match self.answers {
            n if n > 1 && n <= upstream.pool.len() => n - 1,
            _ => 0,
        };
        if extra == 0 {
            return Ok((session::acquire(upstream, want, client.tag()).await?, self));
        }
        let (lease, siblings) =
            session::acquire_with_siblings(upstream, want, extra, client.tag()).await?;
        self.siblings = siblings;
        self.taken_over = true;
        Ok((lease, self))
    }

    fn tenant(&self) -> &Tenant {
        &self.identity.tenant
    }

    /// Place: the character stays where its cache is; a newcomer goes where
    /// slots are free (see `fleet::placement`). A client choosing its own
    /// slot works with the upstream its own slot actions go to.
    fn place(&self, app: &App) -> Result<Arc<Upstream>, Failure> {
        let model = self.body.get("model").and_then(Value::as_str);
        match self.client_slot {
            None => app.place(self.tenant(), model),
            Some(_) => app.default_upstream(),
        }
        .ok_or_else(Failure::no_upstream)
    }

    /// What to ask the slot table for.
    fn want(&self, upstream: &Upstream) -> Result<Want, Failure> {
        let Some(n) = self.client_slot else {
            // Placed by its prompt too: a request no character owns as
            // llama-server itself would place it, a character where its
            // prompt is cached (see `slots::content`).
            return Ok(Want::Prompt {
                tenant: self.tenant().clone(),
                text: Arc::clone(&self.identity.content),
            });
        };
        // llama-server wraps ids around (negative ones too): serialise on
        // the slot it will really use.
        match upstream.pool.len() {
            0 => Err(Failure::Busy(
                "llama-server's slots are not known yet".into(),
            )),
            len => Ok(Want::Pinned(wrap_slot_id(n, len))),
        }
    }

    /// Chat switch: when the client moved to another chat, the previous
    /// chat's slots are saved and released (on every upstream), in a task of
    /// its own so a client leaving can't cut the saves short.
    async fn chat_switch(
        &self,
        app: &Arc<App>,
        upstream: &Upstream,
        client: &Client,
    ) -> Result<(), Failure> {
        let (Tenant::Character { chat, .. }, None) = (self.tenant(), self.client_slot) else {
            return Ok(());
        };
        let Some(previous) = app.shared.memory.note_client_chat(&client.key, chat) else {
            return Ok(());
        };
        if !app.shared.settings.get().clear_on_chat_change {
            return Ok(());
        }
        let (app, client) = (Arc::clone(app), client.key.clone());
        session::detached(upstream, async move {
            for upstream in app.upstreams() {
                session::chat_switch(&upstream, &client, &previous).await;
            }
        })
        .await?;
        Ok(())
    }

    /// The slot is ours: remember the prompt, tell the monitors and the log,
    /// and get the next speaker's prefill ahead ready.
    fn begin(&mut self, upstream: &Upstream, lease: &Lease, client: &Client) {
        let (slot, identity) = (lease.slot(), &self.identity);
        upstream.note_activity(false);
        lease.stamp_used(now_unix());
        let prompt = self.body.get("prompt").and_then(Value::as_str);
        let memory = &upstream.shared.memory;
        memory.remember_prompt(&identity.tenant, identity.prompt_hash, prompt);
        if identity.tenant.is_character() {
            upstream.score_prediction(&identity.tenant);
        }
        self.ahead = self.ahead_job(upstream, prompt.is_some());
        upstream.emit("slot_assigned", || {
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
    }

    /// What prefill ahead needs of this turn, when it may follow it: a named
    /// character's new message in a text-completion chat kvgate remembers.
    fn ahead_job(&self, upstream: &Upstream, has_prompt: bool) -> Option<ahead::Job> {
        let identity = &self.identity;
        let wanted = has_prompt
            && self.client_slot.is_none()
            && identity.tenant.is_character()
            && matches!(identity.kind, Kind::Normal | Kind::Regenerate | Kind::Swipe)
            && upstream.shared.settings.get().prefill_ahead;
        if !wanted {
            return None;
        }
        let prompt = upstream.shared.memory.last_prompt(&identity.tenant)?;
        let user = identity.user.clone();
        Some(ahead::Job {
            speaker: identity.tenant.clone(),
            prompt,
            members: identity
                .roster
                .iter()
                .filter(|m| Some(*m) != user.as_ref())
                .cloned()
                .collect(),
            user,
            first_token: Arc::default(),
            running: upstream.shared.tasks.start(),
        })
    }

    /// Prepare: the previous owner's unsaved messages go to disk, then the
    /// tenant's best save comes in, right before the generation. Both run in
    /// a task that owns the lease (and borrows the body for the restore
    /// decision), so a client that goes away meanwhile can't cut a save or
    /// restore short; the turn and the lease come back with the file
    /// restored, if any.
    async fn prepare(
        self,
        upstream: &Arc<Upstream>,
        lease: Lease,
    ) -> Result<(Turn, Lease, Option<String>), Failure> {
        let resident = lease.grant().resident;
        if resident {
            metrics::inc(&upstream.shared.metrics.resident_hits);
        }
        let needs_restore = lease.grant().needs_restore()
            && self.client_slot.is_none()
            && self.tenant().is_character();
        let take_over = lease.grant().evicted.is_some() && !self.taken_over;
        if !take_over && !needs_restore {
            return Ok((self, lease, None));
        }
        let holder = Arc::clone(upstream);
        let prepared = session::detached(upstream, async move {
            if take_over {
                session::take_over(&holder, &lease).await;
            }
            if !needs_restore {
                return (self, lease, None);
            }
            let prompt = self.body.get("prompt").and_then(Value::as_str);
            let messages = self.body.get("messages");
            let r = session::restore(&holder, &lease, self.tenant(), prompt, messages).await;
            let restored = match r {
                Restore::Restored { file, .. } => Some(file),
                _ => None,
            };
            (self, lease, restored)
        })
        .await?;
        Ok(prepared)
    }

    /// Passes the completion through as the client sent it (less kvgate's
    /// own identity fields), for llama-server to place.
    async fn pass_unpinned(
        mut self,
        upstream: &Upstream,
        mut parts: Parts,
    ) -> Result<Response<ProxyBody>, Failure> {
        let bytes = match self.verbatim.take() {
            Some(raw) => raw,
            None => serde_json::to_vec(&std::mem::take(&mut self.body))
                .map(Bytes::from)
                .map_err(|e| Failure::Kvgate(e.to_string()))?,
        };
        parts
            .headers
            .insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        Ok(forward_relay(upstream, parts, full(bytes)).await)
    }

    /// The body llama-server gets: the client's, pinned to the slot kvgate
    /// leased (also when the client chose it: as a plain number, so
    /// llama-server can't read `1.9`, `true` or a wrapped id differently).
    /// It is taken out of the turn (a prompt can be megabytes; nothing reads
    /// it after this), and a large one is written (and its tree freed) on a
    /// blocking thread.
    async fn take_body_for(&mut self, slot: usize) -> Result<Bytes, Failure> {
        let body = std::mem::take(&mut self.body);
        if let Some(pinned) = self
            .verbatim
            .take()
            .and_then(|raw| pin::with_id_slot(&raw, slot))
        {
            if self.large {
                // Freeing a large tree takes a while too.
                tokio::task::spawn_blocking(move || drop(body));
            }
            return Ok(pinned);
        }
        let pin = Value::from(slot);
        if !self.large {
            return pinned_body(body, pin);
        }
        tokio::task::spawn_blocking(move || pinned_body(body, pin))
            .await
            .map_err(|e| Failure::Kvgate(format!("writing the request body failed: {e}")))?
    }
}

/// How many answers a completion asks for, as llama-server reads it:
/// `n_cmpl`, else its alias `n`, a number cast to an integer; anything else
/// is 1 (llama-server refuses it before touching a slot).
fn answers(body: &Value) -> usize {
    let v = body
        .get("n_cmpl")
        .filter(|v| !v.is_null())
        .or_else(|| body.get("n"));
    match v.and_then(Value::as_f64) {
        Some(n) if n >= 2.0 && n < u32::MAX as f64 => n as usize,
        _ => 1,
    }
}

/// `body` with `id_slot` set to `pin`, as JSON.
fn pinned_body(mut body: Value, pin: Value) -> Result<Bytes, Failure> {
    body["id_slot"] = pin;
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .map_err(|e| Failure::Kvgate(e.to_string()))
}

/// Forward: the body pinned to the leased slot goes to llama-server.
async fn forward(
    upstream: &Upstream,
    turn: &mut Turn,
    lease: &Lease,
    mut parts: Parts,
) -> Result<Response<Driven>, Failure> {
    let bytes = turn.take_body_for(lease.slot()).await?;
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    // kvgate reads the stream: it must not arrive compressed.
    parts.headers.remove(ACCEPT_ENCODING);
    upstream
        .client
        .forward_completion(parts, full(bytes))
        .await
        .map_err(|e| llama_failed(upstream, e))
}

/// Relay: the answer streams to the client through an observer, and a
/// lifecycle task holding the lease waits for its end to [`finish`].
fn relay(
    upstream: &Arc<Upstream>,
    turn: Turn,
    lease: Lease,
    resp: Response<Driven>,
    restored: Option<&str>,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    crate::llama::client::strip_hop_by_hop(&mut parts.headers);
    let sse = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let idle = upstream.shared.cfg.stream_idle_timeout;
    let (mut observed, end) = Observed::with_idle_timeout(body, sse, Some(idle));
    // Once the first token is out, the prompt is processed: a good moment
    // for background saves of other slots (see `fleet::save_behind`).
    observed.notify_on_first_byte(Arc::clone(&upstream.save_behind_kick));
    let mut turn = turn;
    // Only a generation under way is worth preparing the next one for.
    if let Some(job) = turn.ahead.take().filter(|_| parts.status.is_success()) {
        observed.notify_on_first_byte(Arc::clone(&job.first_token));
        upstream.ahead.offer(job);
    }
    let slot = lease.slot();
    let cache = match (lease.grant(), restored) {
        (g, _) if g.resident => "resident",
        (g, _) if g.from_ram.is_some() => "ram",
        (_, Some(_)) => "disk",
        _ => "none",
    };
    add_identity_headers(
        &mut parts.headers,
        slot,
        &turn.identity,
        restored,
        cache,
        &upstream.name,
    );
    let (status, identity) = (parts.status, &turn.identity);
    upstream.emit("generation_started", || {
        json!({
            "slot": slot,
            "chat": identity.tenant.chat(),
            "character": identity.tenant.character(),
            "kind": identity.kind.as_str(),
            "source": identity.source.as_str(),
            "cache": cache,
            "status": status.as_u16(),
        })
    });
    let guard = upstream.shared.tasks.start();
    let upstream = Arc::clone(upstream);
    tokio::spawn(async move {
        let _guard = guard;
        let end = end
            .await
            .unwrap_or(StreamEnd::ClientGone(Default::default()));
        finish(&upstream, lease, turn, status, end).await;
    });
    Response::from_parts(parts, boxed(observed))
}

/// Finish: after the body's end, record what the slot holds, count and
/// tell, autosave, release.
async fn finish(
    upstream: &Upstream,
    lease: Lease,
    mut turn: Turn,
    status: StatusCode,
    end: StreamEnd,
) {
    // llama-server clears the slots of further answers when they end.
    for sibling in std::mem::take(&mut turn.siblings) {
        sibling.release(Outcome::Cleared);
    }
    let turn = &turn;
    let (slot, identity) = (lease.slot(), &turn.identity);
    let pinned = turn.client_slot.is_some();
    let outcome = outcome::decide(pinned, status, &end, identity.kind);
    if let Some(e) = outcome::broke_off(pinned, status, &end) {
        metrics::inc(&upstream.shared.metrics.upstream_errors);
        warn!(slot, error = %e, "upstream broke off the stream");
        upstream.monitor_kick.notify_one();
    }
    report(upstream, slot, turn, &end, outcome);
    if let Outcome::Generated(_) = outcome {
        let summary = end.summary();
        session::judge_ram_load(upstream, &lease, summary.cache_n(), summary.prompt_n());
    }
    lease.apply(outcome);
    if let Outcome::Generated(_) = outcome {
        session::autosave(upstream, &lease, &identity.tenant).await;
    }
    lease.release(Outcome::Untouched);
    released(upstream, slot, turn);
    upstream.note_activity(true);
}

/// Tells the event stream that the turn is over and its slot free for the
/// next request: `generation_finished` comes before the autosave, which
/// may take a while and holds the slot meanwhile.
fn released(upstream: &Upstream, slot: usize, turn: &Turn) {
    let tenant = &turn.identity.tenant;
    upstream.emit(
        "slot_released",
        || json!({"slot": slot, "chat": tenant.chat(), "character": tenant.character()}),
    );
}

/// Metrics, the `generation_finished` event and a debug line for a turn.
fn report(upstream: &Upstream, slot: usize, turn: &Turn, end: &StreamEnd, outcome: Outcome) {
    let (m, identity, summary) = (&upstream.shared.metrics, &turn.identity, end.summary());
    let ttft = summary
        .first_byte
        .map(|t| t.saturating_duration_since(turn.started));
    if let Some(t) = ttft {
        m.ttft.observe(t);
    }
    if let (Some(c), Some(p)) = (summary.cache_n(), summary.prompt_n()) {
        metrics::add(&m.prompt_cached, c);
        metrics::add(&m.prompt_evaluated, p);
    }
    upstream.emit("generation_finished", || {
        json!({
            "slot": slot,
            "chat": identity.tenant.chat(),
            "character": identity.tenant.character(),
            "kind": identity.kind.as_str(),
            "outcome": outcome::label(end, outcome),
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
}
