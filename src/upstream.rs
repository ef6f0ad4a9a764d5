//! One upstream llama-server as kvgate sees it ([`Upstream`]): its client,
//! slot pool, cache hooks, model fingerprint and what its monitor last saw,
//! with the [`Shared`] state every upstream sees. The set of upstreams is
//! [`crate::app::App`]'s; every change to a slot goes through
//! `session/`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::live::Live;
use crate::llama::client::{LlamaClient, SlotInfo};
use crate::lookahead::Ahead;
use crate::observe::metrics::Gauges;
use crate::shared::Shared;
use crate::slots::lease::Pool;
use crate::store::hooks::CacheHooks;
use crate::store::meta::{now_unix, Fingerprint};
use crate::sync::Unpoisoned;
use crate::tenant::Tenant;

/// kvgate's state for one upstream llama-server.
#[derive(Debug)]
pub struct Upstream {
    /// Its name in the admin API and the events (`upstream-1` for the first
    /// `--upstream`, an instance's id for a supervised one).
    pub name: String,
    /// The HTTP client that talks to it.
    pub client: LlamaClient,
    /// Its slot table and the requests waiting for a slot.
    pub pool: Arc<Pool>,
    /// Cache actions around generations (saves, restores).
    pub hooks: Arc<dyn CacheHooks>,
    /// The model it serves, once its monitor has seen it: saves are stamped
    /// with it and only saves under it are restored. Two upstreams may serve
    /// different models, so each has its own.
    pub fingerprint: Arc<Live<Option<Fingerprint>>>,
    /// What its monitor last learned about it.
    pub state: Live<UpstreamState>,
    /// Wakes its monitor for an immediate check.
    pub monitor_kick: Notify,
    /// Wakes its save-behind task (a generation's first token is out).
    pub save_behind_kick: Arc<Notify>,
    /// Wakes its idle-save task (a generation ended).
    pub idle_kick: Notify,
    /// Counts generations starting and ending, so the idle-save task can
    /// tell that llama-server stayed quiet.
    activity: AtomicU64,
    /// Counts generations starting, so prefill ahead can give way.
    starts: AtomicU64,
    /// State every upstream shares.
    pub shared: Arc<Shared>,
    /// Held while a request takes several slots at once (a completion with
    /// `n_cmpl` > 1), so that two such requests can't each hold a slot the
    /// other waits for.
    pub several_slots: tokio::sync::Mutex<()>,
    /// Unix seconds of the last eviction (0: none yet).
    last_eviction: AtomicU64,
    /// The turn whose next speaker may be prefilled ahead.
    pub(crate) ahead: Ahead,
    /// The last next speaker prefill ahead guessed, to count its guesses.
    predicted: std::sync::Mutex<Option<Tenant>>,
}

/// llama-server as last seen by the monitor.
#[derive(Debug, Default, Clone)]
pub struct UpstreamState {
    /// Whether it answered the last poll.
    pub up: bool,
    /// Its slots, as `/slots` reported them.
    pub slots: Vec<SlotInfo>,
    /// The names it answers to in a request's `model` field: the ids in
    /// `/v1/models` (`--alias`) and the model file's name.
    pub models: Vec<String>,
    /// Why kvgate could not read it at the last poll although it answered
    /// (a 401: kvgate lacks its `--api-key`; a 404 from a router
    /// llama-server); not a loading llama-server's 503.
    pub refused: Option<String>,
}

// === impl Upstream ===

impl Upstream {
    /// An upstream called `name` reached through `client`, serving the model
    /// `fingerprint` will name (shared with its hooks). The pool starts
    /// with no slots; the monitor sizes it from llama-server's `/slots`.
    pub(crate) fn new(
        name: String,
        client: LlamaClient,
        hooks: Arc<dyn CacheHooks>,
        fingerprint: Arc<Live<Option<Fingerprint>>>,
        shared: Arc<Shared>,
    ) -> Arc<Upstream> {
        let pool = Pool::new(0, shared.cfg.max_queue);
        pool.set_client_bound(shared.cfg.max_queue_per_client);
        pool.set_ram_cache(shared.cfg.ram_cache);
        Arc::new(Upstream {
            name,
            client,
            pool,
            hooks,
            fingerprint,
            state: Live::default(),
            monitor_kick: Notify::new(),
            save_behind_kick: Arc::default(),
            idle_kick: Notify::new(),
            activity: AtomicU64::new(0),
            starts: AtomicU64::new(0),
            shared,
            several_slots: tokio::sync::Mutex::new(()),
            last_eviction: AtomicU64::new(0),
            ahead: Ahead::default(),
            predicted: std::sync::Mutex::new(None),
        })
    }

    /// Emits an event about this upstream: `fields` (an object) gains its
    /// name under `"upstream"`.
    pub fn emit(&self, kind: &str, fields: impl FnOnce() -> serde_json::Value) {
        self.shared.events.emit_for(&self.name, kind, fields);
    }

    /// Records the model llama-server serves.
    pub fn set_fingerprint(&self, fp: Fingerprint) {
        let before = self.fingerprint.replace(Some(fp.clone()));
        if before.as_ref() != Some(&fp) {
            tracing::info!(model = %fp.model, id = %fp.id, "model fingerprint");
        }
    }

    /// Records that a generation started or ended; an end also wakes the
    /// idle-save task.
    pub fn note_activity(&self, ended: bool) {
        self.activity.fetch_add(1, Ordering::Relaxed);
        if ended {
            self.idle_kick.notify_one();
        } else {
            self.starts.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many generations have started (see [`Upstream::note_activity`]).
    pub fn starts(&self) -> u64 {
        self.starts.load(Ordering::Relaxed)
    }

    /// The activity count (see [`Upstream::note_activity`]).
    pub fn activity(&self) -> u64 {
        self.activity.load(Ordering::Relaxed)
    }

    /// Records prefill ahead's guess at the next speaker of `next`'s chat.
    pub(crate) fn note_prediction(&self, next: &Tenant) {
        *self.predicted.lock_unpoisoned() = Some(next.clone());
    }

    /// Scores the last guess for `tenant`'s chat against `tenant`, who
    /// speaks now.
    pub(crate) fn score_prediction(&self, tenant: &Tenant) {
        let mut predicted = self.predicted.lock_unpoisoned();
        if predicted
            .as_ref()
            .is_some_and(|p| p.chat() == tenant.chat())
        {
            let hit = predicted.take().as_ref() == Some(tenant);
            let m = &self.shared.metrics;
            crate::observe::metrics::inc(if hit {
                &m.predictions_hit
            } else {
                &m.predictions_missed
            });
        }
    }

    /// Records that a slot changed hands.
    pub fn note_eviction(&self) {
        self.last_eviction.store(now_unix(), Ordering::Relaxed);
    }

    /// Whether slots changed hands within `window_s` seconds: more
    /// characters than slots, so idle slots will be evicted soon.
    pub fn under_eviction_pressure(&self, window_s: u64) -> bool {
        let last = self.last_eviction.load(Ordering::Relaxed);
        last != 0 && now_unix().saturating_sub(last) <= window_s
    }

    /// Whether kvgate knows this upstream's slots, asking the monitor to
    /// look at once and waiting up to `limit` when it does not yet (a
    /// request right after llama-server came up).
    pub(crate) async fn slots_known(&self, limit: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.pool.is_empty() {
            // It refuses kvgate, or it answered and has no slots (a router
            // llama-server): waiting would not help.
            let st = self.state.get();
            if tokio::time::Instant::now() >= deadline || st.refused.is_some() || st.up {
                return false;
            }
            self.monitor_kick.notify_one();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        true
    }

    /// This upstream's gauges now: up or not, slot occupancy.
    pub fn gauges(&self) -> Gauges {
        let mut g = Gauges {
            upstreams: 1,
            upstreams_up: u64::from(self.state.get().up),
            ..Gauges::default()
        };
        self.pool.read(|t| {
            g.queued = t.queued() as u64;
            for s in t.slots() {
                if s.lease.is_some() {
                    g.busy += 1;
                } else if s.owner.is_some() {
                    g.owned += 1;
                } else {
                    g.free += 1;
                }
            }
        });
        g
    }
}
