//! `/health` and its view of llama-server, unknown admin paths and methods,
//! `GET /slots` (owners, counters, busy slots and the queue, answered while
//! every slot is busy) and `POST /slots/clear`.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use kvgate::store::now_unix;
use serde_json::json;

use crate::support::kvgate::{assert_api_error, spawn_post, EventTap};

use super::{admin, names, poll, say, setup, slot_of, turn, CHAT};

#[tokio::test]
async fn health_reports_kvgate_and_llama_server() {
    let s = setup(2, |_| {}).await;
    let v = s.kv.admin_get("/health").await;
    assert_eq!(v["status"], "ok", "{v}");
    let up = &v["upstream"];
    assert_eq!(
        up["url"].as_str().map(|u| u.trim_end_matches('/')),
        Some(s.fake.url().as_str()),
        "{v}"
    );
    assert_eq!(up["up"], true, "{v}");
    assert_eq!(up["slots"], 2, "{v}");
    assert!(
        up["model"].as_str().is_some_and(|m| m.contains("fake")),
        "model is the fake's: {v}"
    );
    assert!(!up["fingerprint"].is_null(), "{v}");
    let dir = v["save_dir"].as_str().expect("save_dir");
    assert_eq!(
        Path::new(dir).canonicalize().unwrap(),
        s.dir.canonicalize().unwrap()
    );

    // The save directory's disk use: every plain file in it, counted and
    // added up; a save adds its file and sidecar.
    let on_disk = |dir: &Path| -> (u64, u64) {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().unwrap().is_file())
            .fold((0, 0), |(n, b), e| (n + 1, b + e.metadata().unwrap().len()))
    };
    let disk = &v["disk"];
    assert_eq!(
        (disk["files"].as_u64(), disk["bytes"].as_u64()),
        {
            let (n, b) = on_disk(&s.dir);
            (Some(n), Some(b))
        },
        "{v}"
    );
    assert!(disk["free_bytes"].as_u64().is_some_and(|f| f > 0), "{v}");
    say(&s, "Alice", "User: hi").await;
    let (status, r) = admin(&s.kv, "POST", "/save", Some(json!({}))).await;
    assert_eq!(status, 200, "{r}");
    let after = s.kv.admin_get("/health").await;
    let (n, b) = on_disk(&s.dir);
    assert_eq!(after["disk"]["files"].as_u64(), Some(n), "{after}");
    assert_eq!(after["disk"]["bytes"].as_u64(), Some(b), "{after}");
    assert!(
        n >= disk["files"].as_u64().unwrap() + 2 && b > disk["bytes"].as_u64().unwrap(),
        "a save and its sidecar: {disk} → {}",
        after["disk"]
    );

    // llama-server goes away, and comes back.
    s.fake.kill().await;
    poll(&s.kv, "/health", "upstream down", |v| {
        v["upstream"]["up"] == false
    })
    .await;
    s.fake.start_again().await;
    poll(&s.kv, "/health", "upstream up again", |v| {
        v["upstream"]["up"] == true
    })
    .await;
}

#[tokio::test]
async fn unknown_admin_paths_and_methods_are_refused() {
    let s = setup(1, |_| {}).await;
    let (status, v) = admin(&s.kv, "GET", "/nope", None).await;
    assert_eq!(status, 404);
    assert_api_error(404, &v, "GET /nope");
    assert_eq!(v["error"]["type"], "not_found_error");
    for (method, path) in [
        ("POST", "/health"),
        ("DELETE", "/slots"),
        ("POST", "/files"),
        ("PATCH", "/settings"),
        ("GET", "/save"),
    ] {
        let (status, _) = admin(&s.kv, method, path, Some(json!({}))).await;
        assert_eq!(status, 405, "{method} {path}");
    }
}

#[tokio::test]
async fn slots_show_owners_counters_busy_and_the_queue_without_blocking() {
    let s = setup(2, |_| {}).await;
    let tap = EventTap::open(&s.kv).await;
    let v = s.kv.admin_get("/slots").await;
    let sl = v["slots"].as_array().expect("slots");
    assert_eq!(sl.len(), 2, "{v}");
    for (i, x) in sl.iter().enumerate() {
        assert_eq!(x["id"], i, "{v}");
        assert!(x["character"].is_null(), "{v}");
        assert_eq!(x["busy"], false, "{v}");
    }
    assert_eq!(v["queued"], 0, "{v}");

    let before = now_unix();
    say(&s, "Alice", "User: hi").await;
    let v = poll(
        &s.kv,
        "/slots",
        "tokens_cached read from llama-server",
        |v| {
            v["slots"][0]["tokens_cached"]
                .as_u64()
                .is_some_and(|n| n > 0)
        },
    )
    .await;
    let a = &v["slots"][0];
    assert_eq!(a["chat"], CHAT, "{v}");
    assert_eq!(a["character"], "Alice", "{v}");
    assert_eq!(a["anonymous"], false, "{v}");
    assert_eq!(a["usage"], 1, "{v}");
    assert_eq!(a["messages_since_save"], 1, "{v}");
    assert_eq!(a["live"], true, "{v}");
    assert_eq!(a["busy"], false, "{v}");
    assert!(a["restored_from"].is_null(), "{v}");
    let last_used = a["last_used"].as_u64().expect("last_used in Unix seconds");
    assert!(
        (before.saturating_sub(1)..=now_unix() + 1).contains(&last_used),
        "last_used {last_used}, test started at {before}"
    );
    assert!(v["slots"][1]["character"].is_null(), "{v}");

    // Every slot busy and one request waiting: the admin port still answers.
    s.fake.set_gate(true);
    let url = format!("{}/completion", s.kv.url);
    let bob = spawn_post(&url, turn("Bob", "User: hi"));
    assert!(
        s.fake
            .wait_for(Duration::from_secs(5), |f| f.slot_is_processing(1))
            .await
    );
    let carol = spawn_post(&url, turn("Carol", "User: hi"));
    poll(&s.kv, "/slots", "Carol holds slot 0", |v| {
        v["slots"][0]["character"] == "Carol" && v["slots"][0]["busy"] == true
    })
    .await;
    let alice = spawn_post(&url, turn("Alice", "User: hi\nBob: yo"));
    let v = poll(&s.kv, "/slots", "one request queued", |v| v["queued"] == 1).await;
    // Joining the queue is told live, so a dashboard needn't poll.
    let queue = tap.wait_for("queue", 1).await;
    assert_eq!(queue[0]["queued"], 1, "{queue:?}");
    assert_eq!(queue[0]["upstream"], "upstream-1", "{queue:?}");
    assert_eq!(v["slots"][0]["busy"], true, "{v}");
    assert_eq!(v["slots"][1]["busy"], true, "{v}");
    assert_eq!(v["slots"][1]["character"], "Bob", "{v}");
    // The gate holds the slots until it opens: an admin request that waited
    // for them would hang, and `admin` fails after 30 s.
    for path in [
        "/slots",
        "/health",
        "/saves",
        "/files",
        "/settings",
        "/metrics",
    ] {
        let (status, _) = admin(&s.kv, "GET", path, None).await;
        assert_eq!(status, 200, "{path} while every slot is busy");
    }
    s.fake.set_gate(false);
    for h in [bob, carol, alice] {
        let (status, _, body) = h.await.unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    s.kv.wait_idle().await;
    let v = s.kv.admin_get("/slots").await;
    assert_eq!(v["queued"], 0, "{v}");
    // So is leaving it; requests granted at once are never queued.
    let queue = tap.of("queue");
    assert_eq!(queue.len(), 2, "{queue:?}");
    assert_eq!(queue[1]["queued"], 0, "{queue:?}");
    assert!(
        v["slots"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["busy"] == false),
        "{v}"
    );
}

#[tokio::test]
async fn slots_clear_releases_and_optionally_erases() {
    let s = setup(2, |_| {}).await;
    say(&s, "Alice", "User: one").await;
    say(&s, "Bob", "User: one").await;
    let before = names(&s.dir);
    let (status, v) = admin(&s.kv, "POST", "/slots/clear", Some(json!({}))).await;
    assert_eq!(status, 200, "{v}");
    let cleared: BTreeSet<u64> = v["cleared"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert!(cleared.is_superset(&BTreeSet::from([0, 1])), "{v}");
    assert_eq!(v["erased"], json!([]), "{v}");
    assert!(s.fake.slot_actions().iter().all(|a| a.1 != "erase"));
    assert!(!s.fake.slot_tokens(0).is_empty(), "released, not erased");
    assert_eq!(names(&s.dir), before, "files untouched");
    let sl = s.kv.admin_slots().await;
    assert!(sl.iter().all(|x| x["character"].is_null()), "{sl:?}");

    let (_, h, _) = say(&s, "Alice", "User: one\nUser: two").await;
    assert_eq!(slot_of(&h), 0, "the lowest free slot");
    let (status, v) = admin(&s.kv, "POST", "/slots/clear", Some(json!({"erase": true}))).await;
    assert_eq!(status, 200, "{v}");
    let erased: Vec<u64> = v["erased"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert!(erased.contains(&0), "{v}");
    let erase_actions: BTreeSet<u64> = s
        .fake
        .slot_actions()
        .iter()
        .filter(|a| a.1 == "erase")
        .map(|a| a.0 as u64)
        .collect();
    assert_eq!(erase_actions, erased.iter().copied().collect(), "{v}");
    assert!(s.fake.slot_tokens(0).is_empty(), "erased in llama-server");
    assert!(s
        .kv
        .admin_slots()
        .await
        .iter()
        .all(|x| x["character"].is_null()));
    assert_eq!(names(&s.dir), before, "files untouched");
    say(&s, "Bob", "User: one\nUser: two").await;
}
