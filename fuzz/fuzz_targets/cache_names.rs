//! Save-file names: `normalize`, `file_name`, `parse_name`, the stamps and
//! `is_cache_file_name` on arbitrary strings.
//!
//! Input: `chat \0 character \0 tag \0 seconds` (lossy UTF-8; an empty or
//! missing tag means untagged). The whole input, as a string, is also fed to
//! `parse_name` as a file name.
#![no_main]

use kvgate::store::{
    file_name, is_cache_file_name, normalize, parse_name, parse_stamp, utc_stamp, ParsedName,
    MAX_NAME_BYTES, MAX_TAG_BYTES,
};
use kvgate_fuzz::ambiguous;
use libfuzzer_sys::fuzz_target;

/// 10000-01-01T00:00:00Z: stamps have four-digit years.
const MAX_UNIX: u64 = 253_402_300_800;

fn check_normalize(s: &str, max: usize) -> String {
    let n = normalize(s, max);
    assert!(!n.is_empty(), "normalize({s:?}) is empty");
    assert!(n.len() <= max, "normalize({s:?}, {max}) = {n:?} too long");
    assert!(
        n.chars()
            .all(|c| c.is_alphanumeric() || c == '-' || c == '_'),
        "normalize({s:?}) = {n:?} keeps a separator"
    );
    assert_eq!(normalize(&n, max), n, "normalize is idempotent");
    n
}

fuzz_target!(|data: &[u8]| {
    let whole = String::from_utf8_lossy(data);
    // Any string: parse_name never panics, and what it returns is an exact
    // decomposition of the name.
    if let Some(p) = parse_name(&whole) {
        assert_eq!(p.stamp.len(), 14);
        assert!(p.stamp.bytes().all(|b| b.is_ascii_digit()));
        assert!(!p.character.is_empty());
        let rebuilt = match &p.tag {
            Some(t) => format!(
                "{}_{}_tag_{t}_character_{}.bin",
                p.chat, p.stamp, p.character
            ),
            None => format!("{}_{}_character_{}.bin", p.chat, p.stamp, p.character),
        };
        assert_eq!(rebuilt, whole, "parse_name is not a decomposition");
    }
    let _ = is_cache_file_name(&whole);
    let _ = parse_stamp(&whole);

    let mut parts = data.split(|&b| b == 0).map(String::from_utf8_lossy);
    let chat = parts.next().unwrap_or_default();
    let character = parts.next().unwrap_or_default();
    let tag = parts.next().filter(|t| !t.is_empty());
    let unix = parts
        .next()
        .map(|s| {
            s.bytes()
                .fold(0u64, |a, b| a.wrapping_mul(31).wrapping_add(u64::from(b)))
        })
        .unwrap_or(0)
        % MAX_UNIX;

    let stamp = utc_stamp(unix);
    assert_eq!(stamp.len(), 14, "{unix}");
    assert_eq!(parse_stamp(&stamp), Some(unix), "stamp round trip");

    let n_chat = check_normalize(&chat, MAX_NAME_BYTES);
    let n_char = check_normalize(&character, MAX_NAME_BYTES);
    let n_tag = tag.as_deref().map(|t| check_normalize(t, MAX_TAG_BYTES));
    // Any budget that fits the `-` + 8 hex digits suffix (kvgate uses 60
    // and 36; below 9 bytes the suffix alone overflows the budget).
    let _ = check_normalize(&whole, (data.len() % 72) + 9);

    let name = file_name(&chat, unix, tag.as_deref(), &character);
    assert!(is_cache_file_name(&name), "{name:?}");
    assert!(name.len() <= 255, "{name:?} too long");
    let parsed = parse_name(&name);
    if !ambiguous(&n_char, n_tag.as_deref()) {
        assert_eq!(
            parsed,
            Some(ParsedName {
                chat: n_chat,
                stamp,
                tag: n_tag,
                character: n_char,
            }),
            "{name:?} does not round-trip"
        );
    }
});
