//! `POST /preload`, `GET /preload/{id}`, `DELETE /preload/{id}`: group
//! warm-up jobs (the jobs themselves are [`super::preload_jobs`]'s).

use std::collections::HashMap;

use hyper::StatusCode;
use serde_json::{json, Value};

use crate::app::App;
use crate::http::body::json_response;
use crate::http::error::ApiError;
use crate::identity::cap_key;
use crate::tenant::Tenant;

use super::preload_jobs::{Preloads, Progress, Prompts, TooMany, MAX_ACTIVE};
use super::request::{json_ok, named_upstream, one_upstream, Answer};

/// A job id from the path.
fn preload_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::not_found(format!("no preload job {raw}")))
}

/// `POST /preload`: starts a job warming up a chat's characters.
pub(crate) fn start_preload(
    app: &App,
    preloads: &Preloads,
    query: Option<&str>,
    body: &Value,
) -> Answer {
    let chat = body
        .get("chat")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|c| !c.is_empty())
        // The form the front port gives the same chat (a long key hashed).
        .map(cap_key)
        .ok_or_else(|| ApiError::bad_request("\"chat\" must be a non-empty string"))?;
    let characters: Vec<String> = body
        .get("characters")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty() && a.len() <= 256)
        .and_then(|a| {
            a.iter()
                .map(|v| {
                    v.as_str()
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(cap_key)
                })
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| {
            ApiError::bad_request("\"characters\" must be a non-empty array of names")
        })?;
    let prompts = read_prompts(body, &characters)?;
    // The group goes where its first character is, or would go.
    let upstream = match named_upstream(query, body)? {
        Some(_) => one_upstream(app, query, body)?,
        None => app
            .place(
                &Tenant::Character {
                    chat: chat.to_string(),
                    name: characters[0].clone(),
                },
                None,
            )
            .ok_or_else(|| ApiError::unavailable("kvgate has no upstream"))?,
    };
    let id = preloads
        .start(&upstream, chat.to_string(), characters, prompts)
        .map_err(|TooMany| {
            ApiError::unavailable(format!(
                "{MAX_ACTIVE} preload jobs are already working: wait for one to finish \
                 or cancel one (DELETE /preload/{{id}})"
            ))
        })?;
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({ "id": id, "upstream": upstream.name }),
    ))
}

/// The prompts to evaluate for characters without a save: `prompts` maps a
/// character to its own (in SillyTavern's "swap character cards" mode each
/// member's prompt starts with its own card, so one shared prompt would warm
/// the wrong prefix); `prompt` serves the others.
fn read_prompts(body: &Value, characters: &[String]) -> Result<Prompts, ApiError> {
    let shared = match body.get("prompt") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) => Some(p.clone()),
        Some(_) => return Err(ApiError::bad_request("\"prompt\" must be a string")),
    };
    let mut own = HashMap::new();
    match body.get("prompts") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (name, prompt) in map {
                let name = cap_key(name.trim());
                if !characters.contains(&name) {
                    return Err(ApiError::bad_request(format!(
                        "\"prompts\" names {name:?}, which is not in \"characters\""
                    )));
                }
                let Value::String(prompt) = prompt else {
                    return Err(ApiError::bad_request(
                        "\"prompts\" must map character names to prompt strings",
                    ));
                };
                own.insert(name, prompt.clone());
            }
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "\"prompts\" must map character names to prompt strings",
            ))
        }
    }
    Ok(Prompts { shared, own })
}

/// `GET /preload/{id}`: a job's progress.
pub(crate) fn progress(preloads: &Preloads, raw: &str) -> Answer {
    job_answer(raw, |id| preloads.progress(id))
}

/// `DELETE /preload/{id}`: cancels a job at once.
pub(crate) fn cancel(preloads: &Preloads, raw: &str) -> Answer {
    job_answer(raw, |id| preloads.cancel(id))
}

/// The job the path names, as `look` finds it; 404 when there is none.
fn job_answer(raw: &str, look: impl FnOnce(u64) -> Option<Progress>) -> Answer {
    let id = preload_id(raw)?;
    let p = look(id).ok_or_else(|| ApiError::not_found(format!("no preload job {id}")))?;
    Ok(json_ok(&serde_json::to_value(p).unwrap_or(Value::Null)))
}
