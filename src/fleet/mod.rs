//! The upstreams as a fleet: where a request goes ([`placement`], pure), and
//! the three tasks that watch each upstream: its [`monitor`] (slot count,
//! model, outages and restarts), [`save_behind`] (background saves that
//! keep evictions cheap) and [`idle_save`] (saves while llama-server is
//! quiet).

pub(crate) mod idle_save;
pub(crate) mod monitor;
pub(crate) mod placement;
pub(crate) mod save_behind;
