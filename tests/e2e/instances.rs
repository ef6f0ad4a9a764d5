//! The instances API against the REAL llama-server (the tiny model): kvgate
//! starts, lists, stops, starts again and deletes llama-server processes;
//! instances come back with kvgate; stopping one saves its characters
//! first, so they are restored (`timings.cache_n` > 0) on whatever instance
//! serves them next, from the save directory the instances share.

use std::path::Path;
use std::time::{Duration, Instant};

use kvgate::config::Config;
use kvgate::store::SaveKind;
use serde_json::{json, Value};

use crate::support::kvgate::{admin_json, assert_api_error, saves_in, turn_through, Bare};
use crate::support::llama::{alive, llama_server_bin_async, tiny_model_path};
use crate::support::st_chat::GroupChat;

const KEY: &str = "e2e-admin-key";
/// Long enough for llama-server to load the tiny model.
const READY: Duration = Duration::from_secs(120);

/// kvgate with no upstream of its own, a save directory, an admin key and
/// the pinned llama-server for its instances.
async fn kvgate(bin: &Path, dir: &Path) -> Bare {
    Bare::start(Config {
        upstreams: Vec::new(),
        save_dir: Some(dir.to_path_buf()),
        admin_key: Some(KEY.into()),
        llama_server: Some(bin.to_path_buf()),
        health_interval: Duration::from_millis(100),
        queue_timeout: Duration::from_secs(60),
        shutdown_grace: Duration::from_secs(20),
        ..Config::default()
    })
    .await
}

async fn call(kv: &Bare, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    admin_json(&kv.admin_url, method, path, Some(KEY), body).await
}

/// Creates an instance of the tiny model with 2 slots; returns its answer.
async fn create(kv: &Bare) -> Value {
    let body = json!({"model": tiny_model_path(), "slots": 2, "ctx": 2048, "args": ["-t", "1"]});
    let (status, v) = call(kv, "POST", "/instances", Some(body)).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["status"], "running", "{v}");
    kv.wait_upstream(v["id"].as_str().unwrap(), READY).await;
    v
}

fn pid(v: &Value) -> u32 {
    v["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or_else(|| panic!("no pid: {v}"))
}

/// The upstream holding `character`, from `GET /slots`.
async fn upstream_of(kv: &Bare, character: &str) -> Option<String> {
    let (_, v) = call(kv, "GET", "/slots", None).await;
    v["slots"]
        .as_array()?
        .iter()
        .find(|s| s["character"] == character)
        .and_then(|s| s["upstream"].as_str().map(str::to_string))
}

/// One SillyTavern turn through kvgate, then wait until it is idle.
async fn turn(kv: &Bare, chat: &mut GroupChat, who: &str) -> (hyper::HeaderMap, Value) {
    let out = turn_through(&kv.url, chat, who).await;
    kv.wait_idle().await;
    out
}

fn cache_n(last: &Value) -> u64 {
    last["timings"]["cache_n"]
        .as_u64()
        .expect("timings.cache_n")
}

#[tokio::test]
async fn instances_are_created_listed_stopped_started_resumed_and_deleted() {
    let Some(bin) = llama_server_bin_async().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let kv = kvgate(&bin, dir.path()).await;

    let v = create(&kv).await;
    assert_eq!(v["id"], "llama-1", "{v}");
    let port = v["port"].as_u64().expect("port");
    let first_pid = pid(&v);
    assert!(alive(first_pid));
    let (status, list) = call(&kv, "GET", "/instances", None).await;
    assert_eq!(status, 200);
    let listed = &list["instances"][0];
    assert_eq!(listed["status"], "running", "{list}");
    assert_eq!(listed["slots"], 2, "{list}");
    assert_eq!(listed["slots_free"], 2, "{list}");
    assert_eq!(listed["restarts"], 0, "{list}");
    assert!(listed["uptime_s"].is_u64(), "{list}");
    // llama-server's own output, kept by kvgate for the dashboard.
    let (status, log) = call(&kv, "GET", "/instances/llama-1/log", None).await;
    assert_eq!(status, 200, "{log}");
    let listening = |log: &Value| {
        log["lines"].as_array().is_some_and(|l| {
            l.iter()
                .any(|x| x.as_str().unwrap_or("").contains("listening"))
        })
    };
    assert!(listening(&log), "{log}");
    // Its port is taken now: a second instance can't have it.
    let (status, e) = call(
        &kv,
        "POST",
        "/instances",
        Some(json!({"model": tiny_model_path(), "port": port})),
    )
    .await;
    assert_api_error(status, &e, "port taken");
    assert_eq!(status, 400, "{e}");

    // A turn on it, then a stop: the unsaved message is saved first.
    let mut chat = GroupChat::demo(2);
    let alice = chat.names()[0].clone();
    turn(&kv, &mut chat, &alice).await;
    assert_eq!(upstream_of(&kv, &alice).await.as_deref(), Some("llama-1"));
    assert!(saves_in(dir.path()).is_empty(), "nothing saved yet");
    let (status, v) = call(&kv, "POST", "/instances/llama-1/stop", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "stopped", "{v}");
    assert!(!alive(first_pid), "llama-server {first_pid} still runs");
    // Its output outlives it.
    let (_, after) = call(&kv, "GET", "/instances/llama-1/log", None).await;
    assert!(listening(&after), "{after}");
    assert!(after["total"].as_u64() >= log["total"].as_u64(), "{after}");
    let saved: Vec<_> = saves_in(dir.path())
        .into_iter()
        .filter(|m| m.character == alice)
        .collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert_eq!(saved[0].kind, SaveKind::Shutdown);
    // Stopping again changes nothing; with no instance running, requests
    // get a clear 503.
    let (status, _) = call(&kv, "POST", "/instances/llama-1/stop", None).await;
    assert_eq!(status, 200);
    let body = chat.body_for(&alice, false, 4);
    let (status, _, bytes) =
        crate::support::kvgate::post_json(&format!("{}/completion", kv.url), &[], &body).await;
    let e = crate::support::kvgate::json_body(&bytes);
    assert_api_error(status, &e, "no upstream");
    assert_eq!(status, 503, "{e}");

    // Started again: a new process, and Alice's cache comes back from disk.
    let (status, v) = call(&kv, "POST", "/instances/llama-1/start", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "running", "{v}");
    let second_pid = pid(&v);
    assert_ne!(second_pid, first_pid);
    kv.wait_upstream("llama-1", READY).await;
    let (h, last) = turn(&kv, &mut chat, &alice).await;
    assert_eq!(
        h["x-kvgate-restored"].to_str().unwrap(),
        saved[0].file,
        "{h:?}"
    );
    assert!(cache_n(&last) > 0, "{last}");

    // kvgate stops: so does the instance; the record says it was running,
    // so the next kvgate starts it again.
    kv.stop().await;
    assert!(
        !alive(second_pid),
        "llama-server {second_pid} outlived kvgate"
    );
    let record: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join(kvgate::instances::INSTANCES_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(record[0]["id"], "llama-1", "{record}");
    assert_eq!(record[0]["running"], true, "{record}");
    assert_eq!(record[0]["args"], json!(["-t", "1"]), "{record}");

    let kv = kvgate(&bin, dir.path()).await;
    kv.wait_upstream("llama-1", READY).await;
    let (_, v) = call(&kv, "GET", "/instances/llama-1", None).await;
    assert_eq!(v["status"], "running", "{v}");
    let third_pid = pid(&v);
    assert!(alive(third_pid));

    let (status, v) = call(&kv, "DELETE", "/instances/llama-1", None).await;
    assert_eq!(status, 200, "{v}");
    assert!(!alive(third_pid));
    let (status, v) = call(&kv, "GET", "/instances/llama-1", None).await;
    assert_eq!(status, 404, "{v}");
    let (_, list) = call(&kv, "GET", "/instances", None).await;
    assert_eq!(list, json!({"instances": []}));
    let record: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join(kvgate::instances::INSTANCES_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(record, json!([]));
    assert!(kv.app.upstreams().is_empty());
    kv.stop().await;
}

#[tokio::test]
async fn a_character_whose_instance_stops_is_restored_on_the_other() {
    let Some(bin) = llama_server_bin_async().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let kv = kvgate(&bin, dir.path()).await;
    let one = create(&kv).await;
    let two = create(&kv).await;
    assert_eq!(
        (&one["id"], &two["id"]),
        (&json!("llama-1"), &json!("llama-2"))
    );

    let mut chat = GroupChat::demo(2);
    let names = chat.names();
    let (alice, bob) = (names[0].clone(), names[1].clone());
    turn(&kv, &mut chat, &alice).await;
    turn(&kv, &mut chat, &bob).await;
    // Alice took the first; Bob went where more slots were free.
    assert_eq!(upstream_of(&kv, &alice).await.as_deref(), Some("llama-1"));
    assert_eq!(upstream_of(&kv, &bob).await.as_deref(), Some("llama-2"));

    let started = Instant::now();
    let (status, v) = call(&kv, "POST", "/instances/llama-1/stop", None).await;
    assert_eq!(status, 200, "{v}");
    let alice_save = saves_in(dir.path())
        .into_iter()
        .find(|m| m.character == alice)
        .expect("Alice saved when llama-1 stopped");

    let (h, last) = turn(&kv, &mut chat, &alice).await;
    assert_eq!(upstream_of(&kv, &alice).await.as_deref(), Some("llama-2"));
    assert_eq!(
        h["x-kvgate-restored"].to_str().unwrap(),
        alice_save.file,
        "{h:?}"
    );
    let n = cache_n(&last);
    assert!(
        n > 100,
        "Alice's prompt reused on llama-2: cache_n={n} prompt_n={} ({:?} after the stop)",
        last["timings"]["prompt_n"],
        started.elapsed()
    );
    // Bob is still at home on llama-2, as a resident.
    let (h, last) = turn(&kv, &mut chat, &bob).await;
    assert!(h.get("x-kvgate-restored").is_none(), "{h:?}");
    assert!(cache_n(&last) > 100, "{last}");
    kv.stop().await;
}

/// The flags a key holder may pass are ones the real llama-server takes, in
/// the form it takes them; the ones it must not get are refused by name.
#[tokio::test]
async fn tuning_flags_run_on_the_real_llama_server_and_dangerous_ones_are_refused() {
    let Some(bin) = llama_server_bin_async().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let kv = kvgate(&bin, dir.path()).await;
    for (flag, value) in [
        ("--tools", Some("all")),
        ("-ag", None),
        ("--path", Some("/")),
        ("--log-file", Some("/tmp/kvgate-e2e-x.log")),
    ] {
        let args: Vec<&str> = std::iter::once(flag).chain(value).collect();
        let body = json!({"model": tiny_model_path(), "slots": 1, "ctx": 512, "args": args});
        let (status, e) = call(&kv, "POST", "/instances", Some(body)).await;
        assert_api_error(status, &e, flag);
        assert_eq!(status, 400, "{e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("{flag:?}")),
            "{e}"
        );
    }
    // `--threads=1` is llama.cpp-invalid as given (it has no `=` form);
    // kvgate stores it as two arguments, and llama-server takes them all.
    let args = [
        "--threads=1",
        "-tb",
        "1",
        "-ngl",
        "0",
        "-fa",
        "off",
        "-b",
        "256",
        "-ub",
        "128",
        "-ctk",
        "f16",
        "--temp",
        "0.5",
        "--top_k",
        "20",
        "--seed",
        "7",
        "--jinja",
    ];
    let body = json!({"model": tiny_model_path(), "slots": 1, "ctx": 512, "args": args});
    let (status, v) = call(&kv, "POST", "/instances", Some(body)).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["status"], "running", "{v}");
    assert_eq!(
        (&v["args"][0], &v["args"][1]),
        (&json!("--threads"), &json!("1")),
        "{v}"
    );
    assert!(
        v["args"].as_array().unwrap().contains(&json!("--top-k")),
        "{v}"
    );
    let (status, v) = call(&kv, "DELETE", "/instances/llama-1", None).await;
    assert_eq!(status, 200, "{v}");
    kv.stop().await;
}
