//! Which slot a request reaches, read exactly as llama-server reads it, so
//! kvgate can hold that slot's lease first. Pure.
//!
//! kvgate serialises all work per slot. That only holds if kvgate and
//! llama-server agree on the slot a request names; any spelling kvgate reads
//! differently is a way around the lease. So this module follows
//! llama-server b11434 and its cpp-httplib step by step:
//!
//! - **`POST /slots/:id_slot`** (server.cpp). httplib percent-decodes the
//!   whole path (also `%uXXXX`), matches `:id_slot` up to the next `/` (a
//!   trailing `/` still matches), and llama-server percent-decodes the
//!   parameter a second time before `std::stoi` (leading white space, a
//!   sign, digits, then anything). The slot is `id % n_slots` computed in
//!   `size_t`, so negative ids wrap to a slot too (-1 is the last of two).
//! - **`?action=`**: httplib decodes query keys and values (`+` is a space)
//!   and llama-server keeps the *last* value of a repeated key. A form body
//!   (`application/x-www-form-urlencoded`) adds its fields after the query's.
//!   kvgate refuses both ambiguities rather than guess: two different
//!   `action` values, or a form body on a slot route.
//! - **A completion's `id_slot`** (nlohmann's `get<int>` behind
//!   `json_value`): numbers are cast to `int`, booleans are 0 or 1, and any
//!   other type falls back to -1 (any slot).

use serde_json::Value;

/// The slot action a request asks llama-server for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// `action=save`: writes the slot to a file.
    Save,
    /// `action=restore`: replaces the slot's cache with a file.
    Restore,
    /// `action=erase`: clears the slot.
    Erase,
}

/// How llama-server will read a request, as far as slots go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotRoute {
    /// Not `POST /slots/:id_slot`: no slot action.
    NotSlotAction,
    /// A slot action llama-server itself refuses before touching any slot
    /// (a slot id `stoi` can't read, an unknown action): passed through
    /// for llama-server's own answer.
    Refused,
    /// Spelled so that kvgate can't be sure what llama-server would do:
    /// kvgate answers 400 with this reason.
    Ambiguous(&'static str),
    /// A slot action on `id` (before [`wrap_slot_id`]).
    Action {
        /// The id as llama-server reads it.
        id: i32,
        /// What to do.
        verb: Verb,
    },
}

/// Reads a request line the way llama-server routes it. `path` and `query`
/// are raw (still percent-encoded); `form_body` is whether the body is
/// `application/x-www-form-urlencoded`.
pub fn slot_route(post: bool, path: &str, query: Option<&str>, form_body: bool) -> SlotRoute {
    if !post {
        return SlotRoute::NotSlotAction;
    }
    let decoded = routed_path(path);
    let Some(param) = route_param(&decoded) else {
        return SlotRoute::NotSlotAction;
    };
    if form_body {
        return SlotRoute::Ambiguous(
            "kvgate reads slot actions from the query string only; send the action as ?action=, not as a form body",
        );
    }
    let action = match last_action(query.unwrap_or("")) {
        Ok(a) => a,
        Err(reason) => return SlotRoute::Ambiguous(reason),
    };
    let Some(id) = stoi(&llama_decode(&param)) else {
        return SlotRoute::Refused;
    };
    let verb = match action.as_deref() {
        Some("save") => Verb::Save,
        Some("restore") => Verb::Restore,
        Some("erase") => Verb::Erase,
        _ => return SlotRoute::Refused,
    };
    SlotRoute::Action { id, verb }
}

/// The slot llama-server uses for `id` among `n` (`get_slot_by_id`: the
/// remainder in `size_t`, where -1 is 2^64 - 1).
pub fn wrap_slot_id(id: i32, n: usize) -> usize {
    let n = u64::try_from(n.max(1)).unwrap_or(u64::MAX);
    let wrapped = (i64::from(id) as u64) % n;
    usize::try_from(wrapped).unwrap_or(0)
}

/// The slot id a completion body asks for, as llama-server reads
/// `id_slot`: -1 (any slot) when absent, null or not a number or boolean.
pub fn body_id_slot(body: &Value) -> i32 {
    match body.get("id_slot") {
        Some(Value::Bool(b)) => i32::from(*b),
        Some(Value::Number(n)) => {
            // C++'s static_cast<int>: integers wrap to 32 bits, floats
            // truncate toward zero (Rust saturates where C++ is undefined).
            if let Some(i) = n.as_i64() {
                i as i32
            } else if let Some(u) = n.as_u64() {
                u as i32
            } else {
                n.as_f64().map_or(-1, |f| f as i32)
            }
        }
        _ => -1,
    }
}

/// JSON llama-server's parser reads but serde's does not: nested deeper
/// than 128 levels. Such a body can't be checked, so kvgate refuses it
/// rather than pass it by its lease. (A leading byte-order mark, which
/// nlohmann skips too, is taken off first: see [`without_bom`].)
pub fn beyond_kvgate(e: &serde_json::Error) -> bool {
    e.to_string().contains("recursion limit")
}

/// The body without a leading UTF-8 byte-order mark, which nlohmann's
/// parser skips and serde's refuses.
pub fn without_bom(raw: &[u8]) -> &[u8] {
    raw.strip_prefix(b"\xef\xbb\xbf").unwrap_or(raw)
}

/// The `:id_slot` segment of a decoded path `/slots/<segment>[/]`.
fn route_param(decoded: &str) -> Option<String> {
    let rest = decoded.strip_prefix("/slots/")?;
    let segment = rest.strip_suffix('/').unwrap_or(rest);
    if segment.contains('/') {
        return None;
    }
    Some(segment.to_string())
}

/// The `action` llama-server will see: the last of the query's `action`
/// values, refused when two differ (httplib drops exact repeats).
fn last_action(query: &str) -> Result<Option<String>, &'static str> {
    let mut found: Option<String> = None;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if httplib_decode_query(key) != "action" {
            continue;
        }
        let value = httplib_decode_query(value);
        match &found {
            Some(v) if *v != value => {
                return Err("the query names more than one slot action");
            }
            _ => found = Some(value),
        }
    }
    Ok(found)
}

/// `std::stoi`: optional leading white space, an optional sign, at least
/// one digit, then anything; `None` when there is no number or it leaves
/// `int`'s range.
fn stoi(s: &str) -> Option<i32> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let (negative, digits) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let end = digits
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    if end == 0 {
        return None;
    }
    let magnitude: i64 = digits[..end].parse().ok()?;
    let value = if negative { -magnitude } else { magnitude };
    i32::try_from(value).ok()
}

/// The path llama-server routes on: httplib's `decode_path_component`
/// (`%XX` and `%uXXXX` escapes; a malformed escape stays as it is). kvgate
/// must route on it too, or `/complet%69on` would pass it by.
pub fn routed_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 1 < b.len() {
            if b[i + 1] == b'u' {
                if let Some(v) = hex(b, i + 2, 4) {
                    // httplib's to_utf8 writes nothing for a surrogate.
                    if let Some(c) = char::from_u32(v) {
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                    i += 6;
                    continue;
                }
            } else if let Some(v) = hex(b, i + 1, 2) {
                out.push(v as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// httplib's `decode_query_component` with `+` as a space.
fn httplib_decode_query(s: &str) -> String {
    decode_hex_escapes(s, true)
}

/// llama-server's own second decoding of a path parameter: `%XX` only.
fn llama_decode(s: &str) -> String {
    decode_hex_escapes(s, false)
}

/// `%XX` escapes decoded (a malformed one stays as it is), and `+` as a
/// space when `plus_as_space`.
fn decode_hex_escapes(s: &str, plus_as_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let Some(v) = hex(b, i + 1, 2) {
                out.push(v as u8);
                i += 3;
                continue;
            }
        }
        out.push(if plus_as_space && b[i] == b'+' {
            b' '
        } else {
            b[i]
        });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `n` hex digits at `at`, if they are all there (no sign, unlike
/// `from_str_radix`).
fn hex(b: &[u8], at: usize, n: usize) -> Option<u32> {
    let digits = b.get(at..at + n)?;
    digits.iter().try_fold(0u32, |acc, d| {
        let v = char::from(*d).to_digit(16)?;
        Some(acc * 16 + v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn route(path: &str, query: Option<&str>) -> SlotRoute {
        slot_route(true, path, query, false)
    }

    fn action(id: i32, verb: Verb) -> SlotRoute {
        SlotRoute::Action { id, verb }
    }

    #[test]
    fn plain_slot_actions() {
        assert_eq!(
            route("/slots/0", Some("action=save")),
            action(0, Verb::Save)
        );
        assert_eq!(
            route("/slots/12", Some("action=restore")),
            action(12, Verb::Restore)
        );
        assert_eq!(
            route("/slots/1", Some("action=erase")),
            action(1, Verb::Erase)
        );
        assert_eq!(
            slot_route(false, "/slots/0", Some("action=erase"), false),
            SlotRoute::NotSlotAction
        );
        assert_eq!(route("/slots", None), SlotRoute::NotSlotAction);
        assert_eq!(route("/slots/0/x", None), SlotRoute::NotSlotAction);
        assert_eq!(route("/v1/slots/0", None), SlotRoute::NotSlotAction);
    }

    #[test]
    fn spellings_llama_server_reads_as_a_slot() {
        // Each of these reached a slot with no lease before.
        assert_eq!(
            route("/slots/%30", Some("action=erase")),
            action(0, Verb::Erase)
        );
        assert_eq!(
            route("/slots/0abc", Some("action=erase")),
            action(0, Verb::Erase)
        );
        assert_eq!(
            route("/slots/%2530", Some("action=erase")),
            action(0, Verb::Erase)
        );
        assert_eq!(
            route("/slots/%u0031", Some("action=erase")),
            action(1, Verb::Erase)
        );
        assert_eq!(
            route("/slots/%20+3", Some("action=erase")),
            action(3, Verb::Erase)
        );
        assert_eq!(
            route("/slots/1/", Some("action=erase")),
            action(1, Verb::Erase)
        );
        assert_eq!(
            route("/slots/-0", Some("action=erase")),
            action(0, Verb::Erase)
        );
        assert_eq!(
            route("/slots/7", Some("action=%73ave")),
            action(7, Verb::Save)
        );
        assert_eq!(
            route("/slots/7", Some("x=1&%61ction=erase")),
            action(7, Verb::Erase)
        );
        assert_eq!(
            route("/slots/7", Some("action=save&action=save")),
            action(7, Verb::Save)
        );
    }

    #[test]
    fn surrogates_and_signs_decode_as_httplib_decodes_them() {
        // to_utf8 writes nothing for a surrogate: these are slot 0.
        assert_eq!(
            route("/slots/%uD8000?action=erase", None),
            SlotRoute::Refused,
            "no action in the query"
        );
        assert_eq!(
            route("/slots/%uD8000", Some("action=erase")),
            action(0, Verb::Erase)
        );
        assert_eq!(
            route("/slot%uD800s/0", Some("action=erase")),
            action(0, Verb::Erase)
        );
        assert_eq!(routed_path("/complet%69on"), "/completion");
        // from_hex_to_i takes no sign.
        assert_eq!(routed_path("/a%+9"), "/a%+9");
        assert_eq!(routed_path("/a%u+030"), "/a%u+030");
    }

    #[test]
    fn what_llama_server_refuses_itself() {
        for p in ["/slots/abc", "/slots/", "/slots/99999999999"] {
            assert_eq!(route(p, Some("action=erase")), SlotRoute::Refused, "{p}");
        }
        assert_eq!(route("/slots/0", Some("action=nope")), SlotRoute::Refused);
        assert_eq!(route("/slots/0", None), SlotRoute::Refused);
    }

    #[test]
    fn ids_wrap_in_size_t() {
        assert_eq!(
            route("/slots/-1", Some("action=erase")),
            action(-1, Verb::Erase)
        );
        assert_eq!(wrap_slot_id(-1, 2), 1);
        assert_eq!(wrap_slot_id(-1, 3), 0);
        assert_eq!(wrap_slot_id(-5, 4), 3);
        assert_eq!(wrap_slot_id(5, 2), 1);
        assert_eq!(wrap_slot_id(0, 1), 0);
    }

    #[test]
    fn ambiguous_spellings_are_refused() {
        assert!(matches!(
            route("/slots/0", Some("action=save&action=restore")),
            SlotRoute::Ambiguous(_)
        ));
        assert!(matches!(
            slot_route(true, "/slots/0", Some("action=save"), true),
            SlotRoute::Ambiguous(_)
        ));
    }

    #[test]
    fn json_only_llama_server_reads() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let err = serde_json::from_str::<Value>(&deep).unwrap_err();
        assert!(beyond_kvgate(&err));
        // nlohmann refuses numbers beyond a double too.
        let err = serde_json::from_str::<Value>("{\"a\": 1e400}").unwrap_err();
        assert!(!beyond_kvgate(&err));
        assert_eq!(without_bom(b"\xef\xbb\xbf{}"), b"{}");
        assert_eq!(without_bom(b"{}"), b"{}");
        let err = serde_json::from_str::<Value>("{\"a\": ").unwrap_err();
        assert!(!beyond_kvgate(&err));
    }

    #[test]
    fn stoi_reads_like_cpp() {
        assert_eq!(stoi("42"), Some(42));
        assert_eq!(stoi("  -3x"), Some(-3));
        assert_eq!(stoi("+7"), Some(7));
        assert_eq!(stoi("x1"), None);
        assert_eq!(stoi("-"), None);
        assert_eq!(stoi("2147483647"), Some(i32::MAX));
        assert_eq!(stoi("2147483648"), None);
        assert_eq!(stoi("99999999999999999999999"), None);
    }

    #[test]
    fn body_id_slot_coerces_like_nlohmann() {
        assert_eq!(body_id_slot(&json!({})), -1);
        assert_eq!(body_id_slot(&json!({"id_slot": null})), -1);
        assert_eq!(body_id_slot(&json!({"id_slot": "0"})), -1);
        assert_eq!(body_id_slot(&json!({"id_slot": [0]})), -1);
        assert_eq!(body_id_slot(&json!({"id_slot": 1})), 1);
        assert_eq!(body_id_slot(&json!({"id_slot": 1.9})), 1);
        assert_eq!(body_id_slot(&json!({"id_slot": true})), 1);
        assert_eq!(body_id_slot(&json!({"id_slot": false})), 0);
        assert_eq!(body_id_slot(&json!({"id_slot": 4_294_967_296u64})), 0);
        assert_eq!(body_id_slot(&json!({"id_slot": -5})), -5);
    }
}
