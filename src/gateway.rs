//! Building and running kvgate: [`Gateway`] assembles the application from
//! its configuration and serves both ports until shutdown, then drains and
//! saves; [`run`] does it all from a [`Config`], binding the ports and
//! starting the supervised llama-server when `--model` asks for one.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState, BrowserRules, Preloads};
use crate::app::App;
use crate::clients::Clients;
use crate::config::{CacheSettings, Config};
use crate::http::server;
use crate::instances::spec::InstanceSpec;
use crate::instances::Instances;
use crate::policy::{Policy, PolicyError};
use crate::proxy;
use crate::session;
use crate::settings::{load_persisted_settings, settings_json};
use crate::shared::Shared;
use crate::store::hooks::CacheHooks;
use crate::store::index::CacheStore;
use crate::store::meta::{SaveKind, StoreError};
use crate::upstream::Upstream;

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
    app: Arc<App>,
    instances: Arc<Instances>,
    preloads: Arc<Preloads>,
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
            Some(dir) => Some(open_store(dir, &cfg, &mut settings)?),
            None => {
                if hooks.is_none() {
                    warn!("no --save-dir: kvgate pins slots but saves and restores nothing");
                }
                None
            }
        };
        let save_dir = cfg.save_dir.clone();
        let shared = Shared::new(cfg, settings, store);
        let app = Arc::new(App::new(policy, clients, shared, hooks));
        for (i, uri) in app.shared.cfg.upstreams.iter().enumerate() {
            let upstream = app.build_upstream(
                &format!("upstream-{}", i + 1),
                uri.clone(),
                app.shared.cfg.upstream_api_key.clone(),
            );
            // Names are unique: `upstream-N`, and the config refuses a URL
            // given twice.
            let _ = app.add(upstream);
        }
        let instances = Instances::load(Arc::clone(&app), save_dir).map_err(StartError::SaveDir)?;
        Ok(Gateway {
            app,
            instances: Arc::new(instances),
            preloads: Arc::default(),
        })
    }

    /// The first upstream's state (for tests and embedding); `None` before
    /// kvgate has any (only `--model`, not started yet).
    pub fn upstream(&self) -> Option<Arc<Upstream>> {
        self.app.upstreams().into_iter().next()
    }

    /// The application: every upstream, and what they share.
    pub fn app(&self) -> &Arc<App> {
        &self.app
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
        self.serve_on(vec![front], admin, shutdown).await;
    }

    /// [`Gateway::serve`] with the front port on several addresses.
    pub async fn serve_on(
        self,
        fronts: Vec<TcpListener>,
        admin: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let Gateway {
            app,
            instances,
            preloads,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let grace = app.shared.cfg.shutdown_grace;

        app.start();
        let resume = {
            let instances = Arc::clone(&instances);
            tokio::spawn(async move { instances.resume().await })
        };
        let cfg = &app.shared.cfg;
        // The real address: a port configured as 0 is known only now.
        let bound = admin.local_addr().unwrap_or(cfg.admin_listen);
        let browser = BrowserRules::new(bound, &cfg.admin_hosts, &cfg.admin_cors_origins);
        let state = AdminState {
            app: Arc::clone(&app),
            instances: Arc::clone(&instances),
            preloads,
            browser: Arc::new(browser),
        };
        let admin_task = tokio::spawn(server::serve(
            "admin",
            admin,
            move |req, _peer| admin::handle(state.clone(), req),
            app.shared.cfg.admin_limits(),
            stopped(stop_rx.clone()),
            grace,
        ));
        let front_tasks: Vec<_> = fronts
            .into_iter()
            .map(|front| {
                let front_app = Arc::clone(&app);
                tokio::spawn(server::serve(
                    "front",
                    front,
                    move |req, peer| proxy::handle(Arc::clone(&front_app), req, peer),
                    app.shared.cfg.front_limits(),
                    stopped(stop_rx.clone()),
                    grace,
                ))
            })
            .collect();

        shutdown.await;
        info!("shutting down: no new connections; letting streams finish");
        app.shared
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = stop_tx.send(true);
        resume.abort();
        for task in front_tasks {
            let _ = task.await;
        }
        wait_for_lifecycle_tasks(&app, grace).await;
        save_before_exit(&app).await;
        instances.shutdown().await;
        app.stop_all().await;
        let _ = admin_task.await;
        info!("kvgate stopped");
    }
}

/// Resolves once `rx` says stop.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Waits, within `grace`, for streams and their saves to end.
async fn wait_for_lifecycle_tasks(app: &App, grace: std::time::Duration) {
    let tasks = &app.shared.tasks;
    if tokio::time::timeout(grace, tasks.wait_idle())
        .await
        .is_err()
    {
        warn!(
            running = tasks.running(),
            "lifecycle tasks still running after the grace period"
        );
    }
}

/// Saves every slot with unsaved messages, every upstream at once.
async fn save_before_exit(app: &App) {
    let saves = app.upstreams().into_iter().map(|upstream| {
        tokio::spawn(async move {
            let grace = upstream.shared.cfg.shutdown_grace;
            session::save_dirty_slots(&upstream, SaveKind::Shutdown, grace, false).await
        })
    });
    for s in saves.collect::<Vec<_>>() {
        let _ = s.await;
    }
}

/// Opens the save directory; live settings persisted there by the admin
/// API override the configured ones.
fn open_store(
    dir: &Path,
    cfg: &Config,
    settings: &mut CacheSettings,
) -> Result<Arc<CacheStore>, StartError> {
    let store = CacheStore::open(dir)
        .map_err(|e| {
            StartError::SaveDir(match e {
                // `StartError::SaveDir` says "save directory" already.
                StoreError::Directory { dir, reason } => format!("{}: {reason}", dir.display()),
                other => other.to_string(),
            })
        })?
        .with_min_bytes(cfg.cache.min_save_bytes);
    // A bad settings file costs its settings, never kvgate's start: the
    // flags are a complete, valid set.
    match load_persisted_settings(dir, settings) {
        Ok(true) => {
            info!(settings = %settings_json(settings), "settings persisted by the admin API")
        }
        Ok(false) => {}
        Err(e) => error!(
            error = %e,
            settings = %settings_json(settings),
            "the persisted settings are unusable and are IGNORED: the flags' settings are in force until the next PUT /settings rewrites the file"
        ),
    }
    info!(dir = %dir.display(), saves = store.list().len(), "save directory");
    Ok(Arc::new(store))
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
    if let Some(w) = crate::config::open_front_warning(&cfg) {
        warn!("{w}");
    }
    let (listen, admin_listen) = (cfg.listen, cfg.admin_listen);
    let also_listen = cfg.also_listen.clone();
    let gw = Gateway::assemble(cfg, policy, clients, None)?;
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let mut fronts = vec![bind(listen).await?];
    for addr in also_listen {
        fronts.push(bind(addr).await?);
    }
    let admin = bind(admin_listen).await?;
    if let Some(s) = supervised {
        let spec = InstanceSpec {
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
        .app
        .upstreams()
        .iter()
        .map(|a| format!("{}={}", a.name, a.client.base()))
        .collect();
    info!(front = %listen, admin = %admin_listen, upstreams = %upstreams.join(" "), "kvgate listening");
    gw.serve_on(fronts, admin, shutdown).await;
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
