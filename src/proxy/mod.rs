//! The front port. Completions go through the phases of `completion`;
//! a client's own slot actions are serialised with kvgate's work on the
//! slot (`slot_action`); everything else passes through untouched, to the
//! first upstream that is up (`passthrough`).
//!
//! - `front`: one request in: who sent it, which path it takes.
//! - `completion`: the completion path as named phases over one turn.
//! - `outcome`: what a finished completion means for its slot (pure).
//! - `slot_action`, `passthrough`: the other two paths.
//! - `slots_view`: what a client of a clients file sees of `GET /slots`.
//! - `headers`, `client`, `failure`: identity headers, who the client
//!   is, who failed.

mod client;
mod completion;
mod failure;
pub mod front;
pub mod headers;
mod outcome;
mod passthrough;
mod pin;
mod slot_action;
mod slots_view;

pub use front::{completion_api, handle};
pub use headers::{H_CACHE, H_CHARACTER, H_RESTORED, H_SLOT, H_UPSTREAM};
