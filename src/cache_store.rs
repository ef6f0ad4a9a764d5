//! The save directory (llama-server's `--slot-save-path`): file names, a
//! metadata sidecar per save, an in-memory index rebuilt from the directory,
//! rotation, and the choice of the best save to restore.
//!
//! # File names
//! Compatible with the seed extension, so files it wrote still list and load:
//! `{chat}_{YYYYMMDDHHmmss}_character_{name}.bin` and
//! `{chat}_{YYYYMMDDHHmmss}_tag_{tag}_character_{name}.bin`, timestamps in UTC.
//! Each part is normalised (Unicode letters and digits, `-` and `_` kept,
//! anything else `_`) and capped, a long part ending in a short hash so two
//! long names stay distinct. The exact chat, character and tag live in the
//! sidecar `{stem}.meta.json`, never recovered from the name alone.
//!
//! # Never losing a file
//! llama-server writes a save under a temporary name (`.kvgate-tmp-…`);
//! kvgate checks it, writes the sidecar (temp + rename), then renames the
//! save into place. A crash leaves either a temporary file (removed at the
//! next start), a sidecar without its save (removed), or a complete pair. A
//! save never overwrites another: a taken name moves to the next second.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use lru::LruCache;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::hash::fnv1a64;
use crate::slot_file;

/// Prefix of files llama-server is still writing (or a crash left behind).
pub const TEMP_PREFIX: &str = ".kvgate-tmp-";
/// Sidecar suffix replacing `.bin`.
pub const META_SUFFIX: &str = ".meta.json";
/// Longest normalised chat or character part, in bytes.
pub const MAX_NAME_BYTES: usize = 60;
/// Longest normalised tag part, in bytes.
pub const MAX_TAG_BYTES: usize = 36;
/// Token lists of saves kept in memory for restore decisions.
const TOKEN_CACHE: usize = 256;

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

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

// === names (pure) ===

/// Normalises a name part: Unicode letters and digits, `-` and `_` stay;
/// everything else becomes `_`. A result over `max_bytes` is cut at a
/// character boundary and ends in `-` plus 8 hex digits of the original's
/// hash, so long names stay distinct. Never empty.
pub fn normalize(s: &str, max_bytes: usize) -> String {
    let mapped: String = s
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mapped = if mapped.is_empty() {
        "_".to_string()
    } else {
        mapped
    };
    if mapped.len() <= max_bytes {
        return mapped;
    }
    let suffix = format!("-{:08x}", fnv1a64(s.as_bytes()) as u32);
    let mut cut = max_bytes.saturating_sub(suffix.len());
    while !mapped.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{}", &mapped[..cut], suffix)
}

/// `YYYYMMDDHHmmss` (UTC) for Unix seconds.
pub fn utc_stamp(unix: u64) -> String {
    let days = i64::try_from(unix / 86_400).unwrap_or(0);
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}

/// Unix seconds for a `YYYYMMDDHHmmss` stamp (read as UTC).
pub fn parse_stamp(stamp: &str) -> Option<u64> {
    if stamp.len() != 14 || !stamp.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = |r: std::ops::Range<usize>| stamp[r].parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(4..6)?, n(6..8)?);
    let (hh, mm, ss) = (n(8..10)?, n(10..12)?, n(12..14)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// The file name of a save.
pub fn file_name(chat: &str, unix: u64, tag: Option<&str>, character: &str) -> String {
    let chat = normalize(chat, MAX_NAME_BYTES);
    let character = normalize(character, MAX_NAME_BYTES);
    let stamp = utc_stamp(unix);
    match tag {
        Some(t) => format!(
            "{chat}_{stamp}_tag_{}_character_{character}.bin",
            normalize(t, MAX_TAG_BYTES)
        ),
        None => format!("{chat}_{stamp}_character_{character}.bin"),
    }
}

/// Takes a cache file name apart. Anchored on the timestamp (the rightmost
/// `_YYYYMMDDHHmmss_` followed by `tag_` or `character_`), so `_character_`,
/// `_tag_` or even a whole save name inside a chat id parse right (chat ids
/// are arbitrary client strings; character names are short). Unparseable
/// names: `None` (the file API still lists them).
pub fn parse_name(name: &str) -> Option<ParsedName> {
    let stem = name.strip_suffix(".bin")?;
    let bytes = stem.as_bytes();
    for i in (1..bytes.len().saturating_sub(15)).rev() {
        if bytes[i] == b'_'
            && bytes[i + 1..i + 15].iter().all(u8::is_ascii_digit)
            && bytes[i + 15] == b'_'
        {
            let chat = &stem[..i];
            let stamp = &stem[i + 1..i + 15];
            let rest = &stem[i + 16..];
            if let Some(ch) = rest.strip_prefix("character_") {
                if !ch.is_empty() {
                    return Some(ParsedName {
                        chat: chat.into(),
                        stamp: stamp.into(),
                        tag: None,
                        character: ch.into(),
                    });
                }
            }
            if let Some(t) = rest.strip_prefix("tag_") {
                if let Some(at) = t.rfind("_character_") {
                    let (tag, ch) = (&t[..at], &t[at + "_character_".len()..]);
                    if !tag.is_empty() && !ch.is_empty() {
                        return Some(ParsedName {
                            chat: chat.into(),
                            stamp: stamp.into(),
                            tag: Some(tag.into()),
                            character: ch.into(),
                        });
                    }
                }
            }
        }
    }
    None
}

/// Whether `name` may be a cache file of the directory: a plain file name
/// ending in `.bin`, no separators, no `..`, not a temporary file.
pub fn is_cache_file_name(name: &str) -> bool {
    name.ends_with(".bin")
        && name.len() > 4
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && !name.contains("..")
}

/// Length of the common prefix of two token lists.
pub fn common_prefix(a: &[i32], b: &[i32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Picks the save to restore: the longest common token prefix with the new
/// prompt, ties to the newest; only if it beats `at_least` tokens.
pub fn choose_best<'a>(
    candidates: &'a [(SaveMeta, Arc<Vec<i32>>)],
    prompt: &[i32],
    at_least: usize,
) -> Option<(&'a SaveMeta, usize)> {
    candidates
        .iter()
        .map(|(m, toks)| (m, common_prefix(toks, prompt)))
        .filter(|(_, lcp)| *lcp > at_least)
        .max_by(|(a, la), (b, lb)| {
            la.cmp(lb)
                .then(a.created.cmp(&b.created))
                .then(a.file.cmp(&b.file))
        })
}

/// Files to delete so at most `keep` untagged saves remain per chat and
/// character (newest kept). Tagged saves are neither deleted nor counted.
pub fn rotation_victims(
    saves: &[SaveMeta],
    chat: &str,
    character: &str,
    keep: usize,
) -> Vec<String> {
    let mut mine: Vec<&SaveMeta> = saves
        .iter()
        .filter(|m| m.tag.is_none() && m.chat == chat && m.character == character)
        .collect();
    mine.sort_by(|a, b| b.created.cmp(&a.created).then(b.file.cmp(&a.file)));
    mine.into_iter()
        .skip(keep)
        .map(|m| m.file.clone())
        .collect()
}

fn stem(file: &str) -> &str {
    file.strip_suffix(".bin").unwrap_or(file)
}

/// Sidecar name of a save.
pub fn meta_name(file: &str) -> String {
    format!("{}{META_SUFFIX}", stem(file))
}

/// Unix seconds now.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// === store (I/O) ===

/// What a new save is, before kvgate has checked and named it.
#[derive(Clone, Debug)]
pub struct NewSave<'a> {
    /// Chat key.
    pub chat: &'a str,
    /// Character.
    pub character: &'a str,
    /// Tag, for manual saves.
    pub tag: Option<&'a str>,
    /// Why.
    pub kind: SaveKind,
    /// Fingerprint of the model in use.
    pub fingerprint: Option<&'a Fingerprint>,
    /// llama-server's `n_saved`.
    pub n_saved: u64,
    /// llama-server's `n_written`.
    pub n_written: u64,
}

/// The save directory and its index.
#[derive(Debug)]
pub struct CacheStore {
    dir: PathBuf,
    index: Mutex<HashMap<String, SaveMeta>>,
    tokens: Mutex<LruCache<String, Arc<Vec<i32>>>>,
    temp_counter: AtomicU64,
    /// Saves smaller than this are rejected (0: off).
    min_bytes: u64,
}

// === impl CacheStore ===

impl CacheStore {
    /// Opens the directory: it must exist and be writable. Removes leftovers
    /// of interrupted saves and builds the index.
    pub fn open(dir: &Path) -> Result<CacheStore, StoreError> {
        let err = |reason: String| StoreError::Directory {
            dir: dir.to_path_buf(),
            reason,
        };
        let md = fs::metadata(dir).map_err(|e| err(format!("cannot be used ({e})")))?;
        if !md.is_dir() {
            return Err(err("is not a directory".into()));
        }
        let probe = dir.join(format!("{TEMP_PREFIX}probe-{}", std::process::id()));
        fs::write(&probe, b"").map_err(|e| {
            err(format!(
                "is not writable ({e}); kvgate writes its metadata there"
            ))
        })?;
        let _ = fs::remove_file(&probe);
        let store = CacheStore {
            dir: dir.to_path_buf(),
            index: Mutex::new(HashMap::new()),
            tokens: Mutex::new(LruCache::new(
                NonZeroUsize::new(TOKEN_CACHE).expect("nonzero"),
            )),
            temp_counter: AtomicU64::new(0),
            min_bytes: 0,
        };
        store.clean_leftovers();
        store.rescan()?;
        Ok(store)
    }

    /// Rejects saves smaller than `bytes` (`--min-save-bytes`; 0: off).
    pub fn with_min_bytes(mut self, bytes: u64) -> CacheStore {
        self.min_bytes = bytes;
        self
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn index(&self) -> MutexGuard<'_, HashMap<String, SaveMeta>> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn clean_leftovers(&self) {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEMP_PREFIX) {
                info!(file = %name, "removing the leftover of an interrupted save");
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Rebuilds the index from the directory: every `.bin` with its sidecar,
    /// or, for files kvgate did not write, what the name and header say.
    /// Files deleted from outside simply drop out; orphaned sidecars go.
    ///
    /// The index lock is held throughout, as `commit` and `delete` hold it
    /// while they change the directory: a rescan never sees a save half
    /// committed (its sidecar without its file) or half deleted.
    pub fn rescan(&self) -> Result<(), StoreError> {
        let mut index = self.index();
        let rd = fs::read_dir(&self.dir).map_err(io(format!("listing {}", self.dir.display())))?;
        let mut bins = HashMap::new();
        let mut metas = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEMP_PREFIX) {
                // Being written (or a crash's leftover, removed at start).
                continue;
            }
            if name.ends_with(META_SUFFIX) {
                metas.push(name);
            } else if is_cache_file_name(&name) {
                if let Ok(md) = e.metadata() {
                    if md.is_file() {
                        bins.insert(name, md);
                    }
                }
            }
        }
        let mut fresh = HashMap::new();
        for (name, md) in &bins {
            let meta = self
                .read_meta(name)
                .filter(|m| m.file == *name)
                .or_else(|| self.legacy_meta(name, md.len()));
            if let Some(mut m) = meta {
                m.bytes = md.len();
                fresh.insert(name.clone(), m);
            }
        }
        for m in metas {
            let bin = format!("{}.bin", m.trim_end_matches(META_SUFFIX));
            if !bins.contains_key(&bin) {
                debug!(file = %m, "removing a sidecar whose save is gone");
                let _ = fs::remove_file(self.dir.join(&m));
            }
        }
        *index = fresh;
        Ok(())
    }

    fn read_meta(&self, file: &str) -> Option<SaveMeta> {
        let text = fs::read(self.dir.join(meta_name(file))).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn legacy_meta(&self, file: &str, bytes: u64) -> Option<SaveMeta> {
        let p = parse_name(file)?;
        let n_tokens = slot_file::read_tokens(&self.dir.join(file))
            .map(|t| t.len() as u64)
            .unwrap_or(0);
        Some(SaveMeta {
            file: file.to_string(),
            chat: p.chat,
            character: p.character,
            tag: p.tag,
            kind: SaveKind::Legacy,
            created: parse_stamp(&p.stamp).unwrap_or(0),
            n_tokens,
            bytes,
            fingerprint: None,
            model: None,
        })
    }

    /// A fresh temporary name for llama-server to save into.
    pub fn temp_name(&self) -> String {
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        format!("{TEMP_PREFIX}{}-{n}.bin", std::process::id())
    }

    /// Removes a temporary save that will not be kept.
    pub fn discard_temp(&self, temp: &str) {
        if temp.starts_with(TEMP_PREFIX) {
            let _ = fs::remove_file(self.dir.join(temp));
        }
    }

    /// Checks a temporary save llama-server wrote and keeps it under its
    /// final name; on any failure the temporary file is removed and no final
    /// file exists.
    pub fn commit(&self, temp: &str, new: &NewSave<'_>) -> Result<SaveMeta, StoreError> {
        let result = self.commit_inner(temp, new);
        if result.is_err() {
            self.discard_temp(temp);
        }
        result
    }

    fn commit_inner(&self, temp: &str, new: &NewSave<'_>) -> Result<SaveMeta, StoreError> {
        if new.n_saved == 0 {
            return Err(StoreError::Rejected(
                "llama-server saved 0 tokens (empty slot)".into(),
            ));
        }
        let temp_path = self.dir.join(temp);
        let size = fs::metadata(&temp_path)
            .map_err(|e| {
                StoreError::Rejected(format!(
                    "llama-server reported a save but {} is not there ({e}); is kvgate's --save-dir \
                     the same directory as llama-server's --slot-save-path?",
                    temp_path.display()
                ))
            })?
            .len();
        if size != new.n_written {
            return Err(StoreError::Rejected(format!(
                "file has {size} bytes but llama-server reported writing {}",
                new.n_written
            )));
        }
        let min = self.min_bytes;
        if min > 0 && size < min {
            return Err(StoreError::Rejected(format!(
                "file has {size} bytes, under the {min}-byte minimum (--min-save-bytes)"
            )));
        }
        // The header must hold the tokens llama-server said it saved.
        let header = slot_file::read_tokens(&temp_path)
            .map_err(|e| StoreError::Rejected(format!("unreadable save header: {e}")))?;
        if header.len() as u64 != new.n_saved {
            return Err(StoreError::Rejected(format!(
                "header holds {} tokens but llama-server reported {}",
                header.len(),
                new.n_saved
            )));
        }

        let mut index = self.index();
        let mut t = now_unix();
        let file = loop {
            let f = file_name(new.chat, t, new.tag, new.character);
            if !index.contains_key(&f) && !self.dir.join(&f).exists() {
                break f;
            }
            t += 1;
        };
        let meta = SaveMeta {
            file: file.clone(),
            chat: new.chat.to_string(),
            character: new.character.to_string(),
            tag: new.tag.map(str::to_string),
            kind: new.kind,
            created: t,
            n_tokens: new.n_saved,
            bytes: size,
            fingerprint: new.fingerprint.map(|f| f.id.clone()),
            model: new.fingerprint.map(|f| f.model.clone()),
        };
        // Sidecar first: a crash before the rename leaves an orphaned sidecar
        // (removed at the next start), never a save without its metadata.
        self.write_meta(&meta)?;
        if let Err(e) = fs::rename(&temp_path, self.dir.join(&file)) {
            let _ = fs::remove_file(self.dir.join(meta_name(&file)));
            return Err(io(format!("renaming {temp} to {file}"))(e));
        }
        index.insert(file.clone(), meta.clone());
        drop(index);
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(file, Arc::new(header));
        Ok(meta)
    }

    fn write_meta(&self, meta: &SaveMeta) -> Result<(), StoreError> {
        let name = meta_name(&meta.file);
        let tmp = self.dir.join(format!("{TEMP_PREFIX}{name}"));
        let body =
            serde_json::to_vec_pretty(meta).map_err(|e| StoreError::Rejected(e.to_string()))?;
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            fs::rename(&tmp, self.dir.join(&name))
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io(format!("writing {name}"))(e)
        })
    }

    /// Every indexed save.
    pub fn list(&self) -> Vec<SaveMeta> {
        let mut v: Vec<SaveMeta> = self.index().values().cloned().collect();
        v.sort_by(|a, b| b.created.cmp(&a.created).then(a.file.cmp(&b.file)));
        v
    }

    /// The metadata of one save.
    pub fn get(&self, file: &str) -> Option<SaveMeta> {
        self.index().get(file).cloned()
    }

    /// The character's restorable saves under `fingerprint`: those of this
    /// chat, or, if it has none, of any chat.
    pub fn candidates(&self, chat: &str, character: &str, fingerprint: &str) -> Vec<SaveMeta> {
        let index = self.index();
        let usable: Vec<&SaveMeta> = index
            .values()
            .filter(|m| m.character == character && m.fingerprint.as_deref() == Some(fingerprint))
            .collect();
        let this_chat: Vec<SaveMeta> = usable
            .iter()
            .filter(|m| m.chat == chat)
            .map(|m| (*m).clone())
            .collect();
        if this_chat.is_empty() {
            usable.into_iter().cloned().collect()
        } else {
            this_chat
        }
    }

    /// The token list a save holds (from its header; cached).
    pub fn tokens(&self, file: &str) -> Result<Arc<Vec<i32>>, StoreError> {
        if let Some(t) = self
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(file)
        {
            return Ok(Arc::clone(t));
        }
        let toks = slot_file::read_tokens(&self.dir.join(file))
            .map(Arc::new)
            .map_err(|e| match e {
                slot_file::SlotFileError::Io(source)
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    StoreError::NotFound(file.to_string())
                }
                other => StoreError::Rejected(format!("{file}: {other}")),
            })?;
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(file.to_string(), Arc::clone(&toks));
        Ok(toks)
    }

    /// Deletes a save and its sidecar. Only names of cache files in this
    /// directory are accepted (no separators, no `..`, no symlinks).
    pub fn delete(&self, file: &str) -> Result<(), StoreError> {
        if !is_cache_file_name(file) {
            return Err(StoreError::BadName(file.to_string()));
        }
        let path = self.dir.join(file);
        match fs::symlink_metadata(&path) {
            Ok(md) if md.file_type().is_symlink() || !md.is_file() => {
                return Err(StoreError::BadName(file.to_string()))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.forget(file);
                return Err(StoreError::NotFound(file.to_string()));
            }
            Err(e) => return Err(io(format!("checking {file}"))(e)),
        }
        {
            // File, sidecar and entry go together (see `rescan`).
            let mut index = self.index();
            fs::remove_file(&path).map_err(io(format!("deleting {file}")))?;
            let _ = fs::remove_file(self.dir.join(meta_name(file)));
            index.remove(file);
        }
        self.forget_tokens(file);
        Ok(())
    }

    fn forget(&self, file: &str) {
        self.index().remove(file);
        self.forget_tokens(file);
    }

    fn forget_tokens(&self, file: &str) {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop(file);
    }

    /// Applies rotation for one chat and character; returns what it deleted.
    pub fn rotate(&self, chat: &str, character: &str, keep: usize) -> Vec<String> {
        let victims = rotation_victims(&self.list(), chat, character, keep);
        let mut deleted = Vec::new();
        for f in victims {
            match self.delete(&f) {
                Ok(()) | Err(StoreError::NotFound(_)) => deleted.push(f),
                Err(e) => warn!(file = %f, error = %e, "rotation could not delete a save"),
            }
        }
        deleted
    }
}

#[cfg(test)]
mod tests;
