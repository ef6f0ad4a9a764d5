//! Which upstream a request goes to, pure. Placement ([`place`]) keeps a
//! character where its cache is: on the upstream whose table holds it. A
//! newcomer goes to the upstream with the most free slots among those up
//! and serving the requested model. An
//! upstream that is down is skipped, so its characters move and restore
//! from disk: saves are keyed by model fingerprint, and upstreams sharing a
//! save directory restore each other's saves.

use crate::slots::table::Slot;
use crate::tenant::Tenant;

/// How much of a tenant's cache an upstream holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Holds {
    /// Nothing: the tenant owns none of its slots.
    #[default]
    No,
    /// It owns a slot whose cache is gone (after a restart): it restores
    /// there, but a live copy elsewhere is better.
    Stale,
    /// A slot with the tenant's cache in it.
    Live,
}

/// One upstream as placement sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// It answered its monitor's last poll and has slots.
    pub(crate) up: bool,
    /// It serves the model the request names (every upstream does when the
    /// request names none, or one no upstream serves).
    pub(crate) serves: bool,
    /// What it holds of the tenant.
    pub(crate) holds: Holds,
    /// Slots nobody owns or uses.
    pub(crate) free: usize,
    /// Slots owned by someone but idle: a newcomer can evict one at once.
    pub(crate) idle: usize,
    /// Requests waiting for one of its slots.
    pub(crate) queued: usize,
}

/// The upstream a request should go to, or `None` when none is up. Order:
/// the tenant's own cache (live before stale), then most free slots, then
/// most idle slots, then the shortest queue, then the first listed.
pub(crate) fn place(candidates: &[Candidate]) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.up && c.serves)
        // `max_by_key` keeps the last of equals: walk backwards so the
        // first listed wins a tie.
        .rev()
        .max_by_key(|(_, c)| (c.holds, c.free, c.idle, std::cmp::Reverse(c.queued)))
        .map(|(i, _)| i)
}

/// One upstream's [`Candidate`] for `tenant`, from its slots and queue.
pub(crate) fn candidate(
    up: bool,
    serves: bool,
    slots: &[Slot],
    queued: usize,
    tenant: &Tenant,
) -> Candidate {
    let mut c = Candidate {
        up,
        serves,
        queued,
        ..Candidate::default()
    };
    for s in slots {
        match (&s.owner, s.lease.is_some()) {
            (Some(o), _) if o == tenant => {
                c.holds = c.holds.max(if s.live { Holds::Live } else { Holds::Stale })
            }
            (None, false) => c.free += 1,
            (Some(_), false) => c.idle += 1,
            (_, true) => {}
        }
    }
    c
}

/// Whether a request's `model` names one of `names` (case-insensitively:
/// clients spell file names freely).
pub(crate) fn names_model(names: &[String], model: &str) -> bool {
    names.iter().any(|n| n.eq_ignore_ascii_case(model))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(free: usize) -> Candidate {
        Candidate {
            up: true,
            serves: true,
            free,
            ..Candidate::default()
        }
    }

    #[test]
    fn a_tenant_stays_where_its_cache_is() {
        let holder = Candidate {
            holds: Holds::Live,
            ..up(0)
        };
        assert_eq!(place(&[up(3), holder, up(2)]), Some(1));
        // A live copy beats a stale one.
        let stale = Candidate {
            holds: Holds::Stale,
            ..up(5)
        };
        assert_eq!(place(&[stale, holder]), Some(1));
        assert_eq!(place(&[stale, up(5)]), Some(0));
    }

    #[test]
    fn a_holder_that_is_down_or_serves_another_model_is_skipped() {
        let down = Candidate {
            up: false,
            holds: Holds::Live,
            ..up(2)
        };
        assert_eq!(place(&[down, up(0)]), Some(1));
        let other_model = Candidate {
            serves: false,
            holds: Holds::Live,
            ..up(2)
        };
        assert_eq!(place(&[other_model, up(0)]), Some(1));
        assert_eq!(place(&[down]), None);
        assert_eq!(place(&[]), None);
    }

    #[test]
    fn a_newcomer_goes_where_most_slots_are_free() {
        assert_eq!(place(&[up(1), up(3), up(2)]), Some(1));
        // Ties: more idle (evictable) slots, then the shorter queue, then
        // the first listed.
        let idle = Candidate { idle: 2, ..up(0) };
        let queued = Candidate { queued: 4, ..up(0) };
        assert_eq!(place(&[up(0), idle]), Some(1));
        assert_eq!(place(&[queued, up(0)]), Some(1));
        assert_eq!(place(&[up(2), up(2)]), Some(0));
    }

    #[test]
    fn model_names_match_case_insensitively() {
        let names = vec!["Tiny".to_string(), "tiny.gguf".to_string()];
        assert!(names_model(&names, "tiny"));
        assert!(names_model(&names, "TINY.GGUF"));
        assert!(!names_model(&names, "llama"));
    }
}
