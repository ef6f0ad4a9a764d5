//! Prefill ahead: while one character of a group chat generates, the
//! character likely to speak next gets a slot with its cache extended by
//! what has been said since it last spoke, so its turn reads only the
//! current speaker's reply.
//!
//! In SillyTavern's default group mode each speaker's prompt starts with
//! its own card, so no speaker's cache holds another's prompt: llama-server
//! alone (and kvgate without this) evaluates, on each turn, every message
//! said since that speaker last spoke. Here, once the current speaker's
//! first token is out (its prompt is read, so its time to first token is
//! paid):
//! 1. the next speaker is guessed from the current prompt
//!    ([`crate::identity::next_speaker::predict`]: SillyTavern's round of
//!    answers to a user message); no guess at the end of a round;
//! 2. its next prompt's beginning is composed from its own last prompt and
//!    the current one ([`crate::identity::next_speaker::anticipate`]);
//! 3. it takes a slot as its own turn would (never the current speaker's,
//!    never one a request waits for; its cache comes back from
//!    llama-server's RAM or from disk first), and llama-server reads that
//!    beginning with a one-token completion.
//!
//! It runs only for named characters of text-completion chats, only when
//! nothing waits for a slot, and costs the running generation the time to
//! read the new messages (llama-server batches them with its decoding). It
//! gives way to any turn that starts meanwhile: its request is dropped and
//! llama-server cancels it at its next batch, keeping what it read. A
//! wrong guess costs that and nothing else: the guessed character's cache
//! is only extended. Counted in `kvgate_prefill_ahead_*` and the
//! `prefill_ahead` event.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tracing::debug;

use super::unless_shutdown;
use crate::identity::content;
use crate::identity::next_speaker::{anticipate, predict};
use crate::lookahead::Job;
use crate::observe::metrics;
use crate::session;
use crate::slots::table::{Outcome, Want};
use crate::store::hooks::Restore;
use crate::tenant::{Kind, Tenant};
use crate::upstream::Upstream;

/// How long a job waits for its generation's first token.
const FIRST_TOKEN_WAIT: Duration = Duration::from_secs(120);
/// How long it waits for a slot: only one that is free or idle right now.
const SLOT_WAIT: Duration = Duration::from_millis(1);
/// Longest prefill ahead.
const EVALUATE_LIMIT: Duration = Duration::from_secs(120);
/// Prompt tokens prefill ahead leaves for the turn itself to read, at
/// least. llama-server on CPU reads a batch of fewer than 64 new tokens an
/// order of magnitude slower per token than one of 64 (measured on the
/// pinned build: 63 tokens 788 ms, 64 tokens 91 ms, 128 tokens 173 ms):
/// leaving only the last reply, often shorter, would make the turn slower
/// than reading everything.
const LEFT_FOR_THE_TURN: usize = 64;
/// How often a prefill ahead checks whether a turn wants to go first.
const YIELD_POLL: Duration = Duration::from_millis(5);
/// Longest wait for save-behind's holds before taking a slot.
const SAVE_BEHIND_WAIT: Duration = Duration::from_secs(1);
/// Longest wait for llama-server's tokenizer.
const TOKENIZE_LIMIT: Duration = Duration::from_secs(10);

/// Runs until `shutdown` resolves.
pub(crate) async fn run(upstream: Arc<Upstream>, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    while unless_shutdown(upstream.ahead.offered(), &mut shutdown)
        .await
        .is_some()
    {
        let Some(job) = upstream.ahead.take() else {
            continue;
        };
        // A newer turn offered before this one's first token (this one's
        // client went away) is the one that counts.
        let first = tokio::time::timeout(FIRST_TOKEN_WAIT, job.first_token.notified());
        let cue = async {
            tokio::select! {
                _ = upstream.ahead.offered() => false,
                r = first => r.is_ok(),
            }
        };
        match unless_shutdown(cue, &mut shutdown).await {
            None => return,
            // A newer job, or no first token in time.
            Some(false) => {
                if upstream.ahead.is_offered() {
                    upstream.ahead.kick_again();
                }
                continue;
            }
            Some(true) => {}
        }
        let draining = upstream.shared.draining.load(Ordering::Relaxed);
        if draining || !upstream.shared.settings.get().prefill_ahead {
            continue;
        }
        // A newer turn started meanwhile: its job is the one that counts.
        if upstream.ahead.is_offered() {
            continue;
        }
        prefill(&upstream, job).await;
    }
}

/// Resolves when a turn starts (the upstream's count of starts moves past
/// `seen`) or waits for a slot.
async fn a_turn_arrives(upstream: &Upstream, seen: u64) {
    while upstream.starts() == seen && upstream.pool.queued() == 0 {
        tokio::time::sleep(YIELD_POLL).await;
    }
}

/// Waits (a little) for the slots save-behind holds to be free again: it
/// starts at the same first token, and the slot it saves is usually the one
/// the next speaker takes.
async fn after_save_behind(upstream: &Upstream) {
    let deadline = Instant::now() + SAVE_BEHIND_WAIT;
    while Instant::now() < deadline && upstream.pool.read(|t| t.slots().iter().any(|s| s.held)) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Steps 1 to 3 of the module docs for one job.
async fn prefill(upstream: &Arc<Upstream>, job: Job) {
    let (Some(chat), Some(name)) = (job.speaker.chat(), job.speaker.character()) else {
        return;
    };
    let Some(next) = predict(&job.prompt, name, &job.members, job.user.as_deref()) else {
        return;
    };
    let tenant = Tenant::Character {
        chat: chat.to_string(),
        name: next.name,
    };
    upstream.note_prediction(&tenant);
    let memory = &upstream.shared.memory;
    let Some(prompt) = memory
        .last_prompt(&tenant)
        .and_then(|last| anticipate(&last, &job.prompt))
    else {
        return;
    };
    after_save_behind(upstream).await;
    if upstream.pool.queued() > 0 {
        return;
    }
    let body = json!({ "prompt": prompt });
    let text: Arc<str> = Arc::from(content::prompt_text(&body));
    let want = Want::Prompt {
        tenant: tenant.clone(),
        text,
    };
    let Ok(lease) = upstream.pool.acquire(want, SLOT_WAIT).await else {
        return;
    };
    let started = Instant::now();
    let slot = lease.slot();
    let grant = lease.grant().clone();
    let work = {
        let upstream = Arc::clone(upstream);
        async move {
            session::take_over(&upstream, &lease).await;
            if grant.needs_restore() {
                let r = session::restore(&upstream, &lease, &tenant, Some(&prompt), None).await;
                if matches!(r, Restore::Failed(_)) {
                    lease.release(Outcome::Untouched);
                    return;
                }
            }
            // Token ids, so that exactly the last `LEFT_FOR_THE_TURN` are left.
            let Ok(mut tokens) = upstream.client.tokenize(&prompt, TOKENIZE_LIMIT).await else {
                lease.release(Outcome::Untouched);
                return;
            };
            tokens.truncate(tokens.len().saturating_sub(LEFT_FOR_THE_TURN));
            if tokens.is_empty() {
                lease.release(Outcome::Untouched);
                return;
            }
            // A turn that arrives meanwhile goes first: the request is
            // dropped, llama-server cancels it at its next batch, and the
            // slot keeps the prefix read so far (still the character's).
            let starts = upstream.starts();
            let read = tokio::select! {
                r = upstream.client.evaluate(slot, tokens, EVALUATE_LIMIT) => r,
                _ = a_turn_arrives(&upstream, starts) => {
                    lease.apply(Outcome::Generated(Kind::Impersonate));
                    lease.release(Outcome::Untouched);
                    metrics::inc(&upstream.shared.metrics.ahead_yielded);
                    debug!(slot, %tenant, "prefill ahead gave way to a turn");
                    return;
                }
            };
            let Ok(timings) = read else {
                // The slot's contents are unknown.
                lease.release(Outcome::Failed);
                return;
            };
            session::judge_ram_load(&upstream, &lease, timings.cache_n, timings.prompt_n);
            // Not a message of the character's: what the slot holds is
            // longer, but nothing new is unsaved.
            lease.apply(Outcome::Generated(Kind::Impersonate));
            lease.release(Outcome::Untouched);
            let m = &upstream.shared.metrics;
            metrics::inc(&m.ahead_prefills);
            metrics::add(&m.ahead_tokens, timings.prompt_n.unwrap_or(0));
            upstream.emit("prefill_ahead", || {
                json!({
                    "slot": slot,
                    "chat": tenant.chat(),
                    "character": tenant.character(),
                    "mentioned": next.mentioned,
                    "evaluated": timings.prompt_n,
                    "ms": started.elapsed().as_secs_f64() * 1000.0,
                })
            });
            debug!(slot, %tenant, evaluated = ?timings.prompt_n, "prefilled ahead");
        }
    };
    let _ = session::detached(upstream, work).await;
}
