//! Saving a slot's *current* owner while holding the slot: the one mechanism
//! behind autosave, save-behind, shutdown saves, chat switches, manual saves
//! and preloads. (An eviction saves the *previous* owner inside the new
//! owner's lease instead: see [`super::prepare::take_over`].)

use std::time::Duration;

use tracing::info;

use crate::slots::lease::Lease;
use crate::slots::table::{Outcome, SlotId, Want};
use crate::store::meta::SaveKind;
use crate::tenant::Tenant;
use crate::upstream::Upstream;

/// What [`save_owner`] found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum OwnerSave {
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
pub(crate) async fn save_owner(
    upstream: &Upstream,
    lease: &Lease,
    kind: SaveKind,
    tag: Option<&str>,
    expect: Option<&Tenant>,
    dirty_only: bool,
) -> OwnerSave {
    let slot = lease.slot();
    let state = lease.state();
    let tenant = match state.owner {
        Some(t) if t.is_character() && expect.map_or(true, |e| *e == t) => t,
        _ => return OwnerSave::NoOwner,
    };
    if !state.live || (dirty_only && state.usage == 0) {
        return OwnerSave::Clean(tenant);
    }
    match upstream.hooks.save(slot, &tenant, kind, tag).await {
        Some(file) => {
            if tag.is_none() {
                lease.mark_saved();
            }
            OwnerSave::Saved(tenant, file)
        }
        None => OwnerSave::Failed(tenant),
    }
}

/// Character slots whose live cache has unsaved messages; with `idle_only`,
/// only those nobody is using right now.
pub(crate) fn dirty_slots(upstream: &Upstream, idle_only: bool) -> Vec<(SlotId, Tenant)> {
    upstream
        .pool
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
pub(crate) async fn save_dirty_slots(
    upstream: &Upstream,
    kind: SaveKind,
    wait: Duration,
    idle_only: bool,
) -> usize {
    save_slots(
        upstream,
        dirty_slots(upstream, idle_only),
        kind,
        wait,
        |_| Outcome::Untouched,
    )
    .await
}

/// Saves the characters' slots with unsaved messages one after the other
/// while `quiet()` holds (checked before each save), as `kind`; a slot in
/// use is skipped. Returns how many were saved.
pub(crate) async fn save_dirty_while(
    upstream: &Upstream,
    kind: SaveKind,
    quiet: impl Fn() -> bool,
) -> usize {
    let mut saved = 0;
    for (slot, tenant) in dirty_slots(upstream, true) {
        if !quiet() {
            break;
        }
        saved += save_slots(upstream, vec![(slot, tenant)], kind, Duration::ZERO, |_| {
            Outcome::Untouched
        })
        .await;
    }
    saved
}

/// Takes each of `slots` in turn (waiting at most `wait`; a slot that stays
/// busy is skipped), saves its owner as `kind` if it is still the tenant
/// named and has unsaved messages, and releases the slot with the outcome
/// `then` gives for what happened. Returns how many were saved.
pub(crate) async fn save_slots(
    upstream: &Upstream,
    slots: Vec<(SlotId, Tenant)>,
    kind: SaveKind,
    wait: Duration,
    then: impl Fn(&OwnerSave) -> Outcome,
) -> usize {
    let mut saved = 0;
    for (slot, tenant) in slots {
        let Ok(lease) = upstream.pool.acquire(Want::Hold(slot), wait).await else {
            tracing::debug!(slot, %tenant, kind = kind.as_str(), "slot busy; not saved now");
            continue;
        };
        let result = save_owner(upstream, &lease, kind, None, Some(&tenant), true).await;
        if let OwnerSave::Saved(..) = result {
            saved += 1;
        }
        lease.release(then(&result));
    }
    saved
}

/// Saves the owner's unsaved messages when an autosave is due, after a
/// generation for `tenant` (the client already has its last byte; the slot
/// stays leased until the save is done, so the next request for this
/// character can't race it).
pub(crate) async fn autosave(upstream: &Upstream, lease: &Lease, tenant: &Tenant) {
    if tenant.is_character() && upstream.hooks.autosave_due(lease.usage()) {
        save_owner(
            upstream,
            lease,
            SaveKind::Autosave,
            None,
            Some(tenant),
            true,
        )
        .await;
    }
}

/// A client moved from chat `previous` to another: save every slot of the
/// previous chat that has unsaved messages, and release those slots.
pub(crate) async fn chat_switch(upstream: &Upstream, client: &str, previous: &str) {
    let slots: Vec<(usize, Tenant)> = upstream
        .pool
        .snapshot()
        .into_iter()
        .enumerate()
        .filter_map(|(id, s)| {
            s.owner
                .filter(|t| t.chat() == Some(previous))
                .map(|t| (id, t))
        })
        .collect();
    if slots.is_empty() {
        return;
    }
    info!(
        client,
        previous_chat = previous,
        slots = slots.len(),
        "chat switch: saving and releasing the previous chat's slots"
    );
    // A slot someone else took meanwhile, or whose save failed, is kept (with
    // its unsaved messages); the others are the previous chat's no more.
    let wait = upstream.shared.cfg.queue_timeout;
    save_slots(upstream, slots, SaveKind::ChatSwitch, wait, |r| match r {
        OwnerSave::NoOwner | OwnerSave::Failed(_) => Outcome::Untouched,
        OwnerSave::Clean(_) | OwnerSave::Saved(..) => Outcome::Cleared,
    })
    .await;
}
