//! The save directory (llama-server's `--slot-save-path`) and its index:
//! a metadata sidecar per save, an in-memory index rebuilt from the
//! directory, checked commits, rotation and deletion.
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
//! kvgate checks it, syncs it, writes the sidecar (temp + sync + rename),
//! renames the save into place and syncs the directory: only then is the
//! save kept, and only then may rotation delete older ones. A crash leaves either a temporary file (removed at the
//! next start), a sidecar without its save (removed), or a complete pair. A
//! save never overwrites another: a taken name moves to the next second.

use std::collections::HashMap;
use std::fs;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;
use tracing::{debug, info, warn};

use crate::llama::slot_file;
use crate::store::atomic::{sync_dir, temp_token, write_whole};
use crate::store::lock::DirLock;
use crate::store::meta::{
    io, now_unix, Fingerprint, SaveKind, SaveMeta, StoreError, META_SUFFIX, TEMP_PREFIX,
};
use crate::store::names::{
    file_name, is_cache_file_name, meta_name, parse_name, parse_stamp, rotation_victims,
};
use crate::sync::Unpoisoned;

/// Token lists of saves kept in memory for restore decisions.
const TOKEN_CACHE: usize = 256;

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
    /// Numbers this store's temporary save names.
    temp_counter: AtomicU64,
    /// This process's hold on the directory (see `store::lock`).
    _lock: DirLock,
    /// Saves smaller than this are rejected (0: off).
    min_bytes: u64,
}

// === impl CacheStore ===

impl CacheStore {
    /// Opens the directory: it must exist and be writable, and no other
    /// process may hold it (see `store::lock`). Removes leftovers of
    /// interrupted saves (safe: nobody else writes there) and builds the
    /// index.
    pub fn open(dir: &Path) -> Result<CacheStore, StoreError> {
        let err = |reason: String| StoreError::Directory {
            dir: dir.to_path_buf(),
            reason,
        };
        let md = fs::metadata(dir).map_err(|e| err(format!("cannot be used ({e})")))?;
        if !md.is_dir() {
            return Err(err("is not a directory".into()));
        }
        let probe = dir.join(format!("{TEMP_PREFIX}{:016x}-probe", temp_token()));
        fs::write(&probe, b"").map_err(|e| {
            err(format!(
                "is not writable ({e}); kvgate writes its metadata there"
            ))
        })?;
        let _ = fs::remove_file(&probe);
        let lock = DirLock::acquire(dir).map_err(err)?;
        let store = CacheStore {
            dir: dir.to_path_buf(),
            index: Mutex::new(HashMap::new()),
            tokens: Mutex::new(LruCache::new(
                NonZeroUsize::new(TOKEN_CACHE).expect("nonzero"),
            )),
            temp_counter: AtomicU64::new(0),
            _lock: lock,
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
        self.index.lock_unpoisoned()
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

    /// A fresh temporary name for llama-server to save into (see
    /// [`temp_token`]).
    pub fn temp_name(&self) -> String {
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        format!("{TEMP_PREFIX}{:016x}-{n}.bin", temp_token())
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

        // llama-server wrote the file and did not sync it: its bytes reach
        // the disk before its name does, so a power loss can't leave a
        // truncated save under a final name (and older saves rotated away).
        fs::File::open(&temp_path)
            .and_then(|f| f.sync_all())
            .map_err(io(format!("syncing {temp}")))?;

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
        // The renames (the save's and its sidecar's) reach the disk before
        // the save counts as kept: rotation deletes older saves next.
        sync_dir(&self.dir).map_err(io(format!("syncing {}", self.dir.display())))?;
        index.insert(file.clone(), meta.clone());
        drop(index);
        self.tokens.lock_unpoisoned().put(file, Arc::new(header));
        Ok(meta)
    }

    fn write_meta(&self, meta: &SaveMeta) -> Result<(), StoreError> {
        let name = meta_name(&meta.file);
        let body =
            serde_json::to_vec_pretty(meta).map_err(|e| StoreError::Rejected(e.to_string()))?;
        write_whole(&self.dir, &name, &body).map_err(io(format!("writing {name}")))
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

    /// The saves of `chat`'s other characters under `fingerprint`: a
    /// character whose cache went into another's slot of the chat (a
    /// member, see `slots::content`) may find its latest context there.
    pub fn chat_candidates(&self, chat: &str, character: &str, fingerprint: &str) -> Vec<SaveMeta> {
        self.index()
            .values()
            .filter(|m| {
                m.chat == chat
                    && m.character != character
                    && m.fingerprint.as_deref() == Some(fingerprint)
            })
            .cloned()
            .collect()
    }

    /// The token list a save holds (from its header; cached).
    pub fn tokens(&self, file: &str) -> Result<Arc<Vec<i32>>, StoreError> {
        if let Some(t) = self.tokens.lock_unpoisoned().get(file) {
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
            .lock_unpoisoned()
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
        self.tokens.lock_unpoisoned().pop(file);
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
