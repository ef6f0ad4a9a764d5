//! Keeps kvgate's picture of llama-server true: the slot count (from
//! `GET /slots`, falling back to `/props` `total_slots`), whether it is up,
//! and whether it restarted. A restart, seen as an outage followed by
//! recovery, a changed `/props`, or task ids going backwards, marks every
//! slot's contents unknown: each character's next request restores from disk.

use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use serde_json::Value;
use tracing::{info, warn};

use serde_json::json;

use crate::llama::client::{LlamaClient, SlotInfo, UpstreamError};
use crate::observe::metrics;
use crate::store::meta::Fingerprint;
use crate::upstream::{Upstream, UpstreamState};

/// Timeout of one poll.
const POLL_TIMEOUT: Duration = Duration::from_secs(5);

/// What the monitor remembers between polls.
#[derive(Debug, Default)]
struct Seen {
    /// Whether the last poll reached llama-server.
    up: Option<bool>,
    /// Identity-relevant `/props` fields at the last contact.
    props_key: Option<String>,
    /// Highest task id in `/slots` at the last poll.
    max_task: Option<i64>,
    /// Whether the model fingerprint was computed for the current upstream.
    fingerprinted: bool,
    /// The names the upstream's model answers to (see [`model_names`]).
    models: Vec<String>,
    /// Whether llama-server was asleep (`--sleep-idle-seconds`) at the last
    /// poll.
    sleeping: bool,
}

/// Whether `/props` says llama-server sleeps: its model is unloaded, its
/// slots' caches gone, and any call but `/health`, `/props`, `/metrics` and
/// `/models` would wake it.
fn is_sleeping(props: &Value) -> bool {
    props.get("is_sleeping").and_then(Value::as_bool) == Some(true)
}

/// `/props`' slot count (with `--no-slots`, or while llama-server sleeps).
fn total_slots(props: &Value) -> usize {
    props
        .get("total_slots")
        .and_then(Value::as_u64)
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0)
}

/// The `/props` fields that change when llama-server comes back different.
pub(crate) fn props_key(props: &Value) -> String {
    let f = |p: &str| props.pointer(p).map(Value::to_string).unwrap_or_default();
    [
        f("/model_path"),
        f("/build_info"),
        f("/total_slots"),
        f("/default_generation_settings/n_ctx"),
    ]
    .join("|")
}

/// Polls until `shutdown` resolves. The first successful poll sizes the
/// pool; later ones detect outages and restarts.
pub(crate) async fn run(upstream: Arc<Upstream>, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut seen = Seen::default();
    loop {
        poll(&upstream, &mut seen).await;
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(upstream.shared.cfg.health_interval) => {}
            _ = upstream.monitor_kick.notified() => {}
        }
    }
}

/// `/props`, `/slots` (`None` with `--no-slots`) and the slot count.
async fn read_upstream(
    upstream: &Upstream,
) -> Result<(Value, Option<Vec<SlotInfo>>, usize), UpstreamError> {
    let props = upstream.client.get_json("/props", POLL_TIMEOUT).await?;
    if is_sleeping(&props) {
        // `/slots` would wake it, and polling it would keep it from ever
        // sleeping: kvgate must not start work llama-server alone would not.
        let n = total_slots(&props);
        return Ok((props, None, n));
    }
    let slots = match upstream.client.slots(POLL_TIMEOUT).await {
        Ok(s) => Some(s),
        // `--no-slots`: fall back to /props for the count.
        Err(UpstreamError::Status { status, .. }) if status == StatusCode::NOT_IMPLEMENTED => None,
        Err(e) => return Err(e),
    };
    let n = match &slots {
        Some(s) => s.len(),
        None => total_slots(&props),
    };
    Ok((props, slots, n))
}

/// Marks the slots llama-server reports empty although kvgate believed
/// them live. A slot that never ran a task (no `id_task`) or holds no
/// tokens is empty; kvgate's own restores are always followed by a
/// generation in the same lease, so a live slot has run a task.
fn reconcile(upstream: &Upstream, slots: &[SlotInfo], ticks_before: &[u64]) {
    let empty: Vec<bool> = slots
        .iter()
        .map(|s| s.id_task.is_none() || s.n_prompt_tokens == Some(0))
        .collect();
    let lost = upstream.pool.reconcile(&empty, ticks_before);
    if !lost.is_empty() {
        warn!(?lost, "llama-server no longer holds these slots' caches; their characters will restore from disk");
    }
}

/// One look at llama-server: slot count, model, outages and restarts.
async fn poll(upstream: &Upstream, seen: &mut Seen) {
    let ticks_before: Vec<u64> = upstream
        .pool
        .snapshot()
        .iter()
        .map(|s| s.last_used)
        .collect();
    let (props, slots, n) = match read_upstream(upstream).await {
        Ok(read) => read,
        Err(e) => return down(upstream, seen, &e),
    };
    let key = props_key(&props);
    let sleeping = is_sleeping(&props);
    // Asleep, llama-server shows no slots: keep the last task id seen.
    let max_task = match (&slots, sleeping) {
        (_, true) => seen.max_task,
        (s, false) => s
            .as_ref()
            .and_then(|s| s.iter().filter_map(|x| x.id_task).max()),
    };
    if sleeping && !seen.sleeping && seen.up.is_some() {
        info!(
            "llama-server went to sleep: its slots' caches are gone; characters restore from disk"
        );
        upstream.pool.lose_all_caches();
    }
    seen.sleeping = sleeping;

    let first = seen.up.is_none();
    let was_down = seen.up == Some(false);
    let changed = seen.props_key.as_ref().is_some_and(|k| *k != key);
    let went_back = match (seen.max_task, max_task) {
        (Some(before), Some(now)) => now < before,
        (Some(_), None) => true,
        _ => false,
    };
    if first || changed || !seen.fingerprinted {
        seen.fingerprinted = false;
        if let Some((fp, names)) = fetch_fingerprint(&upstream.client, &props).await {
            upstream.set_fingerprint(fp);
            seen.models = names;
            seen.fingerprinted = true;
        }
    }
    if first {
        first_contact(upstream, &props, n).await;
    } else if was_down || changed || went_back {
        metrics::inc(&upstream.shared.metrics.upstream_restarts);
        warn!(
            was_down,
            props_changed = changed,
            task_ids_reset = went_back,
            "llama-server restarted: every slot's cache is gone; characters restore from disk"
        );
        upstream.pool.lose_all_caches();
    }
    if let Some(slots) = &slots {
        reconcile(upstream, slots, &ticks_before);
    }
    if upstream.pool.len() != n {
        info!(slots = n, "adopting llama-server's slot count");
        upstream.pool.resize(n);
    }
    if seen.up != Some(true) {
        upstream.emit(
            "upstream_up",
            || json!({"url": upstream.client.base().to_string(), "slots": n}),
        );
    }
    upstream.state.replace(UpstreamState {
        up: true,
        slots: slots.clone().unwrap_or_default(),
        models: seen.models.clone(),
        refused: None,
    });
    seen.up = Some(true);
    seen.props_key = Some(key);
    seen.max_task = max_task;
}

fn down(upstream: &Upstream, seen: &mut Seen, e: &UpstreamError) {
    let refused = matches!(e, UpstreamError::Status { status, .. }
        if *status != StatusCode::SERVICE_UNAVAILABLE);
    if refused {
        // It answered, but not what kvgate asked (a key kvgate lacks, a
        // router llama-server without these endpoints); a loading
        // llama-server's 503 is not a refusal: it will answer soon. Say
        // why, once.
        let mut st = upstream.state.get();
        if st.refused.is_none() {
            warn!(error = %e, "llama-server refuses kvgate's own calls (give --upstream-api-key if it has an --api-key); requests pass through unpinned");
        }
        st.refused = Some(e.to_string());
        upstream.state.replace(st);
    }
    if seen.up != Some(false) {
        warn!(error = %e, upstream = %upstream.client.base(), "llama-server is unreachable");
    }
    // Only a real outage counts as down (a slow answer under load does not).
    if e.is_connect() || seen.up.is_none() {
        if seen.up != Some(false) {
            upstream.emit(
                "upstream_down",
                || json!({"url": upstream.client.base().to_string(), "error": e.to_string()}),
            );
        }
        // Only the monitor writes this: no update is lost between get and
        // replace. The slots stay as last seen.
        let mut st = upstream.state.get();
        st.up = false;
        upstream.state.replace(st);
        seen.up = Some(false);
    }
}

/// The fingerprint of the model llama-server serves (from `/props` and
/// `/v1/models`), and the names it answers to.
async fn fetch_fingerprint(
    client: &LlamaClient,
    props: &Value,
) -> Option<(Fingerprint, Vec<String>)> {
    let models = client
        .get_json("/v1/models", Duration::from_secs(5))
        .await
        .ok()?;
    let fp = Fingerprint::from_upstream(props, &models);
    let names = model_names(props, &models, &fp.model);
    Some((fp, names))
}

/// The names a request's `model` field may use for this upstream's model:
/// the ids `/v1/models` lists (the `--alias`, or the model path), the model
/// path, and its file name (`file`, as the fingerprint has it) with and
/// without `.gguf`.
pub(crate) fn model_names(props: &Value, models: &Value, file: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut add = |n: &str| {
        if !n.is_empty() && !names.iter().any(|x| x == n) {
            names.push(n.to_string());
        }
    };
    for m in models
        .get("data")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(id) = m.get("id").and_then(Value::as_str) {
            add(id);
        }
    }
    if let Some(path) = props.get("model_path").and_then(Value::as_str) {
        add(path);
    }
    add(file);
    if let Some(stem) = file.strip_suffix(".gguf") {
        add(stem);
    }
    names
}

/// Logs what kvgate found and warns about settings that defeat it.
async fn first_contact(upstream: &Upstream, props: &Value, n: usize) {
    let model = props
        .get("model_path")
        .and_then(|v| v.as_str())
        .unwrap_or("?");
    let build = props
        .get("build_info")
        .and_then(|v| v.as_str())
        .unwrap_or("?");
    info!(upstream = %upstream.client.base(), slots = n, model, build, "connected to llama-server");
    if n == 4 {
        warn!(
            "llama-server reports 4 slots, its automatic default: if it was started without an \
             explicit -np, it uses a unified KV cache and clears idle slots whenever another slot \
             starts work, which defeats per-character slots. Start it with an explicit -np N \
             (and --slot-save-path DIR for kvgate's saves)"
        );
    }
    // An empty file name is refused before any work, so this probe only
    // tells whether slot actions are enabled (501 without --slot-save-path).
    let probe = serde_json::json!({ "filename": "" });
    if let Ok((status, _)) = upstream
        .client
        .call_json(
            hyper::Method::POST,
            "/slots/0?action=save",
            Some(&probe),
            POLL_TIMEOUT,
        )
        .await
    {
        if status == StatusCode::NOT_IMPLEMENTED {
            warn!(
                "llama-server runs without --slot-save-path: caches can't be saved or restored. \
                 Start it with: llama-server -m MODEL -np N --slot-save-path DIR (the same DIR as \
                 kvgate's --save-dir)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_cover_alias_path_file_and_stem() {
        let props = serde_json::json!({"model_path": "/models/tiny-q8.gguf"});
        let models = serde_json::json!({"data": [{"id": "tiny"}, {"id": "tiny"}]});
        let file = Fingerprint::from_upstream(&props, &models).model;
        assert_eq!(
            model_names(&props, &models, &file),
            ["tiny", "/models/tiny-q8.gguf", "tiny-q8.gguf", "tiny-q8"]
        );
        let none = serde_json::json!({});
        assert!(model_names(&none, &none, "").is_empty());
    }

    #[test]
    fn props_key_ignores_volatile_fields() {
        let a =
            serde_json::json!({"model_path": "/m.gguf", "total_slots": 2, "is_sleeping": false});
        let b = serde_json::json!({"model_path": "/m.gguf", "total_slots": 2, "is_sleeping": true});
        let c = serde_json::json!({"model_path": "/n.gguf", "total_slots": 2});
        assert_eq!(props_key(&a), props_key(&b));
        assert_ne!(props_key(&a), props_key(&c));
    }
}
