//! The fake's state: what every "process" shares ([`Shared`]: settings,
//! knobs, recorded calls) and what a restart wipes ([`Process`]: slots with
//! their tokens, task ids, counters); taking a slot waits like llama-server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::knobs::Knobs;
use super::{Call, FakeHandle};

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) addr: SocketAddr,
    pub(super) n_slots: usize,
    pub(super) n_ctx: usize,
    pub(super) save_dir: Option<PathBuf>,
    pub(super) payload_bytes_per_token: usize,
    pub(super) build_info: String,
    pub(super) knobs: Mutex<Knobs>,
    pub(super) calls: Mutex<Vec<Call>>,
    /// The current "process"; replaced on restart.
    pub(super) process: Mutex<Arc<Process>>,
    pub(super) gate: Semaphore,
    /// Signalled when `gate` or `hang` is switched off.
    pub(super) knobs_changed: Notify,
    pub(super) active: AtomicUsize,
}

impl Shared {
    pub(super) fn process(&self) -> Arc<Process> {
        lock(&self.process).clone()
    }
    pub(super) fn knobs(&self) -> Knobs {
        lock(&self.knobs).clone()
    }
    pub(super) fn model_name(&self) -> String {
        let p = self.knobs().model_path;
        p.rsplit('/').next().unwrap_or(&p).to_string()
    }
}

/// State that a llama-server restart wipes.
#[derive(Debug)]
pub(super) struct Process {
    pub(super) slots: Vec<Slot>,
    /// Signalled whenever a slot is released.
    slot_freed: Notify,
    next_task_id: AtomicU64,
    pub(super) deferred: AtomicUsize,
    pub(super) prompt_tokens_total: AtomicU64,
    pub(super) predicted_tokens_total: AtomicU64,
    pub(super) cached_tokens_total: AtomicU64,
}

#[derive(Debug)]
pub(super) struct Slot {
    sem: Arc<Semaphore>,
    pub(super) state: Mutex<SlotState>,
}

#[derive(Debug, Default)]
pub(super) struct SlotState {
    pub(super) tokens: Vec<i32>,
    pub(super) processing: bool,
    pub(super) last_task: Option<TaskInfo>,
}

#[derive(Debug, Clone)]
pub(super) struct TaskInfo {
    pub(super) id_task: u64,
    pub(super) n_prompt_processed: usize,
    pub(super) n_prompt_cache: usize,
    pub(super) n_decoded: usize,
    pub(super) n_predict: i64,
    pub(super) stream: bool,
    pub(super) done: bool,
}

impl Process {
    pub(super) fn new(n_slots: usize) -> Self {
        Process {
            slots: (0..n_slots)
                .map(|_| Slot {
                    sem: Arc::new(Semaphore::new(1)),
                    state: Mutex::new(SlotState::default()),
                })
                .collect(),
            slot_freed: Notify::new(),
            next_task_id: AtomicU64::new(0),
            deferred: AtomicUsize::new(0),
            prompt_tokens_total: AtomicU64::new(0),
            predicted_tokens_total: AtomicU64::new(0),
            cached_tokens_total: AtomicU64::new(0),
        }
    }

    pub(super) fn new_task_id(&self) -> u64 {
        self.next_task_id.fetch_add(1, Ordering::SeqCst)
    }

    /// Waits until slot `id` (or, with `None`, the lowest idle slot) is free
    /// and takes it.
    pub(super) async fn acquire(self: &Arc<Self>, id: Option<usize>) -> SlotGuard {
        let _deferred = Counter::new(&self.deferred);
        let (slot, permit) = match id {
            Some(i) => {
                let permit = self.slots[i]
                    .sem
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("slot semaphore");
                (i, permit)
            }
            None => 'outer: loop {
                let freed = self.slot_freed.notified();
                tokio::pin!(freed);
                freed.as_mut().enable();
                for (i, s) in self.slots.iter().enumerate() {
                    if let Ok(p) = s.sem.clone().try_acquire_owned() {
                        break 'outer (i, p);
                    }
                }
                freed.await;
            },
        };
        lock(&self.slots[slot].state).processing = true;
        SlotGuard {
            process: self.clone(),
            slot,
            permit: Some(permit),
        }
    }
}

/// Holds a slot; releasing it (drop) marks it idle and wakes waiters.
#[derive(Debug)]
pub(super) struct SlotGuard {
    pub(super) process: Arc<Process>,
    pub(super) slot: usize,
    permit: Option<OwnedSemaphorePermit>,
}

impl SlotGuard {
    pub(super) fn state(&self) -> MutexGuard<'_, SlotState> {
        lock(&self.process.slots[self.slot].state)
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        {
            let mut st = self.state();
            st.processing = false;
            if let Some(t) = st.last_task.as_mut() {
                t.done = true;
            }
        }
        // Release the permit before notifying, so woken waiters can take it.
        drop(self.permit.take());
        self.process.slot_freed.notify_waiters();
    }
}

/// Increments a counter for its lifetime.
#[derive(Debug)]
struct Counter<'a>(&'a AtomicUsize);

impl<'a> Counter<'a> {
    fn new(c: &'a AtomicUsize) -> Self {
        c.fetch_add(1, Ordering::SeqCst);
        Counter(c)
    }
}

impl Drop for Counter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts an in-flight request; moves into a stream's task.
#[derive(Debug)]
pub(super) struct ActiveGuard(Arc<Shared>);

impl ActiveGuard {
    pub(super) fn new(shared: &Arc<Shared>) -> Self {
        shared.active.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(shared.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeHandle {
    /// Tokens slot `id` holds now.
    pub fn slot_tokens(&self, id: usize) -> Vec<i32> {
        lock(&self.process().slots[id].state).tokens.clone()
    }
    /// Puts tokens into slot `id` as if a prompt had been processed there.
    pub fn set_slot_tokens(&self, id: usize, tokens: Vec<i32>) {
        lock(&self.process().slots[id].state).tokens = tokens;
    }
    pub fn slot_is_processing(&self, id: usize) -> bool {
        lock(&self.process().slots[id].state).processing
    }
    /// Requests currently being handled (including ones waiting for a slot
    /// and streams still sending).
    pub fn active_requests(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }
    /// Completions and slot actions waiting for a busy slot.
    pub fn deferred_requests(&self) -> usize {
        self.process().deferred.load(Ordering::SeqCst)
    }
}
