//! Save-behind: keeps saves off the next speaker's critical path.
//!
//! In a group chat with more characters than slots, every turn evicts a
//! slot, and a save before eviction would sit between the next speaker's
//! request and its first token (a large save costs as much as a warm turn).
//! Instead, when a generation's first token is out (its prompt is processed,
//! so its time to first token is already paid), this task saves the *other*
//! idle slots that hold unsaved messages. llama-server runs those saves
//! between decode steps of the running generation, slowing its tail a little
//! rather than anyone's first token. When the next speaker evicts one of
//! those slots, it is clean: the eviction only restores.
//!
//! It acts only under eviction pressure (a slot changed hands recently), so
//! 1:1 chats and setups with enough slots write no extra files; the usual
//! autosave and save-before-eviction rules still apply on top.

use std::sync::Arc;
use std::time::Duration;

use super::unless_shutdown;
use crate::session::save_dirty_slots;
use crate::store::meta::SaveKind;
use crate::upstream::Upstream;

/// How recent an eviction must be to count as pressure.
const PRESSURE_WINDOW_S: u64 = 300;
/// How long the task waits for a slot it wants to save (it skips busy ones).
const HOLD_WAIT: Duration = Duration::from_millis(50);

/// Runs until `shutdown` resolves.
pub(crate) async fn run(upstream: Arc<Upstream>, shutdown: impl std::future::Future<Output = ()>) {
    if upstream.shared.store.is_none() {
        return;
    }
    tokio::pin!(shutdown);
    let kick = &upstream.save_behind_kick;
    while unless_shutdown(kick.notified(), &mut shutdown)
        .await
        .is_some()
    {
        if upstream.under_eviction_pressure(PRESSURE_WINDOW_S) {
            // A slot that is busy is left alone: its owner is generating and
            // will be dirty again afterwards anyway.
            // Counted like any lifecycle task, so "kvgate is idle" (shutdown,
            // tests, the demo) includes these saves.
            let _running = upstream.shared.tasks.start();
            save_dirty_slots(&upstream, SaveKind::Eviction, HOLD_WAIT, true).await;
        }
    }
}
