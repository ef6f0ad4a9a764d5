//! HTTP plumbing shared by both ports, knowing nothing of slots: response
//! bodies ([`body`]) and the byte budget for those held ([`budget`]),
//! llama.cpp-style errors ([`error`]), percent-encoding
//! ([`percent`]), the accept loop
//! with graceful shutdown ([`server`]), each connection's timeouts ([`conn`])
//! and the relay that watches a
//! streamed answer for its end ([`sse`]).

pub mod body;
pub mod budget;
pub mod conn;
pub mod error;
pub mod percent;
pub mod server;
pub mod sse;
