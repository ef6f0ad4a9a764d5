//! The front port's request classification: which slot a slot action
//! reaches as llama-server reads it
//! (`slot_route`, `wrap_slot_id`), a body's `id_slot` (`body_id_slot`) and
//! the file names a slot action may not use (`reserved`).
//!
//! Input: `flags \0 path \0 query \0 body` (lossy UTF-8). Bit 0 of the first
//! byte: POST; bit 1: a form body.
#![no_main]

use kvgate::llama::slot_route::{body_id_slot, slot_route, wrap_slot_id, SlotRoute};
use kvgate::store::reserved::reserved;
use libfuzzer_sys::fuzz_target;

/// Percent-encodes every byte: httplib decodes the path once before
/// routing, so this spelling must reach the same slot.
fn encode_all(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let mut parts = text.splitn(3, '\0');
    let path = parts.next().unwrap_or("");
    let query = parts.next();
    let body = parts.next().unwrap_or("");
    let (post, form) = (flags & 1 == 1, flags & 2 == 2);

    let route = slot_route(post, path, query, form);
    assert_eq!(route, slot_route(post, path, query, form), "deterministic");

    if let SlotRoute::Action { id, .. } = &route {
        assert!(!form, "a form body is never read as a plain action");
        for n in 1..=9 {
            assert!(wrap_slot_id(*id, n) < n, "slot {id} of {n} out of range");
        }
        // The same path with the segment percent-encoded once more (when it
        // has no escapes of its own) names the same slot.
        if let Some(segment) = path.strip_prefix("/slots/") {
            if !segment.contains(['%', '/']) && !segment.is_empty() {
                let again = format!("/slots/{}", encode_all(segment));
                assert_eq!(slot_route(post, &again, query, form), route, "{again}");
            }
        }
    }
    if !path.starts_with("/slots/") && !path.contains('%') {
        assert_eq!(route, SlotRoute::NotSlotAction, "{path}");
    }

    if let Ok(v) = serde_json::from_str::<serde_json::Value>(body) {
        let id = body_id_slot(&v);
        if v.get("id_slot").is_none() {
            assert_eq!(id, -1);
        }
    }
    if reserved(body).is_some() {
        assert!(reserved(&body.to_ascii_uppercase()).is_some(), "{body:?}: case matters");
    }
});
