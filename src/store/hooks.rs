//! The points in a completion's life where the cache layer acts: save a
//! slot's owner (before eviction, as an autosave, on a chat switch or at
//! shutdown), and restore the new owner's best save right before its
//! generation. Every hook runs while the caller holds the slot's lease, so
//! nothing else can touch the slot meanwhile.
//!
//! [`NoCache`] does nothing (kvgate without a save directory);
//! [`crate::store::persist::Persistence`] is the real thing; tests plug in fakes.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;

use serde_json::Value;

use crate::slots::table::SlotId;
use crate::store::meta::SaveKind;
use crate::tenant::Tenant;

/// A boxed, sendable future (the hooks are trait objects).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a restore did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Restore {
    /// Nothing worth restoring (no save, or the slot already holds more).
    Skipped,
    /// A save was loaded into the slot.
    Restored {
        /// File name in the save directory.
        file: String,
        /// Tokens loaded.
        tokens: u64,
    },
    /// The restore failed; llama-server cleared the slot.
    Failed(String),
}

/// A generation about to run.
#[derive(Clone, Copy, Debug)]
pub struct Generation<'a> {
    /// The slot it runs on.
    pub slot: SlotId,
    /// Who it is for.
    pub tenant: &'a Tenant,
    /// The prompt text, for text completions.
    pub prompt: Option<&'a str>,
    /// The messages, for chat completions.
    pub messages: Option<&'a Value>,
}

/// Cache actions around a generation.
pub trait CacheHooks: Send + Sync + Debug + 'static {
    /// Saves the tenant's cache from `slot`. Returns the file name when a
    /// save was written (and checked); `None` when nothing was saved.
    fn save<'a>(
        &'a self,
        slot: SlotId,
        tenant: &'a Tenant,
        kind: SaveKind,
        tag: Option<&'a str>,
    ) -> BoxFuture<'a, Option<String>>;

    /// Brings the tenant's best save into the slot, right before the
    /// generation (no gap in which llama-server could clear the slot).
    fn restore<'a>(&'a self, generation: Generation<'a>) -> BoxFuture<'a, Restore>;

    /// Loads a chosen save into the slot for `tenant` (the admin `/load`).
    fn restore_file<'a>(
        &'a self,
        slot: SlotId,
        tenant: &'a Tenant,
        file: &'a str,
    ) -> BoxFuture<'a, Restore>;

    /// Whether a slot with `usage` unsaved messages is due for an autosave.
    fn autosave_due(&self, usage: u32) -> bool;
}

/// Hooks that do nothing: kvgate as a pure slot-pinning proxy.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoCache;

impl CacheHooks for NoCache {
    fn save<'a>(
        &'a self,
        _: SlotId,
        _: &'a Tenant,
        _: SaveKind,
        _: Option<&'a str>,
    ) -> BoxFuture<'a, Option<String>> {
        Box::pin(async { None })
    }

    fn restore<'a>(&'a self, _: Generation<'a>) -> BoxFuture<'a, Restore> {
        Box::pin(async { Restore::Skipped })
    }

    fn restore_file<'a>(&'a self, _: SlotId, _: &'a Tenant, _: &'a str) -> BoxFuture<'a, Restore> {
        Box::pin(async { Restore::Skipped })
    }

    fn autosave_due(&self, _: u32) -> bool {
        false
    }
}
