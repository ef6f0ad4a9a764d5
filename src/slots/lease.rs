//! Slot leases: the async face of the pure [`SlotTable`]. A [`Lease`] is the
//! right to do one thing at a time on one slot (generate, save, restore,
//! erase). Waiting is FIFO through the table's queue; grants travel to their
//! waiters over oneshot channels. The table lock is a `std` mutex, never held
//! across an `.await`.
//!
//! A lease is released exactly once: explicitly with an [`Outcome`], or on
//! drop with [`Outcome::Failed`] (the slot's contents are then unknown, so the
//! owner restores next time). A grant whose waiter has gone away is released
//! at once, so no slot is ever left locked by a cancelled request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::slots::table::{
    ClientTag, Grant, Outcome, Slot, SlotId, SlotTable, TableError, Ticket, Want,
};
use crate::sync::Unpoisoned;

/// Why no lease was granted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AcquireError {
    /// The table refused (queue full, no such slot, slots unknown).
    #[error(transparent)]
    Table(#[from] TableError),
    /// Waited too long.
    #[error("no slot became free within {0:.0} s")]
    Timeout(f64),
    /// The pool is shutting down.
    #[error("kvgate is shutting down")]
    Closed,
}

#[derive(Debug)]
struct Inner {
    table: SlotTable,
    waiters: HashMap<Ticket, oneshot::Sender<Grant>>,
    closed: bool,
}

/// The shared slot table plus its waiters.
#[derive(Debug)]
pub struct Pool {
    inner: Mutex<Inner>,
}

// === impl Pool ===

impl Pool {
    /// A pool over `n` slots (0 until the upstream is known).
    pub fn new(n: usize, max_queue: usize) -> Arc<Pool> {
        Arc::new(Pool {
            inner: Mutex::new(Inner {
                table: SlotTable::new(n, max_queue),
                waiters: HashMap::new(),
                closed: false,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the table consistent (every
        // mutation is a single call), so poisoning is not fatal.
        self.inner.lock_unpoisoned()
    }

    /// At most `n` waiting requests per known client.
    pub fn set_client_bound(&self, n: usize) {
        self.lock().table.set_client_bound(n);
    }

    /// Whether to rely on llama-server's RAM prompt cache (see
    /// [`crate::slots::ram`]).
    pub fn set_ram_cache(&self, on: bool) {
        self.lock().table.set_ram_cache(on);
    }

    /// Waits (FIFO, bounded by `timeout`) for a lease on what `want` asks,
    /// for kvgate's own work.
    pub async fn acquire(
        self: &Arc<Self>,
        want: Want,
        timeout: Duration,
    ) -> Result<Lease, AcquireError> {
        self.acquire_as(want, None, timeout).await
    }

    /// Waits for a lease on behalf of client `by` (see the table's fair
    /// order and per-client bound).
    pub async fn acquire_as(
        self: &Arc<Self>,
        want: Want,
        by: Option<ClientTag>,
        timeout: Duration,
    ) -> Result<Lease, AcquireError> {
        let (tx, rx) = oneshot::channel();
        let ticket = {
            let mut inner = self.lock();
            if inner.closed {
                return Err(AcquireError::Closed);
            }
            let (ticket, grants) = inner.table.enqueue_by(want, by)?;
            inner.waiters.insert(ticket, tx);
            deliver(&mut inner, grants);
            ticket
        };
        let mut guard = WaitGuard {
            pool: self,
            ticket,
            rx: Some(rx),
        };
        let rx = guard.rx.as_mut().expect("set above");
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(grant)) => {
                guard.rx = None;
                Ok(Lease {
                    pool: Arc::clone(self),
                    grant,
                    released: false,
                })
            }
            // The sender was dropped: the pool closed or the slot vanished.
            Ok(Err(_)) => Err(AcquireError::Closed),
            Err(_) => Err(AcquireError::Timeout(timeout.as_secs_f64())),
        }
    }

    /// Reads the table (the admin view, placement, gauges, tests).
    pub(crate) fn read<R>(&self, f: impl FnOnce(&SlotTable) -> R) -> R {
        f(&self.lock().table)
    }

    /// Changes one leased slot's state; only [`Lease`]'s methods call it,
    /// so every change to a slot is made by its lease holder.
    fn change<R>(&self, f: impl FnOnce(&mut SlotTable) -> R) -> R {
        f(&mut self.lock().table)
    }

    /// llama-server restarted: no slot holds its owner's cache any more.
    /// With [`Pool::reconcile`] and [`Pool::resize`], the only changes made
    /// without a lease: they record what llama-server did, whoever holds
    /// the slot (only the monitor calls them).
    pub(crate) fn lose_all_caches(&self) {
        self.lock().table.invalidate_all();
    }

    /// Marks the slots that llama-server reports empty although kvgate
    /// believed them live (see [`SlotTable::reconcile`]); returns them.
    pub(crate) fn reconcile(&self, empty: &[bool], ticks_before: &[u64]) -> Vec<SlotId> {
        self.lock().table.reconcile(empty, ticks_before)
    }

    /// Requests waiting for a slot.
    pub fn queued(&self) -> usize {
        self.lock().table.queued()
    }

    /// A copy of every slot's state.
    pub fn snapshot(&self) -> Vec<Slot> {
        self.lock().table.slots().to_vec()
    }

    /// True when no lease is held and nobody waits.
    pub fn is_idle(&self) -> bool {
        self.lock().table.is_idle()
    }

    /// Number of slots (0 while unknown).
    pub fn len(&self) -> usize {
        self.lock().table.len()
    }

    /// True while the slot count is unknown.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adopts the upstream's slot count and serves waiters it allows.
    pub fn resize(&self, n: usize) {
        let mut inner = self.lock();
        let grants = inner.table.resize(n);
        // Waiters for slots that no longer exist were dropped from the queue:
        // dropping their senders ends their waits.
        let queued: Vec<Ticket> = inner.waiters.keys().copied().collect();
        for t in queued {
            if !grants.iter().any(|(g, _)| *g == t) && !inner.table.is_queued(t) {
                inner.waiters.remove(&t);
            }
        }
        deliver(&mut inner, grants);
    }

    /// Stops new acquisitions and wakes every waiter with `Closed`.
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        let tickets: Vec<Ticket> = inner.waiters.keys().copied().collect();
        for t in tickets {
            inner.table.cancel(t);
        }
        inner.waiters.clear();
    }

    fn release(&self, slot: SlotId, lease: u64, outcome: Outcome) {
        let mut inner = self.lock();
        let grants = inner.table.release(slot, lease, outcome);
        deliver(&mut inner, grants);
    }
}

/// Hands grants to their waiters. A waiter that is gone gets its grant
/// released on the spot, which may serve the next waiter, and so on.
fn deliver(inner: &mut Inner, mut grants: Vec<(Ticket, Grant)>) {
    while let Some((ticket, grant)) = grants.pop() {
        let sent = match inner.waiters.remove(&ticket) {
            Some(tx) => tx.send(grant.clone()).is_ok(),
            None => false,
        };
        if !sent {
            let more = inner
                .table
                .release(grant.slot, grant.lease, Outcome::Untouched);
            grants.extend(more);
        }
    }
}

/// Cleans up a wait that ends without a lease (timeout, cancellation).
struct WaitGuard<'a> {
    pool: &'a Arc<Pool>,
    ticket: Ticket,
    rx: Option<oneshot::Receiver<Grant>>,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let mut inner = self.pool.lock();
        inner.waiters.remove(&self.ticket);
        if !inner.table.cancel(self.ticket) {
            // Granted but never taken: the grant may sit in the channel.
            if let Ok(grant) = rx.try_recv() {
                let grants = inner
                    .table
                    .release(grant.slot, grant.lease, Outcome::Untouched);
                deliver(&mut inner, grants);
            }
        }
    }
}

/// The right to use one slot until released.
#[derive(Debug)]
pub struct Lease {
    pool: Arc<Pool>,
    grant: Grant,
    released: bool,
}

// === impl Lease ===

impl Lease {
    /// The slot.
    pub fn slot(&self) -> SlotId {
        self.grant.slot
    }

    /// What the table decided when granting.
    pub fn grant(&self) -> &Grant {
        &self.grant
    }

    /// Applies an outcome to the slot without releasing it (the holder has
    /// more to do, e.g. an autosave after the generation).
    pub(crate) fn apply(&self, outcome: Outcome) {
        self.pool
            .change(|t| t.apply(self.grant.slot, self.grant.lease, outcome));
    }

    /// The slot's state now; an empty slot's when the slot is no longer
    /// this lease's (the upstream came back with fewer slots meanwhile, and
    /// maybe grew again): nothing to save, nobody's cache to touch.
    pub(crate) fn state(&self) -> Slot {
        self.pool.read(|t| {
            t.slots()
                .get(self.grant.slot)
                .filter(|s| s.lease == Some(self.grant.lease))
                .cloned()
                .unwrap_or_default()
        })
    }

    /// Changes the slot through `f` only while it is still this lease's (see
    /// [`Lease::state`]): a slot that vanished, or came back for someone
    /// else, is left alone.
    fn change_mine(&self, f: impl FnOnce(&mut SlotTable, SlotId)) {
        let (slot, lease) = (self.grant.slot, self.grant.lease);
        self.pool.change(|t| {
            if t.slots().get(slot).is_some_and(|s| s.lease == Some(lease)) {
                f(t, slot);
            }
        });
    }

    /// The slot's usage counter now.
    pub fn usage(&self) -> u32 {
        self.state().usage
    }

    /// The owner's cache is on disk: nothing unsaved.
    pub(crate) fn mark_saved(&self) {
        self.change_mine(|t, s| t.mark_saved(s));
    }

    /// The slot holds the cache restored from `file`.
    pub(crate) fn mark_restored(&self, file: &str) {
        self.change_mine(|t, s| t.mark_restored(s, file));
    }

    /// The turn this lease was granted for went to llama-server's RAM
    /// cache and found nothing there: stop relying on it.
    pub(crate) fn ram_missed(&self) {
        let epoch = self.grant.ram_epoch;
        self.change_mine(|t, _| t.ram_missed(epoch));
    }

    /// The cache this grant evicted was not stashed in RAM after all (a
    /// restore replaced it first).
    pub(crate) fn ram_forget_evicted(&self) {
        if let Some(ev) = &self.grant.evicted {
            let tenant = ev.tenant.clone();
            self.change_mine(|t, _| t.ram_forget(&tenant));
        }
    }

    /// The cache this grant evicted was saved before it went to RAM.
    pub(crate) fn ram_evicted_saved(&self) {
        if let Some(ev) = &self.grant.evicted {
            let tenant = ev.tenant.clone();
            self.change_mine(|t, _| t.ram_mark_saved(&tenant));
        }
    }

    /// The slot holds nothing (a failed restore cleared it).
    pub(crate) fn mark_empty(&self) {
        self.change_mine(|t, s| t.mark_empty(s));
    }

    /// A generation runs on the slot now (Unix seconds, for display).
    pub(crate) fn stamp_used(&self, unix: u64) {
        self.change_mine(|t, s| t.stamp_used(s, unix));
    }

    /// Releases with `outcome`.
    pub fn release(mut self, outcome: Outcome) {
        self.released = true;
        self.pool
            .release(self.grant.slot, self.grant.lease, outcome);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.released {
            self.pool
                .release(self.grant.slot, self.grant.lease, Outcome::Failed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::Kind;
    use crate::tenant::Tenant;

    fn want(n: &str) -> Want {
        Want::Tenant(Tenant::Character {
            chat: "c".into(),
            name: n.into(),
        })
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn waiter_gets_slot_when_released() {
        let pool = Pool::new(1, 4);
        let a = pool.acquire(want("A"), T).await.unwrap();
        let p2 = Arc::clone(&pool);
        let waiting = tokio::spawn(async move { p2.acquire(want("B"), T).await.map(|l| l.slot()) });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        a.release(Outcome::Generated(Kind::Normal));
        assert_eq!(waiting.await.unwrap().unwrap(), 0);
        assert!(pool.is_idle(), "B's lease was dropped after the task ended");
    }

    #[tokio::test]
    async fn cancelled_waiter_leaves_nothing_locked() {
        let pool = Pool::new(1, 4);
        let a = pool.acquire(want("A"), T).await.unwrap();
        let p2 = Arc::clone(&pool);
        let waiting = tokio::spawn(async move { p2.acquire(want("B"), T).await.map(|l| l.slot()) });
        tokio::task::yield_now().await;
        waiting.abort();
        let _ = waiting.await;
        drop(a);
        assert!(pool.is_idle());
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_gives_up_and_cleans_up() {
        let pool = Pool::new(1, 4);
        let _a = pool.acquire(want("A"), T).await.unwrap();
        let err = pool
            .acquire(want("B"), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(err, AcquireError::Timeout(2.0));
        assert_eq!(pool.queued(), 0);
    }

    #[tokio::test]
    async fn grant_to_a_vanished_waiter_is_passed_on() {
        let pool = Pool::new(1, 4);
        let a = pool.acquire(want("A"), T).await.unwrap();
        // Simulate a waiter whose receiver is gone before delivery.
        let (tx, rx) = oneshot::channel();
        drop(rx);
        {
            let mut inner = pool.lock();
            let (ticket, grants) = inner.table.enqueue(want("B")).unwrap();
            assert!(grants.is_empty());
            inner.waiters.insert(ticket, tx);
        }
        let p2 = Arc::clone(&pool);
        let c = tokio::spawn(async move { p2.acquire(want("C"), T).await.map(|l| l.slot()) });
        tokio::task::yield_now().await;
        a.release(Outcome::Generated(Kind::Normal));
        assert_eq!(
            c.await.unwrap().unwrap(),
            0,
            "B's unclaimed grant went to C"
        );
        assert!(pool.is_idle());
    }

    #[tokio::test]
    async fn a_lease_whose_slot_vanished_is_inert_and_does_not_panic() {
        let pool = Pool::new(2, 4);
        let _a = pool.acquire(Want::Pinned(0), T).await.unwrap();
        let b = pool.acquire(want("B"), T).await.unwrap();
        assert_eq!(b.slot(), 1);
        b.apply(Outcome::Generated(Kind::Normal));
        assert_eq!(
            b.state().owner,
            Some(Tenant::Character {
                chat: "c".into(),
                name: "B".into()
            })
        );
        // llama-server came back with one slot, then with two again, and C
        // took the new slot 1.
        pool.resize(1);
        assert_eq!(b.state().owner, None, "nothing to save");
        pool.resize(2);
        let c = pool.acquire(want("C"), T).await.unwrap();
        assert_eq!(c.slot(), 1);
        c.apply(Outcome::Generated(Kind::Normal));
        assert_eq!(b.state().owner, None, "C's slot is not B's");
        b.mark_saved();
        b.mark_empty();
        b.mark_restored("x.bin");
        b.stamp_used(1);
        assert_eq!(b.usage(), 0);
        assert_eq!(c.usage(), 1, "C's slot untouched by B's lease");
        assert!(c.state().live);
        b.release(Outcome::Cleared);
        assert_eq!(c.state().owner.map(|t| t.to_string()), Some(want_name("C")));
    }

    fn want_name(n: &str) -> String {
        Tenant::Character {
            chat: "c".into(),
            name: n.into(),
        }
        .to_string()
    }

    #[tokio::test]
    async fn close_wakes_waiters() {
        let pool = Pool::new(1, 4);
        let _a = pool.acquire(want("A"), T).await.unwrap();
        let p2 = Arc::clone(&pool);
        let w = tokio::spawn(async move { p2.acquire(want("B"), T).await.map(|l| l.slot()) });
        tokio::task::yield_now().await;
        pool.close();
        assert_eq!(w.await.unwrap().unwrap_err(), AcquireError::Closed);
        assert_eq!(
            pool.acquire(want("C"), T).await.unwrap_err(),
            AcquireError::Closed
        );
    }
}
