//! The live cache settings: shared by the admin port (which changes them)
//! and the proxy and cache layer (which read them), shown and changed as
//! JSON, and persisted in the save directory so they outlive a restart.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::config::CacheSettings;
use crate::live::Live;
use crate::store::atomic::write_whole;

/// Where live settings are persisted, inside the save directory.
pub use crate::store::reserved::SETTINGS_FILE;

/// Settings shared between the admin port and the proxy and cache layer.
pub type Settings = Arc<Live<CacheSettings>>;

/// The settings as the API shows them.
pub fn settings_json(s: &CacheSettings) -> Value {
    json!({
        "autosave": s.autosave,
        "save_every": s.save_every,
        "max_files": s.max_files,
        "clear_on_chat_change": s.clear_on_chat_change,
        "preload_timeout_s": s.preload_timeout_s,
        "idle_save_s": s.idle_save_s,
        "prefill_ahead": s.prefill_ahead,
    })
}

/// Applies a partial settings object; unknown keys and bad values are errors.
pub fn apply_settings(s: &mut CacheSettings, body: &Map<String, Value>) -> Result<(), String> {
    for (k, v) in body {
        let positive = |v: &Value| -> Result<u64, String> {
            v.as_u64()
                .filter(|n| *n >= 1)
                .ok_or_else(|| format!("{k} must be a whole number ≥ 1"))
        };
        let boolean = |v: &Value| {
            v.as_bool()
                .ok_or_else(|| format!("{k} must be true or false"))
        };
        match k.as_str() {
            "autosave" => s.autosave = boolean(v)?,
            "clear_on_chat_change" => s.clear_on_chat_change = boolean(v)?,
            "prefill_ahead" => s.prefill_ahead = boolean(v)?,
            "save_every" => {
                s.save_every = u32::try_from(positive(v)?)
                    .map_err(|_| "save_every is too large".to_string())?
            }
            "max_files" => {
                s.max_files =
                    u32::try_from(positive(v)?).map_err(|_| "max_files is too large".to_string())?
            }
            "preload_timeout_s" => s.preload_timeout_s = positive(v)?,
            "idle_save_s" => {
                s.idle_save_s = v
                    .as_u64()
                    .ok_or_else(|| format!("{k} must be a whole number ≥ 0 (0: off)"))?
            }
            other => return Err(format!("unknown setting {other:?}")),
        }
    }
    Ok(())
}

/// Writes the settings file atomically.
pub fn persist_settings(dir: &Path, s: &CacheSettings) -> std::io::Result<()> {
    write_whole(
        dir,
        SETTINGS_FILE,
        &serde_json::to_vec_pretty(&settings_json(s))?,
    )
}

/// Applies settings persisted by an earlier run, if any: all of them, or,
/// when the file is unreadable or any of it is bad, none (the error says
/// why, and `s` is left as it was).
pub fn load_persisted_settings(dir: &Path, s: &mut CacheSettings) -> Result<bool, String> {
    let path = dir.join(SETTINGS_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let v: Value = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| format!("{}: not a JSON object", path.display()))?;
    let mut next = s.clone();
    apply_settings(&mut next, obj).map_err(|e| format!("{}: {e}", path.display()))?;
    *s = next;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_apply_and_refuse() {
        let mut s = CacheSettings::default();
        let body = json!({"save_every": 3, "autosave": false});
        apply_settings(&mut s, body.as_object().unwrap()).unwrap();
        assert_eq!((s.save_every, s.autosave), (3, false));
        for bad in [
            json!({"save_every": 0}),
            json!({"max_files": "x"}),
            json!({"autosave": 1}),
            json!({"nope": 1}),
        ] {
            assert!(
                apply_settings(&mut s, bad.as_object().unwrap()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_bad_settings_file_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let start = CacheSettings::default();
        for bad in [
            &b"{\"save_every\": 3, \"max_files\": 0}"[..],
            b"{\"save_every\": 3",
            b"[]",
        ] {
            std::fs::write(dir.path().join(SETTINGS_FILE), bad).unwrap();
            let mut s = start.clone();
            let e = load_persisted_settings(dir.path(), &mut s).unwrap_err();
            assert!(e.contains(SETTINGS_FILE), "{e}");
            assert_eq!(s, start, "nothing applied from {bad:?}");
        }
    }
}
