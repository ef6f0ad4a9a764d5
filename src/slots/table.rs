//! The slot table: which tenant (chat + character) owns which llama-server
//! slot, who is using a slot right now, and who waits for one.
//!
//! This module is pure: no I/O, no async, no clock. [`crate::slots::lease`] wraps it
//! in a mutex and turns its grants into RAII leases; everything the table
//! decides is decided in one call, so a decision and its reservation can never
//! be separated by an `.await` (llama-swap's "a read that gates a mutation is a
//! bug").
//!
//! # Rules
//! - A tenant already resident in a slot gets that slot; requests for a busy
//!   resident slot queue behind it (same character = serialised).
//! - A request no character owns ([`Want::Prompt`]) is placed as llama-server
//!   places a request without `id_slot`: the idle slot whose prompt shares
//!   the longest prefix with it, when that is more than [`SIMILARITY`] of
//!   it, among the slots no character holds; else as a newcomer. It never
//!   waits behind a busy slot of its own, as llama-server runs two such
//!   requests side by side.
//! - A character's request whose prompt extends what another character's
//!   idle slot of the same chat holds (see [`super::content`]) takes that
//!   slot when it holds more of the prompt than the character's own (by
//!   more than `MOVE_GAIN_BYTES`) and its own is idle: the previous owner
//!   stays in it as a *member* (its cache is a prefix of what the slot will
//!   hold), so nothing is saved or restored. A member is resident in the
//!   slot like its owner; an admin load or preload for a member evicts the
//!   owner (saved first).
//! - Otherwise the lowest free (unowned, idle) slot; then, for a request no
//!   character owns, the least recently used slot no character holds.
//! - Otherwise the idle slot with the smallest usage counter, ties broken by
//!   least recent use, then by the lowest id (the seed extension's rule, with
//!   LRU added so ties do not always hit slot 0).
//! - A slot with a lease (a request in flight, a save, a restore) is never
//!   evicted. Waiters are served in FIFO order among those that can proceed;
//!   when several newcomers compete for free slots, the one whose client
//!   holds the fewest leases goes first, so one client can't starve others.
//! - With known clients (a clients file), each client may have at most
//!   `max_per_client` requests waiting, besides the overall bound.
//! - Usage counts messages since the last save or restore: `normal` +1;
//!   `regenerate`, `swipe`, `continue`, `quiet` +1 only when it is 0;
//!   `impersonate` no change. Anonymous tenants never count.

use std::collections::VecDeque;
use std::sync::Arc;

pub use super::content::SIMILARITY;
use super::content::{extends, extends_by, reuse, shares, MOVE_GAIN_BYTES};
use crate::tenant::{Kind, Tenant};

/// Index of a llama-server slot (`id_slot`).
pub type SlotId = usize;

/// What a request asks the table for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Want {
    /// A slot for this tenant, chosen by kvgate.
    Tenant(Tenant),
    /// A slot for a request whose prompt kvgate knows, chosen by content
    /// too (see the module docs): as llama-server chooses for an anonymous
    /// tenant; for a character, its own slot unless another one of its chat
    /// holds more of the prompt and can be extended.
    Prompt {
        /// Who it runs as.
        tenant: Tenant,
        /// Its prompt ([`crate::identity::content::prompt_text`]).
        text: Arc<str>,
    },
    /// Exactly this slot, because the client chose it (`id_slot` ≥ 0) or a
    /// client's slot action targets it. The grant takes the slot from its
    /// owner (reported as evicted); afterwards its contents are unknown.
    Pinned(SlotId),
    /// Exclusive use of this slot without changing its owner (a save, an
    /// inspection); the release outcome says what changed.
    Hold(SlotId),
}

/// Handle of a queued request.
pub type Ticket = u64;

/// The authenticated client a request comes from, when kvgate knows its
/// clients; kvgate's own work and unknown clients have none.
pub type ClientTag = Arc<str>;

/// Identifies one lease so a stale release can't free someone else's slot.
pub type LeaseId = u64;

/// The previous owner of a slot that a grant takes over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evicted {
    /// Who held the slot.
    pub tenant: Tenant,
    /// Its usage counter: ≥ 1 means unsaved messages (save before eviction).
    pub usage: u32,
    /// Whether the slot still held the tenant's live cache.
    pub live: bool,
}

/// A slot handed to a request. The holder must call
/// [`SlotTable::release`] with the same lease id exactly once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The slot to use as `id_slot`.
    pub slot: SlotId,
    /// The lease to release.
    pub lease: LeaseId,
    /// True when the slot already holds this tenant's live cache.
    pub resident: bool,
    /// Set when the grant takes the slot from another tenant.
    pub evicted: Option<Evicted>,
    /// Usage counter of the slot at grant time (for the new owner).
    pub usage: u32,
}

/// How a lease ended; decides what the table believes about the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A generation for the owner finished (fully or stopped by the client):
    /// the slot holds a valid prefix of the owner's conversation.
    Generated(Kind),
    /// Something went wrong upstream: the slot's contents are unknown.
    Failed,
    /// The lease did nothing to the slot (e.g. the request was refused
    /// before reaching llama-server).
    Untouched,
    /// The slot was used by someone kvgate does not track (a client-pinned
    /// request, a client's own slot action) or erased: it belongs to nobody.
    Cleared,
}

/// One slot's bookkeeping.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    /// Current owner, kept across eviction-free idle periods.
    pub owner: Option<Tenant>,
    /// Whether llama-server's slot holds the owner's cache right now. False
    /// after an upstream restart or failure: the owner keeps its affinity
    /// but its next request must restore from disk.
    pub live: bool,
    /// Messages since the last save or restore.
    pub usage: u32,
    /// Logical time of the last grant (for LRU tie breaks).
    pub last_used: u64,
    /// Wall-clock Unix seconds of the last generation, as its caller stamped
    /// it (the table reads no clock); shown by the admin API.
    pub used_at: Option<u64>,
    /// The lease in force, if any.
    pub lease: Option<LeaseId>,
    /// Restored but not generated on since: llama-server's `/slots` shows
    /// no task for such a slot, which must not be mistaken for a lost cache.
    pub fresh: bool,
    /// The lease in force is a [`Want::Hold`] (a save or an inspection, not
    /// a generation): the slot will be free again shortly and unchanged.
    pub held: bool,
    /// The prompt of the last request granted here with its text
    /// ([`Want::Prompt`]); gone with the cache or a restore.
    pub prompt: Option<Arc<str>>,
    /// Characters of the owner's chat whose cache is a prefix of this
    /// slot's: earlier owners whose slot a later speaker extended. They are
    /// resident here; gone with the cache (an eviction, a loss, a restore);
    /// when the owner moves on, the first member becomes the owner.
    pub members: Vec<Tenant>,
    /// The save the live cache was restored from (generations since then
    /// only extend it); gone with the cache.
    pub restored_from: Option<String>,
    /// The client whose generation last completed in the slot through
    /// kvgate: whose work llama-server's `/slots` shows for it. None after
    /// an erase, a restore, a failure or a client-pinned generation.
    pub client: Option<ClientTag>,
    /// The client holding the lease in force, for the fair order.
    pub lease_client: Option<ClientTag>,
}

impl Slot {
    /// llama-server's slot no longer holds the owner's cache.
    fn lose_cache(&mut self) {
        self.live = false;
        self.restored_from = None;
        self.prompt = None;
        self.members.clear();
    }

    /// Whether `t` is resident here: the owner or a member.
    fn hosts(&self, t: &Tenant) -> bool {
        self.owner.as_ref() == Some(t) || self.members.contains(t)
    }

    /// Whether a character of `t`'s chat owns this slot, so that `t` may
    /// extend it.
    fn same_chat(&self, t: &Tenant) -> bool {
        t.is_character()
            && self
                .owner
                .as_ref()
                .is_some_and(|o| o.is_character() && o.chat() == t.chat())
    }

    /// Whether a character's cache is here, to be kept from requests no
    /// character owns while kvgate can.
    fn holds_character(&self) -> bool {
        self.owner.as_ref().is_some_and(Tenant::is_character)
    }
}

/// A queued request.
#[derive(Clone, Debug)]
struct Waiter {
    ticket: Ticket,
    want: Want,
    by: Option<ClientTag>,
}

/// Why a request was refused outright.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The wait queue is full.
    #[error("all {slots} slots are busy and {queued} requests are already waiting")]
    QueueFull {
        /// Number of slots.
        slots: usize,
        /// Queue length.
        queued: usize,
    },
    /// This client already has its share of the wait queue.
    #[error("all slots are busy and this client already has {queued} requests waiting")]
    ClientQueueFull {
        /// The client's requests waiting.
        queued: usize,
    },
    /// A pinned slot that does not exist.
    #[error("slot {0} does not exist")]
    NoSuchSlot(SlotId),
    /// The upstream's slot count is not known yet.
    #[error("the upstream's slots are not known yet")]
    NoSlots,
}

/// The pure allocator. See the module docs for its rules.
#[derive(Debug, Clone)]
pub struct SlotTable {
    slots: Vec<Slot>,
    queue: VecDeque<Waiter>,
    max_queue: usize,
    max_per_client: usize,
    tick: u64,
    next_ticket: Ticket,
    next_lease: LeaseId,
}

// === impl SlotTable ===

impl SlotTable {
    /// A table of `n` empty slots whose wait queue holds at most `max_queue`
    /// (and as many of one client's).
    pub fn new(n: usize, max_queue: usize) -> Self {
        SlotTable {
            slots: vec![Slot::default(); n],
            queue: VecDeque::new(),
            max_queue,
            max_per_client: max_queue,
            tick: 0,
            next_ticket: 1,
            next_lease: 1,
        }
    }

    /// At most `n` waiting requests per known client.
    pub fn set_client_bound(&mut self, n: usize) {
        self.max_per_client = n;
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when the upstream's slot count is unknown (zero slots).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Read access to every slot.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Number of queued requests.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The slot a tenant is resident in (its owner or a member), if any.
    pub fn resident(&self, tenant: &Tenant) -> Option<SlotId> {
        self.slots.iter().position(|s| s.hosts(tenant))
    }

    /// Where a character's request with prompt `text` belongs: the idle slot
    /// of its chat whose prompt `text` extends, when that holds more of
    /// `text` than the character's own slot; else its own slot, if any.
    fn character_target(&self, t: &Tenant, text: &str) -> Option<SlotId> {
        let home = self.resident(t);
        // A character's requests are serialised: while its own slot is
        // busy, it waits there.
        if let Some(r) = home.filter(|&r| self.slots[r].lease.is_some()) {
            return Some(r);
        }
        let own = home
            .map(|r| &self.slots[r])
            .filter(|s| s.live)
            .map_or(0, |s| reuse(s.prompt.as_deref(), text));
        let better = self
            .slots
            .iter()
            .enumerate()
            .filter(|(id, s)| Some(*id) != home && s.lease.is_none() && s.live && s.same_chat(t))
            .filter_map(|(id, s)| {
                // One prefix scan per candidate: whether the prompt extends
                // the slot's, and by how much.
                let held = s.prompt.as_deref()?;
                let r = reuse(Some(held), text);
                (extends_by(held, r) && r > own + MOVE_GAIN_BYTES).then_some((id, r))
            })
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)));
        better.map(|(id, _)| id).or(home)
    }

    /// The slot `want` is bound to, if any: a pinned or held slot, a
    /// tenant's own (or the one its prompt extends); `None` for a newcomer.
    fn target(&self, want: &Want) -> Option<SlotId> {
        match want {
            Want::Pinned(s) | Want::Hold(s) => Some(*s),
            Want::Tenant(t) => self.resident(t),
            Want::Prompt { tenant, text } if tenant.is_character() => {
                self.character_target(tenant, text)
            }
            Want::Prompt { .. } => None,
        }
    }

    /// Whether llama-server's view of `slot` shows only `me`'s work: its
    /// last completed generation was `me`'s and nobody else's work runs in
    /// it now (kvgate's own save of it aside).
    pub fn shown_to(&self, slot: SlotId, me: &ClientTag) -> bool {
        let Some(s) = self.slots.get(slot) else {
            return false;
        };
        let quiet = match s.lease {
            None => true,
            Some(_) => (s.held && s.lease_client.is_none()) || s.lease_client.as_ref() == Some(me),
        };
        s.client.as_ref() == Some(me) && quiet
    }

    /// True when no slot is leased and nobody waits.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.slots.iter().all(|s| s.lease.is_none())
    }

    /// Queues a request of kvgate's own or of an unknown client.
    pub fn enqueue(&mut self, want: Want) -> Result<(Ticket, Vec<(Ticket, Grant)>), TableError> {
        self.enqueue_by(want, None)
    }

    /// Queues a request from `by` and serves whatever can be served now.
    /// Returns the ticket and the grants made by this call (which may include
    /// the new ticket's own grant). The queue bounds apply only to requests
    /// that must wait.
    pub fn enqueue_by(
        &mut self,
        want: Want,
        by: Option<ClientTag>,
    ) -> Result<(Ticket, Vec<(Ticket, Grant)>), TableError> {
        if self.slots.is_empty() {
            return Err(TableError::NoSlots);
        }
        if let Want::Pinned(s) | Want::Hold(s) = want {
            if s >= self.slots.len() {
                return Err(TableError::NoSuchSlot(s));
            }
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let mine = |w: &Waiter| by.is_some() && w.by == by;
        let client_queued = self.queue.iter().filter(|w| mine(w)).count();
        self.queue.push_back(Waiter {
            ticket,
            want,
            by: by.clone(),
        });
        let grants = self.dispatch();
        if grants.iter().any(|(t, _)| *t == ticket) {
            return Ok((ticket, grants));
        }
        let refusal = if by.is_some() && client_queued >= self.max_per_client {
            Some(TableError::ClientQueueFull {
                queued: client_queued,
            })
        } else if self.queue.len() > self.max_queue {
            Some(TableError::QueueFull {
                slots: self.slots.len(),
                queued: self.queue.len() - 1,
            })
        } else {
            None
        };
        match refusal {
            Some(e) => {
                self.queue.retain(|w| w.ticket != ticket);
                Err(e)
            }
            None => Ok((ticket, grants)),
        }
    }

    /// Removes a waiter that gave up (timeout, client gone). Returns whether it
    /// was still queued; if it was already granted, the caller owns a lease
    /// and must release it instead.
    pub fn cancel(&mut self, ticket: Ticket) -> bool {
        let before = self.queue.len();
        self.queue.retain(|w| w.ticket != ticket);
        self.queue.len() != before
    }

    /// Ends a lease and serves the waiters that can now proceed.
    /// A release with a stale lease id changes nothing.
    pub fn release(
        &mut self,
        slot: SlotId,
        lease: LeaseId,
        outcome: Outcome,
    ) -> Vec<(Ticket, Grant)> {
        if !self.apply(slot, lease, outcome) {
            return Vec::new();
        }
        self.slots[slot].lease = None;
        self.slots[slot].lease_client = None;
        self.slots[slot].held = false;
        self.dispatch()
    }

    /// Whether `ticket` still waits in the queue.
    pub fn is_queued(&self, ticket: Ticket) -> bool {
        self.queue.iter().any(|w| w.ticket == ticket)
    }

    /// Applies an outcome to a leased slot without releasing it (the holder
    /// has more to do, such as an autosave). Returns false for a stale lease.
    pub fn apply(&mut self, slot: SlotId, lease: LeaseId, outcome: Outcome) -> bool {
        let Some(s) = self.slots.get_mut(slot) else {
            return false;
        };
        if s.lease != Some(lease) {
            return false;
        }
        match outcome {
            Outcome::Generated(kind) => {
                s.client = s.lease_client.clone();
                s.live = true;
                s.fresh = false;
                if s.owner.as_ref().is_some_and(Tenant::is_character) {
                    s.usage = next_usage(s.usage, kind);
                }
            }
            Outcome::Failed => {
                s.client = None;
                s.lose_cache();
            }
            Outcome::Untouched => {}
            Outcome::Cleared => {
                s.client = None;
                s.owner = None;
                s.lose_cache();
                s.usage = 0;
                s.fresh = false;
            }
        }
        true
    }

    /// Records when (Unix seconds) a generation last ran on the slot.
    pub fn stamp_used(&mut self, slot: SlotId, unix: u64) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.used_at = Some(unix);
        }
    }

    /// Records a successful save of the slot's cache: nothing is unsaved.
    pub fn mark_saved(&mut self, slot: SlotId) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.usage = 0;
        }
    }

    /// Records a successful restore: the slot holds the owner's cache as of
    /// the restored `file`, so nothing is unsaved.
    pub fn mark_restored(&mut self, slot: SlotId, file: &str) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.usage = 0;
            s.live = true;
            s.fresh = true;
            s.restored_from = Some(file.to_string());
            s.client = None;
            // The restored cache is the owner's alone, and kvgate does not
            // know its text.
            s.members.clear();
            s.prompt = None;
        }
    }

    /// Records that the slot's cache is gone (a failed restore clears it).
    pub fn mark_empty(&mut self, slot: SlotId) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.lose_cache();
        }
    }

    /// The upstream restarted: every cache is gone. Owners keep their slots
    /// (affinity) but must restore; nothing is left to save.
    pub fn invalidate_all(&mut self) {
        for s in &mut self.slots {
            s.lose_cache();
            s.usage = 0;
        }
    }

    /// Reconciles with llama-server's `/slots`: a slot kvgate believes holds
    /// a live cache but llama-server reports empty has lost it (a restart
    /// between polls, or idle-slot clearing). `observed_empty[i]` is what the
    /// poll saw; `ticks_before[i]` is slot i's `last_used` when the poll was
    /// sent, so a slot granted since then is left alone. Returns the slots
    /// marked lost; their unsaved messages are gone with the cache.
    pub fn reconcile(&mut self, observed_empty: &[bool], ticks_before: &[u64]) -> Vec<SlotId> {
        let mut lost = Vec::new();
        for (id, s) in self.slots.iter_mut().enumerate() {
            let (Some(&empty), Some(&tick)) = (observed_empty.get(id), ticks_before.get(id)) else {
                continue;
            };
            if empty && s.live && !s.fresh && s.lease.is_none() && s.last_used == tick {
                s.lose_cache();
                s.usage = 0;
                lost.push(id);
            }
        }
        lost
    }

    /// Adopts a new slot count (first contact, or an upstream restarted with
    /// another `-np`). Existing leases on removed slots are dropped from the
    /// table; their holders' releases become no-ops. Returns the grants the
    /// new slots allow.
    pub fn resize(&mut self, n: usize) -> Vec<(Ticket, Grant)> {
        self.slots.resize_with(n, Slot::default);
        let len = self.slots.len();
        self.queue
            .retain(|w| !matches!(w.want, Want::Pinned(s) | Want::Hold(s) if s >= len));
        self.dispatch()
    }

    /// Serves waiters in FIFO order. Two passes: first those whose slot is
    /// already theirs (resident or pinned) and idle, then newcomers, so a
    /// newcomer never evicts a slot whose owner is being served in this pass.
    /// A client's resident tenant steps back for an older newcomer of
    /// another client holding no more slots, so one client queueing its
    /// residents' next turns can't keep every slot forever.
    fn dispatch(&mut self) -> Vec<(Ticket, Grant)> {
        let mut grants = Vec::new();
        // A resident that stepped back may have its slot once the newcomer
        // it waited for is served elsewhere: repeat until nothing moves.
        loop {
            let before = grants.len();
            self.serve_residents(&mut grants);
            self.serve_newcomers(&mut grants);
            if grants.len() == before {
                return grants;
            }
        }
    }

    /// The first pass: waiters whose slot is theirs (resident or pinned)
    /// and idle.
    fn serve_residents(&mut self, grants: &mut Vec<(Ticket, Grant)>) {
        let mut i = 0;
        while i < self.queue.len() {
            match self.target(&self.queue[i].want) {
                Some(slot) => {
                    if self.slots[slot].lease.is_none() && !self.steps_back(i) {
                        let w = self.queue.remove(i).expect("index in range");
                        let g = self.grant(slot, &w);
                        grants.push((w.ticket, g));
                    } else {
                        i += 1;
                    }
                }
                None => i += 1,
            }
        }
    }

    /// The second pass: newcomers, fairest first, while a slot is idle.
    fn serve_newcomers(&mut self, grants: &mut Vec<(Ticket, Grant)>) {
        while let Some(i) = self.next_newcomer() {
            let slot = match &self.queue[i].want {
                Want::Prompt { tenant, text } if !tenant.is_character() => {
                    self.pick_by_prompt(text)
                }
                _ => self.pick_for_newcomer(),
            };
            // Nothing is idle: no newcomer can be served.
            let Some(slot) = slot else {
                break;
            };
            let w = self.queue.remove(i).expect("index in range");
            let g = self.grant(slot, &w);
            grants.push((w.ticket, g));
        }
    }

    /// Whether the resident waiter at `i` leaves its slot to an older
    /// newcomer of another client holding no more leases (first come, first
    /// served between equals; only between known clients, and kvgate's own
    /// work never steps back).
    fn steps_back(&self, i: usize) -> bool {
        let w = &self.queue[i];
        let a_tenant = match &w.want {
            Want::Tenant(_) => true,
            Want::Prompt { tenant, .. } => tenant.is_character(),
            Want::Pinned(_) | Want::Hold(_) => false,
        };
        if w.by.is_none() || !a_tenant {
            return false;
        }
        let mine = self.leases_of(w.by.as_ref());
        self.queue.iter().take(i).any(|older| {
            older.by.is_some()
                && older.by != w.by
                && self.is_newcomer(&older.want)
                && self.leases_of(older.by.as_ref()) <= mine
        })
    }

    /// The newcomer to serve next: among waiting tenants with no slot yet
    /// (one that became resident during this pass waits behind that slot),
    /// the one whose client holds the fewest leases, first come first among
    /// equals.
    fn next_newcomer(&self) -> Option<usize> {
        self.queue
            .iter()
            .enumerate()
            .filter(|(_, w)| self.is_newcomer(&w.want))
            .min_by_key(|(i, w)| (self.leases_of(w.by.as_ref()), *i))
            .map(|(i, _)| i)
    }

    /// Whether `want` asks for a slot that is not already its own: a tenant
    /// resident nowhere, or a request placed by its prompt.
    fn is_newcomer(&self, want: &Want) -> bool {
        match want {
            Want::Pinned(_) | Want::Hold(_) => false,
            Want::Prompt { tenant, .. } if !tenant.is_character() => true,
            _ => self.target(want).is_none(),
        }
    }

    /// Leases held by `client` (none for kvgate's own work).
    fn leases_of(&self, client: Option<&ClientTag>) -> usize {
        let Some(c) = client else {
            return 0;
        };
        self.slots
            .iter()
            .filter(|s| s.lease.is_some() && s.lease_client.as_ref() == Some(c))
            .count()
    }

    /// Lowest free slot, else the idle slot with least usage, then least
    /// recently used, then lowest id. When that slot has unsaved messages
    /// while another slot is only held for a save (which leaves it clean),
    /// the newcomer waits for that one instead: the wait is shorter than the
    /// save an eviction of the dirty slot would need, and the dirty slot
    /// (usually the latest speaker) stays resident.
    fn pick_for_newcomer(&self) -> Option<SlotId> {
        let idle = || {
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.lease.is_none())
        };
        if let Some((id, _)) = idle().find(|(_, s)| s.owner.is_none()) {
            return Some(id);
        }
        let best = idle().min_by_key(|(id, s)| (s.usage, s.last_used, *id));
        match best {
            Some((_, s)) if s.usage >= 1 && self.slots.iter().any(|x| x.held) => None,
            other => other.map(|(id, _)| id),
        }
    }

    /// For a request no character owns: the idle slot no character holds
    /// whose prompt shares most of `text`, past [`SIMILARITY`], as
    /// llama-server picks; else a free slot, else the least recently used
    /// slot no character holds, and only then a character's (as any
    /// newcomer would).
    fn pick_by_prompt(&self, text: &str) -> Option<SlotId> {
        let unnamed = || {
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.lease.is_none() && !s.holds_character())
        };
        let best = unnamed()
            .map(|(id, s)| (id, shares(s.prompt.as_deref(), text)))
            .filter(|(_, sim)| *sim > SIMILARITY)
            .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
        if let Some((id, _)) = best {
            return Some(id);
        }
        if let Some((id, _)) = unnamed().find(|(_, s)| s.owner.is_none()) {
            return Some(id);
        }
        unnamed()
            .min_by_key(|(id, s)| (s.last_used, *id))
            .map(|(id, _)| id)
            .or_else(|| self.pick_for_newcomer())
    }

    fn grant(&mut self, slot: SlotId, waiter: &Waiter) -> Grant {
        let want = &waiter.want;
        self.tick += 1;
        let lease = self.next_lease;
        self.next_lease += 1;
        // A character moving into a slot its prompt extends leaves its old
        // one: what that held is in the new prompt too.
        let carried = match want {
            Want::Tenant(t) | Want::Prompt { tenant: t, .. }
                if t.is_character() && !self.slots[slot].hosts(t) =>
            {
                self.leave(t, slot)
            }
            _ => 0,
        };
        let s = &mut self.slots[slot];
        s.lease = Some(lease);
        s.held = matches!(want, Want::Hold(_));
        s.lease_client = waiter.by.clone();
        // A save or an inspection is not a use: it must not make the slot
        // look recently used to the eviction order.
        if !s.held {
            s.last_used = self.tick;
        }
        let (resident, evicted) = match want {
            Want::Hold(_) => (s.live, None),
            Want::Prompt { tenant, text } if !tenant.is_character() => {
                if s.holds_character() {
                    (false, s.take_over(Some(tenant.clone())))
                } else {
                    let resident = shares(s.prompt.as_deref(), text) > SIMILARITY && s.live;
                    s.owner = Some(tenant.clone());
                    (resident, None)
                }
            }
            // An admin load or a preload for a member replaces the slot's
            // cache: the owner (with the other members' caches) is evicted
            // and saved first, as for any newcomer.
            Want::Tenant(t) if s.members.contains(t) => {
                let ev = s.take_over(Some(t.clone()));
                (false, ev)
            }
            Want::Tenant(t) | Want::Prompt { tenant: t, .. } if s.hosts(t) => {
                s.promote(t);
                (s.live, None)
            }
            Want::Prompt { tenant, text }
                if tenant.is_character() && s.extendable_by(tenant, text) =>
            {
                // The owner's cache is a prefix of the new prompt: it stays
                // here, as a member, and nothing needs saving.
                let previous = s.owner.replace(tenant.clone()).expect("an owned slot");
                s.members.push(previous);
                s.usage = s.usage.max(carried);
                (true, None)
            }
            // llama-server reuses whatever prefix the slot shares with the
            // prompt; a character's cache taken over is an eviction.
            // A newcomer, or a client pinning the slot, takes it from its
            // owner: report the owner so unsaved messages can be saved first.
            Want::Tenant(t) | Want::Prompt { tenant: t, .. } => {
                (false, s.take_over(Some(t.clone())))
            }
            Want::Pinned(_) => (false, s.take_over(None)),
        };
        if let Want::Prompt { text, .. } = want {
            s.prompt = Some(Arc::clone(text));
        }
        Grant {
            slot,
            lease,
            resident,
            evicted,
            usage: s.usage,
        }
    }

    /// Takes `t` out of every slot but `except` (moving there); returns the
    /// unsaved messages of a slot it owned, which move with it. A slot it
    /// owned goes to its first member, or is free with its contents kept.
    fn leave(&mut self, t: &Tenant, except: SlotId) -> u32 {
        let mut carried = 0;
        for (id, s) in self.slots.iter_mut().enumerate() {
            if id == except {
                continue;
            }
            s.members.retain(|m| m != t);
            if s.owner.as_ref() == Some(t) {
                carried = carried.max(s.usage);
                s.usage = 0;
                s.owner = if s.members.is_empty() {
                    None
                } else {
                    Some(s.members.remove(0))
                };
            }
        }
        carried
    }
}

// === impl Slot (grants) ===

impl Slot {
    /// Makes resident `t` the owner (a member becomes the owner; the owner
    /// becomes a member).
    fn promote(&mut self, t: &Tenant) {
        if self.owner.as_ref() == Some(t) {
            return;
        }
        self.members.retain(|m| m != t);
        if let Some(previous) = self.owner.replace(t.clone()) {
            self.members.push(previous);
        }
    }

    /// Whether character `t`'s prompt `text` extends this idle slot's live
    /// cache of a character of the same chat.
    fn extendable_by(&self, t: &Tenant, text: &str) -> bool {
        self.live && self.same_chat(t) && self.prompt.as_deref().is_some_and(|p| extends(p, text))
    }

    /// Gives the slot and its cache up to `owner`: reports the owner it
    /// had (the evicted, with its unsaved messages); members go with the
    /// cache.
    fn take_over(&mut self, owner: Option<Tenant>) -> Option<Evicted> {
        let previous = std::mem::replace(&mut self.owner, owner);
        let ev = previous.map(|tenant| Evicted {
            tenant,
            usage: self.usage,
            live: self.live,
        });
        self.usage = 0;
        self.lose_cache();
        ev
    }
}

/// The usage rule for a completed generation of `kind`.
pub fn next_usage(usage: u32, kind: Kind) -> u32 {
    match kind {
        Kind::Normal => usage.saturating_add(1),
        Kind::Regenerate | Kind::Swipe | Kind::Continue | Kind::Quiet => usage.max(1),
        Kind::Impersonate => usage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(name: &str) -> Tenant {
        Tenant::Character {
            chat: "c".into(),
            name: name.into(),
        }
    }

    fn want(name: &str) -> Want {
        Want::Tenant(ch(name))
    }

    /// Enqueues and expects an immediate grant.
    fn take(t: &mut SlotTable, w: Want) -> Grant {
        let (ticket, grants) = t.enqueue(w).expect("enqueue");
        grants
            .into_iter()
            .find(|(k, _)| *k == ticket)
            .map(|(_, g)| g)
            .expect("granted at once")
    }

    fn finish(t: &mut SlotTable, g: &Grant, kind: Kind) -> Vec<(Ticket, Grant)> {
        t.release(g.slot, g.lease, Outcome::Generated(kind))
    }

    #[test]
    fn lowest_free_slot_then_resident() {
        let mut t = SlotTable::new(3, 8);
        let a = take(&mut t, want("A"));
        assert_eq!(a.slot, 0);
        assert!(!a.resident);
        finish(&mut t, &a, Kind::Normal);
        let b = take(&mut t, want("B"));
        assert_eq!(b.slot, 1);
        finish(&mut t, &b, Kind::Normal);
        let a2 = take(&mut t, want("A"));
        assert_eq!(a2.slot, 0);
        assert!(a2.resident);
        assert_eq!(a2.evicted, None);
    }

    #[test]
    fn restored_from_lasts_as_long_as_the_restored_cache() {
        let mut t = SlotTable::new(1, 8);
        let from = |t: &SlotTable| t.slots()[0].restored_from.clone();
        let a = take(&mut t, want("A"));
        t.mark_restored(0, "a.bin");
        finish(&mut t, &a, Kind::Normal);
        assert_eq!(from(&t).as_deref(), Some("a.bin"), "generations extend it");
        let a = take(&mut t, want("A"));
        t.release(a.slot, a.lease, Outcome::Failed);
        assert_eq!(from(&t), None, "a failed generation");
        let a = take(&mut t, want("A"));
        t.mark_restored(0, "a.bin");
        t.release(a.slot, a.lease, Outcome::Cleared);
        assert_eq!(from(&t), None, "cleared (chat switch, erase)");
        let a = take(&mut t, want("A"));
        t.mark_restored(0, "a.bin");
        finish(&mut t, &a, Kind::Normal);
        let b = take(&mut t, want("B"));
        assert_eq!(from(&t), None, "another character took the slot");
        t.mark_restored(0, "b.bin");
        finish(&mut t, &b, Kind::Normal);
        t.invalidate_all();
        assert_eq!(from(&t), None, "llama-server restarted");
        let b = take(&mut t, want("B"));
        t.mark_restored(0, "b.bin");
        t.mark_empty(0);
        assert_eq!(from(&t), None, "a failed restore");
        finish(&mut t, &b, Kind::Normal);
    }

    #[test]
    fn evicts_least_usage_then_lru() {
        let mut t = SlotTable::new(2, 8);
        let a = take(&mut t, want("A"));
        finish(&mut t, &a, Kind::Normal);
        let a = take(&mut t, want("A"));
        finish(&mut t, &a, Kind::Normal); // A usage 2
        let b = take(&mut t, want("B"));
        finish(&mut t, &b, Kind::Normal); // B usage 1
        let c = take(&mut t, want("C"));
        assert_eq!(c.slot, 1, "B has the smallest usage");
        assert_eq!(
            c.evicted,
            Some(Evicted {
                tenant: ch("B"),
                usage: 1,
                live: true
            })
        );
        finish(&mut t, &c, Kind::Normal); // C usage 1, A usage 2
        t.mark_saved(0); // A usage 0
        let d = take(&mut t, want("D"));
        assert_eq!(d.slot, 0);
        finish(&mut t, &d, Kind::Impersonate); // D usage 0
        t.mark_saved(1); // C usage 0 too: tie, D used more recently
        let e = take(&mut t, want("E"));
        assert_eq!(e.slot, 1, "tie on usage goes to the least recently used");
    }

    #[test]
    fn busy_slots_are_never_evicted_and_waiters_are_fifo() {
        let mut t = SlotTable::new(2, 8);
        let a = take(&mut t, want("A"));
        let b = take(&mut t, want("B"));
        let (tc, g) = t.enqueue(want("C")).unwrap();
        assert!(g.is_empty(), "both slots busy: C waits");
        let (td, g) = t.enqueue(want("D")).unwrap();
        assert!(g.is_empty());
        let (ta2, g) = t.enqueue(want("A")).unwrap();
        assert!(g.is_empty(), "A's own slot is busy: A waits behind it");
        // B finishes: C (first in line) takes slot 1, D still waits.
        let grants = finish(&mut t, &b, Kind::Normal);
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].0, tc);
        assert_eq!(grants[0].1.slot, 1);
        // A finishes: A's waiter gets its slot back before D may evict it.
        let grants = finish(&mut t, &a, Kind::Normal);
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].0, ta2);
        assert!(grants[0].1.resident);
        assert_eq!(t.queued(), 1);
        assert!(!t.cancel(tc), "granted tickets are no longer queued");
        assert!(t.cancel(td));
    }

    #[test]
    fn queue_bound_refuses_extra_waiters() {
        let mut t = SlotTable::new(1, 1);
        let _a = take(&mut t, want("A"));
        assert!(t.enqueue(want("B")).unwrap().1.is_empty());
        assert_eq!(
            t.enqueue(want("C")),
            Err(TableError::QueueFull {
                slots: 1,
                queued: 1
            })
        );
        assert_eq!(t.queued(), 1);
    }

    #[test]
    fn one_client_cannot_fill_the_queue_for_everyone() {
        let mut t = SlotTable::new(2, 4);
        t.set_client_bound(2);
        let greedy = Some(ClientTag::from("client-greedy"));
        let by = |t: &mut SlotTable, w: Want, c: &Option<ClientTag>| t.enqueue_by(w, c.clone());
        // Two generations hold both slots, two more wait: the greedy
        // client's share.
        for name in ["A", "B", "C", "D"] {
            by(&mut t, want(name), &greedy).unwrap();
        }
        assert_eq!(
            by(&mut t, want("E"), &greedy).unwrap_err(),
            TableError::ClientQueueFull { queued: 2 }
        );
        // Another client still gets in line, and so does kvgate's own work.
        let other = Some(ClientTag::from("client-other"));
        by(&mut t, want("F"), &other).unwrap();
        t.enqueue(want("G")).unwrap();
        assert_eq!(t.queued(), 4);
    }

    #[test]
    fn a_freed_slot_goes_to_the_client_holding_fewest() {
        let mut t = SlotTable::new(2, 8);
        let greedy = Some(ClientTag::from("client-greedy"));
        let other = Some(ClientTag::from("client-other"));
        let (t1, g) = t.enqueue_by(want("A"), greedy.clone()).unwrap();
        let a = g.into_iter().find(|(k, _)| *k == t1).unwrap().1;
        t.enqueue_by(want("B"), greedy.clone()).unwrap();
        // The greedy client queues first, the other client after it.
        let (greedy_next, _) = t.enqueue_by(want("C"), greedy.clone()).unwrap();
        let (other_next, _) = t.enqueue_by(want("D"), other.clone()).unwrap();
        let grants = finish(&mut t, &a, Kind::Normal);
        assert_eq!(grants.len(), 1);
        assert_eq!(
            grants[0].0, other_next,
            "the client with no slot goes before the one holding one"
        );
        assert!(t.is_queued(greedy_next));
        // The table remembers whose work each slot shows, once it is done.
        let d = grants[0].1.clone();
        let me = other.clone().unwrap();
        assert!(!t.shown_to(d.slot, &me), "not before the generation ends");
        assert!(t.cancel(greedy_next));
        finish(&mut t, &d, Kind::Normal);
        assert!(t.shown_to(d.slot, &me));
        let greedy_tag = greedy.clone().unwrap();
        assert!(!t.shown_to(d.slot, &greedy_tag));
        // Another client's lease hides it again; an erase forgets it.
        let (tk, g) = t.enqueue_by(Want::Pinned(d.slot), greedy.clone()).unwrap();
        let pinned = g.into_iter().find(|(k, _)| *k == tk).map(|(_, g)| g);
        if let Some(p) = pinned {
            assert!(!t.shown_to(d.slot, &me), "someone else works in it");
            t.release(p.slot, p.lease, Outcome::Cleared);
            assert!(!t.shown_to(d.slot, &me), "erased: nobody's");
        }
    }

    #[test]
    fn a_clients_queued_residents_step_back_for_an_older_newcomer() {
        let mut t = SlotTable::new(1, 8);
        let greedy = Some(ClientTag::from("client-greedy"));
        let other = Some(ClientTag::from("client-other"));
        let (t1, g) = t.enqueue_by(want("A"), greedy.clone()).unwrap();
        let a = g.into_iter().find(|(k, _)| *k == t1).unwrap().1;
        // The other client's newcomer waits first, then the greedy client's
        // next turn for its resident character.
        let (newcomer, _) = t.enqueue_by(want("B"), other.clone()).unwrap();
        let (again, _) = t.enqueue_by(want("A"), greedy.clone()).unwrap();
        let grants = finish(&mut t, &a, Kind::Normal);
        assert_eq!(grants.len(), 1);
        assert_eq!(
            grants[0].0, newcomer,
            "the slot is not kept by the resident"
        );
        assert!(t.is_queued(again));
        // Without known clients the resident goes first, as always.
        let mut t = SlotTable::new(1, 8);
        let a = take(&mut t, want("A"));
        t.enqueue(want("B")).unwrap();
        let (again, _) = t.enqueue(want("A")).unwrap();
        let grants = finish(&mut t, &a, Kind::Normal);
        assert_eq!(grants[0].0, again);
    }

    #[test]
    fn usage_rules_per_kind() {
        assert_eq!(next_usage(0, Kind::Normal), 1);
        assert_eq!(next_usage(3, Kind::Normal), 4);
        for k in [Kind::Regenerate, Kind::Swipe, Kind::Continue, Kind::Quiet] {
            assert_eq!(next_usage(0, k), 1, "{k:?} counts when 0");
            assert_eq!(next_usage(2, k), 2, "{k:?} does not count otherwise");
        }
        assert_eq!(next_usage(0, Kind::Impersonate), 0);
        assert_eq!(next_usage(5, Kind::Impersonate), 5);
    }

    #[test]
    fn anonymous_never_counts() {
        let mut t = SlotTable::new(1, 4);
        let g = take(&mut t, Want::Tenant(Tenant::Anonymous { key: "x".into() }));
        finish(&mut t, &g, Kind::Normal);
        assert_eq!(t.slots()[0].usage, 0);
    }

    #[test]
    fn pinned_waits_for_busy_slot_and_clears_owner() {
        let mut t = SlotTable::new(2, 4);
        let a = take(&mut t, want("A"));
        let (tp, g) = t.enqueue(Want::Pinned(0)).unwrap();
        assert!(g.is_empty(), "pinned request waits for the busy slot");
        let grants = finish(&mut t, &a, Kind::Normal);
        assert_eq!(grants[0].0, tp);
        let p = &grants[0].1;
        assert_eq!(
            p.evicted.as_ref().map(|e| (e.tenant.clone(), e.usage)),
            Some((ch("A"), 1)),
            "the owner's unsaved message is reported"
        );
        t.release(p.slot, p.lease, Outcome::Cleared);
        assert_eq!(t.slots()[0].owner, None);
        let a2 = take(&mut t, want("A"));
        assert!(!a2.resident, "A lost its cache to the pinned request");
        assert_eq!(a2.slot, 0, "lowest free slot");
        assert_eq!(t.enqueue(Want::Pinned(7)), Err(TableError::NoSuchSlot(7)));
    }

    #[test]
    fn hold_keeps_the_owner_and_serialises() {
        let mut t = SlotTable::new(1, 4);
        let a = take(&mut t, want("A"));
        let (th, g) = t.enqueue(Want::Hold(0)).unwrap();
        assert!(g.is_empty(), "waits for A's generation");
        let grants = finish(&mut t, &a, Kind::Normal);
        assert_eq!(grants[0].0, th);
        let h = &grants[0].1;
        assert_eq!(h.evicted, None);
        assert!(h.resident);
        t.mark_saved(0);
        t.release(h.slot, h.lease, Outcome::Untouched);
        assert_eq!(t.slots()[0].owner, Some(ch("A")));
        assert_eq!(t.slots()[0].usage, 0);
        let a2 = take(&mut t, want("A"));
        assert!(a2.resident);
    }

    #[test]
    fn a_newcomer_waits_for_a_slot_being_saved_rather_than_evict_a_dirty_one() {
        let mut t = SlotTable::new(2, 4);
        let a = take(&mut t, want("A"));
        finish(&mut t, &a, Kind::Normal); // A dirty (usage 1)
        let b = take(&mut t, want("B"));
        finish(&mut t, &b, Kind::Normal); // B dirty
                                          // A save of B is under way (save-behind): C must not evict dirty A.
        let hold = take(&mut t, Want::Hold(1));
        let (tc, g) = t.enqueue(want("C")).unwrap();
        assert!(g.is_empty(), "C waits for B's save");
        t.mark_saved(1);
        let grants = t.release(hold.slot, hold.lease, Outcome::Untouched);
        assert_eq!(grants[0].0, tc);
        assert_eq!(grants[0].1.slot, 1, "C takes the slot that was just saved");
        assert_eq!(
            grants[0].1.evicted.as_ref().map(|e| e.usage),
            Some(0),
            "no save needed"
        );
        assert_eq!(t.slots()[0].owner, Some(ch("A")), "A stays resident");
        // Without a save under way, a dirty slot is evicted as usual.
        let mut t = SlotTable::new(1, 4);
        let a = take(&mut t, want("A"));
        finish(&mut t, &a, Kind::Normal);
        assert_eq!(take(&mut t, want("C")).evicted.map(|e| e.usage), Some(1));
    }

    #[test]
    fn stale_release_changes_nothing() {
        let mut t = SlotTable::new(1, 4);
        let a = take(&mut t, want("A"));
        t.release(a.slot, a.lease + 100, Outcome::Cleared);
        assert_eq!(t.slots()[0].lease, Some(a.lease));
        finish(&mut t, &a, Kind::Normal);
        finish(&mut t, &a, Kind::Normal);
        assert_eq!(t.slots()[0].usage, 1, "double release is ignored");
    }

    #[test]
    fn failure_and_restart_mark_unknown() {
        let mut t = SlotTable::new(2, 4);
        let a = take(&mut t, want("A"));
        t.release(a.slot, a.lease, Outcome::Failed);
        let a = take(&mut t, want("A"));
        assert!(!a.resident, "contents unknown after a failure");
        finish(&mut t, &a, Kind::Normal);
        t.invalidate_all();
        assert_eq!(t.slots()[0].usage, 0);
        let a = take(&mut t, want("A"));
        assert_eq!(a.slot, 0, "affinity survives a restart");
        assert!(!a.resident);
    }

    #[test]
    fn reconcile_marks_only_untouched_live_slots_lost() {
        let mut t = SlotTable::new(3, 4);
        for n in ["A", "B", "C"] {
            let g = take(&mut t, want(n));
            finish(&mut t, &g, Kind::Normal);
        }
        let ticks: Vec<u64> = t.slots().iter().map(|s| s.last_used).collect();
        // B is used again after the poll was sent: its emptiness is stale.
        let b = take(&mut t, want("B"));
        finish(&mut t, &b, Kind::Normal);
        let lost = t.reconcile(&[true, true, false], &ticks);
        assert_eq!(lost, vec![0]);
        assert!(!t.slots()[0].live);
        assert_eq!(t.slots()[0].usage, 0);
        assert!(t.slots()[1].live && t.slots()[2].live);
    }

    #[test]
    fn same_new_tenant_twice_shares_one_slot() {
        let mut t = SlotTable::new(2, 4);
        let (t1, g1) = t.enqueue(want("A")).unwrap();
        let (t2, g2) = t.enqueue(want("A")).unwrap();
        assert_eq!(g1.len(), 1);
        assert_eq!(g1[0].0, t1);
        assert!(g2.is_empty(), "second A waits behind the first");
        let grants = finish(&mut t, &g1[0].1, Kind::Normal);
        assert_eq!(grants[0].0, t2);
        assert_eq!(grants[0].1.slot, 0);
        assert!(grants[0].1.resident);
    }

    #[test]
    fn resize_keeps_owners_and_serves_waiters() {
        let mut t = SlotTable::new(0, 4);
        assert_eq!(t.enqueue(want("A")), Err(TableError::NoSlots));
        let grants = t.resize(2);
        assert!(grants.is_empty());
        let a = take(&mut t, want("A"));
        let _b = take(&mut t, want("B"));
        let (tc, g) = t.enqueue(want("C")).unwrap();
        assert!(g.is_empty());
        let grants = t.resize(3);
        assert_eq!(grants[0].0, tc);
        assert_eq!(grants[0].1.slot, 2);
        assert_eq!(t.slots()[a.slot].owner, Some(ch("A")));
    }

    mod by_prompt {
        //! Requests no character owns, placed as llama-server places them.
        use super::*;

        fn anon(key: &str, text: &str) -> Want {
            Want::Prompt {
                tenant: Tenant::Anonymous { key: key.into() },
                text: Arc::from(text),
            }
        }

        const SYSTEM: &str = "You are a helpful assistant. Answer briefly and kindly.";

        #[test]
        fn a_prompt_goes_where_its_prefix_is() {
            let mut t = SlotTable::new(3, 8);
            let a = take(&mut t, anon("a", &format!("{SYSTEM} Q: one")));
            let b = take(&mut t, anon("b", "something else entirely, at length"));
            finish(&mut t, &a, Kind::Quiet);
            finish(&mut t, &b, Kind::Quiet);
            assert_eq!((a.slot, b.slot), (0, 1));
            // Another key (its start differs past a short common part) but
            // most of its text is slot 0's: llama-server would take slot 0.
            let c = take(&mut t, anon("c", &format!("{SYSTEM} Q: two")));
            assert_eq!(c.slot, 0);
            assert!(c.resident, "the shared prefix is reused");
            assert_eq!(c.evicted, None, "no character was there");
            assert_eq!(
                t.slots()[0].usage,
                0,
                "requests no character owns never count"
            );
        }

        #[test]
        fn it_never_waits_behind_its_own_busy_slot() {
            let mut t = SlotTable::new(2, 8);
            let a = take(&mut t, anon("a", SYSTEM));
            finish(&mut t, &a, Kind::Quiet);
            let a1 = take(&mut t, anon("a", SYSTEM));
            let a2 = take(&mut t, anon("a", SYSTEM));
            assert_eq!(a1.slot, 0);
            assert_eq!(
                a2.slot, 1,
                "the same prompt again runs beside it, as llama-server would"
            );
            let (_, g) = t.enqueue(anon("a", SYSTEM)).unwrap();
            assert!(g.is_empty(), "all slots busy: it waits");
            let grants = finish(&mut t, &a1, Kind::Quiet);
            assert_eq!(grants.len(), 1);
            assert_eq!(grants[0].1.slot, 0);
        }

        #[test]
        fn characters_are_kept_while_an_unnamed_slot_is_idle() {
            let mut t = SlotTable::new(3, 8);
            let x = take(&mut t, want("X"));
            let a = take(&mut t, anon("a", "first anonymous prompt"));
            let b = take(&mut t, anon("b", "second anonymous prompt, unrelated"));
            for g in [&x, &a, &b] {
                finish(&mut t, g, Kind::Normal);
            }
            let a = take(&mut t, anon("a", "first anonymous prompt"));
            finish(&mut t, &a, Kind::Quiet);
            // Shares nothing: the least recently used unnamed slot (b's),
            // not X's, although X is older.
            let c = take(&mut t, anon("c", "zzz"));
            assert_eq!(c.slot, b.slot);
            assert_eq!(c.evicted, None);
            assert!(!c.resident);
            assert_eq!(t.slots()[x.slot].owner, Some(ch("X")));
            // With every unnamed slot busy, a character's slot is taken
            // (and reported, so its unsaved messages are saved first).
            let a = take(&mut t, anon("a", "first anonymous prompt"));
            assert!(a.resident);
            let d = take(&mut t, anon("d", "qqq"));
            assert_eq!(d.slot, x.slot);
            assert_eq!(d.evicted.as_ref().map(|e| e.tenant.clone()), Some(ch("X")));
            // And a character goes back to its own slot's rules meanwhile.
            finish(&mut t, &d, Kind::Quiet);
            assert_eq!(t.resident(&ch("X")), None);
        }

        #[test]
        fn a_small_share_is_not_enough() {
            let mut t = SlotTable::new(2, 8);
            let a = take(&mut t, anon("a", "0123456789"));
            finish(&mut t, &a, Kind::Quiet);
            // 1 byte of 10 in common is a share of 0.1, not more than it:
            // the free slot, as llama-server's LRU would pick.
            let b = take(&mut t, anon("b", "0abcdefghi"));
            assert_eq!(b.slot, 1);
            finish(&mut t, &b, Kind::Quiet);
            let c = take(&mut t, anon("c", "01xxxxxxxx"));
            assert_eq!(c.slot, 0, "2 of 10 is past the threshold");
            assert!(c.resident);
        }

        #[test]
        fn a_failure_forgets_the_prompt() {
            let mut t = SlotTable::new(2, 8);
            let a = take(&mut t, anon("a", SYSTEM));
            t.release(a.slot, a.lease, Outcome::Failed);
            assert_eq!(t.slots()[0].prompt, None);
            let b = take(&mut t, anon("a", SYSTEM));
            assert!(!b.resident);
        }
    }

    mod shared_prefix {
        //! Characters whose prompts extend each other share one slot.
        use super::*;

        fn said(name: &str, text: &str) -> Want {
            Want::Prompt {
                tenant: ch(name),
                text: Arc::from(text),
            }
        }

        const STORY: &str = "A fictional chat between Anna, Ben, Cleo and User. Anna's card. Ben's card. Cleo's card.\n***\n";

        fn turn(history: &str, name: &str) -> String {
            format!("{STORY}{history}{name}:")
        }

        #[test]
        fn speakers_of_one_history_share_a_slot() {
            let mut t = SlotTable::new(2, 8);
            let mut history = String::from("User: hello all\n");
            let mut slots = Vec::new();
            for name in ["Anna", "Ben", "Cleo", "Anna", "Ben"] {
                let g = take(&mut t, said(name, &turn(&history, name)));
                assert_eq!(g.evicted, None, "{name}: nothing is evicted");
                slots.push(g.slot);
                finish(&mut t, &g, Kind::Normal);
                history.push_str(&format!("{name}: a reply of {name}'s\n"));
            }
            assert_eq!(slots, vec![0; 5], "one slot serves the whole chat");
            let s = &t.slots()[0];
            assert_eq!(s.owner, Some(ch("Ben")));
            assert_eq!(s.members.len(), 2, "{:?}", s.members);
            assert_eq!(t.resident(&ch("Anna")), Some(0));
            assert_eq!(t.resident(&ch("Cleo")), Some(0));
            assert_eq!(s.usage, 5, "the slot's unsaved messages");
            assert_eq!(t.slots()[1].owner, None, "the other slot stays free");
        }

        #[test]
        fn a_move_is_resident_and_a_member_comes_back_resident() {
            let mut t = SlotTable::new(2, 8);
            let a = take(&mut t, said("Anna", &turn("User: hi\n", "Anna")));
            finish(&mut t, &a, Kind::Normal);
            let b = take(&mut t, said("Ben", &turn("User: hi\nAnna: hey\n", "Ben")));
            assert_eq!(b.slot, 0);
            assert!(b.resident, "Anna's cache holds Ben's prompt but its tail");
            finish(&mut t, &b, Kind::Normal);
            let a = take(
                &mut t,
                said("Anna", &turn("User: hi\nAnna: hey\nBen: yo\n", "Anna")),
            );
            assert_eq!((a.slot, a.resident, a.evicted.clone()), (0, true, None));
            assert_eq!(t.slots()[0].owner, Some(ch("Anna")));
            assert_eq!(t.slots()[0].members, vec![ch("Ben")]);
        }

        #[test]
        fn own_cards_first_keep_their_own_slots() {
            let mut t = SlotTable::new(2, 8);
            let a = take(
                &mut t,
                said(
                    "Anna",
                    "Write Anna's next reply. Anna's card.\n***\nUser: hi\nAnna:",
                ),
            );
            finish(&mut t, &a, Kind::Normal);
            let b = take(
                &mut t,
                said(
                    "Ben",
                    "Write Ben's next reply. Ben's card.\n***\nUser: hi\nAnna: hey\nBen:",
                ),
            );
            assert_eq!(b.slot, 1, "swap mode: no shared prefix");
            assert!(t.slots()[0].members.is_empty());
        }

        #[test]
        fn another_chat_is_never_extended() {
            let mut t = SlotTable::new(2, 8);
            let a = take(&mut t, said("Anna", &turn("User: hi\n", "Anna")));
            finish(&mut t, &a, Kind::Normal);
            let other = Tenant::Character {
                chat: "other".into(),
                name: "Ben".into(),
            };
            let text: Arc<str> = Arc::from(turn("User: hi\nAnna: hey\n", "Ben"));
            let b = take(
                &mut t,
                Want::Prompt {
                    tenant: other,
                    text,
                },
            );
            assert_eq!(b.slot, 1);
        }

        #[test]
        fn an_extended_slot_keeps_its_unsaved_messages() {
            let mut t = SlotTable::new(3, 8);
            for _ in 0..2 {
                let b = take(&mut t, said("Ben", &turn("User: hi\n", "Ben")));
                finish(&mut t, &b, Kind::Normal);
            }
            assert_eq!(t.slots()[0].usage, 2);
            let a = take(
                &mut t,
                said("Anna", &turn("User: hi\nBen: x\nUser: more\n", "Anna")),
            );
            assert_eq!(
                (a.slot, a.evicted.clone()),
                (0, None),
                "Anna extends Ben's slot"
            );
            finish(&mut t, &a, Kind::Normal);
            assert_eq!(t.resident(&ch("Ben")), Some(0));
            assert_eq!(t.slots()[0].usage, 3, "nothing unsaved is forgotten");
        }

        #[test]
        fn a_character_whose_slot_is_busy_waits_for_it() {
            let mut t = SlotTable::new(2, 8);
            let a = take(&mut t, said("Anna", &turn("User: hi\n", "Anna")));
            finish(&mut t, &a, Kind::Normal);
            let b = take(&mut t, Want::Tenant(ch("Ben")));
            assert_eq!(b.slot, 1);
            // Ben's slot is busy; his prompt extends Anna's idle slot, but
            // his requests are serialised: he waits for his own.
            let (ticket, g) = t
                .enqueue(said("Ben", &turn("User: hi\nAnna: hey\n", "Ben")))
                .unwrap();
            assert!(g.is_empty(), "{g:?}");
            let grants = t.release(b.slot, b.lease, Outcome::Generated(Kind::Normal));
            assert_eq!(grants.len(), 1);
            assert_eq!(grants[0].0, ticket);
            assert_eq!(grants[0].1.slot, 0, "then the better slot");
        }

        #[test]
        fn a_load_for_a_member_evicts_the_owner_and_a_restore_forgets_the_members() {
            let mut t = SlotTable::new(1, 8);
            let a = take(&mut t, said("Anna", &turn("User: hi\n", "Anna")));
            finish(&mut t, &a, Kind::Normal);
            let b = take(&mut t, said("Ben", &turn("User: hi\nAnna: hey\n", "Ben")));
            finish(&mut t, &b, Kind::Normal);
            // An admin load (or a preload) for Anna, a member: Ben's cache
            // (hers inside) is replaced, so Ben is evicted and saved first.
            let load = take(&mut t, Want::Tenant(ch("Anna")));
            assert_eq!(
                load.evicted.as_ref().map(|e| (e.tenant.clone(), e.usage)),
                Some((ch("Ben"), 2))
            );
            t.mark_restored(0, "anna.bin");
            let s = &t.slots()[0];
            assert!(s.members.is_empty() && s.prompt.is_none(), "{s:?}");
            assert_eq!(t.resident(&ch("Ben")), None);
        }

        #[test]
        fn an_eviction_takes_the_members_with_the_cache() {
            let mut t = SlotTable::new(1, 8);
            let a = take(&mut t, said("Anna", &turn("User: hi\n", "Anna")));
            finish(&mut t, &a, Kind::Normal);
            let b = take(&mut t, said("Ben", &turn("User: hi\nAnna: hey\n", "Ben")));
            finish(&mut t, &b, Kind::Normal);
            let x = take(
                &mut t,
                Want::Tenant(Tenant::Character {
                    chat: "z".into(),
                    name: "Xena".into(),
                }),
            );
            assert_eq!(
                x.evicted.as_ref().map(|e| (e.tenant.clone(), e.usage)),
                Some((ch("Ben"), 2))
            );
            assert_eq!(
                t.resident(&ch("Anna")),
                None,
                "Anna's cache left with Ben's"
            );
        }

        #[test]
        fn a_character_leaves_its_slot_for_a_better_one() {
            let mut t = SlotTable::new(2, 8);
            let a = take(&mut t, said("Anna", &turn("User: hi\n", "Anna")));
            finish(&mut t, &a, Kind::Normal);
            // Ben comes in through another door (an admin load): slot 1.
            let b = take(&mut t, Want::Tenant(ch("Ben")));
            assert_eq!(b.slot, 1);
            t.release(b.slot, b.lease, Outcome::Generated(Kind::Normal));
            // Ben's prompt extends Anna's, and his own slot has no prompt
            // kvgate knows: slot 0 holds more of it.
            let b = take(&mut t, said("Ben", &turn("User: hi\nAnna: hey\n", "Ben")));
            assert_eq!(b.slot, 0);
            assert_eq!(t.slots()[1].owner, None, "his old slot is free");
            assert_eq!(t.slots()[1].usage, 0);
            assert_eq!(t.slots()[0].usage, 1, "his unsaved message moved with him");
        }
    }

    mod clients {
        //! Random interleavings of several known clients' requests: the
        //! per-client bound always holds, no slot is leased twice, and no
        //! newcomer waits while a slot is free.
        use super::*;
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum Op {
            Enqueue {
                client: usize,
                tenant: usize,
            },
            Anonymous {
                client: usize,
                text: usize,
            },
            Said {
                client: usize,
                name: usize,
                turn: usize,
            },
            Release(usize),
            Cancel(usize),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (0..4usize, 0..6usize).prop_map(|(client, tenant)| Op::Enqueue { client, tenant }),
                2 => (0..4usize, 0..3usize).prop_map(|(client, text)| Op::Anonymous { client, text }),
                3 => (0..4usize, 0..3usize, 0..5usize).prop_map(|(client, name, turn)| Op::Said { client, name, turn }),
                3 => (0..8usize).prop_map(Op::Release),
                1 => (0..8usize).prop_map(Op::Cancel),
            ]
        }

        proptest! {
            #[test]
            fn bounds_hold_and_free_slots_are_used(ops in proptest::collection::vec(op(), 1..80)) {
                let mut t = SlotTable::new(2, 6);
                t.set_client_bound(2);
                let tags: Vec<Option<ClientTag>> = vec![
                    None,
                    Some(ClientTag::from("a")),
                    Some(ClientTag::from("b")),
                    Some(ClientTag::from("c")),
                ];
                let mut leases: Vec<Grant> = Vec::new();
                let mut waiting: Vec<(Ticket, Option<ClientTag>, Tenant)> = Vec::new();
                for op in ops {
                    let grants = match op {
                        Op::Enqueue { client, tenant } => {
                            let by = tags[client].clone();
                            let name = format!("T{tenant}");
                            match t.enqueue_by(want(&name), by.clone()) {
                                Ok((ticket, grants)) => {
                                    waiting.push((ticket, by, ch(&name)));
                                    grants
                                }
                                Err(TableError::ClientQueueFull { queued }) => {
                                    prop_assert!(by.is_some());
                                    prop_assert_eq!(queued, 2);
                                    Vec::new()
                                }
                                Err(TableError::QueueFull { .. }) => Vec::new(),
                                Err(e) => return Err(TestCaseError::fail(e.to_string())),
                            }
                        }
                        Op::Said { client, name, turn } => {
                            // One shared history: later turns extend earlier ones.
                            let by = tags[client].clone();
                            let who = ["S0", "S1", "S2"][name];
                            let history: String = (0..turn).map(|i| format!("line {i}\n")).collect();
                            let tenant = ch(who);
                            let w = Want::Prompt {
                                tenant: tenant.clone(),
                                text: Arc::from(format!("shared story\n{history}{who}:")),
                            };
                            match t.enqueue_by(w, by.clone()) {
                                Ok((ticket, grants)) => {
                                    waiting.push((ticket, by, tenant));
                                    grants
                                }
                                Err(TableError::ClientQueueFull { .. } | TableError::QueueFull { .. }) => Vec::new(),
                                Err(e) => return Err(TestCaseError::fail(e.to_string())),
                            }
                        }
                        Op::Anonymous { client, text } => {
                            let by = tags[client].clone();
                            let tenant = Tenant::Anonymous { key: format!("k{text}") };
                            let w = Want::Prompt {
                                tenant: tenant.clone(),
                                text: Arc::from(["shared prefix: a", "shared prefix: b", "other"][text]),
                            };
                            match t.enqueue_by(w, by.clone()) {
                                Ok((ticket, grants)) => {
                                    waiting.push((ticket, by, tenant));
                                    grants
                                }
                                Err(TableError::ClientQueueFull { .. } | TableError::QueueFull { .. }) => Vec::new(),
                                Err(e) => return Err(TestCaseError::fail(e.to_string())),
                            }
                        }
                        Op::Release(i) if !leases.is_empty() => {
                            let g = leases.remove(i % leases.len());
                            t.release(g.slot, g.lease, Outcome::Generated(Kind::Normal))
                        }
                        Op::Cancel(i) if !waiting.is_empty() => {
                            let ticket = waiting[i % waiting.len()].0;
                            t.cancel(ticket);
                            Vec::new()
                        }
                        _ => Vec::new(),
                    };
                    for (ticket, g) in grants {
                        prop_assert!(
                            leases.iter().all(|l| l.slot != g.slot),
                            "slot {} leased twice", g.slot
                        );
                        leases.push(g);
                        waiting.retain(|(w, _, _)| *w != ticket);
                    }
                    waiting.retain(|(w, _, _)| t.is_queued(*w));
                    for tag in tags.iter().flatten() {
                        let n = waiting.iter().filter(|(_, by, _)| by.as_ref() == Some(tag)).count();
                        prop_assert!(n <= 2, "client {} has {} waiting", tag, n);
                    }
                    // A newcomer (its character in no slot) never waits
                    // while a slot is free.
                    if waiting.iter().any(|(_, _, tenant)| t.resident(tenant).is_none()) {
                        prop_assert!(
                            t.slots().iter().all(|s| s.lease.is_some() || s.owner.is_some()),
                            "a newcomer waits while a slot is free: {:?}", t.slots()
                        );
                    }
                    // Nobody is resident twice; a member is never the owner
                    // and lives only in a character's slot.
                    for s in t.slots() {
                        if let Some(o) = &s.owner {
                            prop_assert!(!s.members.contains(o), "owner among members: {:?}", s);
                        }
                        prop_assert!(s.members.is_empty() || s.holds_character(), "{:?}", s);
                    }
                    for who in ["S0", "S1", "S2", "T0", "T1", "T2", "T3", "T4", "T5"] {
                        let n = t.slots().iter().filter(|s| s.hosts(&ch(who))).count();
                        prop_assert!(n <= 1, "{} resident in {} slots: {:?}", who, n, t.slots());
                    }
                    // A request no character owns never waits while any
                    // slot is idle.
                    if waiting.iter().any(|(_, _, tenant)| !tenant.is_character()) {
                        prop_assert!(
                            t.slots().iter().all(|s| s.lease.is_some()),
                            "an anonymous request waits beside an idle slot: {:?}", t.slots()
                        );
                    }
                }
            }
        }
    }
}
