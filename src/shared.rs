//! [`Shared`]: the state every upstream shares, held once behind an `Arc`:
//! the configuration, live settings, the save directory, metrics and
//! events, the running lifecycle tasks and what kvgate remembers of past
//! requests.

use std::sync::{Arc, Mutex};

use crate::config::{CacheSettings, Config};
use crate::http::budget::BodyBudget;
use crate::live::Live;
use crate::memory::Memory;
use crate::observe::events::Events;
use crate::observe::metrics::Metrics;
use crate::settings::Settings;
use crate::store::index::CacheStore;
use crate::tasks::TaskCounter;

/// The state every upstream shares.
#[derive(Debug)]
pub struct Shared {
    /// The validated configuration (its `cache` part is the start value of
    /// [`Shared::settings`]).
    pub cfg: Config,
    /// Live cache settings: the admin port changes them, the proxy and the
    /// cache layer read them.
    pub settings: Settings,
    /// Serialises changes of [`Shared::settings`] (`PUT /settings`): read,
    /// change, persist and apply are one step.
    pub(crate) settings_writes: Mutex<()>,
    /// The save directory, when configured.
    pub store: Option<Arc<CacheStore>>,
    /// Counters and histograms.
    pub metrics: Arc<Metrics>,
    /// The live event stream.
    pub events: Arc<Events>,
    /// Lifecycle tasks still holding a lease (streams, saves), on any
    /// upstream: shutdown waits for all of them.
    pub tasks: Arc<TaskCounter>,
    /// What kvgate remembers of past requests (identity is resolved before
    /// an upstream is chosen, so this is not per upstream).
    pub memory: Memory,
    /// Bytes of completion bodies held in memory, all requests together.
    pub body_budget: BodyBudget,
    /// Set when kvgate starts shutting down: work of its own (prefill
    /// ahead) no longer starts.
    pub draining: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Fresh metrics, events and memory over `cfg`, with `settings` in force.
    pub fn new(cfg: Config, settings: CacheSettings, store: Option<Arc<CacheStore>>) -> Shared {
        let metrics = Arc::new(Metrics::default());
        Shared {
            draining: std::sync::atomic::AtomicBool::new(false),
            body_budget: BodyBudget::new(cfg.max_body_bytes_in_flight),
            cfg,
            settings: Arc::new(Live::new(settings)),
            settings_writes: Mutex::new(()),
            store,
            events: Arc::new(Events::new(Arc::clone(&metrics))),
            metrics,
            tasks: Arc::default(),
            memory: Memory::default(),
        }
    }
}
