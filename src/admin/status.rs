//! `GET /health` and `GET /upstreams`: kvgate, its upstreams and its save
//! directory at a glance.

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::app::App;
use crate::store::usage::disk_usage;
use crate::upstream::Upstream;

/// `GET /health`: kvgate and every upstream, and the save directory's
/// disk use.
pub(crate) async fn health(app: &App) -> Value {
    let upstreams = app.upstreams();
    // `upstream` is the first one, as before kvgate had several.
    let first = upstreams.first().map(|a| upstream_json(a));
    let dir = app.shared.store.as_ref().map(|s| s.dir().to_path_buf());
    let disk = match &dir {
        Some(d) => disk_json(d.clone()).await,
        None => Value::Null,
    };
    json!({
        "status": "ok",
        "upstream": first,
        "upstreams": upstreams.iter().map(|a| upstream_json(a)).collect::<Vec<_>>(),
        "save_dir": dir.map(|d| d.display().to_string()),
        "disk": disk,
    })
}

/// The save directory's disk use, measured off the async workers (it reads
/// the directory); null when it can't be read.
async fn disk_json(dir: PathBuf) -> Value {
    match tokio::task::spawn_blocking(move || disk_usage(&dir)).await {
        Ok(Ok(u)) => json!({"files": u.files, "bytes": u.bytes, "free_bytes": u.free_bytes}),
        _ => Value::Null,
    }
}

/// One upstream as the API shows it.
fn upstream_json(upstream: &Upstream) -> Value {
    let st = upstream.state.get();
    let fp = upstream.fingerprint.get();
    let g = upstream.gauges();
    json!({
        "name": upstream.name,
        "url": upstream.client.base().to_string(),
        "up": st.up,
        "slots": upstream.pool.len(),
        "slots_busy": g.busy,
        "slots_free": g.free,
        "queued": g.queued,
        "model": fp.as_ref().map(|f| f.model.clone()),
        "models": st.models,
        "fingerprint": fp.as_ref().map(|f| f.id.clone()),
    })
}

/// `GET /upstreams`.
pub(crate) fn upstreams(app: &App) -> Value {
    let list: Vec<Value> = app.upstreams().iter().map(|a| upstream_json(a)).collect();
    json!({ "upstreams": list })
}
