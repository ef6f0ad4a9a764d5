//! Group preload (warm-up): for each character of a chat in turn, take a
//! slot, restore its best save, or else evaluate a prompt with a 1-token
//! generation and save the result (kind `preload`). Jobs run in the
//! background; progress is readable and published as events; cancelling
//! aborts the job at once, and dropping its lease frees the slot.
//!
//! Both kinds of job are bounded, so a client looping on `POST /preload`
//! cannot grow kvgate without end: at most [`MAX_ACTIVE`] work at once
//! (more is refused until one ends), and only the [`KEEP_FINISHED`] newest
//! finished ones stay readable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use crate::session::{self, OwnerSave};
use crate::slots::table::{Outcome, Want};
use crate::store::hooks::Restore;
use crate::store::meta::SaveKind;
use crate::sync::Unpoisoned;
use crate::tenant::{Kind, Tenant};
use crate::upstream::Upstream;

/// Most jobs working at once. Each holds or waits for a slot, so more
/// would only queue behind each other (and behind the chats).
pub(crate) const MAX_ACTIVE: usize = 8;
/// Finished jobs (done or cancelled) whose progress stays readable; older
/// ones are forgotten when a new job starts.
pub(crate) const KEEP_FINISHED: usize = 64;

/// What to evaluate for a character without a save: its own prompt, else
/// the shared one, else the last prompt kvgate saw for it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Prompts {
    /// One prompt for every character (`"prompt"`).
    pub(crate) shared: Option<String>,
    /// Each character's own (`"prompts"`), by name.
    pub(crate) own: HashMap<String, String>,
}

impl Prompts {
    fn for_character(&self, name: &str) -> Option<&str> {
        self.own
            .get(name)
            .or(self.shared.as_ref())
            .map(String::as_str)
    }
}

/// Why a job was not started: [`MAX_ACTIVE`] jobs are working.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TooMany;

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum JobState {
    /// Working through its characters.
    Running,
    /// Every character was handled.
    Done,
    /// Cancelled by `DELETE /preload/{id}`.
    Cancelled,
}

/// A character the job could not warm up.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub(crate) struct Failure {
    /// The character.
    pub(crate) character: String,
    /// Why.
    pub(crate) reason: String,
}

/// Progress of one job, as `GET /preload/{id}` shows it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Progress {
    /// Job id.
    pub(crate) id: u64,
    /// Chat the characters belong to.
    pub(crate) chat: String,
    /// Running, done or cancelled.
    pub(crate) state: JobState,
    /// The character being worked on.
    pub(crate) current: Option<String>,
    /// Characters handled.
    pub(crate) done: usize,
    /// Characters in the job.
    pub(crate) total: usize,
    /// Characters warmed up, with what was done.
    pub(crate) succeeded: Vec<Value>,
    /// Characters that failed, with the reason.
    pub(crate) failed: Vec<Failure>,
}

#[derive(Debug)]
struct Job {
    progress: Mutex<Progress>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Job {
    /// Whether the job still works: running, and its task alive (a task
    /// that died without saying so must not hold a place for ever).
    fn is_active(&self) -> bool {
        // One lock at a time: no order between the two to get wrong.
        let running = self.progress.lock_unpoisoned().state == JobState::Running;
        let ended = self
            .handle
            .lock_unpoisoned()
            .as_ref()
            .is_some_and(JoinHandle::is_finished);
        running && !ended
    }
}

/// The finished jobs to forget: all but the `keep` newest (highest ids).
fn to_forget(mut finished: Vec<u64>, keep: usize) -> Vec<u64> {
    finished.sort_unstable_by(|a, b| b.cmp(a));
    finished.split_off(keep.min(finished.len()))
}

/// All jobs of this kvgate.
#[derive(Debug, Default)]
pub(crate) struct Preloads {
    next: AtomicU64,
    jobs: Mutex<HashMap<u64, Arc<Job>>>,
}

impl Preloads {
    /// Starts a job; returns its id, or [`TooMany`] while [`MAX_ACTIVE`]
    /// jobs work. Finished jobs beyond [`KEEP_FINISHED`] are forgotten.
    pub(crate) fn start(
        &self,
        upstream: &Arc<Upstream>,
        chat: String,
        characters: Vec<String>,
        prompts: Prompts,
    ) -> Result<u64, TooMany> {
        let mut jobs = self.jobs.lock_unpoisoned();
        let (active, finished): (Vec<_>, Vec<_>) = jobs.iter().partition(|(_, j)| j.is_active());
        if active.len() >= MAX_ACTIVE {
            return Err(TooMany);
        }
        let finished: Vec<u64> = finished.into_iter().map(|(id, _)| *id).collect();
        for id in to_forget(finished, KEEP_FINISHED) {
            jobs.remove(&id);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let job = Arc::new(Job {
            progress: Mutex::new(Progress {
                id,
                chat: chat.clone(),
                state: JobState::Running,
                current: None,
                done: 0,
                total: characters.len(),
                succeeded: Vec::new(),
                failed: Vec::new(),
            }),
            handle: Mutex::new(None),
        });
        jobs.insert(id, Arc::clone(&job));
        drop(jobs);
        let upstream2 = Arc::clone(upstream);
        let job2 = Arc::clone(&job);
        let handle =
            tokio::spawn(async move { run(upstream2, job2, chat, characters, prompts).await });
        *job.handle.lock_unpoisoned() = Some(handle);
        Ok(id)
    }

    /// A job's progress.
    pub(crate) fn progress(&self, id: u64) -> Option<Progress> {
        let jobs = self.jobs.lock_unpoisoned();
        jobs.get(&id).map(|j| j.progress.lock_unpoisoned().clone())
    }

    /// Cancels a job at once. Returns its progress, or `None` if unknown.
    pub(crate) fn cancel(&self, id: u64) -> Option<Progress> {
        let job = self.jobs.lock_unpoisoned().get(&id).cloned()?;
        if let Some(h) = job.handle.lock_unpoisoned().take() {
            // Aborting drops the job's future, and with it its lease (the
            // slot is released) and any request to llama-server.
            h.abort();
        }
        let mut p = job.progress.lock_unpoisoned();
        if p.state == JobState::Running {
            p.state = JobState::Cancelled;
            p.current = None;
        }
        Some(p.clone())
    }
}

fn update(job: &Job, f: impl FnOnce(&mut Progress)) -> Progress {
    let mut p = job.progress.lock_unpoisoned();
    f(&mut p);
    p.clone()
}

fn publish(upstream: &Upstream, p: &Progress) {
    upstream.emit("preload_progress", || {
        serde_json::to_value(p).unwrap_or(Value::Null)
    });
}

async fn run(
    upstream: Arc<Upstream>,
    job: Arc<Job>,
    chat: String,
    characters: Vec<String>,
    prompts: Prompts,
) {
    for character in characters {
        let p = update(&job, |p| p.current = Some(character.clone()));
        publish(&upstream, &p);
        let limit = Duration::from_secs(upstream.shared.settings.get().preload_timeout_s);
        let result = tokio::time::timeout(
            limit,
            preload_one(
                &upstream,
                &chat,
                &character,
                prompts.for_character(&character),
            ),
        )
        .await;
        let p = update(&job, |p| {
            // Done with this one: nobody is current until the next starts,
            // so "current" and "done" never count the same character.
            p.done += 1;
            p.current = None;
            match result {
                Ok(Ok(what)) => p
                    .succeeded
                    .push(json!({"character": character, "result": what})),
                Ok(Err(reason)) => p.failed.push(Failure {
                    character: character.clone(),
                    reason,
                }),
                Err(_) => p.failed.push(Failure {
                    character: character.clone(),
                    reason: format!("timed out after {} s", limit.as_secs()),
                }),
            }
        });
        publish(&upstream, &p);
    }
    let p = update(&job, |p| {
        p.state = JobState::Done;
        p.current = None;
    });
    publish(&upstream, &p);
}

/// Warms one character up; returns what was done.
async fn preload_one(
    upstream: &Arc<Upstream>,
    chat: &str,
    character: &str,
    prompt: Option<&str>,
) -> Result<String, String> {
    let tenant = Tenant::Character {
        chat: chat.to_string(),
        name: character.to_string(),
    };
    let lease = upstream
        .pool
        .acquire(
            Want::Tenant(tenant.clone()),
            upstream.shared.cfg.queue_timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
    let slot = lease.slot();
    session::take_over(upstream, &lease).await;
    if lease.grant().resident {
        lease.release(Outcome::Untouched);
        return Ok(format!("already in slot {slot}"));
    }
    let known = upstream.shared.memory.last_prompt(&tenant);
    let prompt = prompt.or(known.as_deref());
    match session::restore(upstream, &lease, &tenant, prompt, None).await {
        Restore::Restored { file, tokens } => {
            lease.release(Outcome::Untouched);
            return Ok(format!(
                "restored {file} ({tokens} tokens) into slot {slot}"
            ));
        }
        // A failed restore leaves an empty slot: evaluate the prompt instead.
        Restore::Failed(_) | Restore::Skipped => {}
    }
    let Some(prompt) = prompt else {
        lease.release(Outcome::Untouched);
        return Err(
            "no save and no prompt known for this character (send one in \"prompts\")".into(),
        );
    };
    // On an error the lease is dropped: the slot's contents are unknown.
    let limit = Duration::from_secs(upstream.shared.settings.get().preload_timeout_s);
    let evaluated = upstream
        .client
        .evaluate(slot, prompt, limit)
        .await?
        .prompt_n
        .unwrap_or(0);
    lease.apply(Outcome::Generated(Kind::Quiet));
    let result = match session::save_owner(
        upstream,
        &lease,
        SaveKind::Preload,
        None,
        Some(&tenant),
        false,
    )
    .await
    {
        OwnerSave::Saved(_, file) => Ok(format!(
            "evaluated {evaluated} tokens in slot {slot}, saved {file}"
        )),
        _ => Ok(format!(
            "evaluated {evaluated} tokens in slot {slot} (not saved)"
        )),
    };
    lease.release(Outcome::Untouched);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newest_finished_jobs_are_kept() {
        assert_eq!(to_forget(vec![3, 1, 2], 5), Vec::<u64>::new());
        assert_eq!(to_forget(vec![3, 1, 2], 2), vec![1]);
        let mut forgotten = to_forget((1..=100).rev().collect(), KEEP_FINISHED);
        forgotten.sort_unstable();
        assert_eq!(forgotten, (1..=36).collect::<Vec<u64>>());
        assert_eq!(to_forget(vec![7], 0), vec![7]);
    }
}
