//! Getting a leased slot ready for its new owner: the previous owner's
//! unsaved messages go to disk ([`take_over`]), then the new owner's best
//! save comes in ([`restore`]) or a chosen one ([`load_file`]), and the
//! table learns what the slot holds.

use serde_json::{json, Value};
use tracing::warn;

use crate::observe::metrics;
use crate::slots::lease::Lease;
use crate::slots::ram;
use crate::store::hooks::{Generation, Restore};
use crate::store::meta::SaveKind;
use crate::tenant::Tenant;
use crate::upstream::Upstream;

/// A grant that takes a slot from another tenant: count it, tell the
/// monitors, and save the previous owner's unsaved messages first (inside the
/// new owner's lease, so nothing can run on the slot meanwhile).
pub(crate) async fn take_over(upstream: &Upstream, lease: &Lease) {
    let Some(ev) = lease.grant().evicted.clone() else {
        return;
    };
    let slot = lease.slot();
    metrics::inc(&upstream.shared.metrics.evictions);
    upstream.note_eviction();
    upstream.emit(
        "evicted",
        || json!({"slot": slot, "chat": ev.tenant.chat(), "character": ev.tenant.character(), "usage": ev.usage}),
    );
    if ev.usage >= 1 && ev.tenant.is_character() && ev.live {
        let saved = upstream
            .hooks
            .save(slot, &ev.tenant, SaveKind::Eviction, None)
            .await;
        if saved.is_some() {
            // What llama-server stashes in RAM is on disk too.
            lease.ram_evicted_saved();
        }
    }
}

/// After a generation whose grant sent the tenant to llama-server's RAM
/// cache (`from_ram`), judges from its `timings` whether the cache came
/// back: counts it, and after a miss has kvgate restore from disk until
/// llama-server restarts (see [`crate::slots::ram`]). Other grants: nothing.
pub(crate) fn judge_ram_load(
    upstream: &Upstream,
    lease: &Lease,
    cache_n: Option<u64>,
    prompt_n: Option<u64>,
) {
    let Some(expect) = lease.grant().from_ram else {
        return;
    };
    let m = &upstream.shared.metrics;
    match ram::came_back(expect, cache_n, prompt_n) {
        Some(true) => metrics::inc(&m.ram_hits),
        Some(false) => {
            metrics::inc(&m.ram_misses);
            lease.ram_missed();
            let (slot, tenant) = (lease.slot(), lease.state().owner);
            let name = tenant.as_ref().map(ToString::to_string).unwrap_or_default();
            warn!(
                slot,
                ?cache_n,
                ?prompt_n,
                "llama-server's RAM prompt cache did not have {name}'s cache; restoring from disk from now on until it restarts"
            );
            upstream.emit("ram_cache_miss", || {
                let t = tenant.as_ref();
                json!({"slot": slot, "chat": t.and_then(Tenant::chat), "character": t.and_then(Tenant::character)})
            });
        }
        None => {}
    }
}

/// Restores the tenant's best save into the leased slot, right before its
/// generation, and records what happened to the slot.
pub(crate) async fn restore(
    upstream: &Upstream,
    lease: &Lease,
    tenant: &Tenant,
    prompt: Option<&str>,
    messages: Option<&Value>,
) -> Restore {
    let generation = Generation {
        slot: lease.slot(),
        tenant,
        prompt,
        messages,
    };
    let r = upstream.hooks.restore(generation).await;
    record_restore(lease, &r);
    r
}

/// Loads a chosen save into the leased slot for `tenant` (the admin
/// `/load`), and records what happened to the slot.
pub(crate) async fn load_file(
    upstream: &Upstream,
    lease: &Lease,
    tenant: &Tenant,
    file: &str,
) -> Restore {
    let r = upstream
        .hooks
        .restore_file(lease.slot(), tenant, file)
        .await;
    record_restore(lease, &r);
    r
}

/// What a restore means for the slot: it holds the restored cache (nothing
/// unsaved), or, after a failure, nothing (llama-server cleared it).
fn record_restore(lease: &Lease, r: &Restore) {
    if !matches!(r, Restore::Skipped) {
        // The restore replaced (or cleared) what the slot held before the
        // generation could have llama-server stash it in RAM.
        lease.ram_forget_evicted();
    }
    match r {
        Restore::Restored { file, .. } => lease.mark_restored(file),
        Restore::Failed(reason) => {
            warn!(slot = lease.slot(), %reason, "restore failed; the slot is empty");
            lease.mark_empty();
        }
        Restore::Skipped => {}
    }
}
