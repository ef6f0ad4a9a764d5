//! What kvgate reads from and adds to a completion's headers: the explicit
//! identity (`X-Kvgate-Chat`, `-Character`, `-Kind`, raw or percent-encoded
//! UTF-8) and the response headers naming the slot, chat, character, kind,
//! where the identity came from, the restored file and the upstream.

use hyper::header::{HeaderMap, HeaderValue};
use serde_json::Value;

use crate::http::percent::{percent_decode, percent_encode};
use crate::identity::{Explicit, Identity};

use super::failure::Failure;

/// Response header: the slot kvgate used.
pub const H_SLOT: &str = "x-kvgate-slot";
/// Response header: the character (percent-encoded UTF-8) when known.
pub const H_CHARACTER: &str = "x-kvgate-character";
/// Response header: the chat key (percent-encoded UTF-8) when a character
/// is known.
pub const H_CHAT: &str = "x-kvgate-chat";
/// Response header: the generation kind kvgate read (`normal`, `swipe`, …).
pub const H_KIND: &str = "x-kvgate-kind";
/// Response header: where the identity came from: `explicit` (headers or the
/// `kvgate` body object), `inferred` (the policy) or `anonymous`.
pub const H_IDENTITY: &str = "x-kvgate-identity";
/// Response header: the upstream (its name) that served the completion.
pub const H_UPSTREAM: &str = "x-kvgate-upstream";
/// Response header: the file restored before the generation.
pub const H_RESTORED: &str = "x-kvgate-restored";
/// Response header: where the character's cache came from for this turn:
/// `resident` (it was in the slot), `ram` (llama-server's RAM prompt
/// cache), `disk` (a restore; see [`H_RESTORED`]) or `none`.
pub const H_CACHE: &str = "x-kvgate-cache";

/// The identity a client states itself, in headers or the `kvgate` body
/// member (which is removed from the body).
pub(crate) fn explicit_identity(
    headers: &HeaderMap,
    json: &mut Value,
) -> Result<Explicit, Failure> {
    // Header values arrive as bytes: raw UTF-8 is accepted, and so is
    // percent-encoded UTF-8 (what clients that can only send Latin-1 header
    // values, like Node's fetch, must use for "Алиса"). Anything else is a
    // clear 400, never a silent fallback to inference.
    let mut decoded: Vec<(&'static str, String)> = Vec::new();
    for name in ["x-kvgate-chat", "x-kvgate-character", "x-kvgate-kind"] {
        if let Some(v) = headers.get(name) {
            let text = std::str::from_utf8(v.as_bytes())
                .ok()
                .map(|s| {
                    if s.contains('%') {
                        percent_decode(s).unwrap_or_else(|| s.to_string())
                    } else {
                        s.to_string()
                    }
                })
                .ok_or_else(|| {
                    Failure::Client(format!("{name} must be UTF-8 (raw or percent-encoded)"))
                })?;
            decoded.push((name, text));
        }
    }
    let from_headers = Explicit::from_headers(|k| {
        decoded
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.as_str())
    })
    .map_err(|e| Failure::Client(e.to_string()))?;
    let from_body = Explicit::take_from_body(json).map_err(|e| Failure::Client(e.to_string()))?;
    Ok(from_headers.or(from_body))
}

/// Names the slot, the chat and character, the kind, the identity's source,
/// the restored file and the upstream.
pub(crate) fn add_identity_headers(
    headers: &mut HeaderMap,
    slot: usize,
    identity: &Identity,
    restored: Option<&str>,
    cache: &'static str,
    upstream: &str,
) {
    headers.insert(H_SLOT, HeaderValue::from(slot));
    headers.insert(H_CACHE, HeaderValue::from_static(cache));
    headers.insert(H_KIND, HeaderValue::from_static(identity.kind.as_str()));
    headers.insert(
        H_IDENTITY,
        HeaderValue::from_static(identity.source.as_str()),
    );
    if let Some(chat) = identity.tenant.chat() {
        if let Ok(v) = HeaderValue::from_str(&percent_encode(chat)) {
            headers.insert(H_CHAT, v);
        }
    }
    if let Some(name) = identity.tenant.character() {
        if let Ok(v) = HeaderValue::from_str(&percent_encode(name)) {
            headers.insert(H_CHARACTER, v);
        }
    }
    if let Some(file) = restored {
        if let Ok(v) = HeaderValue::from_str(&percent_encode(file)) {
            headers.insert(H_RESTORED, v);
        }
    }
    // kvgate names its upstreams in ASCII (`upstream-1`, `llama-1`, `main`);
    // slot ids are per upstream.
    if let Ok(v) = HeaderValue::from_str(upstream) {
        headers.insert(H_UPSTREAM, v);
    }
}
