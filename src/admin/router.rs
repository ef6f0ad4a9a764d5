//! One admin request in: the browser rules ([`super::browser`]: Host,
//! Origin, content type, CORS), the dashboard's page and files (served
//! without the key: [`super::dashboard`]), the admin key, then the route (a
//! pure match of method and path), the body when the route takes one, and
//! the resource that answers.

use std::sync::Arc;

use hyper::body::{Body, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::app::App;
use crate::clients::{constant_time_eq, presented_key};
use crate::http::body::ProxyBody;
use crate::http::error::{ApiError, ErrorType};
use crate::instances::Instances;

use super::browser::{self, BrowserRules, Cors};
use super::instances::Action;
use super::preload_jobs::Preloads;
use super::request::{json_ok, query_param, read_json, selected, Answer};
use super::{dashboard, files, instances, observe, preload, saves, settings, slots, status};

/// The seed plugin's path prefixes, accepted in front of every route: the
/// one the plugin serves, and the underscore spelling its README documents.
pub(crate) const PLUGIN_PREFIXES: [&str; 2] = [
    "/api/plugins/kv-cache-manager",
    "/api/plugins/kv_cache-manager",
];

/// `path` without a seed plugin prefix (only a whole path segment counts).
fn strip_plugin_prefix(path: &str) -> &str {
    PLUGIN_PREFIXES
        .iter()
        .find_map(|prefix| {
            path.strip_prefix(prefix)
                .filter(|rest| rest.is_empty() || rest.starts_with('/'))
        })
        .unwrap_or(path)
}

/// The resources the side port serves (a known one with the wrong method
/// is a 405, anything else a 404).
const RESOURCES: &[&str] = &[
    "health",
    "upstreams",
    "slots",
    "saves",
    "files",
    "save",
    "load",
    "preload",
    "instances",
    "settings",
    "events",
    "metrics",
];

/// What the admin handlers share.
#[derive(Debug, Clone)]
pub(crate) struct AdminState {
    /// The application.
    pub(crate) app: Arc<App>,
    /// The llama-server processes kvgate runs.
    pub(crate) instances: Arc<Instances>,
    /// Preload jobs, running and finished.
    pub(crate) preloads: Arc<Preloads>,
    /// Which Host, Origin and bodies the port accepts from browsers.
    pub(crate) browser: Arc<BrowserRules>,
}

/// What an admin request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route<'a> {
    Health,
    Upstreams,
    Slots,
    Saves,
    Files,
    DeleteFile(&'a str),
    SaveAll,
    SaveSlot(&'a str),
    Clear,
    Load,
    Preload,
    PreloadProgress(&'a str),
    PreloadCancel(&'a str),
    Instances(Action, &'a str),
    GetSettings,
    PutSettings,
    Events,
    Metrics,
}

/// Serves one admin request: the browser rules first (they hold with or
/// without an admin key, and before it, so a foreign page learns nothing),
/// then the request itself; every answer to an allowed origin carries its
/// CORS headers (the `/events` stream and errors included).
pub(crate) async fn handle(state: AdminState, req: Request<Incoming>) -> Response<ProxyBody> {
    let rules = &state.browser;
    let host = match rules.check_host(req.version(), req.headers()) {
        Ok(h) => h.map(str::to_string),
        Err(e) => return e.into_response(),
    };
    let cors = rules.cors(req.headers(), host.as_deref());
    if req.method() == Method::OPTIONS {
        return browser::preflight(&cors);
    }
    let resp = answer(&state, &cors, req)
        .await
        .unwrap_or_else(ApiError::into_response);
    browser::with_cors(resp, &cors)
}

async fn answer(state: &AdminState, cors: &Cors, req: Request<Incoming>) -> Answer {
    // The page holds no data and a browser opening a URL can't send the
    // key: it is served before the key check (the Host rule still held).
    if let Some(found) = dashboard::lookup(req.method(), req.uri().path()) {
        return found.map(dashboard::response);
    }
    let has_body = !req.body().is_end_stream();
    state
        .browser
        .check_write(req.method(), req.headers(), cors, has_body)?;
    authorize(&state.app, &req)?;
    let method = req.method().clone();
    let full_path = req.uri().path().to_string();
    let path = strip_plugin_prefix(&full_path);
    let query = req.uri().query().map(str::to_string);
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if segments[0] == "instances" && state.app.shared.cfg.admin_key.is_none() {
        return Err(instances::key_required());
    }
    let route = route(&method, &segments, path)?;
    let body = if takes_body(route) {
        read_json(req).await?
    } else {
        json!({})
    };
    dispatch(state, route, query.as_deref(), &body).await
}

/// The admin key, when one is configured, in `X-Admin-Key` or
/// `Authorization: Bearer`, compared in constant time.
fn authorize(app: &App, req: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(key) = &app.shared.cfg.admin_key else {
        return Ok(());
    };
    // SillyTavern server plugins name their admin key X-ST-Admin-Key; the
    // CORS preflight allows it, so the key check reads it too.
    let presented = presented_key(req.headers(), "x-admin-key")
        .or_else(|| presented_key(req.headers(), "x-st-admin-key"));
    match presented {
        Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorType::Authentication,
            "admin key required (X-Admin-Key, X-ST-Admin-Key or Authorization: Bearer)",
        )),
    }
}

/// The route for `method` on `segments` (of `path`); 404 or 405 if none.
fn route<'a>(method: &Method, segments: &[&'a str], path: &str) -> Result<Route<'a>, ApiError> {
    use Route as R;
    Ok(match (method, segments) {
        (&Method::GET, ["health"]) => R::Health,
        (&Method::GET, ["upstreams"]) => R::Upstreams,
        (&Method::GET, ["slots"]) => R::Slots,
        (&Method::GET, ["saves"]) => R::Saves,
        (&Method::GET, ["files"]) => R::Files,
        (&Method::DELETE, ["files", name]) => R::DeleteFile(name),
        // A raw `/` in the name: never a file of the directory.
        (&Method::DELETE, ["files", _, ..]) => {
            return Err(files::forbidden(path.trim_start_matches("/files/")))
        }
        (&Method::POST, ["save"]) => R::SaveAll,
        (&Method::POST, ["slots", "clear"]) => R::Clear,
        (&Method::POST, ["slots", id, "save"]) => R::SaveSlot(id),
        (&Method::POST, ["load"]) => R::Load,
        (&Method::POST, ["preload"]) => R::Preload,
        (&Method::GET, ["preload", id]) => R::PreloadProgress(id),
        (&Method::DELETE, ["preload", id]) => R::PreloadCancel(id),
        (&Method::GET, ["instances"]) => R::Instances(Action::List, ""),
        (&Method::POST, ["instances"]) => R::Instances(Action::Create, ""),
        (&Method::GET, ["instances", id]) => R::Instances(Action::Show, id),
        (&Method::GET, ["instances", id, "log"]) => R::Instances(Action::Log, id),
        (&Method::POST, ["instances", id, "start"]) => R::Instances(Action::Start, id),
        (&Method::POST, ["instances", id, "stop"]) => R::Instances(Action::Stop, id),
        (&Method::DELETE, ["instances", id]) => R::Instances(Action::Delete, id),
        (&Method::GET, ["settings"]) => R::GetSettings,
        (&Method::PUT, ["settings"]) => R::PutSettings,
        (&Method::GET, ["events"]) => R::Events,
        (&Method::GET, ["metrics"]) => R::Metrics,
        (_, [first, ..]) if RESOURCES.contains(first) => {
            return Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorType::InvalidRequest,
                format!("{method} is not allowed on {path}"),
            ))
        }
        _ => return Err(ApiError::not_found(format!("no admin endpoint {path}"))),
    })
}

/// Whether the route reads a JSON body (POST and PUT).
fn takes_body(route: Route<'_>) -> bool {
    matches!(
        route,
        Route::SaveAll
            | Route::SaveSlot(_)
            | Route::Clear
            | Route::Load
            | Route::Preload
            | Route::Instances(Action::Create, _)
            | Route::PutSettings
    )
}

/// The resource's answer.
async fn dispatch(
    state: &AdminState,
    route: Route<'_>,
    query: Option<&str>,
    body: &Value,
) -> Answer {
    let (app, shared) = (&state.app, &state.app.shared);
    match route {
        Route::Health => Ok(json_ok(&status::health(app).await)),
        Route::Upstreams => Ok(json_ok(&status::upstreams(app))),
        Route::Slots => query_param(query, "upstream")
            .and_then(|name| selected(app, name))
            .map(|all| json_ok(&slots::slots(&all))),
        Route::Saves => saves::saves(app, query),
        Route::Files => files::files(shared),
        Route::DeleteFile(name) => files::delete_file(shared, name),
        Route::SaveAll => slots::save_all(app, query, body).await,
        Route::SaveSlot(id) => slots::save_one(app, query, id, body).await,
        Route::Clear => slots::clear(app, query, body).await,
        Route::Load => saves::load(app, query, body).await,
        Route::Preload => preload::start_preload(app, &state.preloads, query, body),
        Route::PreloadProgress(id) => preload::progress(&state.preloads, id),
        Route::PreloadCancel(id) => preload::cancel(&state.preloads, id),
        Route::Instances(action, id) => instances::act(&state.instances, action, id, body).await,
        Route::GetSettings => settings::get_settings(shared),
        Route::PutSettings => settings::put_settings(shared, body).await,
        Route::Events => Ok(observe::events(shared)),
        Route::Metrics => Ok(observe::metrics(app)),
    }
}

#[cfg(test)]
mod tests {
    use super::strip_plugin_prefix;

    #[test]
    fn both_plugin_prefixes_are_taken_off_whole_segments_only() {
        assert_eq!(
            strip_plugin_prefix("/api/plugins/kv-cache-manager/files"),
            "/files"
        );
        assert_eq!(
            strip_plugin_prefix("/api/plugins/kv_cache-manager/files"),
            "/files"
        );
        assert_eq!(strip_plugin_prefix("/api/plugins/kv_cache-manager"), "");
        assert_eq!(
            strip_plugin_prefix("/api/plugins/kv-cache-managerx/files"),
            "/api/plugins/kv-cache-managerx/files"
        );
        assert_eq!(strip_plugin_prefix("/files"), "/files");
    }
}
