mod smoke;
#[path = "../support/mod.rs"]
mod support;
