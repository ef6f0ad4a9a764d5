//! `GET /settings`, `PUT /settings`: the live cache settings (their JSON
//! form and file are [`crate::settings`]'s).

use serde_json::Value;
use tracing::info;

use crate::http::error::ApiError;
use crate::settings::{apply_settings, persist_settings, settings_json};
use crate::shared::Shared;

use super::request::{json_ok, Answer};

/// `GET /settings`.
pub(crate) fn get_settings(shared: &Shared) -> Answer {
    Ok(json_ok(&settings_json(&shared.settings.get())))
}

/// `PUT /settings`: changes some settings, persists and applies them.
pub(crate) fn put_settings(shared: &Shared, body: &Value) -> Answer {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("settings must be a JSON object"))?;
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
