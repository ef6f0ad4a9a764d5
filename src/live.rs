//! [`Live<T>`]: a value read often and replaced whole now and then (the live
//! settings, an upstream's model fingerprint, what its monitor last saw).

use std::sync::RwLock;

use crate::sync::UnpoisonedRw;

/// A value read often and replaced whole now and then, shared by the
/// handlers and the cache hooks: the live settings, the model fingerprint.
/// Readers get a copy, so no lock outlives the call. Writers replace the
/// value whole, so a lock poisoned by a panic still holds a whole value and
/// is used as is.
#[derive(Debug, Default)]
pub struct Live<T>(RwLock<T>);

impl<T: Clone> Live<T> {
    /// A live value starting at `value`.
    pub fn new(value: T) -> Live<T> {
        Live(RwLock::new(value))
    }

    /// A copy of the current value.
    pub fn get(&self) -> T {
        self.0.read_unpoisoned().clone()
    }

    /// Puts `value` in place; returns the value it replaced.
    pub fn replace(&self, value: T) -> T {
        std::mem::replace(&mut *self.0.write_unpoisoned(), value)
    }
}

#[cfg(test)]
mod tests {
    use super::Live;

    #[test]
    fn live_values_are_replaced_whole_and_survive_a_poisoned_lock() {
        let live = std::sync::Arc::new(Live::new(1u32));
        assert_eq!(live.replace(2), 1);
        // Poison the lock: a thread panics while it holds it for writing.
        let held = std::sync::Arc::clone(&live);
        let panicked = std::thread::spawn(move || {
            let _guard = held.0.write().unwrap();
            panic!("poison the lock");
        })
        .join();
        assert!(panicked.is_err() && live.0.is_poisoned());
        assert_eq!(live.get(), 2);
        assert_eq!(live.replace(3), 2);
        assert_eq!(live.get(), 3);
    }
}
