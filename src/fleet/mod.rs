//! The upstreams as a fleet: where a request goes ([`placement`], pure), and
//! the four tasks that work beside each upstream's requests: its
//! [`monitor`] (slot count, model, outages and restarts), [`save_behind`]
//! (background saves that keep what a slot holds on disk), [`idle_save`]
//! (saves while llama-server is quiet) and [`ahead`] (the next speaker's
//! prefill while the current one generates).

pub(crate) mod ahead;
pub(crate) mod idle_save;
pub(crate) mod monitor;
pub(crate) mod placement;
pub(crate) mod save_behind;

use std::future::Future;
use std::pin::Pin;

/// `work`'s output, or `None` once `shutdown` resolves first: how the
/// tasks wait for their cue, so that each stops at kvgate's shutdown.
pub(crate) async fn unless_shutdown<T>(
    work: impl Future<Output = T>,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> Option<T> {
    tokio::select! {
        _ = shutdown => None,
        out = work => Some(out),
    }
}
