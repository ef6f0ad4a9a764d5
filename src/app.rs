//! The state kvgate keeps for one upstream llama-server ([`App`]): its slot
//! pool, client, cache hooks, model fingerprint and what it last said about
//! its slots; and the state every upstream shares ([`Shared`]): live
//! settings, the save directory, metrics and events, preload jobs, running
//! lifecycle tasks, and a little memory (each tenant's last prompt, each
//! client's chat). The set of upstreams is [`crate::fleet`]'s.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use lru::LruCache;
use tokio::sync::Notify;

use crate::cache_store::{CacheStore, Fingerprint};
use crate::clients::Clients;
use crate::config::{CacheSettings, Config};
use crate::events::Events;
use crate::hooks::CacheHooks;
use crate::lease::Pool;
use crate::metrics::{Gauges, Metrics};
use crate::policy::Policy;
use crate::preload::Preloads;
use crate::slots::Tenant;
use crate::upstream::{SlotInfo, Upstream};

/// How many tenants' prompt fingerprints and clients' chats are remembered.
const MEMORY: usize = 4096;
/// How many full prompts are kept for preloads.
const PROMPTS_KEPT: usize = 64;
/// Longest prompt kept for preloads (bytes).
const PROMPT_KEPT_MAX: usize = 4 << 20;

/// A value read often and replaced whole now and then, shared by the
/// handlers and the cache hooks: the live settings, the model fingerprint.
/// Readers get a copy, so no lock outlives the call. Writers replace the
/// value whole, so a lock poisoned by a panic still holds a whole value and
/// is used as is.
#[derive(Debug, Default)]
pub struct Live<T>(RwLock<T>);

impl<T: Clone> Live<T> {
    pub fn new(value: T) -> Live<T> {
        Live(RwLock::new(value))
    }

    /// A copy of the current value.
    pub fn get(&self) -> T {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `value` in place; returns the value it replaced.
    pub fn replace(&self, value: T) -> T {
        std::mem::replace(
            &mut *self.0.write().unwrap_or_else(|e| e.into_inner()),
            value,
        )
    }
}

/// Settings shared between the admin port (which changes them) and the
/// proxy and cache layer (which read them).
pub type Settings = Arc<Live<CacheSettings>>;

/// The pieces built before the [`App`] and shared with the cache hooks.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Counters and histograms.
    pub metrics: Arc<Metrics>,
    /// The live event stream.
    pub events: Arc<Events>,
    /// Live cache settings.
    pub settings: Settings,
    /// The save directory, when configured.
    pub store: Option<Arc<CacheStore>>,
    /// The model this upstream serves, once the monitor has seen it: saves
    /// are stamped with it and only saves under it are restored. Each
    /// upstream has its own (see [`Shared::for_upstream`]).
    pub fingerprint: Arc<Live<Option<Fingerprint>>>,
    /// Lifecycle tasks still holding a lease (streams, saves), on any
    /// upstream: shutdown waits for all of them.
    pub tasks: Arc<TaskCounter>,
    /// Running and finished preload jobs, whichever upstream they run on.
    pub preloads: Arc<Preloads>,
    /// What kvgate remembers of past requests.
    pub memory: Arc<Memory>,
}

impl Shared {
    /// Fresh metrics and events over `settings`.
    pub fn new(settings: CacheSettings, store: Option<Arc<CacheStore>>) -> Shared {
        let metrics = Arc::new(Metrics::default());
        Shared {
            events: Arc::new(Events::new(Arc::clone(&metrics))),
            metrics,
            settings: Arc::new(Live::new(settings)),
            store,
            fingerprint: Arc::default(),
            tasks: Arc::default(),
            preloads: Arc::default(),
            memory: Arc::default(),
        }
    }

    /// The same shared state with a fingerprint of its own, for another
    /// upstream: two upstreams may serve different models.
    pub fn for_upstream(&self) -> Shared {
        Shared {
            fingerprint: Arc::default(),
            ..self.clone()
        }
    }
}

/// kvgate's state for one upstream llama-server, with the [`Shared`] parts
/// every upstream sees.
#[derive(Debug)]
pub struct App {
    /// This upstream's name in the admin API and the events (`upstream-1`
    /// for the first `--upstream`, an instance's id for a supervised one).
    pub name: String,
    /// Validated configuration (its `cache` part is the start value of
    /// [`App::settings`]).
    pub cfg: Config,
    /// Identity policy in force.
    pub policy: Policy,
    /// Slot table and waiters.
    pub pool: Arc<Pool>,
    /// llama-server client.
    pub upstream: Upstream,
    /// Cache actions around generations.
    pub hooks: Arc<dyn CacheHooks>,
    /// The save directory, when configured.
    pub store: Option<Arc<CacheStore>>,
    /// Live cache settings.
    pub settings: Settings,
    /// The model llama-server serves, once known (see [`Shared`]).
    pub fingerprint: Arc<Live<Option<Fingerprint>>>,
    /// Counters and histograms.
    pub metrics: Arc<Metrics>,
    /// The live event stream.
    pub events: Arc<Events>,
    /// Front-port clients, when a clients file is configured.
    pub clients: Option<Clients>,
    /// Lifecycle tasks still holding a lease (streams, saves), shared by all
    /// upstreams.
    pub tasks: Arc<TaskCounter>,
    /// Wakes the upstream monitor for an immediate check.
    pub monitor_kick: Notify,
    /// Running and finished preload jobs, shared by all upstreams.
    pub preloads: Arc<Preloads>,
    /// Wakes the save-behind task (a generation's first token is out).
    pub save_behind_kick: Arc<Notify>,
    /// Unix seconds of the last eviction (0: none yet).
    last_eviction: std::sync::atomic::AtomicU64,
    /// What the monitor last learned about llama-server.
    pub upstream_state: Live<UpstreamState>,
    /// Each tenant's last prompt and each client's chat, shared by all
    /// upstreams (identity is resolved before an upstream is chosen).
    pub memory: Arc<Memory>,
    /// Wall-clock seconds each slot was last used (the table itself keeps no
    /// clock).
    last_used: Mutex<HashMap<usize, u64>>,
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
}

/// What kvgate remembers of past requests, whatever upstream served them:
/// each tenant's last prompt (its hash tells a swipe; its text feeds
/// preloads), each character's last chat, each client's chat.
#[derive(Debug)]
pub struct Memory(Mutex<Remembered>);

#[derive(Debug)]
struct Remembered {
    prompt_hashes: LruCache<Tenant, u64>,
    prompts: LruCache<Tenant, Arc<str>>,
    client_chats: LruCache<String, String>,
    character_chats: LruCache<String, String>,
}

impl Default for Memory {
    fn default() -> Memory {
        Memory(Mutex::new(Remembered {
            prompt_hashes: lru(MEMORY),
            prompts: lru(PROMPTS_KEPT),
            client_chats: lru(MEMORY),
            character_chats: lru(MEMORY),
        }))
    }
}

impl Memory {
    fn lock(&self) -> std::sync::MutexGuard<'_, Remembered> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tenant's previous prompt fingerprint.
    pub fn previous_prompt(&self, tenant: &Tenant) -> Option<u64> {
        self.lock().prompt_hashes.peek(tenant).copied()
    }

    /// Remembers a request: its prompt fingerprint, its text (for preloads),
    /// the chat its character was last seen in.
    pub fn remember_prompt(&self, tenant: &Tenant, hash: u64, text: Option<&str>) {
        // Copy the prompt (up to megabytes) before taking the lock every
        // request takes.
        let kept: Option<Arc<str>> = match (tenant, text) {
            (Tenant::Character { .. }, Some(t)) if t.len() <= PROMPT_KEPT_MAX => Some(Arc::from(t)),
            _ => None,
        };
        let mut m = self.lock();
        m.prompt_hashes.put(tenant.clone(), hash);
        if let (Tenant::Character { chat, name }, Some(_)) = (tenant, text) {
            m.character_chats.put(name.clone(), chat.clone());
        }
        if let Some(prompt) = kept {
            m.prompts.put(tenant.clone(), prompt);
        }
    }

    /// The last prompt kvgate saw for a tenant.
    pub fn last_prompt(&self, tenant: &Tenant) -> Option<Arc<str>> {
        self.lock().prompts.peek(tenant).cloned()
    }

    /// The chat kvgate last saw a character in.
    pub fn last_chat_of(&self, character: &str) -> Option<String> {
        self.lock().character_chats.peek(character).cloned()
    }

    /// Records that `client` now talks to `chat`; returns the previous chat
    /// when it was another one (a chat switch).
    pub fn note_client_chat(&self, client: &str, chat: &str) -> Option<String> {
        match self
            .lock()
            .client_chats
            .put(client.to_string(), chat.to_string())
        {
            Some(prev) if prev != chat => Some(prev),
            _ => None,
        }
    }
}

fn lru<K: std::hash::Hash + Eq, V>(n: usize) -> LruCache<K, V> {
    LruCache::new(NonZeroUsize::new(n).expect("nonzero constant"))
}

// === impl App ===

impl App {
    /// Builds the shared state. The pool starts with no slots; the upstream
    /// monitor sizes it from llama-server's `/slots`.
    pub fn new(
        name: String,
        cfg: Config,
        policy: Policy,
        upstream: Upstream,
        hooks: Arc<dyn CacheHooks>,
        shared: Shared,
        clients: Option<Clients>,
    ) -> Arc<App> {
        let pool = Pool::new(0, cfg.max_queue);
        Arc::new(App {
            name,
            cfg,
            policy,
            pool,
            upstream,
            hooks,
            store: shared.store,
            settings: shared.settings,
            fingerprint: shared.fingerprint,
            metrics: shared.metrics,
            events: shared.events,
            clients,
            tasks: shared.tasks,
            monitor_kick: Notify::new(),
            preloads: shared.preloads,
            save_behind_kick: Arc::default(),
            last_eviction: std::sync::atomic::AtomicU64::new(0),
            upstream_state: Live::default(),
            memory: shared.memory,
            last_used: Mutex::new(HashMap::new()),
        })
    }

    /// Emits an event about this upstream: `fields` (an object) gains its
    /// name under `"upstream"`.
    pub fn emit(&self, kind: &str, fields: impl FnOnce() -> serde_json::Value) {
        self.events.emit_for(&self.name, kind, fields);
    }

    /// Records the model llama-server serves.
    pub fn set_fingerprint(&self, fp: Fingerprint) {
        let before = self.fingerprint.replace(Some(fp.clone()));
        if before.as_ref() != Some(&fp) {
            tracing::info!(model = %fp.model, id = %fp.id, "model fingerprint");
        }
    }

    /// Records the wall-clock time a slot was used.
    pub fn touch_slot(&self, slot: usize) {
        let now = crate::cache_store::now_unix();
        self.last_used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(slot, now);
    }

    /// Unix seconds a slot was last used.
    pub fn slot_used_at(&self, slot: usize) -> Option<u64> {
        self.last_used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&slot)
            .copied()
    }

    /// Records that a slot changed hands.
    pub fn note_eviction(&self) {
        self.last_eviction
            .store(crate::cache_store::now_unix(), Ordering::Relaxed);
    }

    /// Whether slots changed hands within `window_s` seconds: more
    /// characters than slots, so idle slots will be evicted soon.
    pub fn under_eviction_pressure(&self, window_s: u64) -> bool {
        let last = self.last_eviction.load(Ordering::Relaxed);
        last != 0 && crate::cache_store::now_unix().saturating_sub(last) <= window_s
    }

    /// This upstream's gauges now: up or not, slot occupancy.
    pub fn gauges(&self) -> Gauges {
        let mut g = Gauges {
            upstreams: 1,
            upstreams_up: u64::from(self.upstream_state.get().up),
            ..Gauges::default()
        };
        self.pool.with_table(|t| {
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

/// Counts running lifecycle tasks so shutdown can wait for them.
#[derive(Debug, Default)]
pub struct TaskCounter {
    running: AtomicUsize,
    idle: Notify,
}

/// Held by a running task; dropping it ends the task's count.
#[derive(Debug)]
pub struct TaskGuard(Arc<TaskCounter>);

impl TaskCounter {
    /// Counts one more running task.
    pub fn start(self: &Arc<Self>) -> TaskGuard {
        self.running.fetch_add(1, Ordering::SeqCst);
        TaskGuard(Arc::clone(self))
    }

    /// Tasks running now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Waits until no task runs.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.running() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Live;

    #[test]
    fn live_values_are_replaced_whole_and_survive_a_poisoned_lock() {
        let live = std::sync::Arc::new(Live::new(1u32));
        assert_eq!(live.replace(2), 1);
        // Poison the lock: a thread panics while it holds it for writing.
        let held = std::sync::Arc::clone(&live);
        let panicked = std::thread::spawn(move || {
            let _guard = held.0.write().unwrap();
            panic!("poison the lock");
        })
        .join();
        assert!(panicked.is_err() && live.0.is_poisoned());
        assert_eq!(live.get(), 2);
        assert_eq!(live.replace(3), 2);
        assert_eq!(live.get(), 3);
    }
}
