//! How slot work runs: leases are acquired with kvgate's queue bound,
//! metrics and `queue` events, and work that must not be cut short runs in
//! a task of its own.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;

use serde_json::json;

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
    // Declared before the request, so that a client leaving while queued
    // drops its place in the queue first and the count told is the new one.
    let mut queued = QueueNotice {
        upstream,
        waiting: false,
    };
    let mut acquiring = std::pin::pin!(upstream.pool.acquire_as(want, by, timeout));
    let at_once = std::future::poll_fn(|cx| Poll::Ready(acquiring.as_mut().poll(cx))).await;
    let granted = match at_once {
        Poll::Ready(r) => r,
        Poll::Pending => {
            queued.join();
            acquiring.await
        }
    };
    granted.inspect_err(|_| {
        crate::observe::metrics::inc(&upstream.shared.metrics.queue_rejections);
    })
}

/// Tells the event stream (`queue`, with the upstream's count) when a
/// request joins the queue and when it leaves it, granted, refused or
/// gone, so a dashboard shows the queue as it is without polling.
struct QueueNotice<'a> {
    upstream: &'a Upstream,
    /// It joined: leaving is told on drop.
    waiting: bool,
}

impl QueueNotice<'_> {
    fn join(&mut self) {
        self.waiting = true;
        self.tell();
    }

    fn tell(&self) {
        let queued = self.upstream.pool.queued();
        self.upstream.emit("queue", || json!({"queued": queued}));
    }
}

impl Drop for QueueNotice<'_> {
    fn drop(&mut self) {
        if self.waiting {
            self.tell();
        }
    }
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
