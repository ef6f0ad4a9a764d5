//! The one door for slot work. Everything that changes what a slot holds
//! goes through here, while its caller holds the slot's [`Lease`]: taking a
//! slot over (saving the evicted owner), restoring the best save or a chosen
//! one, saving the owner (autosave, save-behind, chat switch, manual,
//! preload, shutdown), clearing, and recording each result in the slot
//! table. The proxy, the admin API, preload jobs, save-behind, instance
//! stops and shutdown call these functions; none of them marks what a slot
//! holds itself. (The holder of a generation's lease records the
//! generation: its outcome and when it ran.)
//!
//! - [`prepare`]: take over, restore, load a chosen save.
//! - [`save`]: save the current owner; dirty slots; chat switch; autosave.
//! - [`manual`]: the admin API's save, clear and load.
//! - [`run`]: acquiring on a request's path; work detached from the request.
//! - [`siblings`]: the further slots of a request with several answers.
//!
//! [`Lease`]: crate::slots::lease::Lease

pub(crate) mod manual;
pub(crate) mod prepare;
pub(crate) mod run;
pub(crate) mod save;
pub(crate) mod siblings;

pub(crate) use prepare::{judge_ram_load, restore, take_over};
pub(crate) use run::{acquire, detached, Detached};
pub(crate) use save::{
    autosave, chat_switch, save_dirty_slots, save_dirty_while, save_owner, OwnerSave,
};
pub(crate) use siblings::{acquire_with_siblings, SiblingError};
