//! The upstreams kvgate serves through, and which one a request goes to.
//!
//! Each upstream (a `--upstream` URL, the `--model` llama-server, an
//! instance started through the admin API) is an [`App`] with its own slot
//! table, client, model fingerprint, monitor and save-behind task; they
//! share settings, the save directory, metrics, events and memory.
//!
//! Placement ([`place`], pure) keeps a character where its cache is: on the
//! upstream whose table holds it. A newcomer goes to the upstream with the
//! most free slots among those up and serving the requested model. An
//! upstream that is down is skipped, so its characters move and restore
//! from disk: saves are keyed by model fingerprint, and upstreams sharing a
//! save directory restore each other's saves.

use std::sync::{Arc, RwLock};

use hyper::Uri;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::app::{App, Shared};
use crate::clients::Clients;
use crate::config::Config;
use crate::hooks::{CacheHooks, NoCache};
use crate::metrics::Gauges;
use crate::persist::Persistence;
use crate::policy::Policy;
use crate::slots::Tenant;
use crate::upstream::Upstream;

/// How much of a tenant's cache an upstream holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Holds {
    /// Nothing: the tenant owns none of its slots.
    #[default]
    No,
    /// It owns a slot whose cache is gone (after a restart): it restores
    /// there, but a live copy elsewhere is better.
    Stale,
    /// A slot with the tenant's cache in it.
    Live,
}

/// One upstream as placement sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Candidate {
    /// It answered its monitor's last poll and has slots.
    pub up: bool,
    /// It serves the model the request names (every upstream does when the
    /// request names none, or one no upstream serves).
    pub serves: bool,
    /// What it holds of the tenant.
    pub holds: Holds,
    /// Slots nobody owns or uses.
    pub free: usize,
    /// Slots owned by someone but idle: a newcomer can evict one at once.
    pub idle: usize,
    /// Requests waiting for one of its slots.
    pub queued: usize,
}

/// The upstream a request should go to, or `None` when none is up. Order:
/// the tenant's own cache (live before stale), then most free slots, then
/// most idle slots, then the shortest queue, then the first listed.
pub fn place(candidates: &[Candidate]) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.up && c.serves)
        // `max_by_key` keeps the last of equals: walk backwards so the
        // first listed wins a tie.
        .rev()
        .max_by_key(|(_, c)| (c.holds, c.free, c.idle, std::cmp::Reverse(c.queued)))
        .map(|(i, _)| i)
}

/// Whether a request's `model` names one of `names` (case-insensitively:
/// clients spell file names freely).
pub fn names_model(names: &[String], model: &str) -> bool {
    names.iter().any(|n| n.eq_ignore_ascii_case(model))
}

/// One upstream and the tasks that watch it.
#[derive(Debug)]
struct Member {
    app: Arc<App>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Member {
    /// Spawns the upstream's monitor and save-behind task, which run until
    /// `stop` says so.
    fn watch(&mut self) {
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let app = &self.app;
        self.tasks = vec![
            tokio::spawn(crate::monitor::run(
                Arc::clone(app),
                stopped(self.stop.subscribe()),
            )),
            tokio::spawn(crate::save_behind::run(
                Arc::clone(app),
                stopped(self.stop.subscribe()),
            )),
        ];
    }
}

/// Every upstream kvgate serves through, and what building another needs.
#[derive(Debug)]
pub struct Fleet {
    /// The configuration every upstream shares (its `upstreams` are the
    /// flags').
    pub cfg: Config,
    /// Identity policy in force.
    pub policy: Policy,
    /// Front-port clients, when a clients file is configured.
    pub clients: Option<Clients>,
    /// State every upstream shares.
    pub shared: Shared,
    /// Hooks given by an embedder (tests) in place of the save directory's.
    hooks: Option<Arc<dyn CacheHooks>>,
    members: RwLock<Vec<Member>>,
    /// Whether upstreams are watched as soon as they are added (once kvgate
    /// serves; before, [`Fleet::start`] does it).
    started: std::sync::atomic::AtomicBool,
}

// === impl Fleet ===

impl Fleet {
    /// A fleet with no upstream yet. With `hooks`, every upstream uses them;
    /// otherwise each gets checked saves into the shared save directory (or
    /// none without one).
    pub fn new(
        cfg: Config,
        policy: Policy,
        clients: Option<Clients>,
        shared: Shared,
        hooks: Option<Arc<dyn CacheHooks>>,
    ) -> Fleet {
        Fleet {
            cfg,
            policy,
            clients,
            shared,
            hooks,
            members: RwLock::new(Vec::new()),
            started: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn members(&self) -> std::sync::RwLockReadGuard<'_, Vec<Member>> {
        self.members.read().unwrap_or_else(|e| e.into_inner())
    }

    fn members_mut(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Member>> {
        self.members.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Builds (without adding) the state for an upstream at `uri` called
    /// `name`; kvgate sends it `api_key`.
    pub fn build_app(&self, name: &str, uri: Uri, api_key: Option<String>) -> Arc<App> {
        let shared = self.shared.for_upstream();
        let mut cfg = self.cfg.clone();
        cfg.upstreams = vec![uri.clone()];
        let upstream = Upstream::new(uri, cfg.upstream_timeout).with_api_key(api_key);
        let hooks: Arc<dyn CacheHooks> = match (&self.hooks, &shared.store) {
            (Some(h), _) => Arc::clone(h),
            (None, Some(store)) => Arc::new(Persistence::new(
                name,
                Arc::clone(store),
                upstream.clone(),
                &shared,
            )),
            (None, None) => Arc::new(NoCache),
        };
        App::new(
            name.to_string(),
            cfg,
            self.policy.clone(),
            upstream,
            hooks,
            shared,
            self.clients.clone(),
        )
    }

    /// Adds an upstream; once the fleet is started, its monitor (which
    /// sizes its slot table) and save-behind task run at once. `false`, and
    /// nothing added, when an upstream of that name exists.
    pub fn add(&self, app: Arc<App>) -> bool {
        let (stop, _) = watch::channel(false);
        let mut member = Member {
            app,
            stop,
            tasks: Vec::new(),
        };
        let mut members = self.members_mut();
        if members.iter().any(|m| m.app.name == member.app.name) {
            tracing::error!(upstream = %member.app.name, "an upstream of that name exists");
            return false;
        }
        if self.started.load(std::sync::atomic::Ordering::SeqCst) {
            member.watch();
        }
        tracing::info!(upstream = %member.app.name, url = %member.app.upstream.base(), "upstream added");
        members.push(member);
        true
    }

    /// Starts watching every upstream (kvgate begins serving).
    pub fn start(&self) {
        let mut members = self.members_mut();
        self.started
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for m in members.iter_mut().filter(|m| m.tasks.is_empty()) {
            m.watch();
        }
    }

    /// Removes an upstream: new requests no longer go there, its tasks stop.
    /// Requests already on it finish (they hold its `App`), and its slots
    /// can still be leased (to save them) until the caller closes its pool.
    pub async fn remove(&self, name: &str) -> Option<Arc<App>> {
        let member = {
            let mut m = self.members_mut();
            let i = m.iter().position(|x| x.app.name == name)?;
            m.remove(i)
        };
        member.stop.send_replace(true);
        for t in member.tasks {
            let _ = t.await;
        }
        tracing::info!(upstream = name, "upstream removed");
        Some(member.app)
    }

    /// Stops every upstream's tasks (at shutdown, after the last saves).
    pub async fn stop_all(&self) {
        let members: Vec<Member> = std::mem::take(&mut *self.members_mut());
        for m in &members {
            m.app.pool.close();
            m.stop.send_replace(true);
        }
        for m in members {
            for t in m.tasks {
                let _ = t.await;
            }
        }
    }

    /// Every upstream, in the order added.
    pub fn apps(&self) -> Vec<Arc<App>> {
        self.members().iter().map(|m| Arc::clone(&m.app)).collect()
    }

    /// The upstream called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<App>> {
        self.members()
            .iter()
            .find(|m| m.app.name == name)
            .map(|m| Arc::clone(&m.app))
    }

    /// Where requests that are not about a tenant go (passthrough, a
    /// client's own slot actions): the first upstream that is up, else the
    /// first one.
    pub fn default_app(&self) -> Option<Arc<App>> {
        let apps = self.apps();
        if apps.len() < 2 {
            return apps.into_iter().next();
        }
        apps.iter()
            .find(|a| a.upstream_state.get().up)
            .or(apps.first())
            .cloned()
    }

    /// The upstream for `tenant`'s request naming `model` (see [`place`]);
    /// the default one when none is up.
    pub fn place(&self, tenant: &Tenant, model: Option<&str>) -> Option<Arc<App>> {
        let apps = self.apps();
        if apps.len() < 2 {
            // Nothing to choose: skip the snapshots on every request.
            return apps.into_iter().next();
        }
        let states: Vec<_> = apps.iter().map(|a| a.upstream_state.get()).collect();
        let model = model.map(str::trim).filter(|m| !m.is_empty());
        // A model no upstream answers to selects nothing: llama-server
        // itself ignores the field.
        let known = model.filter(|m| states.iter().any(|s| s.up && names_model(&s.models, m)));
        let candidates: Vec<Candidate> = apps
            .iter()
            .zip(&states)
            .map(|(app, st)| {
                let mut c = Candidate {
                    up: st.up && !app.pool.is_empty(),
                    serves: known.map_or(true, |m| names_model(&st.models, m)),
                    ..Candidate::default()
                };
                app.pool.with_table(|t| {
                    c.queued = t.queued();
                    for s in t.slots() {
                        match (&s.owner, s.lease.is_some()) {
                            (Some(o), _) if o == tenant => {
                                c.holds =
                                    c.holds.max(if s.live { Holds::Live } else { Holds::Stale })
                            }
                            (None, false) => c.free += 1,
                            (Some(_), false) => c.idle += 1,
                            (_, true) => {}
                        }
                    }
                });
                c
            })
            .collect();
        match place(&candidates) {
            Some(i) => Some(Arc::clone(&apps[i])),
            None => self.default_app(),
        }
    }

    /// Every upstream's gauges, summed.
    pub fn gauges(&self) -> Gauges {
        let mut g = Gauges::default();
        for app in self.apps() {
            g += app.gauges();
        }
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(free: usize) -> Candidate {
        Candidate {
            up: true,
            serves: true,
            free,
            ..Candidate::default()
        }
    }

    #[test]
    fn a_tenant_stays_where_its_cache_is() {
        let holder = Candidate {
            holds: Holds::Live,
            ..up(0)
        };
        assert_eq!(place(&[up(3), holder, up(2)]), Some(1));
        // A live copy beats a stale one.
        let stale = Candidate {
            holds: Holds::Stale,
            ..up(5)
        };
        assert_eq!(place(&[stale, holder]), Some(1));
        assert_eq!(place(&[stale, up(5)]), Some(0));
    }

    #[test]
    fn a_holder_that_is_down_or_serves_another_model_is_skipped() {
        let down = Candidate {
            up: false,
            holds: Holds::Live,
            ..up(2)
        };
        assert_eq!(place(&[down, up(0)]), Some(1));
        let other_model = Candidate {
            serves: false,
            holds: Holds::Live,
            ..up(2)
        };
        assert_eq!(place(&[other_model, up(0)]), Some(1));
        assert_eq!(place(&[down]), None);
        assert_eq!(place(&[]), None);
    }

    #[test]
    fn a_newcomer_goes_where_most_slots_are_free() {
        assert_eq!(place(&[up(1), up(3), up(2)]), Some(1));
        // Ties: more idle (evictable) slots, then the shorter queue, then
        // the first listed.
        let idle = Candidate { idle: 2, ..up(0) };
        let queued = Candidate { queued: 4, ..up(0) };
        assert_eq!(place(&[up(0), idle]), Some(1));
        assert_eq!(place(&[queued, up(0)]), Some(1));
        assert_eq!(place(&[up(2), up(2)]), Some(0));
    }

    #[test]
    fn model_names_match_case_insensitively() {
        let names = vec!["Tiny".to_string(), "tiny.gguf".to_string()];
        assert!(names_model(&names, "tiny"));
        assert!(names_model(&names, "TINY.GGUF"));
        assert!(!names_model(&names, "llama"));
    }
}
