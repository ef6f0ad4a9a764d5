mod admin;
mod demo;
mod group_chat;
mod instances;
mod persistence;
mod smoke;
mod supervised;
#[path = "../support/mod.rs"]
mod support;
