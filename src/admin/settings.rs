//! `GET /settings`, `PUT /settings`: the live cache settings (their JSON
//! form and file are [`crate::settings`]'s).

use std::sync::Arc;

use serde_json::{Map, Value};
use tracing::info;

use crate::http::error::ApiError;
use crate::settings::{apply_settings, persist_settings, settings_json};
use crate::shared::Shared;
use crate::sync::Unpoisoned;

use super::request::{json_ok, Answer};

/// `GET /settings`.
pub(crate) fn get_settings(shared: &Shared) -> Answer {
    Ok(json_ok(&settings_json(&shared.settings.get())))
}

/// `PUT /settings`: changes some settings, persists and applies them. The
/// file write (synced) runs off the async workers.
pub(crate) async fn put_settings(shared: &Arc<Shared>, body: &Value) -> Answer {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("settings must be a JSON object"))?
        .clone();
    let shared = Arc::clone(shared);
    tokio::task::spawn_blocking(move || change_settings(&shared, &obj))
        .await
        .map_err(|e| ApiError::internal(format!("the settings change failed: {e}")))?
}

/// One change, whole: read the live value, apply `obj`, persist, make it
/// live. Changes run one at a time under `Shared::settings_writes`, so two
/// PUTs never interleave: the file and the live value always hold the same,
/// last, change. The file goes first: when it can't be written nothing
/// changes, and a restart never brings back an older value than the one
/// that was live. (A std mutex: the work under it is synchronous, on a
/// blocking thread, and never crosses an `.await`.)
fn change_settings(shared: &Shared, obj: &Map<String, Value>) -> Answer {
    let _one_at_a_time = shared.settings_writes.lock_unpoisoned();
    let mut next = shared.settings.get();
    apply_settings(&mut next, obj).map_err(ApiError::bad_request)?;
    if let Some(store) = &shared.store {
        persist_settings(store.dir(), &next)
            .map_err(|e| ApiError::internal(format!("cannot persist the settings: {e}")))?;
    }
    shared.settings.replace(next.clone());
    info!(settings = %settings_json(&next), "settings changed");
    Ok(json_ok(&settings_json(&next)))
}
