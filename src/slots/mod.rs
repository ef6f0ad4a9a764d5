//! The slots of one llama-server: the pure [`table`] (who owns which slot,
//! who uses it, who waits) and its async face, the [`lease`]. A lease is the
//! right to do one thing on one slot; `session/` is the one door
//! through which work on a leased slot changes what the table believes.

pub mod content;
pub mod lease;
pub mod ram;
pub mod table;

pub use lease::{AcquireError, Lease, Pool};
pub use table::{
    Evicted, Grant, LeaseId, Outcome, Slot, SlotId, SlotTable, TableError, Ticket, Want,
};
