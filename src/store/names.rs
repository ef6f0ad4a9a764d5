//! Save file names and restore choices, pure: normalising names, UTC
//! stamps, building and parsing seed-compatible file names, the sidecar's
//! name, rotation victims, and the save sharing the longest token prefix
//! with a new prompt.

use std::sync::Arc;

use crate::hash::fnv1a64;
use crate::store::meta::{ParsedName, SaveMeta, MAX_NAME_BYTES, MAX_TAG_BYTES, META_SUFFIX};

/// Normalises a name part: Unicode letters and digits, `-` and `_` stay;
/// everything else becomes `_`. A result over `max_bytes` is cut at a
/// character boundary and ends in `-` plus 8 hex digits of the original's
/// hash, so long names stay distinct. Never empty.
pub fn normalize(s: &str, max_bytes: usize) -> String {
    let mapped: String = s
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mapped = if mapped.is_empty() {
        "_".to_string()
    } else {
        mapped
    };
    if mapped.len() <= max_bytes {
        return mapped;
    }
    let suffix = format!("-{:08x}", fnv1a64(s.as_bytes()) as u32);
    let mut cut = max_bytes.saturating_sub(suffix.len());
    while !mapped.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{}", &mapped[..cut], suffix)
}

/// `YYYYMMDDHHmmss` (UTC) for Unix seconds.
pub fn utc_stamp(unix: u64) -> String {
    let days = i64::try_from(unix / 86_400).unwrap_or(0);
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}

/// Unix seconds for a `YYYYMMDDHHmmss` stamp (read as UTC).
pub fn parse_stamp(stamp: &str) -> Option<u64> {
    if stamp.len() != 14 || !stamp.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = |r: std::ops::Range<usize>| stamp[r].parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(4..6)?, n(6..8)?);
    let (hh, mm, ss) = (n(8..10)?, n(10..12)?, n(12..14)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// The file name of a save.
pub fn file_name(chat: &str, unix: u64, tag: Option<&str>, character: &str) -> String {
    let chat = normalize(chat, MAX_NAME_BYTES);
    let character = normalize(character, MAX_NAME_BYTES);
    let stamp = utc_stamp(unix);
    match tag {
        Some(t) => format!(
            "{chat}_{stamp}_tag_{}_character_{character}.bin",
            normalize(t, MAX_TAG_BYTES)
        ),
        None => format!("{chat}_{stamp}_character_{character}.bin"),
    }
}

/// Takes a cache file name apart. Anchored on the timestamp (the rightmost
/// `_YYYYMMDDHHmmss_` followed by `tag_` or `character_`), so `_character_`,
/// `_tag_` or even a whole save name inside a chat id parse right (chat ids
/// are arbitrary client strings; character names are short). Unparseable
/// names: `None` (the file API still lists them).
pub fn parse_name(name: &str) -> Option<ParsedName> {
    let stem = name.strip_suffix(".bin")?;
    let bytes = stem.as_bytes();
    for i in (1..bytes.len().saturating_sub(15)).rev() {
        if bytes[i] == b'_'
            && bytes[i + 1..i + 15].iter().all(u8::is_ascii_digit)
            && bytes[i + 15] == b'_'
        {
            let chat = &stem[..i];
            let stamp = &stem[i + 1..i + 15];
            let rest = &stem[i + 16..];
            if let Some(ch) = rest.strip_prefix("character_") {
                if !ch.is_empty() {
                    return Some(ParsedName {
                        chat: chat.into(),
                        stamp: stamp.into(),
                        tag: None,
                        character: ch.into(),
                    });
                }
            }
            if let Some(t) = rest.strip_prefix("tag_") {
                if let Some(at) = t.rfind("_character_") {
                    let (tag, ch) = (&t[..at], &t[at + "_character_".len()..]);
                    if !tag.is_empty() && !ch.is_empty() {
                        return Some(ParsedName {
                            chat: chat.into(),
                            stamp: stamp.into(),
                            tag: Some(tag.into()),
                            character: ch.into(),
                        });
                    }
                }
            }
        }
    }
    None
}

/// Whether `name` may be a cache file of the directory: a plain file name
/// ending in `.bin`, no separators, no `..`, not a temporary file.
pub fn is_cache_file_name(name: &str) -> bool {
    name.ends_with(".bin")
        && name.len() > 4
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && !name.contains("..")
}

/// Length of the common prefix of two token lists.
pub fn common_prefix(a: &[i32], b: &[i32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Picks the save to restore: the longest common token prefix with the new
/// prompt, ties to the newest; only if it beats `at_least` tokens.
pub fn choose_best<'a>(
    candidates: &'a [(SaveMeta, Arc<Vec<i32>>)],
    prompt: &[i32],
    at_least: usize,
) -> Option<(&'a SaveMeta, usize)> {
    candidates
        .iter()
        .map(|(m, toks)| (m, common_prefix(toks, prompt)))
        .filter(|(_, lcp)| *lcp > at_least)
        .max_by(|(a, la), (b, lb)| {
            la.cmp(lb)
                .then(a.created.cmp(&b.created))
                .then(a.file.cmp(&b.file))
        })
}

/// Files to delete so at most `keep` untagged saves remain per chat and
/// character (newest kept). Tagged saves are neither deleted nor counted.
pub fn rotation_victims(
    saves: &[SaveMeta],
    chat: &str,
    character: &str,
    keep: usize,
) -> Vec<String> {
    let mut mine: Vec<&SaveMeta> = saves
        .iter()
        .filter(|m| m.tag.is_none() && m.chat == chat && m.character == character)
        .collect();
    mine.sort_by(|a, b| b.created.cmp(&a.created).then(b.file.cmp(&a.file)));
    mine.into_iter()
        .skip(keep)
        .map(|m| m.file.clone())
        .collect()
}

fn stem(file: &str) -> &str {
    file.strip_suffix(".bin").unwrap_or(file)
}

/// Sidecar name of a save.
pub fn meta_name(file: &str) -> String {
    format!("{}{META_SUFFIX}", stem(file))
}
