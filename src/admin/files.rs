//! `GET /files`, `DELETE /files/{name}` (also under the seed plugin's
//! prefix): the cache files as the seed plugin's API showed them. Nothing
//! outside the save directory is ever listed or touched.

use std::time::UNIX_EPOCH;

use hyper::StatusCode;
use serde_json::{json, Value};
use tracing::info;

use crate::http::error::{ApiError, ErrorType};
use crate::http::percent::percent_decode;
use crate::shared::Shared;
use crate::store::meta::StoreError;
use crate::store::names::{is_cache_file_name, utc_stamp};

use super::request::{json_ok, store, Answer};

/// ISO 8601 UTC with milliseconds, as the plugin's `Date` serialised.
fn iso8601(t: std::time::SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let s = utc_stamp(d.as_secs());
    format!(
        "{}-{}-{}T{}:{}:{}.{:03}Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[8..10],
        &s[10..12],
        &s[12..14],
        d.subsec_millis()
    )
}

/// `GET /files`: the cache files, as the seed plugin listed them.
pub(crate) fn files(shared: &Shared) -> Answer {
    let store = store(shared)?;
    let rd = std::fs::read_dir(store.dir())
        .map_err(|e| ApiError::internal(format!("cannot list the save directory: {e}")))?;
    let mut list: Vec<Value> = Vec::new();
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_cache_file_name(&name) {
            continue;
        }
        // A file deleted (e.g. by rotation) while listing is left out, and so
        // is anything that is not a plain file of the directory (symlinks,
        // directories): the file API never reaches outside it.
        let Ok(md) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if !md.file_type().is_file() {
            continue;
        }
        list.push(json!({
            "name": name,
            "size": md.len(),
            "modified": md.modified().map(iso8601).unwrap_or_default(),
            "isDirectory": false,
        }));
    }
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Ok(json_ok(&json!({ "files": list })))
}

/// A name that is not a cache file of the directory.
pub(crate) fn forbidden(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        ErrorType::Permission,
        format!("{name:?} is not a cache file of the save directory"),
    )
}

/// `DELETE /files/{name}`: one cache file and its sidecar.
pub(crate) fn delete_file(shared: &Shared, raw: &str) -> Answer {
    let store = store(shared)?;
    let name = percent_decode(raw).ok_or_else(|| forbidden(raw))?;
    // Separators, parent references and NULs never name a file of the
    // directory, however they were encoded.
    if name.contains(['/', '\\', '\0']) || name.contains("..") || !is_cache_file_name(&name) {
        return Err(forbidden(&name));
    }
    match store.delete(&name) {
        Ok(()) => {
            info!(file = %name, "deleted by the admin API");
            // Other open dashboards and extensions refresh their saves.
            shared
                .events
                .emit("file_deleted", || json!({ "file": name }));
            Ok(json_ok(&json!({
                "success": true,
                "message": format!("File {name} deleted successfully"),
            })))
        }
        Err(StoreError::NotFound(_)) => Err(ApiError::not_found(format!("File {name} not found"))),
        Err(StoreError::BadName(_)) => Err(forbidden(&name)),
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn iso_dates() {
        let t = UNIX_EPOCH + Duration::from_millis(1_705_329_022_123);
        assert_eq!(iso8601(t), "2024-01-15T14:30:22.123Z");
    }
}
