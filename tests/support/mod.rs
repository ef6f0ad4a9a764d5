//! Shared test support: a programmable fake llama-server and a real one,
//! kvgate in-process and as a binary, SillyTavern-shaped chats, and a
//! Prometheus text parser.
#![allow(dead_code)]
pub mod fake_llama;
pub mod kvgate;
pub mod kvgate_bin;
pub mod llama;
pub mod prometheus;
pub mod st_chat;
