mod admin;
mod demo;
mod group_chat;
mod hardening;
mod instances;
mod persistence;
mod smoke;
mod supervised;
#[path = "../support/mod.rs"]
mod support;
