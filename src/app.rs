//! The state every request handler shares: configuration, policy, the slot
//! pool, the upstream client, the cache hooks, and a little memory (each
//! tenant's last prompt, for swipe detection).

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use lru::LruCache;
use tokio::sync::Notify;

use crate::config::Config;
use crate::hooks::CacheHooks;
use crate::lease::Pool;
use crate::policy::Policy;
use crate::slots::Tenant;
use crate::upstream::Upstream;

/// How many tenants' last prompts are remembered.
const PROMPT_MEMORY: usize = 4096;

/// Shared state of one kvgate instance.
#[derive(Debug)]
pub struct App {
    /// Validated configuration.
    pub cfg: Config,
    /// Identity policy in force.
    pub policy: Policy,
    /// Slot table and waiters.
    pub pool: Arc<Pool>,
    /// llama-server client.
    pub upstream: Upstream,
    /// Cache actions around generations.
    pub hooks: Arc<dyn CacheHooks>,
    /// Last prompt fingerprint per tenant (bounded, least recently used out).
    prompts: Mutex<LruCache<Tenant, u64>>,
    /// Lifecycle tasks still holding a lease (streams, saves).
    pub tasks: Arc<TaskCounter>,
    /// Wakes the upstream monitor for an immediate check (after a connection
    /// failure).
    pub monitor_kick: Notify,
    /// Counters.
    pub metrics: Metrics,
    /// Last chat of each client (API key or address), for chat switches.
    clients: Mutex<LruCache<String, String>>,
}

/// Plain counters, exposed on the admin port.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Completions intercepted.
    pub completions: AtomicU64,
    /// Requests passed through.
    pub passthrough: AtomicU64,
    /// Completions that found their cache live in the slot.
    pub resident_hits: AtomicU64,
    /// Evictions.
    pub evictions: AtomicU64,
    /// Saves made before an eviction.
    pub eviction_saves: AtomicU64,
    /// Restores that loaded a file.
    pub restores: AtomicU64,
    /// Restores that failed.
    pub restore_failures: AtomicU64,
    /// Autosaves.
    pub autosaves: AtomicU64,
    /// Requests refused because no slot could be had.
    pub queue_rejections: AtomicU64,
    /// Upstream errors (unreachable, timeout, broken stream).
    pub upstream_errors: AtomicU64,
    /// Upstream restarts detected.
    pub upstream_restarts: AtomicU64,
}

impl Metrics {
    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

// === impl App ===

impl App {
    /// Builds the shared state. The pool starts with no slots; the upstream
    /// monitor sizes it from llama-server's `/slots`.
    pub fn new(cfg: Config, policy: Policy, hooks: Arc<dyn CacheHooks>) -> Arc<App> {
        let upstream = Upstream::new(cfg.upstream.clone(), cfg.upstream_timeout);
        let pool = Pool::new(0, cfg.max_queue);
        Arc::new(App {
            cfg,
            policy,
            pool,
            upstream,
            hooks,
            prompts: Mutex::new(LruCache::new(
                NonZeroUsize::new(PROMPT_MEMORY).expect("nonzero constant"),
            )),
            tasks: Arc::default(),
            monitor_kick: Notify::new(),
            metrics: Metrics::default(),
            clients: Mutex::new(LruCache::new(
                NonZeroUsize::new(PROMPT_MEMORY).expect("nonzero constant"),
            )),
        })
    }

    /// The tenant's previous prompt fingerprint.
    pub fn previous_prompt(&self, tenant: &Tenant) -> Option<u64> {
        self.prompts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .peek(tenant)
            .copied()
    }

    /// Records that `client` now talks to `chat`; returns the previous chat
    /// when it was another one (a chat switch).
    pub fn note_client_chat(&self, client: &str, chat: &str) -> Option<String> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        match clients.put(client.to_string(), chat.to_string()) {
            Some(prev) if prev != chat => Some(prev),
            _ => None,
        }
    }

    /// Remembers the tenant's prompt fingerprint.
    pub fn remember_prompt(&self, tenant: &Tenant, hash: u64) {
        self.prompts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(tenant.clone(), hash);
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
