//! `GET /health` and `GET /upstreams`: kvgate and its upstreams at a glance.

use serde_json::{json, Value};

use crate::app::App;
use crate::upstream::Upstream;

/// `GET /health`: kvgate and every upstream.
pub(crate) fn health(app: &App) -> Value {
    let upstreams = app.upstreams();
    // `upstream` is the first one, as before kvgate had several.
    let first = upstreams.first().map(|a| upstream_json(a));
    json!({
        "status": "ok",
        "upstream": first,
        "upstreams": upstreams.iter().map(|a| upstream_json(a)).collect::<Vec<_>>(),
        "save_dir": app.shared.store.as_ref().map(|s| s.dir().display().to_string()),
    })
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
