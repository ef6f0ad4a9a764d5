//! The application ([`App`]): the identity policy, the front-port clients,
//! the state every upstream shares, and the upstreams themselves.
//!
//! Each upstream (a `--upstream` URL, the `--model` llama-server, an
//! instance started through the admin API) is an [`Upstream`] with its own
//! slot table, client, model fingerprint, monitor and save-behind task; they
//! share settings, the save directory, metrics, events and memory. A request
//! about a tenant goes where `fleet::placement` says.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use hyper::Uri;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clients::Clients;
use crate::fleet::placement::{candidate, names_model, place, Candidate};
use crate::fleet::{ahead, idle_save, monitor, save_behind};
use crate::live::Live;
use crate::llama::client::LlamaClient;
use crate::observe::metrics::Gauges;
use crate::policy::Policy;
use crate::shared::Shared;
use crate::store::hooks::{CacheHooks, NoCache};
use crate::store::persist::Persistence;
use crate::sync::UnpoisonedRw;
use crate::tenant::Tenant;
use crate::upstream::Upstream;

/// kvgate: what it knows of clients and identity, and every upstream it
/// serves through.
#[derive(Debug)]
pub struct App {
    /// Identity policy in force.
    pub policy: Policy,
    /// Front-port clients, when a clients file is configured.
    pub clients: Option<Clients>,
    /// State every upstream shares (the configuration among it).
    pub shared: Arc<Shared>,
    /// Hooks given by an embedder (tests) in place of the save directory's.
    hooks: Option<Arc<dyn CacheHooks>>,
    members: RwLock<Vec<Member>>,
    /// Whether upstreams are watched as soon as they are added (once kvgate
    /// serves; before, [`App::start`] does it).
    started: AtomicBool,
}

/// One upstream and the tasks that watch it.
#[derive(Debug)]
struct Member {
    upstream: Arc<Upstream>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

// === impl Member ===

impl Member {
    /// Spawns the upstream's monitor, save-behind, idle-save and prefill-ahead tasks, which run until
    /// `stop` says so.
    fn watch(&mut self) {
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let upstream = &self.upstream;
        self.tasks = vec![
            tokio::spawn(monitor::run(
                Arc::clone(upstream),
                stopped(self.stop.subscribe()),
            )),
            tokio::spawn(save_behind::run(
                Arc::clone(upstream),
                stopped(self.stop.subscribe()),
            )),
            tokio::spawn(idle_save::run(
                Arc::clone(upstream),
                stopped(self.stop.subscribe()),
            )),
            tokio::spawn(ahead::run(
                Arc::clone(upstream),
                stopped(self.stop.subscribe()),
            )),
        ];
    }
}

// === impl App ===

impl App {
    /// kvgate with no upstream yet. With `hooks`, every upstream uses them;
    /// otherwise each gets checked saves into the shared save directory (or
    /// none without one).
    pub fn new(
        policy: Policy,
        clients: Option<Clients>,
        shared: Shared,
        hooks: Option<Arc<dyn CacheHooks>>,
    ) -> App {
        App {
            policy,
            clients,
            shared: Arc::new(shared),
            hooks,
            members: RwLock::new(Vec::new()),
            started: AtomicBool::new(false),
        }
    }

    fn members(&self) -> RwLockReadGuard<'_, Vec<Member>> {
        self.members.read_unpoisoned()
    }

    fn members_mut(&self) -> RwLockWriteGuard<'_, Vec<Member>> {
        self.members.write_unpoisoned()
    }

    /// Builds (without adding) an upstream at `uri` called `name`; kvgate
    /// sends it `api_key`.
    pub fn build_upstream(&self, name: &str, uri: Uri, api_key: Option<String>) -> Arc<Upstream> {
        let client = LlamaClient::new(uri, self.shared.cfg.upstream_timeout).with_api_key(api_key);
        let fingerprint = Arc::new(Live::default());
        let hooks: Arc<dyn CacheHooks> = match (&self.hooks, &self.shared.store) {
            (Some(h), _) => Arc::clone(h),
            (None, Some(store)) => Arc::new(Persistence::new(
                name,
                Arc::clone(store),
                client.clone(),
                Arc::clone(&fingerprint),
                Arc::clone(&self.shared),
            )),
            (None, None) => Arc::new(NoCache),
        };
        Upstream::new(
            name.to_string(),
            client,
            hooks,
            fingerprint,
            Arc::clone(&self.shared),
        )
    }

    /// Adds an upstream; once kvgate serves, its monitor (which sizes its
    /// slot table) and save-behind task run at once. `false`, and nothing
    /// added, when an upstream of that name exists.
    pub fn add(&self, upstream: Arc<Upstream>) -> bool {
        let (stop, _) = watch::channel(false);
        let mut member = Member {
            upstream,
            stop,
            tasks: Vec::new(),
        };
        let mut members = self.members_mut();
        let name = member.upstream.name.clone();
        if members.iter().any(|m| m.upstream.name == name) {
            tracing::error!(upstream = %name, "an upstream of that name exists");
            return false;
        }
        if self.started.load(Ordering::SeqCst) {
            member.watch();
        }
        tracing::info!(upstream = %name, url = %member.upstream.client.base(), "upstream added");
        members.push(member);
        true
    }

    /// Starts watching every upstream (kvgate begins serving).
    pub fn start(&self) {
        let mut members = self.members_mut();
        self.started.store(true, Ordering::SeqCst);
        for m in members.iter_mut().filter(|m| m.tasks.is_empty()) {
            m.watch();
        }
    }

    /// Removes an upstream: new requests no longer go there, its tasks stop.
    /// Requests already on it finish (they hold its [`Upstream`]), and its
    /// slots can still be leased (to save them) until the caller closes its
    /// pool.
    pub async fn remove(&self, name: &str) -> Option<Arc<Upstream>> {
        let member = {
            let mut m = self.members_mut();
            let i = m.iter().position(|x| x.upstream.name == name)?;
            m.remove(i)
        };
        member.stop.send_replace(true);
        for t in member.tasks {
            let _ = t.await;
        }
        tracing::info!(upstream = name, "upstream removed");
        Some(member.upstream)
    }

    /// Stops every upstream's tasks (at shutdown, after the last saves).
    pub async fn stop_all(&self) {
        let members: Vec<Member> = std::mem::take(&mut *self.members_mut());
        for m in &members {
            m.upstream.pool.close();
            m.stop.send_replace(true);
        }
        for m in members {
            for t in m.tasks {
                let _ = t.await;
            }
        }
    }

    /// Every upstream, in the order added.
    pub fn upstreams(&self) -> Vec<Arc<Upstream>> {
        self.members()
            .iter()
            .map(|m| Arc::clone(&m.upstream))
            .collect()
    }

    /// The upstream called `name`.
    pub fn upstream(&self, name: &str) -> Option<Arc<Upstream>> {
        self.members()
            .iter()
            .find(|m| m.upstream.name == name)
            .map(|m| Arc::clone(&m.upstream))
    }

    /// Where requests that are not about a tenant go (passthrough, a
    /// client's own slot actions): the first upstream that is up, else the
    /// first one.
    pub fn default_upstream(&self) -> Option<Arc<Upstream>> {
        let all = self.upstreams();
        if all.len() < 2 {
            return all.into_iter().next();
        }
        all.iter()
            .find(|u| u.state.get().up)
            .or(all.first())
            .cloned()
    }

    /// The upstream for `tenant`'s request naming `model` (see `fleet::placement::place`);
    /// the default one when none is up.
    pub fn place(&self, tenant: &Tenant, model: Option<&str>) -> Option<Arc<Upstream>> {
        let all = self.upstreams();
        if all.len() < 2 {
            // Nothing to choose: skip the snapshots on every request.
            return all.into_iter().next();
        }
        let states: Vec<_> = all.iter().map(|u| u.state.get()).collect();
        let model = model.map(str::trim).filter(|m| !m.is_empty());
        // A model no upstream answers to selects nothing: llama-server
        // itself ignores the field.
        let known = model.filter(|m| states.iter().any(|s| s.up && names_model(&s.models, m)));
        let candidates: Vec<Candidate> = all
            .iter()
            .zip(&states)
            .map(|(u, st)| {
                let up = st.up && !u.pool.is_empty();
                let serves = known.map_or(true, |m| names_model(&st.models, m));
                u.pool
                    .read(|t| candidate(up, serves, t.slots(), t.queued(), tenant))
            })
            .collect();
        match place(&candidates) {
            Some(i) => Some(Arc::clone(&all[i])),
            None => self.default_upstream(),
        }
    }

    /// Every upstream's gauges, summed.
    pub fn gauges(&self) -> Gauges {
        let mut g = Gauges::default();
        for u in self.upstreams() {
            g += u.gauges();
        }
        g
    }
}
