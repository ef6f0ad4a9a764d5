//! One byte budget for the request bodies kvgate holds in memory at once,
//! all clients together: a body is admitted by its bytes, not only counted
//! as one request, so a few huge bodies can't take the memory many small
//! ones would share. Counted in KiB permits of one semaphore; a body that
//! doesn't fit is refused at once (the caller answers 503) rather than
//! queued, so bodies half-read and waiting for each other can't stall.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes per permit.
const UNIT: u64 = 1024;

/// The budget (cheap to clone; clones share it).
#[derive(Clone, Debug)]
pub struct BodyBudget {
    permits: Arc<Semaphore>,
}

/// The share of the budget one body holds; returned when dropped.
#[derive(Debug)]
pub struct BodyPermit {
    budget: BodyBudget,
    held: Option<OwnedSemaphorePermit>,
}

impl BodyBudget {
    /// A budget of `bytes` (rounded up to whole KiB).
    pub fn new(bytes: u64) -> BodyBudget {
        let units = usize::try_from(bytes.div_ceil(UNIT)).unwrap_or(usize::MAX);
        BodyBudget {
            permits: Arc::new(Semaphore::new(units.min(Semaphore::MAX_PERMITS))),
        }
    }

    /// A permit holding nothing yet.
    pub fn permit(&self) -> BodyPermit {
        BodyPermit {
            budget: self.clone(),
            held: None,
        }
    }

    /// Bytes not held by any body now.
    pub fn available(&self) -> u64 {
        self.permits.available_permits() as u64 * UNIT
    }
}

impl BodyPermit {
    /// Grows the share to cover `bytes`; false (holding what it held) when
    /// the budget has not that much left.
    pub fn cover(&mut self, bytes: u64) -> bool {
        let want = bytes.div_ceil(UNIT);
        let have = self.held.as_ref().map_or(0, |p| p.num_permits() as u64);
        if want <= have {
            return true;
        }
        let Ok(more) = u32::try_from(want - have) else {
            return false;
        };
        match Arc::clone(&self.budget.permits).try_acquire_many_owned(more) {
            Ok(p) => {
                match &mut self.held {
                    Some(held) => held.merge(p),
                    None => self.held = Some(p),
                }
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_share_the_budget_and_give_it_back() {
        let budget = BodyBudget::new(10 * 1024);
        let mut a = budget.permit();
        assert!(a.cover(6 * 1024));
        assert!(a.cover(6 * 1024 - 10), "covering less is free");
        let mut b = budget.permit();
        assert!(!b.cover(5 * 1024), "only 4 KiB left");
        assert!(b.cover(4 * 1024));
        assert_eq!(budget.available(), 0);
        assert!(!a.cover(6 * 1024 + 1), "a partial KiB counts whole");
        drop(a);
        assert_eq!(budget.available(), 6 * 1024);
        assert!(b.cover(10 * 1024), "grows into what a gave back");
        drop(b);
        assert_eq!(budget.available(), 10 * 1024);
    }
}
