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

use super::content::SIMILARITY;
use super::content::{extends, extends_by, reuse, shares, MOVE_GAIN_BYTES};
use super::ram::{RamCache, Stashed, MIN_SHARE};
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
    /// Set when the tenant's cache should come back from llama-server's RAM
    /// prompt cache (see [`super::ram`]): no disk restore. The share of the
    /// prompt kvgate expects cached there, in percent, to tell a miss.
    pub from_ram: Option<u8>,
    /// [`RamCache::epoch`] at grant time, for [`SlotTable::ram_missed`].
    pub ram_epoch: u64,
}

impl Grant {
    /// Whether the tenant's cache must come from disk before it generates:
    /// it is not in the slot, and llama-server's RAM cache won't bring it.
    pub fn needs_restore(&self) -> bool {
        !self.resident && self.from_ram.is_none()
    }
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
    /// What llama-server's RAM prompt cache holds.
    ram: RamCache,
    /// Whether to rely on that cache after a restart.
    ram_configured: bool,
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
            ram: RamCache::default(),
            ram_configured: true,
        }
    }

    /// Whether to rely on llama-server's RAM prompt cache (kvgate's
    /// `--ram-cache`; on by default, as in llama-server).
    pub fn set_ram_cache(&mut self, on: bool) {
        self.ram_configured = on;
        self.ram.restarted(on);
    }

    /// kvgate's picture of llama-server's RAM prompt cache.
    pub fn ram(&self) -> &RamCache {
        &self.ram
    }

    /// A turn granted in `epoch` and sent to llama-server's RAM cache came
    /// back with little cached: stop relying on it until llama-server
    /// restarts.
    pub fn ram_missed(&mut self, epoch: u64) {
        self.ram.missed(epoch);
    }

    /// llama-server did not stash `t`'s cache after all (a restore
    /// overwrote the slot before the generation).
    pub fn ram_forget(&mut self, t: &Tenant) {
        self.ram.forget(t);
    }

    /// `t`'s cache, stashed in RAM, was saved before it left its slot.
    pub fn ram_mark_saved(&mut self, t: &Tenant) {
        self.ram.mark_saved(t);
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
            if let Some(owner) = &s.owner {
                // Any older copy in llama-server's RAM would lose to this.
                self.ram.forget(owner);
            }
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
        // So is its RAM cache; a fresh one is worth trying again.
        self.ram.restarted(self.ram_configured);
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
        // What the slot held before this grant, for llama-server's RAM cache.
        let held = Held::of(&self.slots[slot]);
        let s = &mut self.slots[slot];
        s.lease = Some(lease);
        s.held = matches!(want, Want::Hold(_));
        s.lease_client = waiter.by.clone();
        // A save or an inspection is not a use: it must not make the slot
        // look recently used to the eviction order.
        if !s.held {
            s.last_used = self.tick;
        }
        let mut from_ram = None;
        // Whether llama-server will stash what the slot holds in RAM: only a
        // completion replacing most of a live cache does.
        let mut stash = false;
        let (resident, evicted) = match want {
            Want::Hold(_) => (s.live, None),
            Want::Prompt { tenant, text } if !tenant.is_character() => {
                if s.holds_character() {
                    let ev = s.take_over(Some(tenant.clone()));
                    stash = held.swaps_through_ram(text);
                    (false, ev)
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
            // A character's generation on a slot holding another cache:
            // llama-server stashes that cache in RAM and loads the
            // character's from RAM when it has it (see `super::ram`).
            Want::Prompt { tenant: t, text } if t.is_character() => {
                let ev = s.take_over(Some(t.clone()));
                stash = held.swaps_through_ram(text);
                let share = self.ram.peek(t).map(|e| e.share_of(text));
                if let Some(share) = share.filter(|x| stash && *x >= MIN_SHARE) {
                    s.usage = self.ram.take(t).map_or(s.usage, |back| back.usage);
                    from_ram = Some(percent(share));
                }
                (false, ev)
            }
            // llama-server reuses whatever prefix the slot shares with the
            // prompt; a character's cache taken over is an eviction.
            // A newcomer, or a client pinning the slot, takes it from its
            // owner: report the owner so unsaved messages can be saved first.
            Want::Tenant(t) | Want::Prompt { tenant: t, .. } => {
                // An admin load or preload restores from disk.
                self.ram.forget(t);
                (false, s.take_over(Some(t.clone())))
            }
            Want::Pinned(_) => (false, s.take_over(None)),
        };
        if let Some(ev) = evicted.as_ref().filter(|_| stash) {
            if ev.live && ev.tenant.is_character() {
                self.ram.stash(held.stashed(ev.usage));
            }
        }
        let ram_epoch = self.ram.epoch();
        let s = &mut self.slots[slot];
        if let Want::Prompt { text, .. } = want {
            s.prompt = Some(Arc::clone(text));
        }
        Grant {
            slot,
            lease,
            resident,
            evicted,
            usage: s.usage,
            from_ram,
            ram_epoch,
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

/// What a slot held just before a grant: what llama-server stashes in RAM
/// when the grant's generation replaces it.
struct Held {
    /// Whether llama-server's slot holds a cache (of anyone) at all.
    live: bool,
    /// Whose cache: the owner, then its members.
    tenants: Vec<Tenant>,
    /// The last prompt sent to it, if known.
    prompt: Option<Arc<str>>,
}

impl Held {
    fn of(s: &Slot) -> Held {
        Held {
            live: s.live,
            tenants: s.owner.iter().chain(s.members.iter()).cloned().collect(),
            prompt: s.prompt.clone(),
        }
    }

    /// Whether a generation of `text` on this slot swaps through
    /// llama-server's RAM cache: it stashes the slot's cache and looks for
    /// the new prompt's there only when the slot is not empty (llama.cpp
    /// #28139) and the prompt keeps less than half of what it holds.
    fn swaps_through_ram(&self, text: &str) -> bool {
        if !self.live {
            return false;
        }
        let kept = match self.prompt.as_deref() {
            Some(p) if !p.is_empty() => reuse(Some(p), text) as f32 / p.len() as f32,
            // Unknown (restored) content of another character: its card
            // comes first, so little of it is kept.
            _ => 0.0,
        };
        kept < RAM_LOOKUP_KEEP
    }

    /// The stash entry for this cache, `usage` messages not on disk.
    fn stashed(self, usage: u32) -> Stashed {
        Stashed {
            tenants: self.tenants,
            usage,
            prompt: self.prompt,
        }
    }
}

/// A share as a whole percentage.
fn percent(share: f32) -> u8 {
    (share.clamp(0.0, 1.0) * 100.0).round() as u8
}

/// Below this share of a slot's prompt kept, llama-server swaps the slot's
/// state through its RAM cache (its own threshold is 0.5, in tokens; bytes
/// stand in for them with a margin).
const RAM_LOOKUP_KEEP: f32 = 0.4;

/// The usage rule for a completed generation of `kind`.
pub fn next_usage(usage: u32, kind: Kind) -> u32 {
    match kind {
        Kind::Normal => usage.saturating_add(1),
        Kind::Regenerate | Kind::Swipe | Kind::Continue | Kind::Quiet => usage.max(1),
        Kind::Impersonate => usage,
    }
}

#[cfg(test)]
mod tests;
