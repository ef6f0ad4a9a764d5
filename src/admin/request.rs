//! What every admin handler reads and answers alike: the JSON body, query
//! parameters, which upstream(s) a request is about, and the save
//! directory's presence.

use std::sync::Arc;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::app::App;
use crate::http::body::{json_response, ProxyBody};
use crate::http::error::{ApiError, ErrorType};
use crate::http::percent::percent_decode;
use crate::shared::Shared;
use crate::store::index::CacheStore;
use crate::upstream::Upstream;

/// Largest admin request body.
const MAX_BODY: usize = 1 << 20;

/// What a handler answers.
pub(crate) type Answer = Result<Response<ProxyBody>, ApiError>;

/// A query parameter's value, percent-decoded (`+` is a space). A value
/// that is empty or does not decode is a 400, never taken for "not given"
/// (for `upstream`, that would mean every upstream).
pub(crate) fn query_param(query: Option<&str>, key: &str) -> Result<Option<String>, ApiError> {
    let Some(raw) = query.and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }) else {
        return Ok(None);
    };
    match percent_decode(&raw.replace('+', " ")) {
        Some(v) if !v.is_empty() => Ok(Some(v)),
        _ => Err(ApiError::bad_request(format!(
            "the {key} parameter {raw:?} is empty or not percent-encoded UTF-8"
        ))),
    }
}

/// The upstreams an action is about: the one `name`d, or all.
pub(crate) fn selected(app: &App, name: Option<String>) -> Result<Vec<Arc<Upstream>>, ApiError> {
    match name {
        None => Ok(app.upstreams()),
        Some(n) => app
            .upstream(&n)
            .map(|a| vec![a])
            .ok_or_else(|| ApiError::not_found(format!("no upstream {n:?} (see GET /upstreams)"))),
    }
}

/// The upstream a request names (`?upstream=` or `"upstream"` in the body).
pub(crate) fn named_upstream(
    query: Option<&str>,
    body: &Value,
) -> Result<Option<String>, ApiError> {
    match (query_param(query, "upstream")?, body.get("upstream")) {
        (Some(q), _) => Ok(Some(q)),
        (None, None | Some(Value::Null)) => Ok(None),
        (None, Some(Value::String(n))) => Ok(Some(n.clone())),
        (None, Some(_)) => Err(ApiError::bad_request("\"upstream\" must be a string")),
    }
}

pub(crate) async fn read_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("could not read the body: {e}")))?
        .to_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(ApiError::bad_request("the body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

pub(crate) fn json_ok(v: &Value) -> Response<ProxyBody> {
    json_response(StatusCode::OK, v)
}

pub(crate) fn store(shared: &Shared) -> Result<&Arc<CacheStore>, ApiError> {
    shared.store.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            ErrorType::NotSupported,
            "kvgate runs without --save-dir: there are no cache files",
        )
    })
}

/// The one upstream a slot id is about: the one named, or the only one.
pub(crate) fn one_upstream(
    app: &App,
    query: Option<&str>,
    body: &Value,
) -> Result<Arc<Upstream>, ApiError> {
    let mut upstreams = selected(app, named_upstream(query, body)?)?;
    match upstreams.len() {
        1 => Ok(upstreams.remove(0)),
        0 => Err(ApiError::unavailable("kvgate has no upstream")),
        _ => Err(ApiError::bad_request(
            "kvgate has several upstreams: name one with ?upstream=NAME (see GET /upstreams)",
        )),
    }
}
