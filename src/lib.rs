//! kvgate: a reverse proxy for llama.cpp's `llama-server` that pins every
//! completion to a slot and keeps each character's KV cache on disk.
pub mod slot_file;
pub mod tiny_model;
