//! The admin side port: a JSON API over the cache files (compatible with the
//! seed plugin's), the upstreams and their slots, manual save/load/clear,
//! group preload, the llama-server instances kvgate runs, live settings,
//! events and metrics; and a web dashboard over that API at `/`. See the
//! README's "Admin API" and "Dashboard" for the contract.
//! Handlers take slot leases like any request would (through
//! [`crate::session`]) and never hold the table lock across an `.await`, so
//! nothing here slows the front port beyond the slot it works on.
//!
//! - [`router`]: the admin key, the routes, the dispatch.
//! - [`browser`]: what a browser may do (Host, Origin, content type, CORS).
//! - [`dashboard`]: the web dashboard's page and files, built in.
//! - [`request`]: body, query and upstream selection shared by handlers.
//! - One file per resource: [`status`] (health, upstreams), [`slots`],
//!   [`saves`] (saves and load), [`files`], [`preload`] with its
//!   [`preload_jobs`], [`instances`], [`settings`], [`observe`] (events,
//!   metrics).

mod browser;
mod dashboard;
mod files;
mod instances;
mod observe;
mod preload;
mod preload_jobs;
mod request;
mod router;
mod saves;
mod settings;
mod slots;
mod status;

pub(crate) use browser::BrowserRules;
pub(crate) use preload_jobs::Preloads;
pub(crate) use router::{handle, AdminState};
