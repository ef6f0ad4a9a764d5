//! The cache hooks for real: saves go through llama-server's slot actions
//! into a temporary name, are checked and committed by the
//! [`CacheStore`]; restores pick the save sharing the longest token prefix
//! with the new prompt, under the same model fingerprint.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::json;
use tracing::{debug, info, warn};

use crate::live::Live;
use crate::llama::client::{LlamaClient, SlotAction};
use crate::observe::metrics;
use crate::shared::Shared;
use crate::slots::table::SlotId;
use crate::store::hooks::{BoxFuture, CacheHooks, Generation, Restore};
use crate::store::index::{CacheStore, NewSave};
use crate::store::meta::{Fingerprint, SaveKind, SaveMeta, StoreError};
use crate::store::names::choose_best;
use crate::tenant::Tenant;

/// Bound on one save or restore (a large cache takes a while to write).
const SLOT_IO_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound on tokenizing a prompt for the restore decision.
const TOKENIZE_TIMEOUT: Duration = Duration::from_secs(30);

/// A save llama-server wrote under a temporary name, to be checked and
/// committed.
#[derive(Debug)]
struct Pending {
    temp: String,
    chat: String,
    character: String,
    tag: Option<String>,
    kind: SaveKind,
    fingerprint: Fingerprint,
    n_saved: u64,
    n_written: u64,
    /// Untagged saves to keep per chat and character (rotation), if any.
    keep: Option<usize>,
}

/// Saves and restores through llama-server into a [`CacheStore`].
#[derive(Debug)]
pub struct Persistence {
    /// The upstream's name, for the events.
    name: String,
    store: Arc<CacheStore>,
    client: LlamaClient,
    /// The model the upstream serves (its own, shared with its state).
    fingerprint: Arc<Live<Option<Fingerprint>>>,
    /// Settings, events and metrics.
    shared: Arc<Shared>,
}

// === impl Persistence ===

impl Persistence {
    /// Hooks over `store` for the upstream called `name`, reached through
    /// `client` and serving the model `fingerprint` names; settings, events
    /// and metrics are the `shared` ones.
    pub fn new(
        name: &str,
        store: Arc<CacheStore>,
        client: LlamaClient,
        fingerprint: Arc<Live<Option<Fingerprint>>>,
        shared: Arc<Shared>,
    ) -> Persistence {
        Persistence {
            name: name.to_string(),
            store,
            client,
            fingerprint,
            shared,
        }
    }

    /// Emits an event naming this upstream.
    fn emit(&self, kind: &str, fields: impl FnOnce() -> serde_json::Value) {
        self.shared.events.emit_for(&self.name, kind, fields);
    }

    /// Saves the tenant's cache from `slot` as `kind` (see
    /// [`CacheHooks::save`]).
    async fn do_save(
        &self,
        slot: SlotId,
        tenant: &Tenant,
        kind: SaveKind,
        tag: Option<&str>,
    ) -> Option<String> {
        let (Some(chat), Some(character)) = (tenant.chat(), tenant.character()) else {
            return None;
        };
        let Some(fp) = self.fingerprint.get() else {
            warn!(slot, %tenant, "not saving: llama-server's model is not known yet");
            return None;
        };
        let started = Instant::now();
        let temp = self.store.temp_name();
        let fail = |reason: String| {
            metrics::inc(&self.shared.metrics.save_failures);
            self.emit(
                "save_failed",
                || json!({"slot": slot, "chat": chat, "character": character, "kind": kind.as_str(), "reason": reason}),
            );
        };
        let reply = match self
            .client
            .slot_action(slot, SlotAction::Save, Some(&temp), SLOT_IO_TIMEOUT)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                // llama-server may have written part of the file.
                self.store.discard_temp(&temp);
                warn!(slot, %tenant, kind = kind.as_str(), error = %e, "save failed; the usage counter is kept so the next save retries");
                fail(e.to_string());
                return None;
            }
        };
        let keep = tag
            .is_none()
            .then(|| self.shared.settings.get().max_files as usize);
        let pending = Pending {
            temp,
            chat: chat.to_string(),
            character: character.to_string(),
            tag: tag.map(str::to_string),
            kind,
            fingerprint: fp,
            n_saved: reply.n_saved.unwrap_or(0),
            n_written: reply.n_written.unwrap_or(0),
            keep,
        };
        let committed = self.commit(pending).await;
        match committed {
            Ok((meta, rotated)) => {
                info!(slot, %tenant, kind = kind.as_str(), file = %meta.file, tokens = meta.n_tokens, bytes = meta.bytes, "saved");
                let took = started.elapsed();
                self.shared.metrics.saved(kind.as_str(), meta.bytes, took);
                self.emit(
                    "saved",
                    || json!({"slot": slot, "chat": chat, "character": character, "kind": kind.as_str(), "file": meta.file, "tag": tag, "tokens": meta.n_tokens, "bytes": meta.bytes, "ms": took.as_secs_f64() * 1000.0}),
                );
                if !rotated.is_empty() {
                    debug!(deleted = ?rotated, "rotation");
                }
                Some(meta.file)
            }
            Err(e) => {
                warn!(slot, %tenant, kind = kind.as_str(), error = %e, "save rejected; nothing kept");
                fail(e.to_string());
                None
            }
        }
    }

    /// Checks and commits a save llama-server wrote, then rotates; the
    /// checks, the sidecar (with its fsync), the rename and rotation are
    /// file work, so they run off the async workers, which relay other
    /// streams. Returns the save and the files rotation deleted.
    async fn commit(&self, p: Pending) -> Result<(SaveMeta, Vec<String>), StoreError> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || {
            let new = NewSave {
                chat: &p.chat,
                character: &p.character,
                tag: p.tag.as_deref(),
                kind: p.kind,
                fingerprint: Some(&p.fingerprint),
                n_saved: p.n_saved,
                n_written: p.n_written,
            };
            let meta = store.commit(&p.temp, &new)?;
            let rotated = p.keep.map(|keep| store.rotate(&p.chat, &p.character, keep));
            Ok((meta, rotated.unwrap_or_default()))
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::Rejected(format!("the commit task failed: {e}"))))
    }

    /// Tokenizes the new prompt the way `/completion` will.
    async fn prompt_tokens(&self, g: &Generation<'_>) -> Option<Vec<i32>> {
        let text = match (g.prompt, g.messages) {
            (Some(p), _) => p.to_string(),
            (None, Some(messages)) => {
                let body = serde_json::json!({ "messages": messages });
                let (status, v) = self
                    .client
                    .call_json(
                        Method::POST,
                        "/apply-template",
                        Some(&body),
                        TOKENIZE_TIMEOUT,
                    )
                    .await
                    .ok()?;
                if !status.is_success() {
                    return None;
                }
                v.get("prompt")?.as_str()?.to_string()
            }
            (None, None) => return None,
        };
        match self.client.tokenize(&text, TOKENIZE_TIMEOUT).await {
            Ok(t) => Some(t),
            Err(e) => {
                debug!(error = %e, "tokenize failed; choosing the newest save");
                None
            }
        }
    }

    async fn do_restore(&self, g: Generation<'_>) -> Restore {
        let tenant = g.tenant;
        let (Some(chat), Some(character)) = (tenant.chat(), tenant.character()) else {
            return Restore::Skipped;
        };
        let Some(fp) = self.fingerprint.get() else {
            return Restore::Skipped;
        };
        let candidates = self.store.candidates(chat, character, &fp.id);
        let others = self.store.chat_candidates(chat, character, &fp.id);
        if candidates.is_empty() && others.is_empty() {
            return Restore::Skipped;
        }
        let chosen = match self.prompt_tokens(&g).await {
            Some(prompt) => {
                // Token lists come from the saves' headers (file reads).
                let store = Arc::clone(&self.store);
                let (with_tokens, others): (Vec<_>, Vec<_>) =
                    tokio::task::spawn_blocking(move || {
                        let tokens = |list: Vec<SaveMeta>| -> Vec<_> {
                            list.into_iter()
                                .filter_map(|m| store.tokens(&m.file).ok().map(|t| (m, t)))
                                .collect()
                        };
                        (tokens(candidates), tokens(others))
                    })
                    .await
                    .unwrap_or_default();
                // Restores happen only for a slot that does not hold this
                // tenant's live cache (another tenant's, or nothing), so the
                // save must share more than the BOS token to be worth it.
                let own = choose_best(&with_tokens, &prompt, 1);
                // Another character's save of the chat, only when it holds
                // most of the prompt: the character's context went into
                // that character's slot (a shared prefix).
                let theirs = choose_best(&others, &prompt, prompt.len() / 2);
                match (own, theirs) {
                    (Some(o), Some(t)) if t.1 > o.1 => Some(t),
                    (None, t) => t,
                    (o, _) => o,
                }
                .map(|(m, lcp)| (m.file.clone(), lcp))
            }
            None => candidates
                .iter()
                .max_by_key(|m| (m.created, m.file.clone()))
                .map(|m| (m.file.clone(), 0)),
        };
        let Some((file, lcp)) = chosen else {
            return Restore::Skipped;
        };
        self.load_save(g.slot, tenant, &file, Some(lcp)).await
    }

    /// Loads `file` into `slot` for `tenant`, with its metrics, event and
    /// log line (`shared_prefix`: the tokens it shares with the new prompt,
    /// when known).
    async fn load_save(
        &self,
        slot: SlotId,
        tenant: &Tenant,
        file: &str,
        shared_prefix: Option<usize>,
    ) -> Restore {
        let (chat, character) = (tenant.chat(), tenant.character());
        let started = Instant::now();
        match self
            .client
            .slot_action(slot, SlotAction::Restore, Some(file), SLOT_IO_TIMEOUT)
            .await
        {
            Ok(r) => {
                let tokens = r.n_restored.unwrap_or(0);
                metrics::inc(&self.shared.metrics.restores);
                metrics::add_time(&self.shared.metrics.restore_micros, started.elapsed());
                self.emit("restored", || {
                    // Where the save came from, for a client telling its
                    // user ("restored Alice from yesterday's other chat");
                    // looked up only when someone listens.
                    let saved = self.store.get(file);
                    json!({
                        "slot": slot,
                        "chat": chat,
                        "character": character,
                        "file": file,
                        "tokens": tokens,
                        "shared_prefix": shared_prefix,
                        "ms": started.elapsed().as_secs_f64() * 1000.0,
                        "saved_chat": saved.as_ref().map(|m| m.chat.as_str()),
                        "saved_at": saved.as_ref().map(|m| m.created),
                        "save_kind": saved.as_ref().map(|m| m.kind.as_str()),
                        "tag": saved.as_ref().and_then(|m| m.tag.as_deref()),
                    })
                });
                info!(slot, %tenant, %file, tokens, ?shared_prefix, "restored");
                Restore::Restored {
                    file: file.to_string(),
                    tokens,
                }
            }
            Err(e) => {
                metrics::inc(&self.shared.metrics.restore_failures);
                let reason = format!("{file}: {e}");
                self.emit(
                    "restore_failed",
                    || json!({"slot": slot, "chat": chat, "character": character, "file": file, "reason": reason}),
                );
                Restore::Failed(reason)
            }
        }
    }
}

impl CacheHooks for Persistence {
    fn save<'a>(
        &'a self,
        slot: SlotId,
        tenant: &'a Tenant,
        kind: SaveKind,
        tag: Option<&'a str>,
    ) -> BoxFuture<'a, Option<String>> {
        Box::pin(self.do_save(slot, tenant, kind, tag))
    }

    fn restore<'a>(&'a self, generation: Generation<'a>) -> BoxFuture<'a, Restore> {
        Box::pin(self.do_restore(generation))
    }

    fn restore_file<'a>(
        &'a self,
        slot: SlotId,
        tenant: &'a Tenant,
        file: &'a str,
    ) -> BoxFuture<'a, Restore> {
        Box::pin(self.load_save(slot, tenant, file, None))
    }

    fn autosave_due(&self, usage: u32) -> bool {
        let s = self.shared.settings.get();
        // With idle saves on, the idle-save task saves these as soon as
        // llama-server is quiet, off every request's path; an autosave on
        // the path (the character's next request waits for it) is then only
        // the bound for traffic that never pauses.
        let every = if s.idle_save_s > 0 {
            s.save_every.saturating_mul(2)
        } else {
            s.save_every
        };
        s.autosave && usage >= every
    }
}
