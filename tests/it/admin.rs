//! The admin side port (README "Admin API") against the fake llama-server,
//! over real sockets: every endpoint's answers and errors; the file API
//! refusing hostile names without deleting anything; admin keys; front-port
//! clients; load, preload and its cancellation; live settings that survive a
//! restart; the event stream of a scripted group chat; `/metrics` as
//! Prometheus text.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvgate::cache_store::{now_unix, SaveKind, SaveMeta, META_SUFFIX, TEMP_PREFIX};
use kvgate::config::Config;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::support::fake_llama::FakeLlama;
use crate::support::kvgate::{
    assert_api_error, json_body, names_in, post_json, raw_exchange, saves_in as saves, send,
    spawn_post, EventTap, Kvgate, Saving,
};
use crate::support::kvgate::{preload_id, preload_succeeded};
use crate::support::prometheus::parse_exposition;

/// The group chat of [`turn`]; the user is "User".
const ROSTER: [&str; 3] = ["Alice", "Bob", "Carol"];
/// The chat key kvgate infers for [`turn`] bodies (the sorted roster).
const CHAT: &str = "Alice+Bob+Carol+User";
/// The seed plugin's prefix, which the admin port also serves.
const PLUGIN: &str = "/api/plugins/kv-cache-manager";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A group turn in this file's chat.
fn turn(speaker: &str, history: &str) -> Value {
    crate::support::kvgate::group_turn(&ROSTER, speaker, history)
}

/// `body` with an explicit chat and character (the body's `kvgate` object).
fn with_identity(mut body: Value, chat: &str, character: &str) -> Value {
    body["kvgate"] = json!({ "chat": chat, "character": character });
    body
}

async fn setup(slots: usize, tweak: impl FnOnce(&mut Config)) -> Saving {
    Saving::start(slots, |b| b, tweak).await
}

/// One admin request with an optional JSON body (see [`Kvgate::admin_raw`]).
async fn admin(kv: &Kvgate, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    kv.admin_raw(method, path, &[], &body).await
}

/// `POST /load` with these items.
async fn load(kv: &Kvgate, items: Value) -> (u16, Value) {
    admin(kv, "POST", "/load", Some(json!({ "items": items }))).await
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

/// The `file` of the `saved` entry for `character` in a save answer.
/// Alice and Bob say one line each and are saved by `POST /save`; their
/// files.
async fn alice_and_bob_saved(s: &Saving) -> (String, String) {
    say(s, "Alice", "User: one").await;
    say(s, "Bob", "User: one").await;
    let (status, r) = admin(&s.kv, "POST", "/save", Some(json!({}))).await;
    assert_eq!(status, 200, "{r}");
    (saved_file(&r, "Alice"), saved_file(&r, "Bob"))
}

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

/// Percent-encodes every byte but the unreserved ones.
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// One request written byte for byte on a fresh connection (no client-side
/// URI parsing or normalisation); status and body.
async fn raw_http(
    base: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 0\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let (status, _, body) = raw_exchange(base, req.into_bytes()).await;
    (status, json_body(&body))
}

// ---------------------------------------------------------------------------
// Health, slots, routing
// ---------------------------------------------------------------------------

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
    assert!(
        v["slots"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["busy"] == false),
        "{v}"
    );
}

// ---------------------------------------------------------------------------
// Saves and the file API
// ---------------------------------------------------------------------------

#[tokio::test]
async fn saves_group_by_chat_and_character_newest_first_and_filter() {
    let s = setup(2, |c| c.cache.save_every = 1).await;
    for (chat, who, history) in [
        ("tavern", "Alice", "User: one"),
        ("tavern", "Alice", "User: one\nUser: two"),
        ("tavern", "Bob", "User: one"),
        ("dungeon", "Carol", "User: one"),
    ] {
        s.kv.say_body(&with_identity(turn(who, history), chat, who))
            .await;
    }
    let disk = saves(&s.dir);
    assert_eq!(disk.len(), 4, "{disk:?}");

    let v = s.kv.admin_get("/saves").await;
    let chats = v["chats"].as_array().unwrap_or_else(|| panic!("{v}"));
    let chat_names: BTreeSet<&str> = chats.iter().map(|c| c["chat"].as_str().unwrap()).collect();
    assert_eq!(chat_names, BTreeSet::from(["tavern", "dungeon"]), "{v}");
    for (chat, who, n) in [
        ("tavern", "Alice", 2),
        ("tavern", "Bob", 1),
        ("dungeon", "Carol", 1),
    ] {
        let listed = character_of(&v, chat, who);
        assert_eq!(listed.len(), n, "{chat}/{who}: {v}");
        // Newest first, as the store orders them (created, then name).
        let mut expected: Vec<&SaveMeta> = disk
            .iter()
            .filter(|m| m.chat == chat && m.character == who)
            .collect();
        expected.sort_by(|a, b| b.created.cmp(&a.created).then(b.file.cmp(&a.file)));
        let files: Vec<&str> = listed.iter().map(|x| x["file"].as_str().unwrap()).collect();
        let want: Vec<&str> = expected.iter().map(|m| m.file.as_str()).collect();
        assert_eq!(files, want, "{chat}/{who} newest first");
        for (x, m) in listed.iter().zip(&expected) {
            let size = std::fs::metadata(s.dir.join(&m.file)).unwrap().len();
            assert!(!x["created"].is_null(), "{x}");
            assert!(x["tag"].is_null(), "{x}");
            assert_eq!(x["kind"], "autosave", "{x}");
            assert_eq!(x["tokens"].as_u64(), Some(m.n_tokens), "{x}");
            assert_eq!(x["bytes"].as_u64(), Some(size), "{x}");
            assert_eq!(x["model_match"], true, "{x}");
        }
    }

    // `q` matches a chat or a character, case-insensitively.
    for (q, want) in [
        ("ALICE", vec!["tavern"]),
        ("dungeon", vec!["dungeon"]),
        ("car", vec!["dungeon"]),
        ("TaV", vec!["tavern"]),
        ("zzz", vec![]),
    ] {
        let v = s.kv.admin_get(&format!("/saves?q={q}")).await;
        let got: BTreeSet<&str> = v["chats"]
            .as_array()
            .unwrap_or_else(|| panic!("q={q}: {v}"))
            .iter()
            .map(|c| c["chat"].as_str().unwrap())
            .collect();
        assert_eq!(got, want.into_iter().collect::<BTreeSet<_>>(), "q={q}: {v}");
    }
    let v = s.kv.admin_get("/saves?q=alice").await;
    assert!(
        v["chats"][0]["characters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["character"] == "Alice"),
        "{v}"
    );

    // A tagged manual save lists with its tag and kind, newest.
    let (status, r) = admin(
        &s.kv,
        "POST",
        "/save",
        Some(json!({"tag": "before the duel"})),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        r["saved"].as_array().unwrap().len(),
        1,
        "only Carol is in a slot: {r}"
    );
    let tagged = saved_file(&r, "Carol");
    let listed = character_of(&s.kv.admin_get("/saves?q=carol").await, "dungeon", "Carol");
    assert_eq!(
        listed[0]["file"],
        tagged.as_str(),
        "newest first: {listed:?}"
    );
    assert_eq!(listed[0]["tag"], "before the duel");
    assert_eq!(listed[0]["kind"], "manual");
}

/// The saves `GET /saves` lists for `who` in `chat`.
fn character_of(v: &Value, chat: &str, who: &str) -> Vec<Value> {
    v["chats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["chat"] == chat)
        .unwrap_or_else(|| panic!("no {chat}: {v}"))["characters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["character"] == who)
        .unwrap_or_else(|| panic!("no {who}: {v}"))["saves"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn files_list_and_delete_also_under_the_plugin_prefix() {
    let s = setup(2, |_| {}).await;
    say(&s, "Alice", "User: hi").await;
    let (status, r) = admin(&s.kv, "POST", "/save", Some(json!({}))).await;
    assert_eq!(status, 200, "{r}");
    let fa = saved_file(&r, "Alice");
    // A Unicode character in another chat (its name keeps its letters).
    s.kv.say_body(&with_identity(
        turn("Alice", "User: привет"),
        "таверна",
        "Мария",
    ))
    .await;
    let (status, r) = admin(&s.kv, "POST", "/save", Some(json!({}))).await;
    assert_eq!(status, 200, "{r}");
    let fm = saved_file(&r, "Мария");
    assert!(fm.contains("Мария"), "{fm}");
    // A file the extension wrote, with no sidecar.
    let legacy = "chat1_20240115143022_character_Alice.bin";
    std::fs::write(s.dir.join(legacy), b"legacy bytes").unwrap();

    for prefix in ["", PLUGIN] {
        let v = s.kv.admin_get(&format!("{prefix}/files")).await;
        let files = v["files"].as_array().unwrap_or_else(|| panic!("{v}"));
        for f in [&fa, &fm, &legacy.to_string()] {
            let e = files
                .iter()
                .find(|e| e["name"] == f.as_str())
                .unwrap_or_else(|| panic!("{prefix}/files misses {f}: {v}"));
            let size = std::fs::metadata(s.dir.join(f)).unwrap().len();
            assert_eq!(e["size"].as_u64(), Some(size), "{e}");
            assert_eq!(e["isDirectory"], false, "{e}");
            assert!(!e["modified"].is_null(), "{e}");
        }
    }

    // Delete: a percent-encoded UTF-8 name, a legacy file under the plugin
    // prefix, a plain name; each takes its sidecar along.
    for (path, file) in [
        (format!("/files/{}", pct(&fm)), fm.clone()),
        (format!("{PLUGIN}/files/{legacy}"), legacy.to_string()),
        (format!("/files/{fa}"), fa.clone()),
    ] {
        let (status, v) = admin(&s.kv, "DELETE", &path, None).await;
        assert_eq!(status, 200, "DELETE {path}: {v}");
        assert_eq!(v["success"], true, "{v}");
        assert_eq!(
            v["message"],
            format!("File {file} deleted successfully"),
            "{v}"
        );
        assert!(!s.dir.join(&file).exists(), "{file} still there");
        assert!(
            !s.dir.join(meta_of(&file)).exists(),
            "sidecar of {file} still there"
        );
    }
    let v = s.kv.admin_get("/files").await;
    for f in [&fa, &fm] {
        assert!(
            !v["files"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == f.as_str()),
            "{v}"
        );
    }
    let v = s.kv.admin_get("/saves").await;
    assert!(
        !v.to_string().contains(&fa) && !v.to_string().contains(&fm),
        "deleted saves are no longer listed: {v}"
    );
    for path in [
        format!("/files/{fa}"),
        format!("{PLUGIN}/files/{legacy}"),
        "/files/never_20240101000000_character_Nobody.bin".to_string(),
    ] {
        let (status, v) = admin(&s.kv, "DELETE", &path, None).await;
        assert_eq!(status, 404, "DELETE {path}: {v}");
        assert_api_error(404, &v, &path);
        assert_eq!(v["error"]["type"], "not_found_error");
    }
}

#[tokio::test]
async fn files_listing_survives_files_vanishing_midway() {
    let s = setup(1, |_| {}).await;
    let dir = s.dir.clone();
    let stable = "stable_20240101000000_character_S.bin";
    std::fs::write(dir.join(stable), b"s").unwrap();
    std::os::unix::fs::symlink(
        "/nonexistent/kvgate-test",
        dir.join("dangling_20240101000000_character_D.bin"),
    )
    .unwrap();
    const N: usize = 300;
    let churn = |dir: &Path, i: usize| dir.join(format!("churn{i}_20240101000000_character_C.bin"));
    for i in 0..N {
        std::fs::write(churn(&dir, i), b"c").unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let churner = std::thread::spawn({
        let (stop, dir) = (Arc::clone(&stop), dir.clone());
        move || {
            let mut rounds = 0u64;
            while !stop.load(Ordering::SeqCst) {
                for i in 0..N {
                    let p = churn(&dir, i);
                    let _ = std::fs::remove_file(&p);
                    let _ = std::fs::write(&p, b"c");
                }
                rounds += 1;
            }
            rounds
        }
    });
    for round in 0..60 {
        let path = if round % 2 == 0 {
            "/files".to_string()
        } else {
            format!("{PLUGIN}/files")
        };
        let (status, v) = admin(&s.kv, "GET", &path, None).await;
        assert_eq!(status, 200, "listing {round} failed: {v}");
        let files = v["files"]
            .as_array()
            .unwrap_or_else(|| panic!("listing {round}: {v}"));
        assert!(files.iter().any(|f| f["name"] == stable), "{v}");
        for f in files {
            assert!(
                f["name"].is_string() && f["size"].is_u64() && f["isDirectory"].is_boolean(),
                "listing {round}: bad entry {f}"
            );
        }
    }
    stop.store(true, Ordering::SeqCst);
    assert!(
        churner.join().unwrap() > 0,
        "files churned during the listings"
    );
}

const STRICT: &[u16] = &[403];
const MISSING: &[u16] = &[404];
const REFUSED_OR_MISSING: &[u16] = &[403, 404];
const BAD_OR_REFUSED: &[u16] = &[400, 403];
const RAW_SEPARATOR: &[u16] = &[403, 404, 405];

#[tokio::test]
async fn delete_refuses_hostile_names_and_deletes_nothing() {
    let s = setup(2, |_| {}).await;
    say(&s, "Alice", "User: hi").await;
    let (status, r) = admin(&s.kv, "POST", "/save", Some(json!({}))).await;
    assert_eq!(status, 200, "{r}");
    let victim = saved_file(&r, "Alice");
    let victim_meta = meta_of(&victim);
    let root = s.root.path();
    let d = &s.dir;
    // Outside the save directory: a sentinel a traversal would reach.
    std::fs::write(root.join("x.bin"), "SENTINEL").unwrap();
    // Inside: things that are not cache files.
    let link_out = "link_20240101000000_character_Eve.bin";
    let link_in = "inlink_20240101000000_character_Eve.bin";
    std::os::unix::fs::symlink(root.join("x.bin"), d.join(link_out)).unwrap();
    std::os::unix::fs::symlink(d.join(&victim), d.join(link_in)).unwrap();
    std::fs::create_dir(d.join("d.bin")).unwrap();
    std::fs::write(d.join("notes.txt"), "notes").unwrap();
    std::fs::write(d.join("model.gguf"), "gguf").unwrap();
    let temp = format!("{TEMP_PREFIX}1234.bin");
    std::fs::write(d.join(&temp), "partial").unwrap();
    let before = names(d);

    let abs = |p: &Path| pct(p.to_str().unwrap());
    let table: Vec<(String, &[u16])> = vec![
        ("..".into(), STRICT),
        (".".into(), STRICT),
        ("%2e%2e".into(), STRICT),
        ("%2e".into(), STRICT),
        ("..%2fx.bin".into(), STRICT),
        ("%2e%2e%2fx.bin".into(), STRICT),
        ("%2E%2E%2Fx.bin".into(), STRICT),
        ("..%5cx.bin".into(), STRICT),
        ("..%2f..%2f..%2f..%2f..%2fetc%2fpasswd".into(), STRICT),
        ("%2fetc%2fpasswd".into(), STRICT),
        (abs(&root.join("x.bin")), STRICT),
        (abs(&d.join(&victim)), STRICT),
        (format!(".%2f{victim}"), STRICT),
        (format!("..%2fsaves%2f{victim}"), STRICT),
        (format!("{victim}%2f"), STRICT),
        (format!("{victim}%2f..%2f..%2fx.bin"), STRICT),
        ("x.bin%00.txt".into(), STRICT),
        (format!("{victim}%00"), STRICT),
        (format!("{victim}%00.txt"), STRICT),
        (format!("{victim}%3a%3a%24DATA"), STRICT),
        (format!("{victim}."), STRICT),
        (format!("{victim}%20"), STRICT),
        ("%5c%5c%3f%5cC%3a%5cx.bin".into(), STRICT),
        ("C%3a%5cx.bin".into(), STRICT),
        ("~%2fx.bin".into(), STRICT),
        (link_out.into(), STRICT),
        (link_in.into(), STRICT),
        ("d.bin".into(), STRICT),
        ("notes.txt".into(), STRICT),
        ("model.gguf".into(), STRICT),
        (victim_meta.clone(), STRICT),
        (temp.clone(), STRICT),
        // Unicode look-alikes of the slash after `..`.
        ("..%E2%88%95x.bin".into(), STRICT),
        ("..%EF%BC%8Fx.bin".into(), STRICT),
        ("..%E2%81%84x.bin".into(), STRICT),
        // Lenient where an exact answer is a matter of taste; the point is
        // that nothing is deleted and nothing fails with 5xx.
        ("%E2%80%A5%EF%BC%8Fx.bin".into(), REFUSED_OR_MISSING),
        ("%c0%ae%c0%ae%c0%afx.bin".into(), BAD_OR_REFUSED),
        ("%252e%252e%252fx.bin".into(), REFUSED_OR_MISSING),
        (format!("{}.bin", "a".repeat(300)), REFUSED_OR_MISSING),
        (format!("{}.bin", "%C3%A9".repeat(200)), REFUSED_OR_MISSING),
        // Raw separators: a router may see another path (404, 405) or the
        // name (403).
        ("../x.bin".into(), RAW_SEPARATOR),
        (format!("../saves/{victim}"), RAW_SEPARATOR),
        (format!("./{victim}"), RAW_SEPARATOR),
        ("".into(), &[403, 404, 405]),
        // A plain cache-file name that exists only outside: simply missing.
        ("x.bin".into(), MISSING),
    ];
    for prefix in ["/files".to_string(), format!("{PLUGIN}/files")] {
        for (name, allowed) in &table {
            let target = format!("{prefix}/{name}");
            let (status, v) = raw_http(&s.kv.admin_url, "DELETE", &target, &[]).await;
            assert!(
                allowed.contains(&status),
                "DELETE {target}: {status} (want one of {allowed:?}): {v}"
            );
            if status == 403 || status == 404 {
                assert_api_error(status, &v, &target);
            }
            assert_eq!(
                std::fs::read_to_string(root.join("x.bin")).ok().as_deref(),
                Some("SENTINEL"),
                "DELETE {target} touched the file outside the save directory"
            );
            assert_eq!(names(d), before, "DELETE {target} deleted something");
        }
    }
    assert!(d.join(&victim).is_file() && d.join(&victim_meta).is_file());
    assert!(std::fs::symlink_metadata(d.join(link_out)).is_ok());
    assert!(std::fs::symlink_metadata(d.join(link_in)).is_ok());
    assert!(d.join("d.bin").is_dir());

    // The real thing still works, and takes the sidecar along.
    let (status, v) = admin(&s.kv, "DELETE", &format!("/files/{victim}"), None).await;
    assert_eq!(status, 200, "{v}");
    assert!(!d.join(&victim).exists() && !d.join(&victim_meta).exists());
    assert_eq!(
        std::fs::read_to_string(root.join("x.bin")).unwrap(),
        "SENTINEL"
    );
}

// ---------------------------------------------------------------------------
// Saving, clearing, loading
// ---------------------------------------------------------------------------

#[tokio::test]
async fn save_endpoints_tag_reset_rotate_and_refuse() {
    let s = setup(2, |c| c.cache.max_files = 1).await;
    let (status, v) = admin(&s.kv, "POST", "/save", Some(json!({}))).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["saved"], json!([]), "{v}");
    assert_eq!(v["failed"], json!([]), "{v}");

    say(&s, "Alice", "User: one").await;
    let (status, v) = admin(&s.kv, "POST", "/slots/1/save", None).await;
    assert_eq!(status, 409, "an empty slot: {v}");
    assert_api_error(409, &v, "empty slot");
    let (status, v) = admin(&s.kv, "POST", "/slots/7/save", None).await;
    assert_eq!(status, 404, "unknown slot: {v}");
    assert_api_error(404, &v, "unknown slot");
    let (status, v) = admin(&s.kv, "POST", "/slots/x/save", None).await;
    assert_eq!(status, 404, "slot x: {v}");
    assert_api_error(404, &v, "slot x");

    // Tagged: a manual save; the counters are untouched.
    let (status, v) = admin(&s.kv, "POST", "/slots/0/save", Some(json!({"tag": "duel"}))).await;
    assert_eq!(status, 200, "{v}");
    let e = &v["saved"][0];
    assert_eq!(
        (e["slot"].as_u64(), e["chat"].as_str()),
        (Some(0), Some(CHAT)),
        "{v}"
    );
    assert_eq!(e["character"], "Alice", "{v}");
    assert_eq!(v["failed"], json!([]), "{v}");
    let duel = e["file"].as_str().unwrap().to_string();
    let meta = saves(&s.dir)
        .into_iter()
        .find(|m| m.file == duel)
        .expect("tagged save on disk");
    assert_eq!(
        (meta.tag.as_deref(), meta.kind),
        (Some("duel"), SaveKind::Manual)
    );
    assert!(duel.contains("_tag_duel_character_Alice"), "{duel}");
    let sl = s.kv.admin_slots().await;
    assert_eq!(
        (&sl[0]["usage"], &sl[0]["messages_since_save"]),
        (&json!(1), &json!(1))
    );

    // Untagged, with no body at all (as in the README's curl): save now,
    // reset the counters.
    let (status, v) = s.kv.admin_raw("POST", "/slots/0/save", &[], "").await;
    assert_eq!(status, 200, "{v}");
    let plain = saved_file(&v, "Alice");
    assert!(!plain.contains("_tag_"), "{plain}");
    let sl = s.kv.admin_slots().await;
    assert_eq!(
        (&sl[0]["usage"], &sl[0]["messages_since_save"]),
        (&json!(0), &json!(0))
    );

    say(&s, "Bob", "User: one").await;
    let (status, v) = admin(&s.kv, "POST", "/save", Some(json!({"tag": "t2"}))).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["saved"].as_array().unwrap().len(), 2, "{v}");
    saved_file(&v, "Bob");
    assert_eq!(
        s.kv.admin_slots().await[1]["usage"],
        1,
        "a tagged save leaves counters alone"
    );

    // Untagged saves rotate (max_files 1); tagged ones are never touched.
    say(&s, "Alice", "User: one\nUser: two").await;
    let (status, v) = admin(&s.kv, "POST", "/save", Some(json!({}))).await;
    assert_eq!(status, 200, "{v}");
    let newest = saved_file(&v, "Alice");
    let mine: Vec<SaveMeta> = saves(&s.dir)
        .into_iter()
        .filter(|m| m.character == "Alice")
        .collect();
    let untagged: Vec<&str> = mine
        .iter()
        .filter(|m| m.tag.is_none())
        .map(|m| m.file.as_str())
        .collect();
    let tagged: BTreeSet<&str> = mine.iter().filter_map(|m| m.tag.as_deref()).collect();
    assert_eq!(
        untagged,
        vec![newest.as_str()],
        "rotated to max_files: {mine:?}"
    );
    assert_eq!(tagged, BTreeSet::from(["duel", "t2"]), "{mine:?}");
    assert!(!s.dir.join(&plain).exists() && !s.dir.join(meta_of(&plain)).exists());
    let sl = s.kv.admin_slots().await;
    assert!(sl.iter().all(|x| x["usage"] == 0), "{sl:?}");

    // An anonymous slot holds no character's cache.
    let (_, h, _) =
        s.kv.say_body(
            &json!({"prompt": "Summarize: the quick brown fox.", "stream": true, "n_predict": 2}),
        )
        .await;
    let anon = slot_of(&h);
    assert_eq!(s.kv.admin_slots().await[anon]["anonymous"], true);
    let (status, v) = admin(&s.kv, "POST", &format!("/slots/{anon}/save"), None).await;
    assert_eq!(status, 409, "anonymous slot: {v}");
    let (status, v) = admin(&s.kv, "POST", "/save", Some(json!({"tag": "all"}))).await;
    assert_eq!(status, 200, "{v}");
    let saved = v["saved"].as_array().unwrap();
    assert_eq!(saved.len(), 1, "only the character's slot: {v}");
    assert_ne!(saved[0]["slot"], anon, "{v}");

    // A failed save is reported, leaves no file.
    let who_slot = 1 - anon;
    let who = s.kv.admin_slots().await[who_slot]["character"]
        .as_str()
        .unwrap()
        .to_string();
    s.fake.fail_next_save(500);
    let before = names(&s.dir);
    let (status, v) = admin(
        &s.kv,
        "POST",
        &format!("/slots/{who_slot}/save"),
        Some(json!({"tag": "doomed"})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["saved"], json!([]), "{v}");
    let f = &v["failed"][0];
    assert_eq!(f["slot"].as_u64(), Some(who_slot as u64), "{v}");
    assert_eq!(f["character"], who.as_str(), "{v}");
    assert!(f["reason"].as_str().is_some_and(|r| !r.is_empty()), "{v}");
    assert_eq!(names(&s.dir), before, "a failed save leaves nothing behind");
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

#[tokio::test]
async fn load_never_evicts_or_moves_a_chosen_character() {
    let s = setup(2, |_| {}).await;
    // Alice in slot 0, Bob in slot 1.
    let (fa, fb) = alice_and_bob_saved(&s).await;
    // Carol evicts Alice (usage 0 after the save, least recent): slot 0 is
    // Carol's (usage 1), slot 1 Bob's (usage 0), so Bob's slot is the one
    // a naive load of Alice would take.
    let (_, h, _) = say(&s, "Carol", "User: one").await;
    assert_eq!(slot_of(&h), 0);
    let actions_before = s.fake.slot_actions().len();

    let (status, v) = load(&s.kv, json!([{"file": fa}, {"file": fb}])).await;
    assert_eq!(status, 200, "{v}");
    let loaded = v["loaded"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(loaded.len(), 2, "{v}");
    let entry = |who: &str| {
        loaded
            .iter()
            .find(|e| e["character"] == who)
            .unwrap()
            .clone()
    };
    let (a, b) = (entry("Alice"), entry("Bob"));
    assert_eq!(
        b["slot"], 1,
        "Bob was already in slot 1 and is loaded there: {v}"
    );
    assert_eq!(a["slot"], 0, "Alice must not evict Bob: {v}");
    for (e, f) in [(&a, &fa), (&b, &fb)] {
        assert_eq!(e["file"], f.as_str(), "{v}");
        assert_eq!(e["chat"], CHAT, "{v}");
        let meta = saves(&s.dir).into_iter().find(|m| &m.file == f).unwrap();
        assert_eq!(e["tokens"].as_u64(), Some(meta.n_tokens), "{v}");
    }
    // Carol had an unsaved message: saved before her slot was taken.
    let carol: Vec<SaveMeta> = saves(&s.dir)
        .into_iter()
        .filter(|m| m.character == "Carol")
        .collect();
    assert_eq!(carol.len(), 1, "{carol:?}");
    assert_eq!(carol[0].kind, SaveKind::Eviction);
    let actions = s.fake.slot_actions()[actions_before..].to_vec();
    let restores: BTreeSet<(usize, String)> = actions
        .iter()
        .filter(|a| a.1 == "restore")
        .map(|a| (a.0, a.2.clone().unwrap()))
        .collect();
    assert_eq!(
        restores,
        BTreeSet::from([(0, fa.clone()), (1, fb.clone())]),
        "{actions:?}"
    );
    let sl = s.kv.admin_slots().await;
    assert_eq!(sl[0]["character"], "Alice");
    assert_eq!(sl[0]["live"], true);
    assert_eq!(sl[0]["restored_from"], fa.as_str(), "{sl:?}");
    assert_eq!(sl[1]["character"], "Bob");

    // Alice's next message finds her cache already in the slot.
    let (_, h, events) = say(&s, "Alice", "User: one\nBob: hi").await;
    assert_eq!(slot_of(&h), 0);
    assert!(
        h.get("x-kvgate-restored").is_none(),
        "already loaded: {h:?}"
    );
    assert!(cache_n(&events) > 10, "{:?}", events.last());
}

#[tokio::test]
async fn load_fills_a_slot_and_refuses_bad_requests() {
    let s = setup(2, |_| {}).await;
    let (fa, fb) = alice_and_bob_saved(&s).await;
    let (_, h, _) = say(&s, "Carol", "User: one").await;
    let (status, r) = admin(&s.kv, "POST", &format!("/slots/{}/save", slot_of(&h)), None).await;
    assert_eq!(status, 200, "{r}");
    let fc = saved_file(&r, "Carol");

    // Alice is in no slot: she gets one, her save goes into it.
    let actions_before = s.fake.slot_actions().len();
    let (status, v) = load(&s.kv, json!([{"file": fa}])).await;
    assert_eq!(status, 200, "{v}");
    let e = &v["loaded"][0];
    assert_eq!(v["loaded"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(
        (e["file"].as_str(), e["chat"].as_str()),
        (Some(fa.as_str()), Some(CHAT)),
        "{v}"
    );
    assert_eq!(e["character"], "Alice", "{v}");
    let meta = saves(&s.dir).into_iter().find(|m| m.file == fa).unwrap();
    assert_eq!(e["tokens"].as_u64(), Some(meta.n_tokens), "{v}");
    let slot = e["slot"].as_u64().expect("slot") as usize;
    let restores: Vec<(usize, Option<String>)> = s.fake.slot_actions()[actions_before..]
        .iter()
        .filter(|a| a.1 == "restore")
        .map(|a| (a.0, a.2.clone()))
        .collect();
    assert_eq!(restores, vec![(slot, Some(fa.clone()))]);
    let sl = s.kv.admin_slots().await;
    assert_eq!(sl[slot]["character"], "Alice", "{sl:?}");
    assert_eq!(sl[slot]["chat"], CHAT, "{sl:?}");
    assert_eq!(sl[slot]["live"], true, "{sl:?}");
    assert_eq!(sl[slot]["restored_from"], fa.as_str(), "{sl:?}");
    let (_, h, events) = say(&s, "Alice", "User: one\nBob: hi").await;
    assert_eq!(slot_of(&h), slot);
    assert!(
        h.get("x-kvgate-restored").is_none(),
        "already loaded: {h:?}"
    );
    assert!(cache_n(&events) > 10, "{:?}", events.last());

    // Errors: more items than slots, unknown files, bad shapes. None of
    // them touches a slot.
    let actions_before = s.fake.slot_actions().len();
    for (body, want) in [
        (
            json!({"items": [{"file": fa}, {"file": fb}, {"file": fc}]}),
            400,
        ),
        (
            json!({"items": [{"file": "nobody_20240101000000_character_Nobody.bin"}]}),
            404,
        ),
        (json!({}), 400),
        (json!({"items": "all"}), 400),
        (json!({"items": [{"chat": "x"}]}), 400),
        (json!({"items": [{"file": 7}]}), 400),
    ] {
        let (status, v) = admin(&s.kv, "POST", "/load", Some(body.clone())).await;
        assert_eq!(status, want, "{body}: {v}");
        assert_api_error(want, &v, &body.to_string());
    }
    for hostile in ["../x.bin", "/etc/passwd", ".kvgate-tmp-1.bin", "notes.txt"] {
        let (status, v) = load(&s.kv, json!([{"file": hostile}])).await;
        assert!(
            [400, 403, 404].contains(&status),
            "load {hostile}: {status} {v}"
        );
    }
    let (status, v) = s.kv.admin_raw("POST", "/load", &[], "{not json").await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(
        s.fake.slot_actions().len(),
        actions_before,
        "refused loads touched llama-server"
    );

    // An explicit chat owns the slot.
    let (status, v) = load(&s.kv, json!([{"file": fb, "chat": "elsewhere"}])).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["loaded"][0]["chat"], "elsewhere", "{v}");
    let sl = s.kv.admin_slots().await;
    let bob = slot_with(&sl, "Bob").expect("Bob in a slot");
    assert_eq!(sl[bob]["chat"], "elsewhere", "{sl:?}");

    // A save of another model: listed as such, never loaded.
    let fp = s.kv.admin_get("/health").await["upstream"]["fingerprint"].clone();
    s.fake.set_model_path("/models/other.gguf");
    s.fake.restart().await;
    poll(&s.kv, "/health", "new fingerprint", |v| {
        v["upstream"]["up"] == true && v["upstream"]["fingerprint"] != fp
    })
    .await;
    let listed = character_of(&s.kv.admin_get("/saves?q=alice").await, CHAT, "Alice");
    let old = listed.iter().find(|x| x["file"] == fa.as_str()).unwrap();
    assert_eq!(old["model_match"], false, "{old}");
    let actions_before = s.fake.slot_actions().len();
    let (status, v) = load(&s.kv, json!([{"file": fa}])).await;
    assert_eq!(status, 409, "{v}");
    assert_api_error(409, &v, "load of another model's save");
    assert_eq!(s.fake.slot_actions().len(), actions_before);
}

#[tokio::test]
async fn load_gives_the_slot_to_the_last_seen_chat_else_the_files_chat() {
    let s = setup(2, |c| c.cache.save_every = 1).await;
    let (_, h1, _) =
        s.kv.say_body(&with_identity(turn("Alice", "User: a"), "c1", "Alice"))
            .await;
    let f1 = saves(&s.dir)
        .into_iter()
        .find(|m| m.chat == "c1")
        .expect("autosave in c1")
        .file;
    assert_eq!(h1["x-kvgate-character"], "Alice");
    // The same client moves to c2: Alice is now last seen there.
    let (_, h2, _) =
        s.kv.say_body(&with_identity(turn("Alice", "User: b"), "c2", "Alice"))
            .await;
    let in_c2 = slot_of(&h2);
    let (status, v) = load(&s.kv, json!([{"file": f1}])).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["loaded"][0]["chat"], "c2",
        "the chat kvgate last saw Alice in: {v}"
    );
    assert_eq!(
        v["loaded"][0]["slot"].as_u64(),
        Some(in_c2 as u64),
        "Alice already had a slot: {v}"
    );

    // A fresh kvgate has seen nobody: the file's own chat.
    let Saving {
        fake,
        kv,
        root,
        dir,
    } = s;
    kv.stop().await;
    let kv = Kvgate::start_saving(&fake.url(), &dir, |_| {}).await;
    let (status, v) = load(&kv, json!([{"file": f1}])).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["loaded"][0]["chat"], "c1", "the file's chat: {v}");
    drop(root);
}

// ---------------------------------------------------------------------------
// Preload
// ---------------------------------------------------------------------------

#[tokio::test]
async fn preload_restores_saves_or_evaluates_the_last_prompt() {
    let s = setup(2, |_| {}).await;
    let (fa, fb) = alice_and_bob_saved(&s).await;
    let carol_prompt = turn("Carol", "User: one")["prompt"].clone();
    say(&s, "Carol", "User: one").await; // seen, never saved
    let (status, _) = admin(&s.kv, "POST", "/slots/clear", Some(json!({"erase": true}))).await;
    assert_eq!(status, 200);
    let tap = EventTap::open(&s.kv).await;

    // Characters with saves: restored.
    let actions_before = s.fake.slot_actions().len();
    let (status, v) = admin(
        &s.kv,
        "POST",
        "/preload",
        Some(json!({"chat": CHAT, "characters": ["Alice", "Bob"]})),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let id = preload_id(&v);
    let p = s.kv.wait_preload(&id, Duration::from_secs(10)).await;
    assert_eq!(p["state"], "done", "{p}");
    assert_eq!(preload_id(&p), id);
    assert_eq!(
        (p["done"].as_u64(), p["total"].as_u64()),
        (Some(2), Some(2)),
        "{p}"
    );
    assert_eq!(
        preload_succeeded(&p),
        BTreeSet::from(["Alice".into(), "Bob".into()]),
        "{p}"
    );
    assert_eq!(p["failed"], json!([]), "{p}");
    let restored: BTreeSet<String> = s.fake.slot_actions()[actions_before..]
        .iter()
        .filter(|a| a.1 == "restore")
        .filter_map(|a| a.2.clone())
        .collect();
    assert_eq!(restored, BTreeSet::from([fa, fb]));
    s.kv.wait_idle().await;
    let sl = s.kv.admin_slots().await;
    let alice = slot_with(&sl, "Alice").expect("Alice preloaded");
    assert_eq!(sl[alice]["chat"], CHAT);
    let (_, h, events) = say(&s, "Alice", "User: one\nBob: hi").await;
    assert_eq!(slot_of(&h), alice);
    assert!(h.get("x-kvgate-restored").is_none(), "{h:?}");
    assert!(cache_n(&events) > 10, "{:?}", events.last());

    // A character with no save: its last prompt, a 1-token generation,
    // then a save of kind `preload`.
    let completions_before = s.fake.completions().len();
    let (status, v) = admin(
        &s.kv,
        "POST",
        "/preload",
        Some(json!({"chat": CHAT, "characters": ["Carol"]})),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let p =
        s.kv.wait_preload(&preload_id(&v), Duration::from_secs(10))
            .await;
    assert_eq!(p["state"], "done", "{p}");
    assert_eq!(
        preload_succeeded(&p),
        BTreeSet::from(["Carol".into()]),
        "{p}"
    );
    let new = s.fake.completions()[completions_before..].to_vec();
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(new[0]["prompt"], carol_prompt, "{}", new[0]);
    assert!(
        new[0]["n_predict"] == 1 || new[0]["max_tokens"] == 1,
        "a 1-token generation: {}",
        new[0]
    );
    assert!(
        new[0]["id_slot"].as_i64().is_some_and(|n| n >= 0),
        "{}",
        new[0]
    );
    let carol: Vec<SaveMeta> = saves(&s.dir)
        .into_iter()
        .filter(|m| m.character == "Carol")
        .collect();
    assert_eq!(carol.len(), 1, "{carol:?}");
    assert_eq!(
        (carol[0].kind, carol[0].chat.as_str()),
        (SaveKind::Preload, CHAT)
    );
    s.kv.wait_idle().await;
    let (_, h, events) = say(&s, "Carol", "User: one\nAlice: hello").await;
    assert!(h.get("x-kvgate-restored").is_none(), "{h:?}");
    assert!(cache_n(&events) > 10, "{:?}", events.last());

    // An explicit prompt for a character kvgate never saw.
    let (status, v) = admin(
        &s.kv,
        "POST",
        "/preload",
        Some(json!({"chat": "solo", "characters": ["Zed"], "prompt": "Write Zed's reply.\nUser: hi\nZed:"})),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let p =
        s.kv.wait_preload(&preload_id(&v), Duration::from_secs(10))
            .await;
    assert_eq!(preload_succeeded(&p), BTreeSet::from(["Zed".into()]), "{p}");
    assert!(saves(&s.dir)
        .iter()
        .any(|m| m.character == "Zed" && m.chat == "solo" && m.kind == SaveKind::Preload));

    // The monitor saw the progress.
    tap.wait_for("preload_progress", 1).await;
}

#[tokio::test]
async fn preload_reports_failures_and_refuses_bad_requests() {
    let s = setup(2, |_| {}).await;
    // Never seen, no save, no prompt: nothing to evaluate.
    let (status, v) = admin(
        &s.kv,
        "POST",
        "/preload",
        Some(json!({"chat": "lonely", "characters": ["Nobody"]})),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let p =
        s.kv.wait_preload(&preload_id(&v), Duration::from_secs(10))
            .await;
    assert_eq!(p["state"], "done", "{p}");
    assert!(preload_succeeded(&p).is_empty(), "{p}");
    assert_eq!(p["failed"][0]["character"], "Nobody", "{p}");
    assert!(
        p["failed"][0]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{p}"
    );
    s.kv.wait_idle().await;

    for body in [
        json!({}),
        json!({"chat": "x"}),
        json!({"characters": ["Alice"]}),
        json!({"chat": "x", "characters": "Alice"}),
        json!({"chat": "x", "characters": [1]}),
        json!({"chat": 5, "characters": ["Alice"]}),
        json!({"chat": "x", "characters": ["Alice"], "prompt": 3}),
    ] {
        let (status, v) = admin(&s.kv, "POST", "/preload", Some(body.clone())).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert_api_error(400, &v, &body.to_string());
    }
    let (status, _) = s.kv.admin_raw("POST", "/preload", &[], "chat=x").await;
    assert_eq!(status, 400);
    for (method, path) in [
        ("GET", "/preload/999999"),
        ("DELETE", "/preload/999999"),
        ("GET", "/preload/nope"),
    ] {
        let (status, v) = admin(&s.kv, method, path, None).await;
        assert_eq!(status, 404, "{method} {path}: {v}");
        assert_api_error(404, &v, path);
    }
    assert!(s.fake.completions().is_empty());
}

#[tokio::test]
async fn preload_cancel_frees_every_slot() {
    let s = setup(2, |_| {}).await;
    s.fake.set_gate(true);
    let prompt = turn("Alice", "User: preload me")["prompt"].clone();
    let (status, v) = admin(
        &s.kv,
        "POST",
        "/preload",
        Some(json!({"chat": CHAT, "characters": ["Alice", "Bob"], "prompt": prompt})),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let id = preload_id(&v);
    // The first character's generation is held by the gate.
    assert!(
        s.fake
            .wait_for(Duration::from_secs(5), |f| f.completions().len() == 1)
            .await,
        "the preload never reached llama-server"
    );
    let p = s.kv.admin_get(&format!("/preload/{id}")).await;
    assert_eq!(p["state"], "running", "{p}");
    assert_eq!(p["current"], "Alice", "{p}");
    assert_eq!(
        (p["done"].as_u64(), p["total"].as_u64()),
        (Some(0), Some(2)),
        "{p}"
    );
    assert!(
        s.kv.admin_slots().await.iter().any(|x| x["busy"] == true),
        "the preload holds a slot"
    );

    // llama-server holds the request until the gate opens: a cancel that
    // waited for it would hang, and `admin` fails after 30 s.
    let (status, v) = admin(&s.kv, "DELETE", &format!("/preload/{id}"), None).await;
    assert_eq!(status, 200, "{v}");
    let p = s.kv.admin_get(&format!("/preload/{id}")).await;
    assert_eq!(p["state"], "cancelled", "{p}");
    // No slot stays locked, although llama-server still holds the request.
    s.kv.wait_idle().await;
    let sl = s.kv.admin_slots().await;
    assert!(sl.iter().all(|x| x["busy"] == false), "{sl:?}");
    assert_eq!(s.kv.admin_get("/slots").await["queued"], 0);

    s.fake.set_gate(false);
    // Alice's request ends; a preload that went on would start Bob now.
    assert!(
        s.fake
            .wait_for(Duration::from_secs(5), |f| f.active_requests() == 0)
            .await
    );
    s.kv.wait_idle().await;
    assert_eq!(s.fake.completions().len(), 1, "Bob was never started");
    assert_eq!(
        s.kv.admin_get(&format!("/preload/{id}")).await["state"],
        "cancelled"
    );
    assert!(
        !saves(&s.dir).iter().any(|m| m.kind == SaveKind::Preload),
        "a cancelled preload saves nothing"
    );
    // Both slots serve the front port again.
    say(&s, "Alice", "User: after").await;
    say(&s, "Bob", "User: after").await;
}

#[tokio::test]
async fn preload_gives_up_on_a_character_after_preload_timeout_s() {
    let s = setup(1, |_| {}).await;
    let (status, v) = admin(
        &s.kv,
        "PUT",
        "/settings",
        Some(json!({"preload_timeout_s": 1})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    s.fake.set_gate(true);
    let t0 = Instant::now();
    let (status, v) = admin(
        &s.kv,
        "POST",
        "/preload",
        Some(json!({"chat": CHAT, "characters": ["Alice"], "prompt": "Write Alice's reply.\nUser: hi\nAlice:"})),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let p =
        s.kv.wait_preload(&preload_id(&v), Duration::from_secs(10))
            .await;
    let took = t0.elapsed();
    assert_eq!(p["state"], "done", "{p}");
    assert!(preload_succeeded(&p).is_empty(), "{p}");
    assert_eq!(p["failed"][0]["character"], "Alice", "{p}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "gave up after {took:?}"
    );
    s.kv.wait_idle().await;
    assert!(s.kv.admin_slots().await.iter().all(|x| x["busy"] == false));
    s.fake.set_gate(false);
}

// ---------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------

#[tokio::test]
async fn settings_get_put_validate_and_apply_live() {
    let s = setup(1, |_| {}).await;
    let v = s.kv.admin_get("/settings").await;
    for (k, want) in [
        ("autosave", json!(true)),
        ("save_every", json!(5)),
        ("max_files", json!(10)),
        ("clear_on_chat_change", json!(true)),
        ("preload_timeout_s", json!(1200)),
    ] {
        assert_eq!(v[k], want, "{k}: {v}");
    }

    for bad in [
        json!({"save_every": 0}),
        json!({"save_every": -1}),
        json!({"save_every": "3"}),
        json!({"save_every": 1.5}),
        json!({"max_files": 0}),
        json!({"autosave": "yes"}),
        json!({"clear_on_chat_change": 1}),
        json!({"preload_timeout_s": 0}),
        json!({"save_every": 2, "max_files": 0}),
        // An unknown setting is refused, not silently ignored.
        json!({"save_evry": 2}),
        json!([1]),
        json!("save_every"),
    ] {
        let (status, e) = admin(&s.kv, "PUT", "/settings", Some(bad.clone())).await;
        assert_eq!(status, 400, "{bad}: {e}");
        assert_api_error(400, &e, &bad.to_string());
    }
    let (status, _) =
        s.kv.admin_raw("PUT", "/settings", &[], "save_every=3")
            .await;
    assert_eq!(status, 400);
    assert_eq!(
        s.kv.admin_get("/settings").await,
        v,
        "a refused PUT changes nothing"
    );

    // Live: every message autosaves from now on.
    let (status, r) = admin(&s.kv, "PUT", "/settings", Some(json!({"save_every": 1}))).await;
    assert_eq!(status, 200, "{r}");
    let now = s.kv.admin_get("/settings").await;
    assert_eq!(now["save_every"], 1, "{now}");
    assert_eq!(now["max_files"], 10, "a subset leaves the rest: {now}");
    let file: Value =
        serde_json::from_slice(&std::fs::read(s.dir.join("kvgate-settings.json")).unwrap())
            .expect("kvgate-settings.json is JSON");
    assert_eq!(file["save_every"], 1, "{file}");
    say(&s, "Alice", "User: one").await;
    let v = saves(&s.dir);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].kind, SaveKind::Autosave);

    let (status, _) = admin(&s.kv, "PUT", "/settings", Some(json!({"autosave": false}))).await;
    assert_eq!(status, 200);
    say(&s, "Alice", "User: one\nUser: two").await;
    assert_eq!(saves(&s.dir).len(), 1, "autosave off");

    let (status, _) = admin(
        &s.kv,
        "PUT",
        "/settings",
        Some(json!({"autosave": true, "max_files": 1})),
    )
    .await;
    assert_eq!(status, 200);
    say(&s, "Alice", "User: one\nUser: two\nUser: three").await;
    say(&s, "Alice", "User: one\nUser: two\nUser: three\nUser: four").await;
    let v = saves(&s.dir);
    assert_eq!(v.len(), 1, "rotated to max_files 1: {v:?}");
}

#[tokio::test]
async fn settings_persist_across_restarts() {
    let s = setup(1, |_| {}).await;
    let (status, v) = admin(
        &s.kv,
        "PUT",
        "/settings",
        Some(json!({"save_every": 1, "max_files": 3, "clear_on_chat_change": false, "preload_timeout_s": 77})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let Saving {
        fake,
        kv,
        root,
        dir,
    } = s;
    kv.stop().await;

    // Same save directory, default configuration: the saved settings win.
    let kv = Kvgate::start_saving(&fake.url(), &dir, |_| {}).await;
    let v = kv.admin_get("/settings").await;
    for (k, want) in [
        ("autosave", json!(true)),
        ("save_every", json!(1)),
        ("max_files", json!(3)),
        ("clear_on_chat_change", json!(false)),
        ("preload_timeout_s", json!(77)),
    ] {
        assert_eq!(v[k], want, "{k} after a restart: {v}");
    }
    kv.say_body(&turn("Alice", "User: one")).await;
    assert_eq!(
        saves(&dir).len(),
        1,
        "save_every 1 applies after the restart"
    );

    let (status, _) = admin(&kv, "PUT", "/settings", Some(json!({"save_every": 4}))).await;
    assert_eq!(status, 200);
    kv.stop().await;
    let kv = Kvgate::start_saving(&fake.url(), &dir, |_| {}).await;
    let v = kv.admin_get("/settings").await;
    assert_eq!(
        (v["save_every"].as_u64(), v["max_files"].as_u64()),
        (Some(4), Some(3)),
        "{v}"
    );
    drop(root);
}

// ---------------------------------------------------------------------------
// Events and metrics
// ---------------------------------------------------------------------------

/// A 3-character group chat on 2 slots: the third evicts the first, the
/// first comes back, evicts the second and is restored.
const SCRIPT: [(&str, &str); 4] = [
    ("Alice", "User: Hello!"),
    ("Bob", "User: Hello!"),
    ("Carol", "User: Hello!"),
    ("Alice", "User: Hello!\nBob: Hi.\nCarol: Hey."),
];

async fn run_script(s: &Saving) -> Vec<(usize, hyper::HeaderMap, Vec<Value>)> {
    let mut out = Vec::new();
    for (who, history) in SCRIPT {
        let (_, h, events) = say(s, who, history).await;
        out.push((slot_of(&h), h, events));
    }
    out
}

#[tokio::test]
async fn events_follow_a_scripted_group_chat_in_order() {
    let s = setup(2, |_| {}).await;
    let tap = EventTap::open(&s.kv).await;
    let turns = run_script(&s).await;
    tap.until("generation_finished", SCRIPT.len()).await;
    // The monitor also sees llama-server go and come back.
    s.fake.kill().await;
    tap.until("upstream_down", 1).await;
    s.fake.start_again().await;
    let events = tap.until("upstream_up", 1).await;
    assert!(events.iter().all(|e| e["type"].is_string()), "{events:#?}");

    const TURN_TYPES: [&str; 6] = [
        "slot_assigned",
        "evicted",
        "saved",
        "restored",
        "generation_started",
        "generation_finished",
    ];
    // A turn runs from its slot_assigned to the next one; its events are
    // those of its slot (save-behind may save *other* idle slots meanwhile).
    let mut per_turn: Vec<Vec<(usize, &Value)>> = Vec::new();
    for (at, e) in events
        .iter()
        .enumerate()
        .filter(|(_, e)| TURN_TYPES.contains(&e["type"].as_str().unwrap()))
    {
        if e["type"] == "slot_assigned" {
            per_turn.push(Vec::new());
        }
        if let Some(t) = per_turn.last_mut() {
            t.push((at, e));
        }
    }
    assert_eq!(per_turn.len(), SCRIPT.len(), "{events:#?}");
    let plain = ["slot_assigned", "generation_started", "generation_finished"].as_slice();
    let evicting = [
        "slot_assigned",
        "evicted",
        "saved",
        "generation_started",
        "generation_finished",
    ]
    .as_slice();
    let restoring = [
        "slot_assigned",
        "evicted",
        "saved",
        "restored",
        "generation_started",
        "generation_finished",
    ]
    .as_slice();
    // The evicted slot was already saved behind the previous generation.
    let restoring_clean = [
        "slot_assigned",
        "evicted",
        "restored",
        "generation_started",
        "generation_finished",
    ]
    .as_slice();
    let evicted = [None, None, Some("Alice"), Some("Bob")];
    for i in 0..SCRIPT.len() {
        let (slot, h, stream) = &turns[i];
        let mine: Vec<(usize, &Value)> = per_turn[i]
            .iter()
            .copied()
            .filter(|(_, e)| {
                e.get("slot")
                    .is_none_or(|x| x.as_u64() == Some(*slot as u64))
            })
            .collect();
        let got: Vec<&str> = mine
            .iter()
            .map(|(_, e)| e["type"].as_str().unwrap())
            .collect();
        let ok = match i {
            0 | 1 => got == plain,
            2 => got == evicting,
            _ => got == restoring || got == restoring_clean,
        };
        assert!(
            ok,
            "turn {i} ({}): {got:?}\n{:#?}",
            SCRIPT[i].0, per_turn[i]
        );
        for (_, e) in &mine {
            let ty = e["type"].as_str().unwrap();
            let who = if ty == "saved" || ty == "evicted" {
                evicted[i]
            } else {
                Some(SCRIPT[i].0)
            };
            assert_eq!(e["character"].as_str(), who, "turn {i} {ty}: {e}");
        }
        let fin = mine.last().unwrap().1;
        let timings = &stream.last().unwrap()["timings"];
        for k in ["cache_n", "prompt_n"] {
            assert_eq!(
                fin[k], timings[k],
                "turn {i}: {k} as llama-server reported: {fin}"
            );
        }
        assert!(fin["ttft_ms"].is_number(), "{fin}");
        if let Some(who) = evicted[i] {
            // The evicted character's cache went to disk before the slot
            // was overwritten: in this turn, or behind an earlier one.
            let (restored_at, first_gen) = (
                mine.iter()
                    .find(|(_, e)| e["type"] == "restored")
                    .map(|(at, _)| *at),
                mine.iter()
                    .find(|(_, e)| e["type"] == "generation_started")
                    .map(|(at, _)| *at)
                    .unwrap(),
            );
            let overwritten_at = restored_at.unwrap_or(first_gen);
            let saved_at = events
                .iter()
                .position(|e| {
                    e["type"] == "saved"
                        && e["character"] == who
                        && e["slot"].as_u64() == Some(*slot as u64)
                })
                .unwrap_or_else(|| panic!("{who} never saved: {events:#?}"));
            assert!(
                saved_at < overwritten_at,
                "{who} saved too late: {events:#?}"
            );
        }
        if i == 3 {
            let restored = mine
                .iter()
                .find(|(_, e)| e["type"] == "restored")
                .unwrap()
                .1;
            assert_eq!(
                restored["file"].as_str(),
                h["x-kvgate-restored"].to_str().ok(),
                "{restored}"
            );
            assert!(fin["cache_n"].as_u64().unwrap() > 10, "{fin}");
        }
    }
}

#[tokio::test]
async fn restored_from_names_the_file_a_slot_came_from() {
    let s = setup(2, |_| {}).await;
    let turns = run_script(&s).await;
    let (slot, h, _) = &turns[3];
    let file = h["x-kvgate-restored"].to_str().unwrap();
    let sl = s.kv.admin_slots().await;
    assert_eq!(sl[*slot]["character"], "Alice");
    assert_eq!(sl[*slot]["restored_from"], file, "{sl:?}");
    assert_eq!(sl[*slot]["usage"], 1, "{sl:?}");
}

/// Turns of the stalled-monitor test. Overflowing every buffer between the
/// event bus and a monitor that never reads takes more than 7000 events
/// (the kernel alone absorbed 1.4 MB in a trial), too slow for this suite;
/// so this checks that a stalled monitor costs the proxy nothing and
/// another monitor nothing, not that drops are counted.
const STALL_TURNS: usize = 100;

#[tokio::test]
async fn a_stalled_event_monitor_never_holds_up_the_proxy_or_other_monitors() {
    let s = setup(2, |_| {}).await;
    let dropped = |text: &str| -> f64 {
        parse_exposition(text)
            .family_samples("kvgate_events_dropped_total")
            .iter()
            .map(|x| x.value)
            .sum()
    };
    assert_eq!(
        dropped(&s.kv.metrics_text().await),
        0.0,
        "nobody dropped yet"
    );
    // A monitor that never reads, with a tiny receive window.
    let addr =
        s.kv.admin_url
            .strip_prefix("http://")
            .unwrap()
            .parse()
            .unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(1024).unwrap();
    let mut stalled = sock.connect(addr).await.unwrap();
    stalled
        .write_all(b"GET /events HTTP/1.1\r\nhost: kvgate\r\n\r\n")
        .await
        .unwrap();
    // Its subscription is in place once the response head is out; from
    // then on it reads nothing.
    let mut head = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut stalled, &mut head)
        .await
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 200", "the stalled monitor was served");
    // A monitor that keeps up still sees everything.
    let tap = EventTap::open(&s.kv).await;
    // A proxy held up by the stalled monitor would hang: each turn gets a
    // generous bound (how fast turns are is the benches' business).
    for i in 0..STALL_TURNS {
        tokio::time::timeout(
            Duration::from_secs(10),
            say(&s, ROSTER[i % 3], &format!("User: {i}")),
        )
        .await
        .unwrap_or_else(|_| panic!("turn {i} hung behind a stalled monitor"));
    }
    // Whatever the stalled monitor missed is counted in a family that
    // exists.
    assert!(
        !parse_exposition(&s.kv.metrics_text().await)
            .family_samples("kvgate_events_dropped_total")
            .is_empty(),
        "kvgate_events_dropped_total is exported"
    );
    tap.until("generation_finished", STALL_TURNS).await;
    let finished = tap.of("generation_finished").len();
    assert_eq!(
        finished, STALL_TURNS,
        "the live monitor missed or repeated events"
    );
    drop(stalled);
}

#[tokio::test]
async fn failed_saves_and_restores_show_up_as_events_and_metrics() {
    let s = setup(1, |c| c.cache.save_every = 1).await;
    let tap = EventTap::open(&s.kv).await;
    say(&s, "Alice", "User: a").await; // autosaved
    say(&s, "Bob", "User: a").await; // evicts Alice (already saved)
    s.fake.fail_next_restore();
    let (_, h, _) = say(&s, "Alice", "User: a\nBob: b").await;
    assert!(h.get("x-kvgate-restored").is_none());
    s.fake.fail_next_save(500);
    say(&s, "Alice", "User: a\nBob: b\nUser: c").await; // its autosave fails
                                                        // The restore failed first, then the save.
    let events = tap.until("save_failed", 1).await;
    for ty in ["restore_failed", "save_failed"] {
        let e = events
            .iter()
            .find(|e| e["type"] == ty)
            .unwrap_or_else(|| panic!("no {ty} before the save_failed: {events:#?}"));
        assert_eq!(e["character"], "Alice", "{e}");
    }
    let e = parse_exposition(&s.kv.metrics_text().await);
    let total = |name: &str| -> f64 { e.family_samples(name).iter().map(|x| x.value).sum() };
    assert_eq!(total("kvgate_restore_failures_total"), 1.0);
    assert_eq!(total("kvgate_save_failures_total"), 1.0);
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text() {
    let s = setup(2, |_| {}).await;
    run_script(&s).await;
    let text = s.kv.metrics_text().await;
    let e = parse_exposition(&text);
    let fam = |name: &str| e.family_samples(name);
    let sum = |name: &str, label: Option<(&str, &str)>| -> f64 {
        e.samples
            .iter()
            .filter(|x| x.name == name)
            .filter(|x| label.is_none_or(|(k, v)| x.labels.get(k).map(String::as_str) == Some(v)))
            .map(|x| x.value)
            .sum()
    };
    for name in [
        "kvgate_requests_total",
        "kvgate_ttft_seconds",
        "kvgate_saves_total",
        "kvgate_save_failures_total",
        "kvgate_save_bytes_total",
        "kvgate_save_seconds_total",
        "kvgate_restores_total",
        "kvgate_restore_failures_total",
        "kvgate_restore_seconds_total",
        "kvgate_prompt_tokens_total",
        "kvgate_slots",
        "kvgate_queue_wait_seconds",
        "kvgate_events_dropped_total",
        "kvgate_upstream_up",
    ] {
        assert!(!fam(name).is_empty(), "{name} missing:\n{text}");
    }
    for name in ["kvgate_ttft_seconds", "kvgate_queue_wait_seconds"] {
        assert_eq!(e.type_of(name), Some("histogram"), "{name}:\n{text}");
    }
    for x in &e.samples {
        if x.name.starts_with("kvgate_") && e.type_of(&x.name) == Some("counter") {
            assert!(x.value >= 0.0 && x.value.is_finite(), "{x:?}");
        }
    }
    // Labels as documented, values from the script.
    for x in fam("kvgate_requests_total") {
        assert!(
            x.labels.contains_key("route") && x.labels.contains_key("status"),
            "{x:?}"
        );
    }
    assert!(
        sum("kvgate_requests_total", Some(("status", "200"))) >= SCRIPT.len() as f64,
        "{text}"
    );
    assert!(
        sum("kvgate_ttft_seconds_count", None) >= SCRIPT.len() as f64,
        "{text}"
    );
    assert!(
        sum("kvgate_saves_total", Some(("kind", "eviction"))) >= 2.0,
        "{text}"
    );
    assert!(sum("kvgate_save_bytes_total", None) > 0.0, "{text}");
    assert!(sum("kvgate_restores_total", None) >= 1.0, "{text}");
    assert_eq!(sum("kvgate_restore_failures_total", None), 0.0, "{text}");
    assert!(
        sum("kvgate_prompt_tokens_total", Some(("source", "cache"))) > 0.0,
        "{text}"
    );
    assert!(
        sum("kvgate_prompt_tokens_total", Some(("source", "evaluated"))) > 0.0,
        "{text}"
    );
    for x in fam("kvgate_slots") {
        assert!(x.labels.contains_key("state"), "{x:?}");
    }
    assert_eq!(sum("kvgate_upstream_up", None), 1.0, "{text}");
}

#[test]
fn the_metrics_parser_rejects_what_it_should() {
    let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\"} 3\n\
              # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.3\nh_count 2\n";
    let e = parse_exposition(ok);
    assert_eq!(e.samples.len(), 5);
    assert_eq!(e.samples[0].labels["y"], "q\"");
    for bad in [
        "a{x=1} 3\n",
        "a{x=\"1\" 3\n",
        "a 3 4 5\n",
        "1a 3\n",
        "a nope\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
        "# TYPE a gauge\n# TYPE a gauge\na 1\n",
        "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\na 2\n",
        "# HELP kvgate_x X.\nkvgate_x 1\n",
    ] {
        let r = std::panic::catch_unwind(|| parse_exposition(bad));
        assert!(r.is_err(), "accepted {bad:?}");
    }
}

// ---------------------------------------------------------------------------
// Keys: the admin key, front-port clients
// ---------------------------------------------------------------------------

#[tokio::test]
async fn admin_key_is_required_on_every_endpoint() {
    const KEY: &str = "s3cret-admin-key";
    let s = setup(2, |c| c.admin_key = Some(KEY.into())).await;
    // The front port does not need it.
    say(&s, "Alice", "User: hi").await;
    let legacy = "chat1_20240115143022_character_Alice.bin";
    std::fs::write(s.dir.join(legacy), b"legacy").unwrap();
    let files_before = names(&s.dir);
    let actions_before = s.fake.slot_actions().len();
    let settings_body = json!({"save_every": 1}).to_string();
    let clear_body = json!({"erase": true}).to_string();
    let load_body = json!({"items": [{"file": legacy}]}).to_string();
    let preload_body =
        json!({"chat": CHAT, "characters": ["Alice"], "prompt": "x\nAlice:"}).to_string();
    let endpoints: Vec<(&str, String, String)> = vec![
        ("GET", "/health".into(), String::new()),
        ("GET", "/slots".into(), String::new()),
        ("GET", "/saves".into(), String::new()),
        ("GET", "/saves?q=alice".into(), String::new()),
        ("GET", "/files".into(), String::new()),
        ("GET", format!("{PLUGIN}/files"), String::new()),
        ("DELETE", format!("/files/{legacy}"), String::new()),
        ("DELETE", format!("{PLUGIN}/files/{legacy}"), String::new()),
        ("POST", "/save".into(), "{}".into()),
        ("POST", "/slots/0/save".into(), String::new()),
        ("POST", "/slots/clear".into(), clear_body),
        ("POST", "/load".into(), load_body),
        ("POST", "/preload".into(), preload_body),
        ("GET", "/preload/1".into(), String::new()),
        ("DELETE", "/preload/1".into(), String::new()),
        ("GET", "/settings".into(), String::new()),
        ("PUT", "/settings".into(), settings_body),
        ("GET", "/events".into(), String::new()),
        ("GET", "/metrics".into(), String::new()),
        ("GET", "/no-such-endpoint".into(), String::new()),
    ];
    let bad: [&[(&str, &str)]; 7] = [
        &[],
        &[("x-admin-key", "wrong")],
        &[("authorization", "Bearer wrong")],
        &[("x-admin-key", "s3cret-admin-ke")],
        &[("x-admin-key", "s3cret-admin-key2")],
        &[("authorization", "Bearer ")],
        &[("authorization", "Basic czNjcmV0LWFkbWluLWtleQ==")],
    ];
    for (method, path, body) in &endpoints {
        for headers in bad {
            let (status, v) = s.kv.admin_raw(method, path, headers, body).await;
            assert_eq!(status, 401, "{method} {path} with {headers:?}: {v}");
            assert_api_error(401, &v, path);
        }
    }
    assert_eq!(names(&s.dir), files_before, "nothing deleted or saved");
    assert_eq!(
        s.fake.slot_actions().len(),
        actions_before,
        "no slot touched"
    );
    assert!(s.fake.completions().len() == 1, "no preload ran");

    // Both header forms open every door.
    let bearer = format!("Bearer {KEY}");
    for headers in [[("x-admin-key", KEY)], [("authorization", bearer.as_str())]] {
        for path in ["/health", "/slots", "/settings", "/files", "/metrics"] {
            let (status, v) = s.kv.admin_raw("GET", path, &headers, "").await;
            assert_eq!(status, 200, "{path} with {headers:?}: {v}");
        }
        let (status, v) = s.kv.admin_raw("GET", "/nope", &headers, "").await;
        assert_eq!(status, 404, "{v}");
    }
    let v =
        s.kv.admin_raw("GET", "/settings", &[("x-admin-key", KEY)], "")
            .await
            .1;
    assert_eq!(v["save_every"], 5, "the refused PUT changed nothing: {v}");
}

#[tokio::test]
async fn front_clients_need_a_trusted_key_and_llama_server_gets_kvgates() {
    const UPSTREAM_KEY: &str = "upstream-secret-0123";
    let dir = tempfile::tempdir().unwrap();
    let clients = dir.path().join("clients.toml");
    std::fs::write(
        &clients,
        "[[client]]\nid = \"home\"\nkey = \"k-home-0123456789\"\ntrusted = true\n\n\
         [[client]]\nid = \"guest\"\nkey = \"k-guest-0123456789\"\ntrusted = false\n",
    )
    .unwrap();
    let fake = FakeLlama::builder()
        .slots(2)
        .events(3)
        .api_key(UPSTREAM_KEY)
        .build()
        .await;
    let kv = Kvgate::start(&fake.url(), |c| {
        c.clients = Some(clients.clone());
        c.upstream_api_key = Some(UPSTREAM_KEY.into());
    })
    .await;
    let url = format!("{}/completion", kv.url);
    let body = turn("Alice", "User: hi");
    let upstream_bearer = format!("Bearer {UPSTREAM_KEY}");
    let refused: [&[(&str, &str)]; 7] = [
        &[],
        &[("authorization", "Bearer nope")],
        &[("authorization", "Bearer k-guest-0123456789")],
        &[("x-api-key", "k-guest-0123456789")],
        &[("x-api-key", "nope")],
        &[("authorization", "Bearer k-home-012345678")],
        &[("authorization", upstream_bearer.as_str())],
    ];
    let calls_before = fake.calls().len();
    for headers in refused {
        let (status, _, bytes) = post_json(&url, headers, &body).await;
        assert_eq!(status, 401, "{headers:?}");
        assert_api_error(401, &json_body(&bytes), &format!("{headers:?}"));
        let resp = send("GET", &format!("{}/v1/models", kv.url), headers, "").await;
        assert_eq!(resp.status(), 401, "passthrough with {headers:?}");
        let (status, _, _) = post_json(
            &format!("{}/slots/0?action=erase", kv.url),
            headers,
            &json!({}),
        )
        .await;
        assert_eq!(status, 401, "slot action with {headers:?}");
    }
    assert!(
        fake.completions().is_empty(),
        "a refused completion reached llama-server"
    );
    assert!(
        fake.calls()[calls_before..]
            .iter()
            .all(|c| c.query.as_deref() != Some("action=erase")),
        "a refused slot action reached llama-server"
    );

    let tap = EventTap::open(&kv).await;
    for headers in [
        [("authorization", "Bearer k-home-0123456789")],
        [("x-api-key", "k-home-0123456789")],
    ] {
        fake.clear_calls();
        let (status, _, bytes) = post_json(&url, &headers, &body).await;
        assert_eq!(
            status,
            200,
            "{headers:?}: {}",
            String::from_utf8_lossy(&bytes)
        );
        kv.wait_idle().await;
        let resp = send("GET", &format!("{}/v1/models", kv.url), &headers, "").await;
        assert_eq!(resp.status(), 200);
        let calls = fake.calls();
        for path in ["/completion", "/v1/models"] {
            let c = calls
                .iter()
                .find(|c| c.path == path)
                .unwrap_or_else(|| panic!("{path} never reached llama-server"));
            assert_eq!(
                c.header("authorization"),
                Some(&*format!("Bearer {UPSTREAM_KEY}")),
                "{path}: {:?}",
                c.headers
            );
            assert!(
                c.headers.iter().all(|(_, v)| !v.contains("k-home")),
                "{path}: the client's key leaked upstream: {:?}",
                c.headers
            );
        }
    }
    // Events name the client by its id.
    let events = tap.until("generation_finished", 1).await;
    let assigned = events
        .iter()
        .find(|e| e["type"] == "slot_assigned")
        .unwrap_or_else(|| panic!("{events:#?}"));
    assert!(
        assigned["client"]
            .as_str()
            .is_some_and(|c| c.contains("home")),
        "the client id in events: {assigned}"
    );
    assert!(!assigned.to_string().contains("k-home"), "{assigned}");
}

#[tokio::test]
async fn without_a_clients_file_authorization_passes_through_unchanged() {
    for upstream_key in [None, Some("kvgates-own-key")] {
        let fake = FakeLlama::builder().slots(2).events(3).build().await;
        let kv = Kvgate::start(&fake.url(), |c| {
            c.upstream_api_key = upstream_key.map(Into::into)
        })
        .await;
        for (name, value) in [
            ("authorization", "Bearer client-own-key"),
            ("x-api-key", "client-x-key"),
        ] {
            fake.clear_calls();
            let (status, _, _) = post_json(
                &format!("{}/completion", kv.url),
                &[(name, value)],
                &turn("Alice", "User: hi"),
            )
            .await;
            assert_eq!(status, 200);
            kv.wait_idle().await;
            let resp = send("GET", &format!("{}/props", kv.url), &[(name, value)], "").await;
            assert_eq!(resp.status(), 200);
            for path in ["/completion", "/props"] {
                let c = fake
                    .calls()
                    .into_iter()
                    .find(|c| c.path == path)
                    .unwrap_or_else(|| panic!("no {path}"));
                assert_eq!(
                    c.header(name),
                    Some(value),
                    "{path} with upstream key {upstream_key:?}: {:?}",
                    c.headers
                );
            }
        }
    }
}
