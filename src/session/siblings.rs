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
use crate::slots::table::{ClientTag, Outcome, SlotId, Want};
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

/// Leases a request's own slot (`want`) and the slots llama-server will run
/// `extra` further answers in, in id order, under the upstream's
/// several-slots lock (so two such requests can't wait for each other's
/// slots), and saves what their grants took from owners (the own slot's
/// too: the caller must not take it over again). All of it runs in a task
/// of its own, so a client going away can't leave an evicted owner
/// unsaved; if a slot can't be had, the leases taken so far are given
/// back untouched.
pub(crate) async fn acquire_with_siblings(
    upstream: &Arc<Upstream>,
    want: Want,
    extra: usize,
    by: Option<ClientTag>,
) -> Result<(Lease, Vec<Lease>), SiblingError> {
    let holder = Arc::clone(upstream);
    detached(upstream, async move {
        let _several = holder.several_slots.lock().await;
        let own = super::acquire(&holder, want, by.clone()).await?;
        take_over(&holder, &own).await;
        let mut siblings = Vec::with_capacity(extra);
        for slot in sibling_slots(own.slot(), extra) {
            match super::acquire(&holder, Want::Pinned(slot), by.clone()).await {
                Ok(lease) => {
                    take_over(&holder, &lease).await;
                    siblings.push(lease);
                }
                Err(e) => {
                    // Nothing ran in these slots: what their owners had
                    // is saved, and the slots are as they were.
                    for lease in siblings.into_iter().chain([own]) {
                        lease.release(Outcome::Untouched);
                    }
                    return Err(e.into());
                }
            }
        }
        Ok((own, siblings))
    })
    .await?
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
