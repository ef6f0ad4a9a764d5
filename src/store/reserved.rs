//! The names kvgate keeps for itself in the save directory, and the rule
//! that refuses them to clients. Pure.
//!
//! llama-server's slot actions write and read any plain file name in the
//! save directory. Through the front port a client could overwrite kvgate's
//! settings or instances (the next start refuses them), a save's sidecar
//! (the save is never restored again), or plant a file in kvgate's save
//! scheme that rotation keeps while it deletes real saves; and a restore by
//! name could load another chat's save. So kvgate refuses exactly these
//! names, and every other name passes as before (llama.cpp's own tests save
//! `slot1.bin`).

use crate::store::meta::{META_SUFFIX, TEMP_PREFIX};
use crate::store::names::parse_name;

/// Where live settings are persisted.
pub const SETTINGS_FILE: &str = "kvgate-settings.json";
/// Where API-created instances are recorded.
pub const INSTANCES_FILE: &str = "kvgate-instances.json";
/// kvgate's hidden files (temporary saves, its directory lock) start with
/// this.
pub const HIDDEN_PREFIX: &str = ".kvgate";

/// Why a client may not name `file` in a slot action, or `None` when it
/// may. Compared without regard to case (Unicode's, with `ſ` as `s` and the
/// Kelvin sign as `k`), since the directory may be on a case-insensitive
/// file system that folds them.
pub fn reserved(file: &str) -> Option<&'static str> {
    let lower = file.to_lowercase().replace('ſ', "s");
    if lower == SETTINGS_FILE || lower == INSTANCES_FILE {
        return Some("it is kvgate's own configuration file");
    }
    if lower.starts_with(HIDDEN_PREFIX) || lower.starts_with(TEMP_PREFIX) {
        return Some("kvgate keeps names starting with '.kvgate' for itself");
    }
    if lower.ends_with(META_SUFFIX) {
        return Some("names ending in '.meta.json' are kvgate's save sidecars");
    }
    if parse_name(file).is_some() || parse_name(&lower).is_some() {
        return Some(
            "the name is in kvgate's save scheme (<chat>_<YYYYMMDDHHmmss>_character_<name>.bin); use kvgate's admin API to save and load characters",
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvgate_names_are_refused() {
        for name in [
            "kvgate-settings.json",
            "KVGATE-Settings.JSON",
            "kvgate-instances.json",
            ".kvgate-tmp-1234-x.bin",
            ".kvgate.lock",
            "chat_20260101120000_character_Alice.meta.json",
            "x.meta.json",
            "x_99991231235959_character_Alice.bin",
            "chat_20260101120000_tag_best_character_Bob.bin",
            "X_99991231235959_CHARACTER_Alice.BIN",
            "\u{212a}vgate-settings.json",
            "kvgate-ſettings.json",
        ] {
            assert!(reserved(name).is_some(), "{name} must be refused");
        }
    }

    #[test]
    fn other_names_pass() {
        for name in [
            "slot1.bin",
            "my-save.bin",
            "kvgate.bin",
            "settings.json",
            "x_2026_character_Alice.bin",
            "chat_20260101120000_character_.bin",
            "notes.meta",
        ] {
            assert_eq!(reserved(name), None, "{name} must pass");
        }
    }
}
