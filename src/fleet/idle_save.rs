//! Idle saves: when llama-server has had no generation for a moment (the
//! user is reading and typing), the characters' unsaved messages go to
//! disk, so a crash or restart of llama-server loses little and the next
//! turn after it restores instead of re-reading the whole prompt. This
//! covers what `save_every` and save-behind leave out: a 1:1 chat, or a
//! group with enough slots, is otherwise saved only every few messages.
//!
//! A save runs on llama-server's single main loop, so it must not be in a
//! request's way: the task waits `idle_save_s` (a live setting, 0 = off)
//! after a generation ends, saves only while no generation has started or
//! waits, and stops between two saves as soon as one does. A request that
//! arrives during a save waits for that one save at most.

use std::sync::Arc;
use std::time::Duration;

use super::unless_shutdown;
use crate::session::save_dirty_while;
use crate::store::meta::SaveKind;
use crate::upstream::Upstream;

/// Runs until `shutdown` resolves.
pub(crate) async fn run(upstream: Arc<Upstream>, shutdown: impl std::future::Future<Output = ()>) {
    if upstream.shared.store.is_none() {
        return;
    }
    tokio::pin!(shutdown);
    while unless_shutdown(upstream.idle_kick.notified(), &mut shutdown)
        .await
        .is_some()
    {
        // Quiet for the whole delay: no generation started or ended, and
        // nothing leased or waiting, at its end.
        loop {
            let delay = upstream.shared.settings.get().idle_save_s;
            if delay == 0 {
                break;
            }
            let before = upstream.activity();
            let pause = tokio::time::sleep(Duration::from_secs(delay));
            if unless_shutdown(pause, &mut shutdown).await.is_none() {
                return;
            }
            let generated = upstream.activity() != before;
            if generated && !upstream.pool.is_idle() {
                // The generation running now wakes this task when it ends.
                break;
            }
            if generated || !upstream.pool.is_idle() {
                // A generation came and went, or other slot work (a save,
                // an admin load) is under way: look again after a delay.
                continue;
            }
            let _running = upstream.shared.tasks.start();
            let quiet = || upstream.pool.is_idle() && upstream.activity() == before;
            save_dirty_while(&upstream, SaveKind::Idle, quiet).await;
            break;
        }
    }
}
