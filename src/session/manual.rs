//! Slot work the admin API asks for: save a slot now, clear (and erase)
//! every slot, load chosen saves into slots. Each takes its slots' leases
//! like any request, so it waits for generations in flight and never races
//! them.

use std::time::Duration;

use tracing::warn;

use crate::llama::client::SlotAction;
use crate::slots::lease::{AcquireError, Lease};
use crate::slots::table::{Outcome, SlotId, Want};
use crate::store::hooks::Restore;
use crate::store::meta::SaveKind;
use crate::tenant::Tenant;
use crate::upstream::Upstream;

use super::prepare::{load_file, take_over};
use super::save::{save_owner, OwnerSave};

/// Bound on llama-server erasing one slot.
const ERASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Saves one slot's character now (kind `manual`), under a `Hold` lease. An
/// untagged save is "save now" (the counters start over); a tagged one is a
/// bookmark that leaves them alone.
pub(crate) async fn save_slot(
    upstream: &Upstream,
    slot: SlotId,
    tag: Option<&str>,
) -> Result<OwnerSave, AcquireError> {
    let lease = hold(upstream, slot).await?;
    let result = save_owner(upstream, &lease, SaveKind::Manual, tag, None, false).await;
    lease.release(Outcome::Untouched);
    Ok(result)
}

/// Releases every slot of `upstream` from its owner, erasing its cache in
/// llama-server too with `erase`; returns the slots cleared and erased.
pub(crate) async fn clear(
    upstream: &Upstream,
    erase: bool,
) -> Result<(Vec<SlotId>, Vec<SlotId>), AcquireError> {
    let mut cleared = Vec::new();
    let mut erased = Vec::new();
    for slot in 0..upstream.pool.len() {
        let lease = hold(upstream, slot).await?;
        if erase {
            match upstream
                .client
                .slot_action(slot, SlotAction::Erase, None, ERASE_TIMEOUT)
                .await
            {
                Ok(_) => erased.push(slot),
                Err(e) => warn!(slot, error = %e, "erase failed"),
            }
        }
        lease.release(Outcome::Cleared);
        cleared.push(slot);
    }
    Ok((cleared, erased))
}

/// Loads each `(file, tenant)` of `plan` into a slot of its tenant; returns
/// each one's slot and what the restore did.
///
/// Every lease is held until all are loaded: leased slots are never evicted,
/// so the chosen characters can't evict each other. Characters already in a
/// slot take theirs first, so a newcomer's eviction can't pick a chosen
/// character's slot.
pub(crate) async fn load_saves(
    upstream: &Upstream,
    plan: &[(String, Tenant)],
) -> Result<Vec<(SlotId, Restore)>, AcquireError> {
    let table = upstream.pool.snapshot();
    let mut order: Vec<usize> = (0..plan.len()).collect();
    order.sort_by_key(|&i| !table.iter().any(|s| s.owner.as_ref() == Some(&plan[i].1)));
    let mut leases: Vec<Option<Lease>> = (0..plan.len()).map(|_| None).collect();
    for i in order {
        let want = Want::Tenant(plan[i].1.clone());
        let lease = upstream
            .pool
            .acquire(want, upstream.shared.cfg.queue_timeout)
            .await?;
        take_over(upstream, &lease).await;
        leases[i] = Some(lease);
    }
    let mut results = Vec::new();
    for ((file, tenant), lease) in plan.iter().zip(leases.into_iter().flatten()) {
        let restored = load_file(upstream, &lease, tenant, file).await;
        results.push((lease.slot(), restored));
        lease.release(Outcome::Untouched);
    }
    Ok(results)
}

/// Exclusive use of `slot` without changing its owner.
async fn hold(upstream: &Upstream, slot: SlotId) -> Result<Lease, AcquireError> {
    upstream
        .pool
        .acquire(Want::Hold(slot), upstream.shared.cfg.queue_timeout)
        .await
}
