//! How slot work runs: leases are acquired with kvgate's queue bound and
//! metrics, and work that must not be cut short runs in a task of its own.

use std::future::Future;
use std::sync::Arc;

use crate::slots::lease::{AcquireError, Lease};
use crate::slots::table::{ClientTag, Want};
use crate::upstream::Upstream;

/// Waits (within the configured queue timeout) for a lease on what `want`
/// asks of `upstream` for client `by`; a refusal counts as a queue
/// rejection.
pub(crate) async fn acquire(
    upstream: &Arc<Upstream>,
    want: Want,
    by: Option<ClientTag>,
) -> Result<Lease, AcquireError> {
    let timeout = upstream.shared.cfg.queue_timeout;
    upstream
        .pool
        .acquire_as(want, by, timeout)
        .await
        .inspect_err(|_| {
            crate::observe::metrics::inc(&upstream.shared.metrics.queue_rejections);
        })
}

/// Why detached work did not come back.
#[derive(Debug, thiserror::Error)]
#[error("slot preparation failed: {0}")]
pub(crate) struct Detached(String);

/// Runs `work` in a task of its own, so that the request future being
/// dropped (the client went away) cannot interrupt a save or a restore half
/// way; counted so shutdown waits for it.
pub(crate) async fn detached<T: Send + 'static>(
    upstream: &Upstream,
    work: impl Future<Output = T> + Send + 'static,
) -> Result<T, Detached> {
    let guard = upstream.shared.tasks.start();
    tokio::spawn(async move {
        let _guard = guard;
        work.await
    })
    .await
    .map_err(|e| Detached(e.to_string()))
}
