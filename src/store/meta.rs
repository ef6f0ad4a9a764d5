//! What a save is: why it was made ([`SaveKind`]), the model it belongs to
//! ([`Fingerprint`]), its sidecar metadata ([`SaveMeta`]), and the names and
//! errors of the save directory.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::hash::fnv1a64;

/// Prefix of files llama-server is still writing (or a crash left behind).
pub const TEMP_PREFIX: &str = ".kvgate-tmp-";
/// Sidecar suffix replacing `.bin`.
pub const META_SUFFIX: &str = ".meta.json";
/// Longest normalised chat or character part, in bytes.
pub const MAX_NAME_BYTES: usize = 60;
/// Longest normalised tag part, in bytes.
pub const MAX_TAG_BYTES: usize = 36;

/// Why a save was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SaveKind {
    /// Every `save_every` messages.
    Autosave,
    /// Asked for on the admin port.
    Manual,
    /// Before the slot went to another character.
    Eviction,
    /// The client moved to another chat.
    ChatSwitch,
    /// kvgate was shutting down.
    Shutdown,
    /// A group preload.
    Preload,
    /// llama-server was idle for a moment (the user reading).
    Idle,
    /// A file kvgate did not write (the seed extension's); kind unknown.
    Legacy,
}

impl SaveKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            SaveKind::Autosave => "autosave",
            SaveKind::Manual => "manual",
            SaveKind::Eviction => "eviction",
            SaveKind::ChatSwitch => "chat-switch",
            SaveKind::Shutdown => "shutdown",
            SaveKind::Preload => "preload",
            SaveKind::Idle => "idle",
            SaveKind::Legacy => "legacy",
        }
    }
}

/// Identity of the model a save was made under. Slot files carry none, and a
/// file from another model with the same shapes loads silently and gives
/// wrong output, so kvgate never restores across fingerprints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Short stable id (hash of the fields below).
    pub id: String,
    /// Model file name (without directories).
    pub model: String,
    /// Parameter count.
    pub n_params: u64,
    /// Model size in bytes.
    pub size: u64,
    /// Vocabulary size.
    pub n_vocab: u64,
    /// Context per slot.
    pub n_ctx_slot: u64,
}

impl Fingerprint {
    /// From llama-server's `/props` and `/v1/models` answers.
    pub fn from_upstream(props: &Value, models: &Value) -> Fingerprint {
        let model_path = props
            .get("model_path")
            .and_then(Value::as_str)
            .unwrap_or("");
        let model = model_path
            .rsplit(['/', '\\'])
            .next()
            .unwrap_or(model_path)
            .to_string();
        let meta = models
            .pointer("/data/0/meta")
            .cloned()
            .unwrap_or(Value::Null);
        let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        let n_ctx_slot = props
            .pointer("/default_generation_settings/n_ctx")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let mut fp = Fingerprint {
            id: String::new(),
            model,
            n_params: num(&meta, "n_params"),
            size: num(&meta, "size"),
            n_vocab: num(&meta, "n_vocab"),
            n_ctx_slot,
        };
        let key = format!(
            "{}|{}|{}|{}|{}",
            fp.model, fp.n_params, fp.size, fp.n_vocab, fp.n_ctx_slot
        );
        fp.id = format!("{:016x}", fnv1a64(key.as_bytes()));
        fp
    }
}

/// Everything kvgate knows about one save (the sidecar's contents).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveMeta {
    /// File name in the save directory.
    pub file: String,
    /// Chat key, exactly.
    pub chat: String,
    /// Character name, exactly.
    pub character: String,
    /// Tag of a manual save (tagged saves are never rotated).
    #[serde(default)]
    pub tag: Option<String>,
    /// Why it was made.
    pub kind: SaveKind,
    /// Unix seconds (UTC) of the name's timestamp.
    pub created: u64,
    /// Tokens in the save.
    pub n_tokens: u64,
    /// Size on disk.
    pub bytes: u64,
    /// Model fingerprint id, `None` for files kvgate did not write.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Model file name, for display.
    #[serde(default)]
    pub model: Option<String>,
}

/// A file name taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedName {
    /// Normalised chat part.
    pub chat: String,
    /// `YYYYMMDDHHmmss`.
    pub stamp: String,
    /// Normalised tag part.
    pub tag: Option<String>,
    /// Normalised character part.
    pub character: String,
}

/// Store failures callers branch on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The save directory is missing, not a directory, or not writable.
    #[error("save directory {dir}: {reason}")]
    Directory {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A save failed its checks; nothing was kept.
    #[error("save rejected: {0}")]
    Rejected(String),
    /// A name that is not a cache file of this directory.
    #[error("{0:?} is not a cache file name")]
    BadName(String),
    /// No such file.
    #[error("{0} does not exist")]
    NotFound(String),
    /// File system error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// Unix seconds now.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
