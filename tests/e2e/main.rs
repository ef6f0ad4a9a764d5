mod admin;
mod group_chat;
mod persistence;
mod smoke;
#[path = "../support/mod.rs"]
mod support;
