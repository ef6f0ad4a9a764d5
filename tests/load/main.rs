//! The load test, in a test binary (a process) of its own: its memory check
//! reads this process's RSS, which other tests running alongside would
//! disturb.

mod load;
#[path = "../support/mod.rs"]
mod support;
