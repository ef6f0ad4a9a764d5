//! What the fuzz targets share: the known limit of kvgate's file-name
//! parsing, so every target skips exactly the same inputs.

/// Whether normalised parts hold something `parse_name` anchors on: a
/// `_YYYYMMDDHHmmss_`-like run in the character or the tag (counting the
/// separators around them), or, in a tagged name, `_character_` in the
/// character. Such names do not round-trip (parse_name takes the rightmost
/// anchor, and splits tag from character at the last `_character_`): a
/// known limitation, harmless while kvgate's own saves carry sidecars, since
/// only sidecar-less files are named by parsing. Everything else must
/// round-trip exactly.
pub fn ambiguous(character: &str, tag: Option<&str>) -> bool {
    let stamp_like = |part: &str| {
        let b = format!("_{part}_").into_bytes();
        (0..b.len()).any(|i| {
            i + 15 < b.len()
                && b[i] == b'_'
                && b[i + 1..i + 15].iter().all(u8::is_ascii_digit)
                && b[i + 15] == b'_'
        })
    };
    stamp_like(character)
        || tag.is_some_and(|t| stamp_like(t) || format!("_{character}_").contains("_character_"))
}
