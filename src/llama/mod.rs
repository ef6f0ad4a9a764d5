//! llama-server as kvgate talks to it: the HTTP client with its typed calls
//! ([`client`]) and the reader of its slot files' headers ([`slot_file`]).

pub mod client;
pub mod slot_file;
