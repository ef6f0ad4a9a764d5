//! kvgate: a reverse proxy for llama.cpp's `llama-server` that pins every
//! completion to a slot (`id_slot`) per chat and character, and keeps each
//! character's KV cache on disk.
//!
//! `docs/design.md` tells the slot lifecycle, the request phases and the
//! save/restore timeline; this is the map.
//!
//! # Layout
//! From the top down, roughly by layer; there is no import cycle.
//! - [`Gateway`], [`run`] (`gateway.rs`): build kvgate from a [`config::Config`],
//!   serve both ports, drain and save at shutdown.
//! - `proxy/`: the front port. Passthrough, a client's own slot actions, and
//!   the completion path as named phases over one `Turn`.
//! - `admin/`: the side port, one file per resource (files, saves and load,
//!   slots, preload and its jobs, instances, settings, events and metrics),
//!   and the web dashboard built into the binary.
//! - `instances/`: llama-server processes kvgate runs (`--model`, the admin
//!   API's `/instances`): their spec, records and supervisor.
//! - [`app`]: the application: policy, clients, shared state, the upstreams.
//! - `fleet/`: where a request goes (pure placement), and each upstream's
//!   monitor and save-behind task.
//! - `session/`: **the one door for slot work**: take over, restore, save the
//!   owner, clear, load; every change to a slot goes through it, under the
//!   slot's lease.
//! - [`upstream`]: one llama-server as kvgate sees it; [`shared`]: what every
//!   upstream shares ([`settings`], [`memory`], [`tasks`], metrics, events).
//! - [`store`]: the save directory (names, sidecars, index, rotation) and the
//!   cache hooks that save and restore through llama-server.
//! - [`slots`]: the pure slot table and its leases.
//! - `llama/`: the HTTP client to llama-server and the slot-file reader.
//! - `http/`: bodies, llama.cpp-style errors, the accept loop, the SSE relay.
//! - [`observe`]: the event stream and Prometheus metrics.
//! - Leaves: [`identity`] and [`policy`] (who a request is for, pure),
//!   [`tenant`], [`config`], [`clients`] (front-port keys), [`live`],
//!   `sync`, `hash`.
//! - `demo/` (feature `demo`, on by default): `kvgate demo` and the tiny
//!   model writer; the core never imports it.
//!
//! Modules marked hidden in the docs are public only so that the tests,
//! benches and fuzz targets can reach them; they are not a stable API.

// Only what embedders need is public, and all of it is documented (the
// tests and benches, which reach hidden modules, are not held to this).
#![warn(missing_docs, unreachable_pub)]

pub mod app;
pub mod clients;
pub mod config;
pub mod identity;
pub mod live;
pub mod memory;
pub mod observe;
pub mod policy;
pub mod settings;
pub mod shared;
pub mod slots;
pub mod store;
pub mod tasks;
pub mod tenant;
pub mod upstream;

#[doc(hidden)]
pub mod hash;
#[doc(hidden)]
pub mod http;
#[doc(hidden)]
pub mod instances;
#[doc(hidden)]
pub mod llama;
#[doc(hidden)]
pub mod proxy;

mod admin;

mod fleet;
mod gateway;
mod lookahead;
mod session;
mod sync;

#[cfg(feature = "demo")]
pub mod demo;

pub use gateway::{run, Gateway, StartError};
