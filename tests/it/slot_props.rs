//! Property tests of the pure slot table ([`kvgate::slots::SlotTable`])
//! against a small reference model.
//!
//! Random interleavings of what the running proxy does to the table —
//! requests arriving (characters, anonymous, client-pinned, holds for saves),
//! generations finishing with every outcome, client disconnects while queued,
//! saves, restores, failed restores, upstream restarts (invalidate, resize),
//! `/slots` reconciliation — must never break the table's rules:
//!
//! * at most one owner per slot, and never one tenant in two slots;
//! * a slot with a lease is never granted again (so a busy slot is never
//!   evicted, and its owner never changes under it);
//! * a newcomer takes the lowest free slot, else the idle slot with the least
//!   usage, then least recently used (a hold for a save is no use), then
//!   lowest id — or waits, when that slot has unsaved messages while another
//!   slot is only held for a save; a grant that takes a slot from its owner
//!   reports that owner and its unsaved usage;
//! * usage: `normal` +1, `regenerate`/`swipe`/`continue`/`quiet` +1 only when
//!   0, `impersonate` no change, anonymous never counts; 0 after a save, a
//!   restore, a restart, a new owner;
//! * FIFO: a waiter is never granted a slot while an earlier waiter that
//!   could use that same slot still waits. "Could use" follows the table's
//!   documented two passes: a waiter whose slot is already its own (resident,
//!   pinned, hold) competes only for that slot and is served before
//!   newcomers, so it may overtake an earlier newcomer (affinity first, by
//!   design); among newcomers, and among waiters for one slot, order is
//!   strict;
//! * work conservation: after any call that dispatches (enqueue, release,
//!   resize), no waiter that could run now is still waiting (after an
//!   `apply(Cleared)` a waiter may become servable without a dispatch; the
//!   next dispatching call serves it);
//! * the queue bound holds; a cancelled ticket is gone; a stale or repeated
//!   release changes nothing.
//!
//! The model tracks every slot's state itself (it does not read the table's),
//! and every grant the table makes is checked against the model one by one,
//! in the order the table made them.

use std::collections::HashSet;

use kvgate::slots::{
    Evicted, Grant, LeaseId, Outcome, SlotId, SlotTable, TableError, Ticket, Want,
};
use kvgate::tenant::Kind;
use kvgate::tenant::Tenant;
use proptest::prelude::*;

/// The tenants requests come from: characters in two chats (one name in
/// both) and two anonymous conversations.
fn tenants() -> Vec<Tenant> {
    let ch = |chat: &str, name: &str| Tenant::Character {
        chat: chat.into(),
        name: name.into(),
    };
    vec![
        ch("c1", "Alice"),
        ch("c1", "Bob"),
        ch("c1", "Carol"),
        ch("c1", "Dave"),
        ch("c1", "Eve"),
        ch("c2", "Alice"),
        Tenant::Anonymous { key: "x".into() },
        Tenant::Anonymous { key: "y".into() },
    ]
}

const KINDS: [Kind; 6] = [
    Kind::Normal,
    Kind::Regenerate,
    Kind::Swipe,
    Kind::Continue,
    Kind::Quiet,
    Kind::Impersonate,
];

#[derive(Clone, Debug)]
enum WantSpec {
    Tenant(usize),
    Pinned(usize),
    Hold(usize),
}

#[derive(Clone, Copy, Debug)]
enum OutcomeSpec {
    Generated(usize),
    Failed,
    Untouched,
    Cleared,
}

impl OutcomeSpec {
    fn outcome(self) -> Outcome {
        match self {
            OutcomeSpec::Generated(k) => Outcome::Generated(KINDS[k % KINDS.len()]),
            OutcomeSpec::Failed => Outcome::Failed,
            OutcomeSpec::Untouched => Outcome::Untouched,
            OutcomeSpec::Cleared => Outcome::Cleared,
        }
    }
}

/// One thing the proxy does to the table.
#[derive(Clone, Debug)]
enum Op {
    /// A request arrives (completion, client-pinned request, save/hold).
    Enqueue(WantSpec),
    /// A lease ends (generation over, save done, request refused).
    Release(usize, OutcomeSpec),
    /// An outcome applied while the lease is kept (before an autosave).
    Apply(usize, OutcomeSpec),
    /// A second release of a lease already released, or a made-up lease id.
    StaleRelease(usize, OutcomeSpec),
    /// A waiter gives up (client gone, queue timeout).
    Cancel(usize),
    MarkSaved(usize),
    MarkRestored(usize),
    /// A failed restore: the slot's cache is gone.
    MarkEmpty(usize),
    /// llama-server restarted with the same slot count.
    InvalidateAll,
    /// llama-server came back with another slot count.
    Resize(usize),
    /// A `/slots` poll saw these slots empty (`stale`: the poll is older
    /// than the slot's last grant).
    Reconcile(Vec<bool>, Vec<bool>),
}

fn want_spec() -> impl Strategy<Value = WantSpec> {
    prop_oneof![
        8 => (0..8usize).prop_map(WantSpec::Tenant),
        1 => (0..6usize).prop_map(WantSpec::Pinned),
        1 => (0..6usize).prop_map(WantSpec::Hold),
    ]
}

fn outcome_spec() -> impl Strategy<Value = OutcomeSpec> {
    prop_oneof![
        6 => (0..6usize).prop_map(OutcomeSpec::Generated),
        1 => Just(OutcomeSpec::Failed),
        1 => Just(OutcomeSpec::Untouched),
        1 => Just(OutcomeSpec::Cleared),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => want_spec().prop_map(Op::Enqueue),
        8 => (any::<usize>(), outcome_spec()).prop_map(|(i, o)| Op::Release(i, o)),
        2 => (any::<usize>(), outcome_spec()).prop_map(|(i, o)| Op::Apply(i, o)),
        1 => (any::<usize>(), outcome_spec()).prop_map(|(i, o)| Op::StaleRelease(i, o)),
        2 => any::<usize>().prop_map(Op::Cancel),
        1 => (0..5usize).prop_map(Op::MarkSaved),
        1 => (0..5usize).prop_map(Op::MarkRestored),
        1 => (0..5usize).prop_map(Op::MarkEmpty),
        1 => Just(Op::InvalidateAll),
        1 => (0..6usize).prop_map(Op::Resize),
        1 => (
            proptest::collection::vec(any::<bool>(), 0..6),
            proptest::collection::vec(proptest::bool::weighted(0.2), 0..6)
        )
            .prop_map(|(e, s)| Op::Reconcile(e, s)),
    ]
}

/// The model's view of one slot.
#[derive(Clone, Debug, Default, PartialEq)]
struct MSlot {
    owner: Option<Tenant>,
    live: bool,
    usage: u32,
    fresh: bool,
    lease: Option<LeaseId>,
    last_used: u64,
    /// The lease in force is a hold (a save): the slot will be free again
    /// shortly and unchanged.
    held: bool,
}

#[derive(Debug)]
struct Model {
    slots: Vec<MSlot>,
    /// Waiters in arrival order.
    queue: Vec<(Ticket, Want)>,
    max_queue: usize,
    tick: u64,
    /// Leases handed out and not yet released (some may have become stale
    /// through a resize).
    held: Vec<(SlotId, LeaseId)>,
    /// Leases already released (for repeated releases).
    released: Vec<(SlotId, LeaseId)>,
    /// Every ticket ever issued.
    tickets: Vec<Ticket>,
    /// Every lease id ever granted.
    lease_ids: HashSet<LeaseId>,
}

/// The usage rule, written out independently of `slots::next_usage`.
fn usage_after(usage: u32, kind: Kind) -> u32 {
    match kind {
        Kind::Normal => usage + 1,
        Kind::Regenerate | Kind::Swipe | Kind::Continue | Kind::Quiet => {
            if usage == 0 {
                1
            } else {
                usage
            }
        }
        Kind::Impersonate => usage,
    }
}

impl Model {
    fn new(n: usize, max_queue: usize) -> Model {
        Model {
            slots: vec![MSlot::default(); n],
            queue: Vec::new(),
            max_queue,
            tick: 0,
            held: Vec::new(),
            released: Vec::new(),
            tickets: Vec::new(),
            lease_ids: HashSet::new(),
        }
    }

    fn resident(&self, t: &Tenant) -> Option<SlotId> {
        self.slots.iter().position(|s| s.owner.as_ref() == Some(t))
    }

    /// The slot a waiter is bound to, or `None` for a newcomer (a tenant
    /// resident nowhere), which may take any idle slot.
    fn target(&self, w: &Want) -> Option<SlotId> {
        match w {
            Want::Pinned(s) | Want::Hold(s) => Some(*s),
            Want::Tenant(t) => self.resident(t),
            Want::Prompt { .. } => None,
        }
    }

    /// Where a newcomer goes now: the lowest free (unowned, idle) slot, else
    /// the idle slot with the least usage, then least recently used, then
    /// lowest id — unless that slot has unsaved messages while another slot
    /// is only held for a save: then the newcomer waits for that one.
    fn newcomer_slot(&self) -> Option<SlotId> {
        let idle = || {
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.lease.is_none())
        };
        if let Some((id, _)) = idle().find(|(_, s)| s.owner.is_none()) {
            return Some(id);
        }
        let (id, best) = idle().min_by_key(|(id, s)| (s.usage, s.last_used, *id))?;
        if best.usage >= 1 && self.slots.iter().any(|s| s.held) {
            return None;
        }
        Some(id)
    }

    fn apply_outcome(&mut self, slot: SlotId, outcome: Outcome) {
        let s = &mut self.slots[slot];
        match outcome {
            Outcome::Generated(kind) => {
                s.live = true;
                s.fresh = false;
                if matches!(s.owner, Some(Tenant::Character { .. })) {
                    s.usage = usage_after(s.usage, kind);
                }
            }
            Outcome::Failed => s.live = false,
            Outcome::Untouched => {}
            Outcome::Cleared => {
                s.owner = None;
                s.live = false;
                s.usage = 0;
                s.fresh = false;
            }
        }
    }

    /// Checks the table's grants one by one against the model, in the order
    /// they were made, and applies them to the model.
    fn take_grants(&mut self, grants: &[(Ticket, Grant)]) -> Result<(), TestCaseError> {
        for (ticket, g) in grants {
            let pos = self.queue.iter().position(|(t, _)| t == ticket);
            let Some(pos) = pos else {
                return Err(TestCaseError::fail(format!(
                    "ticket {ticket} granted but not waiting: {g:?}"
                )));
            };
            let want = self.queue[pos].1.clone();
            let target = self.target(&want);
            prop_assert!(
                g.slot < self.slots.len(),
                "grant of a slot that does not exist: {g:?}"
            );
            prop_assert!(
                self.slots[g.slot].lease.is_none(),
                "slot {} granted while leased (busy slots are never taken): {g:?}, model {:?}",
                g.slot,
                self.slots[g.slot]
            );
            prop_assert!(
                self.lease_ids.insert(g.lease),
                "lease id {} reused",
                g.lease
            );
            // FIFO among waiters that could use this slot.
            for (earlier, w) in &self.queue[..pos] {
                let t = self.target(w);
                prop_assert!(
                    t != Some(g.slot),
                    "ticket {ticket} ({want:?}) got slot {} while earlier ticket {earlier} ({w:?}) waits for that same slot",
                    g.slot
                );
                prop_assert!(
                    !(target.is_none() && t.is_none()),
                    "newcomer ticket {ticket} ({want:?}) served before earlier newcomer {earlier} ({w:?})"
                );
            }
            let before = self.slots[g.slot].clone();
            match (&want, target) {
                (Want::Pinned(s) | Want::Hold(s), _) => {
                    prop_assert_eq!(g.slot, *s, "pinned/hold grant on another slot");
                }
                (Want::Tenant(_), Some(r)) => {
                    prop_assert_eq!(g.slot, r, "a resident tenant gets its own slot");
                }
                (Want::Prompt { .. }, _) => {
                    return Err(TestCaseError::fail(
                        "the model sends no prompt-placed requests (those are checked by the \
                         table's own by_prompt and clients tests)",
                    ));
                }
                (Want::Tenant(_), None) => {
                    let expected = self.newcomer_slot();
                    prop_assert_eq!(
                        Some(g.slot),
                        expected,
                        "newcomer placement: lowest free slot, else least usage, LRU, lowest id \
                         (unless that one is dirty while another slot is being saved: wait)"
                    );
                }
            }
            self.tick += 1;
            let s = &mut self.slots[g.slot];
            s.lease = Some(g.lease);
            s.held = matches!(want, Want::Hold(_));
            // A save is not a use: it leaves the eviction order alone.
            if !s.held {
                s.last_used = self.tick;
            }
            let (resident, evicted) = match &want {
                Want::Tenant(t) if s.owner.as_ref() == Some(t) => (s.live, None),
                Want::Tenant(t) => {
                    let ev = s.owner.replace(t.clone()).map(|tenant| Evicted {
                        tenant,
                        usage: s.usage,
                        live: s.live,
                    });
                    s.usage = 0;
                    s.live = false;
                    (false, ev)
                }
                Want::Hold(_) | Want::Prompt { .. } => (s.live, None),
                Want::Pinned(_) => {
                    let ev = s.owner.take().map(|tenant| Evicted {
                        tenant,
                        usage: s.usage,
                        live: s.live,
                    });
                    s.usage = 0;
                    s.live = false;
                    (false, ev)
                }
            };
            prop_assert_eq!(
                g.resident,
                resident,
                "resident flag; slot before: {:?}",
                before
            );
            prop_assert_eq!(&g.evicted, &evicted, "evicted; slot before: {:?}", before);
            prop_assert_eq!(g.usage, s.usage, "usage reported in the grant");
            self.queue.remove(pos);
            self.held.push((g.slot, g.lease));
        }
        Ok(())
    }

    /// The table agrees with the model, and the global rules hold.
    fn check(&self, table: &SlotTable, dispatched: bool) -> Result<(), TestCaseError> {
        prop_assert_eq!(table.len(), self.slots.len());
        for (id, (t, m)) in table.slots().iter().zip(&self.slots).enumerate() {
            prop_assert_eq!(&t.owner, &m.owner, "slot {} owner", id);
            prop_assert_eq!(t.live, m.live, "slot {} live", id);
            prop_assert_eq!(t.usage, m.usage, "slot {} usage", id);
            prop_assert_eq!(t.fresh, m.fresh, "slot {} fresh", id);
            prop_assert_eq!(t.lease, m.lease, "slot {} lease", id);
            prop_assert_eq!(t.last_used, m.last_used, "slot {} last_used", id);
            if !matches!(t.owner, Some(Tenant::Character { .. })) {
                // Anonymous or unowned slots only count through a pinned
                // generation's slot... which never counts: owner None.
                prop_assert_eq!(t.usage, 0, "slot {} counts without a character", id);
            }
        }
        let mut owners = HashSet::new();
        for s in table.slots() {
            if let Some(o) = &s.owner {
                prop_assert!(owners.insert(o.clone()), "{o} owns two slots");
            }
        }
        prop_assert_eq!(table.queued(), self.queue.len());
        prop_assert!(table.queued() <= self.max_queue, "queue bound exceeded");
        for (t, _) in &self.queue {
            prop_assert!(table.is_queued(*t), "ticket {} lost from the queue", t);
        }
        prop_assert_eq!(
            table.is_idle(),
            self.queue.is_empty() && self.slots.iter().all(|s| s.lease.is_none())
        );
        if dispatched {
            for (t, w) in &self.queue {
                match self.target(w) {
                    Some(s) => prop_assert!(
                        self.slots[s].lease.is_some(),
                        "ticket {t} ({w:?}) waits although slot {s} is idle"
                    ),
                    None => prop_assert!(
                        self.newcomer_slot().is_none(),
                        "newcomer ticket {t} ({w:?}) waits although a slot is ready for it: {:?}",
                        self.slots
                    ),
                }
            }
        }
        Ok(())
    }
}

fn run(n: usize, max_queue: usize, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let tenants = tenants();
    let mut table = SlotTable::new(n, max_queue);
    let mut m = Model::new(n, max_queue);
    for op in ops {
        let mut dispatched = false;
        match op {
            Op::Enqueue(spec) => {
                let want = match spec {
                    WantSpec::Tenant(i) => Want::Tenant(tenants[i % tenants.len()].clone()),
                    WantSpec::Pinned(s) => Want::Pinned(s),
                    WantSpec::Hold(s) => Want::Hold(s),
                };
                let result = table.enqueue(want.clone());
                let len = m.slots.len();
                match (&want, result) {
                    (_, Err(TableError::NoSlots)) => prop_assert_eq!(len, 0),
                    (Want::Pinned(s) | Want::Hold(s), Err(TableError::NoSuchSlot(e))) => {
                        prop_assert_eq!(*s, e);
                        prop_assert!(e >= len && len > 0);
                    }
                    (_, Err(TableError::QueueFull { slots, queued })) => {
                        prop_assert_eq!(slots, len);
                        prop_assert_eq!(queued, m.queue.len());
                        prop_assert_eq!(queued, max_queue, "refused below the bound");
                        // The refused request must not have been servable.
                        let t = m.target(&want);
                        match t {
                            Some(s) => prop_assert!(m.slots[s].lease.is_some()),
                            None => prop_assert!(m.newcomer_slot().is_none()),
                        }
                    }
                    (_, Err(e)) => return Err(TestCaseError::fail(format!("{want:?}: {e}"))),
                    (_, Ok((ticket, grants))) => {
                        prop_assert!(len > 0);
                        if let Want::Pinned(s) | Want::Hold(s) = &want {
                            prop_assert!(*s < len);
                        }
                        prop_assert!(
                            m.tickets.last().map_or(true, |last| ticket > *last),
                            "tickets increase"
                        );
                        m.tickets.push(ticket);
                        m.queue.push((ticket, want.clone()));
                        m.take_grants(&grants)?;
                        dispatched = true;
                    }
                }
            }
            Op::Release(i, o) | Op::Apply(i, o) if m.held.is_empty() => {
                // Nothing held: a release of a lease that never existed.
                let grants = table.release(i % 8, 1_000_000 + i as u64 % 8, o.outcome());
                prop_assert!(grants.is_empty());
            }
            Op::Release(i, o) => {
                let (slot, lease) = m.held.remove(i % m.held.len());
                let current = slot < m.slots.len() && m.slots[slot].lease == Some(lease);
                let grants = table.release(slot, lease, o.outcome());
                if current {
                    m.apply_outcome(slot, o.outcome());
                    m.slots[slot].lease = None;
                    m.slots[slot].held = false;
                    m.take_grants(&grants)?;
                    dispatched = true;
                } else {
                    prop_assert!(grants.is_empty(), "a stale lease freed something");
                }
                m.released.push((slot, lease));
            }
            Op::Apply(i, o) => {
                let (slot, lease) = m.held[i % m.held.len()];
                let current = slot < m.slots.len() && m.slots[slot].lease == Some(lease);
                prop_assert_eq!(table.apply(slot, lease, o.outcome()), current);
                if current {
                    m.apply_outcome(slot, o.outcome());
                }
            }
            Op::StaleRelease(i, o) => {
                let (slot, lease) = if m.released.is_empty() {
                    (i % 6, 999_999)
                } else {
                    m.released[i % m.released.len()]
                };
                prop_assert!(table.release(slot, lease, o.outcome()).is_empty());
                prop_assert!(!table.apply(slot, lease, o.outcome()));
            }
            Op::Cancel(i) => {
                if let Some(&ticket) = m.tickets.get(i % m.tickets.len().max(1)) {
                    let queued = m.queue.iter().position(|(t, _)| *t == ticket);
                    prop_assert_eq!(table.cancel(ticket), queued.is_some());
                    if let Some(p) = queued {
                        m.queue.remove(p);
                    }
                    prop_assert!(!table.cancel(ticket), "cancel twice");
                }
            }
            Op::MarkSaved(s) => {
                table.mark_saved(s);
                if let Some(x) = m.slots.get_mut(s) {
                    x.usage = 0;
                }
            }
            Op::MarkRestored(s) => {
                table.mark_restored(s, "restored.bin");
                if let Some(x) = m.slots.get_mut(s) {
                    x.usage = 0;
                    x.live = true;
                    x.fresh = true;
                }
            }
            Op::MarkEmpty(s) => {
                table.mark_empty(s);
                if let Some(x) = m.slots.get_mut(s) {
                    x.live = false;
                }
            }
            Op::InvalidateAll => {
                table.invalidate_all();
                for x in &mut m.slots {
                    x.live = false;
                    x.usage = 0;
                }
            }
            Op::Resize(n) => {
                let grants = table.resize(n);
                m.slots.resize_with(n, MSlot::default);
                m.queue
                    .retain(|(_, w)| !matches!(w, Want::Pinned(s) | Want::Hold(s) if *s >= n));
                m.take_grants(&grants)?;
                dispatched = true;
            }
            Op::Reconcile(empty, stale) => {
                let ticks: Vec<u64> = table
                    .slots()
                    .iter()
                    .enumerate()
                    .map(|(i, s)| s.last_used + u64::from(stale.get(i).copied().unwrap_or(false)))
                    .collect();
                let lost = table.reconcile(&empty, &ticks);
                let mut expected = Vec::new();
                for (id, x) in m.slots.iter_mut().enumerate() {
                    let observed_empty = empty.get(id).copied().unwrap_or(false);
                    let is_stale = stale.get(id).copied().unwrap_or(false);
                    if observed_empty && !is_stale && x.live && !x.fresh && x.lease.is_none() {
                        x.live = false;
                        x.usage = 0;
                        expected.push(id);
                    }
                }
                prop_assert_eq!(
                    lost,
                    expected,
                    "reconcile: only idle, live, non-fresh, unchanged slots are lost"
                );
            }
        }
        m.check(&table, dispatched)?;
    }
    // Wind down: release everything still held, cancel every waiter; the
    // table must end idle with no lease leaked.
    while let Some((slot, lease)) = m.held.pop() {
        let current = slot < m.slots.len() && m.slots[slot].lease == Some(lease);
        let grants = table.release(slot, lease, Outcome::Untouched);
        if current {
            m.slots[slot].lease = None;
            m.slots[slot].held = false;
            m.take_grants(&grants)?;
        }
        m.check(&table, true)?;
    }
    for (t, _) in std::mem::take(&mut m.queue) {
        prop_assert!(table.cancel(t));
    }
    prop_assert!(table.is_idle(), "leases leaked: {:?}", table.slots());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    #[test]
    fn slot_table_keeps_its_rules_under_random_interleavings(
        n in 1..5usize,
        max_queue in 1..6usize,
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        run(n, max_queue, ops)?;
    }
}
