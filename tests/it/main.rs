mod admin;
mod cli;
mod clients;
mod fake_selftest;
mod fleet;
mod idle_save;
mod instances;
mod limits;
mod persistence;
mod prefill_ahead;
mod proxy;
mod reliability;
mod slot_props;
mod slot_rules;
mod st_chat_shape;
#[path = "../support/mod.rs"]
mod support;
