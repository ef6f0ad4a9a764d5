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
//! - [`server`]: accept loop with graceful shutdown, shared by both ports.
//! - [`slot_file`], [`tiny_model`], [`hash`], [`error`], [`body`]: helpers.

pub mod admin;
pub mod app;
pub mod body;
pub mod cache_store;
pub mod clients;
pub mod config;
pub mod error;
pub mod events;
pub mod hash;
pub mod hooks;
pub mod identity;
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
use crate::hooks::{CacheHooks, NoCache};
use crate::persist::Persistence;
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
    /// The save directory is unusable.
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
    app: Arc<App>,
}

// === impl Gateway ===

impl Gateway {
    /// Builds kvgate from its configuration: with a save directory, caches
    /// are saved and restored there (and live settings persisted there
    /// override the configured ones); without one kvgate only pins slots.
    pub fn new(cfg: Config) -> Result<Gateway, StartError> {
        let policy = Policy::load(&cfg.policy)?;
        let clients = load_clients(&cfg)?;
        Self::assemble(cfg, policy, clients)
    }

    /// [`Gateway::new`] with the policy and clients file already loaded.
    fn assemble(
        cfg: Config,
        policy: Policy,
        clients: Option<Clients>,
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
                warn!("no --save-dir: kvgate pins slots but saves and restores nothing");
                None
            }
        };
        let shared = Shared::new(settings, store.clone());
        // One client (one connection pool) for everything kvgate sends.
        let upstream = upstream_client(&cfg);
        let hooks: Arc<dyn CacheHooks> = match store {
            Some(store) => Arc::new(Persistence::new(store, upstream.clone(), &shared)),
            None => Arc::new(NoCache),
        };
        Ok(Gateway {
            app: App::new(cfg, policy, upstream, hooks, shared, clients),
        })
    }

    /// Builds kvgate with explicit cache hooks and no save directory (tests
    /// plug in fakes).
    pub fn with_hooks(cfg: Config, hooks: Arc<dyn CacheHooks>) -> Result<Gateway, StartError> {
        let policy = Policy::load(&cfg.policy)?;
        let clients = load_clients(&cfg)?;
        let shared = Shared::new(cfg.cache.clone(), None);
        let upstream = upstream_client(&cfg);
        Ok(Gateway {
            app: App::new(cfg, policy, upstream, hooks, shared, clients),
        })
    }

    /// The shared state (for tests and embedding).
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Serves the front and admin ports until `shutdown` resolves, then
    /// drains: stops accepting, lets in-flight streams finish within the
    /// grace period, waits for their saves, and returns.
    pub async fn serve(
        self,
        front: TcpListener,
        admin: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let app = self.app;
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let grace = app.cfg.shutdown_grace;

        let monitor = tokio::spawn(monitor::run(Arc::clone(&app), stopped(stop_rx.clone())));
        let saver = tokio::spawn(save_behind::run(Arc::clone(&app), stopped(stop_rx.clone())));
        let admin_app = Arc::clone(&app);
        let admin_task = tokio::spawn(server::serve(
            "admin",
            admin,
            move |req, _peer| admin::handle(Arc::clone(&admin_app), req),
            stopped(stop_rx.clone()),
            grace,
        ));
        let front_app = Arc::clone(&app);
        let front_task = tokio::spawn(server::serve(
            "front",
            front,
            move |req, peer| proxy::handle(Arc::clone(&front_app), req, peer),
            stopped(stop_rx.clone()),
            grace,
        ));

        shutdown.await;
        info!("shutting down: no new connections; letting streams finish");
        let _ = stop_tx.send(true);
        let _ = front_task.await;
        if tokio::time::timeout(grace, app.tasks.wait_idle())
            .await
            .is_err()
        {
            warn!(
                running = app.tasks.running(),
                "lifecycle tasks still running after the grace period"
            );
        }
        // Save every slot with unsaved messages before exiting.
        owner_save::save_dirty_slots(
            &app,
            cache_store::SaveKind::Shutdown,
            app.cfg.shutdown_grace,
            false,
        )
        .await;
        app.pool.close();
        let _ = admin_task.await;
        let _ = monitor.await;
        let _ = saver.await;
        info!("kvgate stopped");
    }
}

fn upstream_client(cfg: &Config) -> upstream::Upstream {
    upstream::Upstream::new(cfg.upstream.clone(), cfg.upstream_timeout)
        .with_api_key(cfg.upstream_api_key.clone())
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
    let supervisor = match cfg.supervised.clone() {
        None => None,
        Some(s) => {
            let dir = match &cfg.save_dir {
                Some(d) => d.clone(),
                None => default_save_dir(),
            };
            std::fs::create_dir_all(&dir)
                .map_err(|e| StartError::SaveDir(format!("{}: {e}", dir.display())))?;
            cfg.save_dir = Some(dir.clone());
            let binary = supervisor::find_binary(s.binary.as_deref())
                .map_err(|e| StartError::Llama(e.to_string()))?;
            let spec = supervisor::Spec {
                binary,
                model: s.model,
                slots: s.slots,
                ctx: s.ctx,
                save_dir: dir,
                args: s.args,
            };
            let sup = supervisor::Supervisor::start(spec)
                .await
                .map_err(|e| StartError::Llama(e.to_string()))?;
            cfg.upstream =
                config::parse_upstream(&sup.url).map_err(|e| StartError::Llama(e.to_string()))?;
            Some(sup)
        }
    };
    let result = serve_configured(cfg, policy, clients, shutdown).await;
    if let Some(sup) = supervisor {
        sup.stop().await;
    }
    result
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

async fn serve_configured(
    cfg: Config,
    policy: Policy,
    clients: Option<Clients>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    let (listen, admin_listen, upstream) = (cfg.listen, cfg.admin_listen, cfg.upstream.clone());
    let gw = Gateway::assemble(cfg, policy, clients)?;
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let front = bind(listen).await?;
    let admin = bind(admin_listen).await?;
    info!(front = %listen, admin = %admin_listen, %upstream, "kvgate listening");
    gw.serve(front, admin, shutdown).await;
    Ok(())
}
