//! llama-server as kvgate talks to it: the HTTP client with its typed calls
//! ([`client`]), the reader of its slot files' headers ([`slot_file`]), and
//! how it reads the slot a request names ([`slot_route`]).

pub mod client;
pub mod slot_file;
pub mod slot_route;
