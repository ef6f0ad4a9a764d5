//! Std locks that outlive a panic. Every structure kvgate keeps behind one
//! is changed by single calls that leave it whole (a table update, a value
//! replaced, a list pushed to), so a lock poisoned by a panicking holder
//! still guards a consistent value and is used as is, instead of taking
//! every later request down with it.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locking a `Mutex` whether or not a panic poisoned it.
pub(crate) trait Unpoisoned<T> {
    /// Exclusive access, ignoring poisoning.
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T>;
}

impl<T> Unpoisoned<T> for Mutex<T> {
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reading and writing an `RwLock` whether or not a panic poisoned it.
pub(crate) trait UnpoisonedRw<T> {
    /// Shared access, ignoring poisoning.
    fn read_unpoisoned(&self) -> RwLockReadGuard<'_, T>;
    /// Exclusive access, ignoring poisoning.
    fn write_unpoisoned(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T> UnpoisonedRw<T> for RwLock<T> {
    fn read_unpoisoned(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_unpoisoned(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(|e| e.into_inner())
    }
}
