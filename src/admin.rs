//! The admin side port: a JSON view of kvgate for operators. This module
//! serves health, the slot table and counters; it never blocks the front port
//! (it only reads the table under its short lock).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response};
use serde_json::{json, Value};

use crate::app::App;
use crate::body::{full, ProxyBody};
use crate::error::ApiError;

/// Serves one admin request.
pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<ProxyBody> {
    let result = match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") => Ok(json!({"status": "ok", "slots": app.pool.len()})),
        (&Method::GET, "/slots") => Ok(slots(&app)),
        (&Method::GET, "/metrics") => Ok(metrics(&app)),
        (_, "/health" | "/slots" | "/metrics") => Err(ApiError::new(
            hyper::StatusCode::METHOD_NOT_ALLOWED,
            crate::error::ErrorType::InvalidRequest,
            "method not allowed",
        )),
        (_, path) => Err(ApiError::not_found(format!("no admin endpoint {path}"))),
    };
    match result {
        Ok(v) => json_response(&v),
        Err(e) => e.into_response(),
    }
}

fn json_response(v: &Value) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::from(v.to_string())));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

fn slots(app: &App) -> Value {
    let slots: Vec<Value> = app
        .pool
        .snapshot()
        .iter()
        .enumerate()
        .map(|(id, s)| {
            json!({
                "id": id,
                "chat": s.owner.as_ref().and_then(|t| t.chat()),
                "character": s.owner.as_ref().and_then(|t| t.character()),
                "anonymous": s.owner.as_ref().is_some_and(|t| !t.is_character()),
                "usage": s.usage,
                "live": s.live,
                "busy": s.lease.is_some(),
                "last_used": s.last_used,
            })
        })
        .collect();
    json!({"slots": slots, "queued": app.pool.with_table(|t| t.queued())})
}

fn metrics(app: &App) -> Value {
    let m = &app.metrics;
    let g = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    json!({
        "completions": g(&m.completions),
        "passthrough": g(&m.passthrough),
        "resident_hits": g(&m.resident_hits),
        "evictions": g(&m.evictions),
        "eviction_saves": g(&m.eviction_saves),
        "restores": g(&m.restores),
        "restore_failures": g(&m.restore_failures),
        "autosaves": g(&m.autosaves),
        "queue_rejections": g(&m.queue_rejections),
        "upstream_errors": g(&m.upstream_errors),
        "upstream_restarts": g(&m.upstream_restarts),
        "tasks_running": app.tasks.running(),
    })
}
