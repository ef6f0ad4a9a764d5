mod admin;
mod group_chat;
mod persistence;
mod smoke;
mod supervised;
#[path = "../support/mod.rs"]
mod support;
