//! The further slots of a completion that asks for several answers
//! (`n_cmpl`, or its alias `n`, above 1).
//!
//! llama-server runs the first answer in the request's slot and each
//! further one in a slot of its own: the first free slots by id, other than
//! the request's (`get_free_slots`), which it clears when they finish
//! (`release`: "do not keep context of the child slots"). kvgate leases
//! exactly those slots before the request goes out, saves their owners'
//! unsaved messages as for any eviction, and marks them cleared at the end.
//! No request of kvgate's runs in a slot it holds, and every lower id is
//! one of them or the request's own, so llama-server finds exactly those
//! free first.

use std::sync::Arc;

use super::{detached, take_over, Detached};
use crate::slots::lease::{AcquireError, Lease};
use crate::slots::table::{ClientTag, SlotId, Want};
use crate::upstream::Upstream;

/// The slots llama-server will run `extra` further answers in, for a
/// request in `parent`: the lowest ids other than `parent`'s.
pub(crate) fn sibling_slots(parent: SlotId, extra: usize) -> Vec<SlotId> {
    (0..).filter(|&id| id != parent).take(extra).collect()
}

/// Why the further slots could not be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SiblingError {
    /// A slot's lease was not granted in time.
    #[error(transparent)]
    Acquire(#[from] AcquireError),
    /// Saving an evicted owner did not come back.
    #[error(transparent)]
    Detached(#[from] Detached),
}

/// Leases the slots llama-server will use for `extra` further answers of a
/// request whose own lease is on `parent`, in id order, and saves what their
/// owners had not saved. The caller holds `upstream.several_slots` from
/// before it leased `parent` until this returns.
pub(crate) async fn acquire_siblings(
    upstream: &Arc<Upstream>,
    parent: SlotId,
    extra: usize,
    by: Option<ClientTag>,
) -> Result<Vec<Lease>, SiblingError> {
    let mut leases = Vec::with_capacity(extra);
    for slot in sibling_slots(parent, extra) {
        leases.push(super::acquire(upstream, Want::Pinned(slot), by.clone()).await?);
    }
    // In a task of its own: a client going away must not cut a save short.
    let holder = Arc::clone(upstream);
    let leases = detached(upstream, async move {
        for lease in &leases {
            take_over(&holder, lease).await;
        }
        leases
    })
    .await?;
    Ok(leases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_ids_but_the_parents() {
        assert_eq!(sibling_slots(0, 2), vec![1, 2]);
        assert_eq!(sibling_slots(1, 2), vec![0, 2]);
        assert_eq!(sibling_slots(3, 3), vec![0, 1, 2]);
        assert_eq!(sibling_slots(2, 0), Vec::<SlotId>::new());
    }
}
