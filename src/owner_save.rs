//! Saving a slot's *current* owner while holding the slot: the one mechanism
//! behind save-behind, shutdown saves, chat switches, manual saves and
//! preloads. (An eviction saves the *previous* owner inside the new owner's
//! lease instead: see `proxy::take_over`.)

use std::time::Duration;

use crate::app::App;
use crate::cache_store::SaveKind;
use crate::lease::Lease;
use crate::slots::{Outcome, SlotId, Tenant, Want};

/// What [`save_owner`] found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerSave {
    /// The slot holds no character's cache (or not the expected one).
    NoOwner,
    /// The owner's cache is not live, or (when only unsaved messages count)
    /// has nothing unsaved: nothing to do.
    Clean(Tenant),
    /// Saved as this file.
    Saved(Tenant, String),
    /// The save failed; the usage counter is kept so a later save retries.
    Failed(Tenant),
}

/// With `lease` holding its slot, saves the owner's cache as `kind` when the
/// slot holds the live cache of a character (of `expect`, if given), and,
/// with `dirty_only`, only when it has unsaved messages. A kept untagged save
/// resets the usage counter; a tagged one is a bookmark and leaves it.
pub async fn save_owner(
    app: &App,
    lease: &Lease,
    kind: SaveKind,
    tag: Option<&str>,
    expect: Option<&Tenant>,
    dirty_only: bool,
) -> OwnerSave {
    let slot = lease.slot();
    let state = app.pool.with_table(|t| t.slots()[slot].clone());
    let tenant = match state.owner {
        Some(t) if t.is_character() && expect.map_or(true, |e| *e == t) => t,
        _ => return OwnerSave::NoOwner,
    };
    if !state.live || (dirty_only && state.usage == 0) {
        return OwnerSave::Clean(tenant);
    }
    match app.hooks.save(slot, &tenant, kind, tag).await {
        Some(file) => {
            if tag.is_none() {
                app.pool.with_table(|t| t.mark_saved(slot));
            }
            OwnerSave::Saved(tenant, file)
        }
        None => OwnerSave::Failed(tenant),
    }
}

/// Character slots whose live cache has unsaved messages; with `idle_only`,
/// only those nobody is using right now.
pub fn dirty_slots(app: &App, idle_only: bool) -> Vec<(SlotId, Tenant)> {
    app.pool
        .snapshot()
        .into_iter()
        .enumerate()
        .filter(|(_, s)| s.live && s.usage >= 1 && !(idle_only && s.lease.is_some()))
        .filter_map(|(id, s)| s.owner.filter(Tenant::is_character).map(|t| (id, t)))
        .collect()
}

/// Saves every dirty character slot (see [`dirty_slots`]) as `kind`,
/// waiting at most `wait` for each slot; a slot that stays busy is skipped.
/// Returns how many were saved.
pub async fn save_dirty_slots(app: &App, kind: SaveKind, wait: Duration, idle_only: bool) -> usize {
    save_slots(app, dirty_slots(app, idle_only), kind, wait, |_| {
        Outcome::Untouched
    })
    .await
}

/// Takes each of `slots` in turn (waiting at most `wait`; a slot that stays
/// busy is skipped), saves its owner as `kind` if it is still the tenant
/// named and has unsaved messages, and releases the slot with the outcome
/// `then` gives for what happened. Returns how many were saved.
pub async fn save_slots(
    app: &App,
    slots: Vec<(SlotId, Tenant)>,
    kind: SaveKind,
    wait: Duration,
    then: impl Fn(&OwnerSave) -> Outcome,
) -> usize {
    let mut saved = 0;
    for (slot, tenant) in slots {
        let Ok(lease) = app.pool.acquire(Want::Hold(slot), wait).await else {
            tracing::debug!(slot, %tenant, kind = kind.as_str(), "slot busy; not saved now");
            continue;
        };
        let result = save_owner(app, &lease, kind, None, Some(&tenant), true).await;
        if let OwnerSave::Saved(..) = result {
            saved += 1;
        }
        lease.release(then(&result));
    }
    saved
}
