//! The save directory and the cache layer on top of it.
//!
//! - `atomic`: small files written whole (temp, sync, rename).
//! - [`meta`]: what a save is (kind, model fingerprint, sidecar metadata).
//! - [`names`]: seed-compatible file names and the restore choice (pure).
//! - [`index`]: the directory and its index: checked commits, rotation.
//! - [`lock`]: one kvgate per save directory.
//! - [`hooks`]: the points where the cache layer acts around a generation.
//! - [`persist`]: the hooks for real: saves and restores through
//!   llama-server's slot actions into the store.
//! - [`reserved`]: the names kvgate keeps for itself (pure).
//! - [`usage`]: the directory's size and its filesystem's free space.

pub(crate) mod atomic;
pub mod hooks;
pub mod index;
pub mod lock;
pub mod meta;
pub mod names;
pub mod persist;
pub mod reserved;
pub mod usage;

pub use atomic::temp_token;
pub use hooks::{CacheHooks, Generation, NoCache, Restore};
pub use index::{CacheStore, NewSave};
pub use lock::LOCK_FILE;
pub use meta::{
    now_unix, Fingerprint, ParsedName, SaveKind, SaveMeta, StoreError, MAX_NAME_BYTES,
    MAX_TAG_BYTES, META_SUFFIX, TEMP_PREFIX,
};
pub use names::{
    choose_best, common_prefix, file_name, is_cache_file_name, meta_name, normalize, parse_name,
    parse_stamp, rotation_victims, utc_stamp,
};

#[cfg(test)]
mod tests;
