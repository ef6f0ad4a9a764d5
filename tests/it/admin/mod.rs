//! The admin side port (README "Admin API") against the fake llama-server,
//! over real sockets: every endpoint's answers and errors, one file per
//! resource. Here: the helpers several of those files share (requests to
//! the admin port go through `support::kvgate`).

mod browser;
mod dashboard;
mod files;
mod health_slots;
mod keys;
mod observe;
mod preload;
mod saves;
mod settings;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use kvgate::config::Config;
use kvgate::store::META_SUFFIX;
use serde_json::{json, Value};

use crate::support::kvgate::{names_in, Kvgate, Saving};

/// The group chat of [`turn`]; the user is "User".
const ROSTER: [&str; 3] = ["Alice", "Bob", "Carol"];
/// The chat key kvgate infers for [`turn`] bodies (the sorted roster).
const CHAT: &str = "Alice+Bob+Carol+User";
/// The seed plugin's prefix, which the admin port also serves.
const PLUGIN: &str = "/api/plugins/kv-cache-manager";
/// The prefix the seed plugin's README documents (it serves [`PLUGIN`]).
const PLUGIN_README: &str = "/api/plugins/kv_cache-manager";

/// A group turn in the admin tests' chat.
fn turn(speaker: &str, history: &str) -> Value {
    crate::support::kvgate::group_turn(&ROSTER, speaker, history)
}

/// `body` with an explicit chat and character (the body's `kvgate` object).
fn with_identity(mut body: Value, chat: &str, character: &str) -> Value {
    body["kvgate"] = json!({ "chat": chat, "character": character });
    body
}

/// kvgate saving over a fake llama-server with `slots` slots
/// ([`Saving::start`]), `tweak` applied to its configuration.
async fn setup(slots: usize, tweak: impl FnOnce(&mut Config)) -> Saving {
    Saving::start(slots, |b| b, tweak).await
}

/// One admin request with an optional JSON body (see [`Kvgate::admin_raw`]).
async fn admin(kv: &Kvgate, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    kv.admin_raw(method, path, &[], &body).await
}

/// Polls `GET path` until `pred` holds (5 s at most).
async fn poll(kv: &Kvgate, path: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = kv.admin_get(path).await;
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: still {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn say(s: &Saving, speaker: &str, history: &str) -> (u16, hyper::HeaderMap, Vec<Value>) {
    s.kv.say_body(&turn(speaker, history)).await
}

fn slot_of(h: &hyper::HeaderMap) -> usize {
    h["x-kvgate-slot"].to_str().unwrap().parse().unwrap()
}

fn cache_n(events: &[Value]) -> u64 {
    events.last().unwrap()["timings"]["cache_n"]
        .as_u64()
        .expect("timings.cache_n")
}

/// The id of the slot `character` holds, from a `GET /slots` array.
fn slot_with(slots: &[Value], character: &str) -> Option<usize> {
    slots
        .iter()
        .find(|s| s["character"] == character)
        .map(|s| s["id"].as_u64().expect("slot id") as usize)
}

fn names(dir: &Path) -> BTreeSet<String> {
    names_in(dir).into_iter().collect()
}

fn meta_of(file: &str) -> String {
    format!("{}{META_SUFFIX}", file.strip_suffix(".bin").unwrap())
}

/// Alice and Bob say one line each and are saved by `POST /save`; their
/// files.
async fn alice_and_bob_saved(s: &Saving) -> (String, String) {
    say(s, "Alice", "User: one").await;
    say(s, "Bob", "User: one").await;
    let (status, r) = admin(&s.kv, "POST", "/save", Some(json!({}))).await;
    assert_eq!(status, 200, "{r}");
    (saved_file(&r, "Alice"), saved_file(&r, "Bob"))
}

/// The `file` of the `saved` entry for `character` in a save answer.
fn saved_file(v: &Value, character: &str) -> String {
    v["saved"]
        .as_array()
        .unwrap_or_else(|| panic!("no saved array: {v}"))
        .iter()
        .find(|e| e["character"] == character)
        .unwrap_or_else(|| panic!("{character} not saved: {v}"))["file"]
        .as_str()
        .expect("file")
        .to_string()
}
