//! kvgate: a reverse proxy for llama.cpp's `llama-server` that pins every
//! completion to a slot (`id_slot`) per chat and character, and keeps each
//! character's KV cache on disk.
//!
//! # Layout
//! - [`config`]: flags, env vars and TOML file → validated [`config::Config`].
//! - [`policy`]: identity rules per client, from `policies/*.toml` (pure).
//! - [`identity`]: request → chat, character, generation kind (pure).
//! - [`slots`]: the slot table: residency, usage-counting eviction, FIFO
//!   waiters (pure, no I/O).
//! - [`lease`]: async leases over the table; one operation per slot at a time.
//! - [`upstream`]: pooled client to llama-server and its typed slot calls.
//! - [`monitor`]: slot count, outages and restarts of llama-server.
//! - [`fleet`]: the upstreams, and which one a request goes to (pure
//!   placement: cache affinity, then most free slots).
//! - [`instances`]: llama-server processes kvgate runs (`--model`, the
//!   admin API's `/instances`), persisted in the save directory.
//! - [`proxy`]: the front port: passthrough, and the completion lifecycle.
//! - [`sse`]: relays response bodies untouched while observing their end.
//! - [`hooks`]: where the cache layer acts (saves of every kind, restore).
//! - [`owner_save`]: saving a slot's current owner (shared by every save
//!   but the one before an eviction).
//! - [`save_behind`]: background saves that keep evictions cheap.
//! - [`persist`]: the real hooks: checked saves, longest-prefix restores.
//! - [`cache_store`]: the save directory: names, metadata, index, rotation.
//! - [`admin`]: the side port: files, saves, slots, load, preload, settings.
//! - [`events`], [`metrics`]: the live event stream and Prometheus metrics.
//! - [`preload`]: group warm-up jobs.
//! - [`clients`]: front-port clients file and key checks.
//! - [`supervisor`]: runs llama-server for kvgate (`--model`).
//! - [`demo`]: `kvgate demo`, a scripted group chat against a real llama-server.
//! - [`server`]: accept loop with graceful shutdown, shared by both ports.
//! - [`slot_file`], [`tiny_model`], [`hash`], [`error`], [`body`]: helpers.

pub mod admin;
pub mod app;
pub mod body;
pub mod cache_store;
pub mod clients;
pub mod config;
pub mod demo;
pub mod error;
pub mod events;
pub mod fleet;
pub mod hash;
pub mod hooks;
pub mod identity;
pub mod instances;
pub mod lease;
pub mod metrics;
pub mod monitor;
pub mod owner_save;
pub mod persist;
pub mod policy;
pub mod preload;
pub mod proxy;
pub mod save_behind;
pub mod server;
pub mod slot_file;
pub mod slots;
pub mod sse;
pub mod supervisor;
pub mod tiny_model;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::app::{App, Shared};
use crate::cache_store::CacheStore;
use crate::clients::Clients;
use crate::config::Config;
use crate::fleet::Fleet;
use crate::hooks::CacheHooks;
use crate::instances::Instances;
use crate::policy::{Policy, PolicyError};

/// Why kvgate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The policy could not be loaded.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The save directory (or a file kvgate keeps there) is unusable.
    #[error("save directory {0}")]
    SaveDir(String),
    /// The clients file is unusable.
    #[error("{0}")]
    Clients(String),
    /// The supervised llama-server could not be run.
    #[error("{0}")]
    Llama(String),
}

/// A configured kvgate, ready to serve.
#[derive(Debug)]
pub struct Gateway {
    fleet: Arc<Fleet>,
    instances: Arc<Instances>,
}

// === impl Gateway ===

impl Gateway {
    /// Builds kvgate from its configuration: with a save directory, caches
    /// are saved and restored there (and live settings persisted there
    /// override the configured ones); without one kvgate only pins slots.
    pub fn new(cfg: Config) -> Result<Gateway, StartError> {
        let policy = Policy::load(&cfg.policy)?;
        let clients = load_clients(&cfg)?;
        Self::assemble(cfg, policy, clients, None)
    }

    /// Builds kvgate with explicit cache hooks for every upstream, and no
    /// save directory (tests plug in fakes).
    pub fn with_hooks(mut cfg: Config, hooks: Arc<dyn CacheHooks>) -> Result<Gateway, StartError> {
        let policy = Policy::load(&cfg.policy)?;
        let clients = load_clients(&cfg)?;
        cfg.save_dir = None;
        Self::assemble(cfg, policy, clients, Some(hooks))
    }

    /// [`Gateway::new`] with the policy and clients file already loaded:
    /// one upstream per `--upstream`, and the instances recorded in the
    /// save directory (started by [`Gateway::serve`]).
    fn assemble(
        cfg: Config,
        policy: Policy,
        clients: Option<Clients>,
        hooks: Option<Arc<dyn CacheHooks>>,
    ) -> Result<Gateway, StartError> {
        let mut settings = cfg.cache.clone();
        let store = match &cfg.save_dir {
            Some(dir) => {
                let store = CacheStore::open(dir)
                    .map_err(|e| StartError::SaveDir(e.to_string()))?
                    .with_min_bytes(cfg.cache.min_save_bytes);
                if admin::load_persisted_settings(dir, &mut settings)
                    .map_err(StartError::SaveDir)?
                {
                    info!(settings = %admin::settings_json(&settings), "settings persisted by the admin API");
                }
                info!(dir = %dir.display(), saves = store.list().len(), "save directory");
                Some(Arc::new(store))
            }
            None => {
                if hooks.is_none() {
                    warn!("no --save-dir: kvgate pins slots but saves and restores nothing");
                }
                None
            }
        };
        let shared = Shared::new(settings, store);
        let save_dir = cfg.save_dir.clone();
        let fleet = Arc::new(Fleet::new(cfg, policy, clients, shared, hooks));
        for (i, uri) in fleet.cfg.upstreams.iter().enumerate() {
            let app = fleet.build_app(
                &format!("upstream-{}", i + 1),
                uri.clone(),
                fleet.cfg.upstream_api_key.clone(),
            );
            // Names are unique: `upstream-N`, and the config refuses a URL
            // given twice.
            let _ = fleet.add(app);
        }
        let instances =
            Instances::load(Arc::clone(&fleet), save_dir).map_err(StartError::SaveDir)?;
        Ok(Gateway {
            fleet,
            instances: Arc::new(instances),
        })
    }

    /// The first upstream's state (for tests and embedding); `None` before
    /// kvgate has any (only `--model`, not started yet).
    pub fn app(&self) -> Option<Arc<App>> {
        self.fleet.apps().into_iter().next()
    }

    /// Every upstream, and what they share.
    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// The llama-server instances kvgate runs.
    pub fn instances(&self) -> &Arc<Instances> {
        &self.instances
    }

    /// Serves the front and admin ports until `shutdown` resolves, then
    /// drains: stops accepting, lets in-flight streams finish within the
    /// grace period, waits for their saves, saves every slot with unsaved
    /// messages, stops the instances it runs, and returns.
    pub async fn serve(
        self,
        front: TcpListener,
        admin: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let Gateway { fleet, instances } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let grace = fleet.cfg.shutdown_grace;

        fleet.start();
        let resume = {
            let instances = Arc::clone(&instances);
            tokio::spawn(async move { instances.resume().await })
        };
        let (admin_fleet, admin_instances) = (Arc::clone(&fleet), Arc::clone(&instances));
        let admin_task = tokio::spawn(server::serve(
            "admin",
            admin,
            move |req, _peer| {
                admin::handle(Arc::clone(&admin_fleet), Arc::clone(&admin_instances), req)
            },
            stopped(stop_rx.clone()),
            grace,
        ));
        let front_fleet = Arc::clone(&fleet);
        let front_task = tokio::spawn(server::serve(
            "front",
            front,
            move |req, peer| proxy::handle(Arc::clone(&front_fleet), req, peer),
            stopped(stop_rx.clone()),
            grace,
        ));

        shutdown.await;
        info!("shutting down: no new connections; letting streams finish");
        let _ = stop_tx.send(true);
        resume.abort();
        let _ = front_task.await;
        let tasks = &fleet.shared.tasks;
        if tokio::time::timeout(grace, tasks.wait_idle())
            .await
            .is_err()
        {
            warn!(
                running = tasks.running(),
                "lifecycle tasks still running after the grace period"
            );
        }
        // Save every slot with unsaved messages before exiting, every
        // upstream at once.
        let saves = fleet.apps().into_iter().map(|app| {
            tokio::spawn(async move {
                owner_save::save_dirty_slots(
                    &app,
                    cache_store::SaveKind::Shutdown,
                    app.cfg.shutdown_grace,
                    false,
                )
                .await
            })
        });
        for s in saves.collect::<Vec<_>>() {
            let _ = s.await;
        }
        instances.shutdown().await;
        fleet.stop_all().await;
        let _ = admin_task.await;
        info!("kvgate stopped");
    }
}

fn load_clients(cfg: &Config) -> Result<Option<Clients>, StartError> {
    match &cfg.clients {
        Some(path) => {
            let c = Clients::load(path).map_err(|e| StartError::Clients(e.to_string()))?;
            info!(file = %path.display(), "front-port clients file: keys required");
            Ok(Some(c))
        }
        None => Ok(None),
    }
}

/// Checks the configuration's files (policy, save directory), starts the
/// supervised llama-server when `--model` asks for one, binds the configured
/// ports and serves until `shutdown`; then stops llama-server (after the
/// shutdown saves, which need it).
pub async fn run(
    mut cfg: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    // Problems with the policy or the clients file are reported before
    // anything is started or bound.
    let policy = Policy::load(&cfg.policy)?;
    let clients = load_clients(&cfg)?;
    let supervised = cfg.supervised.clone();
    if supervised.is_some() && cfg.save_dir.is_none() {
        let dir = default_save_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| StartError::SaveDir(format!("{}: {e}", dir.display())))?;
        cfg.save_dir = Some(dir);
    }
    let (listen, admin_listen) = (cfg.listen, cfg.admin_listen);
    let gw = Gateway::assemble(cfg, policy, clients, None)?;
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let front = bind(listen).await?;
    let admin = bind(admin_listen).await?;
    if let Some(s) = supervised {
        let spec = instances::InstanceSpec {
            model: s.model,
            slots: s.slots,
            ctx: s.ctx,
            port: None,
            args: s.args,
        };
        if let Err(e) = gw.instances.start_main(spec).await {
            gw.instances.shutdown().await;
            return Err(StartError::Llama(e.to_string()));
        }
    }
    let upstreams: Vec<String> = gw
        .fleet
        .apps()
        .iter()
        .map(|a| format!("{}={}", a.name, a.upstream.base()))
        .collect();
    info!(front = %listen, admin = %admin_listen, upstreams = %upstreams.join(" "), "kvgate listening");
    gw.serve(front, admin, shutdown).await;
    Ok(())
}

/// Where a supervised llama-server keeps its slot files when no
/// `--save-dir` is given.
fn default_save_dir() -> std::path::PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".local/share"))
        })
        .unwrap_or_else(|| std::path::PathBuf::from("."));
    base.join("kvgate").join("slots")
}
