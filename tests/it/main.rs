mod fake_selftest;
#[path = "../support/mod.rs"]
mod support;
mod proxy;
mod st_chat_shape;
mod persistence;
