//! kvgate: a reverse proxy for llama.cpp's `llama-server` that pins every
//! completion to a slot and keeps each character's KV cache on disk.
pub mod hash;
pub mod identity;
pub mod policy;
pub mod slot_file;
pub mod slots;
pub mod tiny_model;
