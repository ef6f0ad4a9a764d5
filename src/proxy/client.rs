//! Who sent a front-port request: with a clients file, an authenticated
//! client whose key kvgate replaces with its own towards llama-server;
//! otherwise a key derived from the client's API key or address, used for
//! chat switches and per-client metrics.

use std::net::SocketAddr;

use hyper::header::HeaderMap;

use crate::clients::{Clients, Refusal};
use crate::slots::table::ClientTag;
use crate::upstream::Upstream;

use super::failure::Failure;

/// Who sent a request, as kvgate tracks clients.
#[derive(Debug)]
pub(crate) struct Client {
    /// The key chat switches and per-client metrics use.
    pub(crate) key: String,
    /// Authenticated against the clients file: kvgate talks to llama-server
    /// with its own key, not the client's.
    gatekept: bool,
}

impl Client {
    /// Identifies the sender of `headers` from `peer`. With a clients file
    /// kvgate is the gatekeeper: the client's key must be a trusted one.
    pub(crate) fn identify(
        clients: Option<&Clients>,
        headers: &HeaderMap,
        peer: SocketAddr,
    ) -> Result<Client, Failure> {
        let Some(clients) = clients else {
            return Ok(Client {
                key: client_key(headers, peer),
                gatekept: false,
            });
        };
        match clients.authenticate(headers) {
            Ok(c) => Ok(Client {
                key: format!("client-{}", c.id),
                gatekept: true,
            }),
            Err(refusal) => Err(Failure::Unauthorized(match refusal {
                Refusal::Missing => "an API key is required (Authorization: Bearer or X-Api-Key)",
                Refusal::Unknown => "Invalid API Key",
                Refusal::Untrusted => "this client is not trusted",
            })),
        }
    }

    /// The client as the slot table knows it: only clients of a clients
    /// file are told apart (for their queue share, fair order and `/slots`
    /// view); without one, every client is trusted alike.
    pub(crate) fn tag(&self) -> Option<ClientTag> {
        self.gatekept.then(|| ClientTag::from(self.key.as_str()))
    }

    /// Puts kvgate's upstream key in place of the client's, when kvgate is
    /// the gatekeeper.
    pub(crate) fn credentials_for(&self, upstream: &Upstream, headers: &mut HeaderMap) {
        if self.gatekept {
            upstream.client.substitute_credentials(headers);
        }
    }
}

/// Who a client is, for chat-switch tracking: its API key when it sends one
/// (hashed, never logged), else its address.
fn client_key(headers: &HeaderMap, peer: SocketAddr) -> String {
    let key = headers
        .get(hyper::header::AUTHORIZATION)
        .or_else(|| headers.get("x-api-key"))
        .map(|v| v.as_bytes());
    match key {
        Some(k) => format!("key-{:016x}", crate::hash::fnv1a64(k)),
        None => format!("addr-{}", peer.ip()),
    }
}
