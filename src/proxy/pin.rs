//! The body llama-server gets for a completion: the client's own bytes with
//! `"id_slot":N` put first, when kvgate has nothing else to change in them.
//! No re-serialisation: a large prompt is copied once, not rebuilt, and
//! llama-server reads exactly what the client wrote (number spellings, key
//! order, duplicate keys). Pure.

use bytes::{BufMut, Bytes, BytesMut};

use crate::llama::slot_route::without_bom;

/// `raw` (a JSON object, as the client sent it, that has no `id_slot` and
/// nothing kvgate must take out) with `"id_slot":slot` as its first member.
/// `None` when `raw` does not start with `{` (after a byte-order mark and
/// white space), which a parsed object always does.
pub(super) fn with_id_slot(raw: &[u8], slot: usize) -> Option<Bytes> {
    let raw = without_bom(raw);
    let open = raw.iter().position(|b| !is_ws(*b))?;
    if raw[open] != b'{' {
        return None;
    }
    let rest = &raw[open + 1..];
    let empty = rest.iter().find(|b| !is_ws(**b)) == Some(&b'}');
    let head = format!("{{\"id_slot\":{slot}{}", if empty { "" } else { "," });
    let mut out = BytesMut::with_capacity(head.len() + rest.len());
    out.put_slice(head.as_bytes());
    out.put_slice(rest);
    Some(out.freeze())
}

/// JSON white space.
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn pinned(raw: &str, slot: usize) -> String {
        String::from_utf8(
            with_id_slot(raw.as_bytes(), slot)
                .expect("an object")
                .to_vec(),
        )
        .unwrap()
    }

    #[test]
    fn the_client_bytes_follow_the_pin_untouched() {
        assert_eq!(
            pinned(r#"{"prompt":"x","temperature":0.70,"n_predict":1e2}"#, 3),
            r#"{"id_slot":3,"prompt":"x","temperature":0.70,"n_predict":1e2}"#
        );
        assert_eq!(
            pinned("  \n{ \"a\" : 1 }  ", 0),
            "{\"id_slot\":0, \"a\" : 1 }  "
        );
        assert_eq!(pinned("\u{feff}{\"a\":1}", 1), "{\"id_slot\":1,\"a\":1}");
    }

    #[test]
    fn an_empty_object_gets_no_comma() {
        assert_eq!(pinned("{}", 2), "{\"id_slot\":2}");
        assert_eq!(pinned("{ \n }", 2), "{\"id_slot\":2 \n }");
        let v: Value = serde_json::from_str(&pinned("{ \n }", 2)).unwrap();
        assert_eq!(v["id_slot"], 2);
    }

    #[test]
    fn the_result_reads_as_the_client_body_plus_the_pin() {
        let raw = r#"{"prompt":"Hello \"there\"","stop":["\nUser:"],"nested":{"id_slot":9}}"#;
        let v: Value = serde_json::from_str(&pinned(raw, 5)).unwrap();
        let mut want: Value = serde_json::from_str(raw).unwrap();
        want["id_slot"] = 5.into();
        assert_eq!(v, want);
    }

    #[test]
    fn not_an_object_is_not_pinned() {
        assert!(with_id_slot(b"[1,2]", 0).is_none());
        assert!(with_id_slot(b"   ", 0).is_none());
        assert!(with_id_slot(b"", 0).is_none());
    }
}
