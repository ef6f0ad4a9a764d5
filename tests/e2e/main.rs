mod admin;
mod demo;
mod dropin;
mod group_chat;
mod hardening;
mod idle_save;
mod instances;
mod persistence;
mod prefill_ahead;
mod ram_cache;
mod shared_prefix;
mod smoke;
mod supervised;
#[path = "../support/mod.rs"]
mod support;
