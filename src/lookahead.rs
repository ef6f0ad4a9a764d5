//! The offer a turn makes to prefill ahead (`fleet::ahead`): a mailbox
//! holding the latest turn that may be followed by one, so the proxy and
//! the upstream can hand it over without knowing the task.

use std::sync::Arc;

use tokio::sync::Notify;

use crate::sync::Unpoisoned;
use crate::tasks::TaskGuard;
use crate::tenant::Tenant;

/// A turn that may be followed by a prefill ahead.
#[derive(Debug)]
pub(crate) struct Job {
    /// The character generating now.
    pub speaker: Tenant,
    /// Its prompt.
    pub prompt: Arc<str>,
    /// The chat's characters (not the user).
    pub members: Vec<String>,
    /// The user's name in the prompt, when known.
    pub user: Option<String>,
    /// Notified when the generation's first token is out.
    pub first_token: Arc<Notify>,
    /// Counts the job as kvgate's own work from its offer to its end, so
    /// "kvgate is idle" (tests, shutdown) includes a prefill about to start.
    #[allow(dead_code)] // held for its Drop
    pub running: TaskGuard,
}

/// The latest job of an upstream (an older one is moot).
#[derive(Debug, Default)]
pub(crate) struct Ahead {
    job: std::sync::Mutex<Option<Job>>,
    kick: Notify,
}

impl Ahead {
    /// Offers the job of a turn that just started.
    pub(crate) fn offer(&self, job: Job) {
        *self.job.lock_unpoisoned() = Some(job);
        self.kick.notify_one();
    }

    /// Takes the job offered, if any.
    pub(crate) fn take(&self) -> Option<Job> {
        self.job.lock_unpoisoned().take()
    }

    /// Whether a job waits (a newer turn than one being handled).
    pub(crate) fn is_offered(&self) -> bool {
        self.job.lock_unpoisoned().is_some()
    }

    /// Waits until a job is offered.
    pub(crate) async fn offered(&self) {
        self.kick.notified().await;
    }

    /// Wakes [`Ahead::offered`] again (the job it announced is still to be
    /// taken).
    pub(crate) fn kick_again(&self) {
        self.kick.notify_one();
    }
}
