//! The front port against the fake llama-server: transparency, slot pinning,
//! streaming, serialisation, disconnects, waiting and eviction.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use kvgate::slots::SlotId;
use kvgate::store::hooks::{BoxFuture, CacheHooks, Generation, Restore};
use kvgate::store::SaveKind;
use kvgate::tenant::Tenant;
use serde_json::{json, Value};

use crate::support::fake_llama::{self, FakeLlama};
use crate::support::kvgate::{
    assert_api_error, json_body, next_chunk, post_json, send, spawn_post, sse_events, Kvgate,
};

fn st_body(speaker: &str, others: &[&str], stream: bool) -> Value {
    let mut stop = vec!["\nUser:".to_string()];
    stop.extend(others.iter().map(|o| format!("\n{o}:")));
    json!({
        "prompt": format!("Write {speaker}'s next reply.\nUser: Hello everyone!\n{speaker}:"),
        "stop": stop,
        "stream": stream,
        "n_predict": 50,
        "cache_prompt": true,
        "temperature": 1,
        "api_type": "llamacpp",
    })
}

/// A group turn with distinct history, so it is not taken for a swipe.
fn group_turn(speaker: &str, turn: usize) -> Value {
    let mut b = group(speaker);
    let p = b["prompt"]
        .as_str()
        .unwrap()
        .replace("Hello everyone!", &format!("Hello everyone! (turn {turn})"));
    b["prompt"] = Value::from(p);
    b
}

fn group(speaker: &str) -> Value {
    let all = ["Alice", "Bob", "Carol", "Dave"];
    let others: Vec<&str> = all.iter().copied().filter(|n| *n != speaker).collect();
    st_body(speaker, &others, true)
}

/// What a request looks like on the wire, minus the volatile headers.
fn comparable(
    call: &fake_llama::Call,
) -> (String, String, Option<String>, Vec<(String, String)>, Bytes) {
    let mut headers: Vec<(String, String)> = call
        .headers
        .iter()
        .filter(|(k, _)| k != "host")
        .cloned()
        .collect();
    headers.sort();
    (
        call.method.clone(),
        call.path.clone(),
        call.query.clone(),
        headers,
        call.body.clone(),
    )
}

#[tokio::test]
async fn passthrough_is_byte_exact_both_ways() {
    let fake = FakeLlama::start().await;
    let kv = Kvgate::start(&fake.url(), |_| {}).await;
    fake.clear_calls();

    type Case = (
        &'static str,
        &'static str,
        Vec<(&'static str, &'static str)>,
        Bytes,
    );
    let cases: Vec<Case> = vec![
        (
            "GET",
            "/v1/models",
            vec![("accept", "*/*"), ("user-agent", "node-fetch")],
            Bytes::new(),
        ),
        ("GET", "/props", vec![], Bytes::new()),
        ("GET", "/slots?fail_on_no_slot=1", vec![], Bytes::new()),
        ("GET", "/health", vec![("x-custom", "a b c")], Bytes::new()),
        (
            "POST",
            "/tokenize",
            vec![
                ("content-type", "application/json"),
                ("authorization", "Bearer k"),
            ],
            Bytes::from(r#"{"model":"undefined","content":"Carol: *bustles over* ¿qué?"}"#),
        ),
        (
            "PUT",
            "/anything/else?x=1&y=%20z",
            vec![],
            Bytes::from_static(b"\xff\x00raw"),
        ),
        (
            "GET",
            "/stream-raw?chunks=5&delay_ms=5",
            vec![],
            Bytes::new(),
        ),
    ];
    for (method, path, headers, body) in cases {
        let direct = send(
            method,
            &format!("{}{path}", fake.url()),
            &headers,
            body.clone(),
        )
        .await;
        let d_status = direct.status();
        let mut d_headers = direct.headers().clone();
        let d_body = direct.into_body().collect().await.unwrap().to_bytes();
        let via = send(method, &format!("{}{path}", kv.url), &headers, body.clone()).await;
        let v_status = via.status();
        let mut v_headers = via.headers().clone();
        let v_body = via.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(v_status, d_status, "{method} {path}");
        assert_eq!(v_body, d_body, "{method} {path}: body bytes differ");
        for h in ["date", "connection", "keep-alive", "transfer-encoding"] {
            d_headers.remove(h);
            v_headers.remove(h);
        }
        assert_eq!(v_headers, d_headers, "{method} {path}: headers differ");
        // The upstream saw the same request from kvgate as from the client.
        let calls = fake.calls();
        let n = calls.len();
        assert!(n >= 2);
        assert_eq!(
            comparable(&calls[n - 1]),
            comparable(&calls[n - 2]),
            "{method} {path}: upstream saw a different request"
        );
        fake.clear_calls();
    }
    assert_eq!(
        kv.upstream
            .pool
            .snapshot()
            .iter()
            .filter(|s| s.owner.is_some())
            .count(),
        0,
        "passthrough takes no slot"
    );
}

#[tokio::test]
async fn completion_is_pinned_and_otherwise_unchanged() {
    let fake = FakeLlama::builder().slots(3).events(4).build().await;
    let kv = Kvgate::start(&fake.url(), |_| {}).await;
    let mut body = group("Bob");
    body["kvgate"] = json!({"chat": "tavern"});
    let (status, headers, bytes) = post_json(&format!("{}/completion", kv.url), &[], &body).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-kvgate-slot"], "0");
    assert_eq!(headers["x-kvgate-character"], "Bob");
    assert_eq!(headers["content-type"], "text/event-stream");
    let events = sse_events(&bytes);
    assert_eq!(events.last().unwrap()["id_slot"], 0);
    let content: String = events
        .iter()
        .filter_map(|e| e["content"].as_str())
        .collect();
    assert_eq!(content, fake_llama::expected_content(4));

    let sent = fake.completions().pop().unwrap();
    let mut expected = body.clone();
    expected.as_object_mut().unwrap().remove("kvgate");
    expected["id_slot"] = json!(0);
    assert_eq!(
        sent, expected,
        "only id_slot was added and the kvgate object removed"
    );
    // llama-server closes a connection after streaming although it announced
    // keep-alive: completions must never reuse a pooled connection.
    let call = fake.calls_to("/completion").pop().unwrap();
    assert_eq!(call.header("connection"), Some("close"));
    kv.wait_idle().await;
    let slot = &kv.upstream.pool.snapshot()[0];
    assert_eq!(
        slot.owner,
        Some(Tenant::Character {
            chat: "tavern".into(),
            name: "Bob".into()
        })
    );
    assert_eq!(slot.usage, 1);

    // Every route is intercepted, and each character keeps its own slot.
    for (i, (path, speaker)) in [
        ("/completions", "Alice"),
        ("/v1/completions", "Carol"),
        ("/completion", "Bob"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut b = group(speaker);
        b["kvgate"] = json!({"chat": "tavern"});
        let (status, headers, _) = post_json(&format!("{}{path}", kv.url), &[], &b).await;
        assert_eq!(status, 200, "{path}");
        let expected_slot = [1, 2, 0][i];
        assert_eq!(
            headers["x-kvgate-slot"],
            expected_slot.to_string().as_str(),
            "{path} {speaker}"
        );
        assert_eq!(fake.completions().last().unwrap()["id_slot"], expected_slot);
    }
    // Chat completions too, with an explicit character header.
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "stream": false});
    let (status, headers, _) = post_json(
        &format!("{}/v1/chat/completions", kv.url),
        &[("x-kvgate-character", "Alice"), ("x-kvgate-chat", "tavern")],
        &chat,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-kvgate-slot"], "1", "Alice's slot");
    assert_eq!(fake.completions().last().unwrap()["id_slot"], 1);
}

#[tokio::test]
async fn anonymous_requests_get_a_slot_too_and_never_a_characters() {
    let fake = FakeLlama::builder().slots(2).events(2).build().await;
    let kv = Kvgate::start(&fake.url(), |_| {}).await;
    let (s, h, _) = post_json(&format!("{}/completion", kv.url), &[], &group("Alice")).await;
    assert_eq!((s, h["x-kvgate-slot"].to_str().unwrap()), (200, "0"));
    let quiet = json!({"prompt": "Summarize the story so far.", "n_predict": 5});
    let (s, h, _) = post_json(&format!("{}/completion", kv.url), &[], &quiet).await;
    assert_eq!(s, 200);
    assert_eq!(
        h["x-kvgate-slot"], "1",
        "a quiet prompt does not land on Alice's slot"
    );
    assert!(h.get("x-kvgate-character").is_none());
    assert_eq!(fake.completions().last().unwrap()["id_slot"], 1);
}

#[tokio::test]
async fn an_event_reaches_the_client_before_upstream_sends_the_next() {
    let fake = FakeLlama::builder()
        .slots(1)
        .events(3)
        .gate(true)
        .build()
        .await;
    let kv = Kvgate::start(&fake.url(), |_| {}).await;
    let resp = send(
        "POST",
        &format!("{}/completion", kv.url),
        &[("content-type", "application/json")],
        group("Alice").to_string(),
    )
    .await;
    let mut body = resp.into_body();
    let mut received = Vec::new();
    // The fake holds back every event after the first until released; each
    // one must arrive before the next is released.
    for i in 0..3 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), next_chunk(&mut body))
            .await
            .unwrap_or_else(|_| panic!("event {i} was not relayed while upstream waited"))
            .expect("chunk");
        received.extend_from_slice(&chunk);
        assert!(
            String::from_utf8_lossy(&chunk).contains(&fake_llama::event_text(i)),
            "chunk {i}"
        );
        fake.release_event();
    }
    while let Some(c) = next_chunk(&mut body).await {
        received.extend_from_slice(&c);
    }
    let last = sse_events(&received).pop().unwrap();
    assert_eq!(last["stop"], true);
    kv.wait_idle().await;
}

#[tokio::test]
async fn same_character_is_serialised_different_characters_run_in_parallel() {
    let fake = FakeLlama::builder()
        .slots(2)
        .events(2)
        .gate(true)
        .build()
        .await;
    let kv = Kvgate::start(&fake.url(), |_| {}).await;
    let url = format!("{}/completion", kv.url);
    let post = |b: Value| spawn_post(&url, b);
    let a1 = post(group("Alice"));
    assert!(
        fake.wait_for(Duration::from_secs(5), |f| f.active_requests() == 1)
            .await
    );
    let a2 = post(group("Alice"));
    let b1 = post(group("Bob"));
    // Bob runs next to Alice; Alice's second request waits in kvgate.
    assert!(
        fake.wait_for(Duration::from_secs(5), |f| f.active_requests() == 2)
            .await
    );
    kv.wait_queued(1).await; // Alice's second request waits in kvgate
    assert_eq!(
        fake.completions().len(),
        2,
        "Alice's second request must not reach llama-server yet"
    );
    assert_eq!(
        fake.deferred_requests(),
        0,
        "nothing queues inside llama-server"
    );
    fake.release_events(4);
    let (_, h1, _) = a1.await.unwrap();
    let (_, hb, _) = b1.await.unwrap();
    assert_eq!(h1["x-kvgate-slot"], "0");
    assert_eq!(hb["x-kvgate-slot"], "1");
    assert!(
        fake.wait_for(Duration::from_secs(5), |f| f.completions().len() == 3)
            .await
    );
    fake.release_events(2);
    let (_, h2, _) = a2.await.unwrap();
    assert_eq!(h2["x-kvgate-slot"], "0", "Alice keeps her slot");
    kv.wait_idle().await;
}

#[tokio::test]
async fn client_disconnect_cancels_upstream_and_frees_the_slot() {
    let fake = FakeLlama::builder()
        .slots(1)
        .events(50)
        .event_delay(Duration::from_millis(20))
        .build()
        .await;
    let kv = Kvgate::start(&fake.url(), |_| {}).await;
    let resp = send(
        "POST",
        &format!("{}/completion", kv.url),
        &[("content-type", "application/json")],
        group("Alice").to_string(),
    )
    .await;
    let mut body = resp.into_body();
    assert!(next_chunk(&mut body).await.is_some());
    drop(body);
    assert!(
        fake.wait_for(Duration::from_secs(5), |f| f.active_requests() == 0)
            .await,
        "llama-server's generation was not cancelled"
    );
    kv.wait_idle().await;
    let slot = &kv.upstream.pool.snapshot()[0];
    assert_eq!(
        slot.owner.as_ref().and_then(|t| t.character()),
        Some("Alice")
    );
    assert!(slot.live, "a stopped generation leaves a valid prefix");

    // Disconnect while still queued: no lease leaks either.
    fake.set_gate(true);
    let url = format!("{}/completion", kv.url);
    let holder = spawn_post(&url, group("Bob"));
    assert!(
        fake.wait_for(Duration::from_secs(5), |f| f.active_requests() == 1)
            .await
    );
    let queued = spawn_post(&url, group("Carol"));
    kv.wait_queued(1).await;
    queued.abort();
    let _ = queued.await;
    kv.wait_queued(0).await; // the abandoned waiter left the queue
    fake.set_gate(false);
    fake.release_events(100);
    holder.await.unwrap();
    kv.wait_idle().await;
}

/// Records hook calls with their time, to check the order against the
/// upstream's call log.
#[derive(Debug, Default)]
struct Recorder {
    log: Mutex<Vec<(String, SlotId, String, Instant)>>,
}

impl CacheHooks for Recorder {
    fn save<'a>(
        &'a self,
        slot: SlotId,
        tenant: &'a Tenant,
        kind: SaveKind,
        _: Option<&'a str>,
    ) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move {
            // Take a little time, as a real save does.
            tokio::time::sleep(Duration::from_millis(30)).await;
            self.log.lock().unwrap().push((
                format!("{}-save", kind.as_str()),
                slot,
                tenant.character().unwrap_or("").to_string(),
                Instant::now(),
            ));
            Some("f.bin".into())
        })
    }
    fn restore<'a>(&'a self, g: Generation<'a>) -> BoxFuture<'a, Restore> {
        Box::pin(async move {
            self.log.lock().unwrap().push((
                "restore".into(),
                g.slot,
                g.tenant.character().unwrap_or("").to_string(),
                Instant::now(),
            ));
            Restore::Skipped
        })
    }
    fn restore_file<'a>(&'a self, _: SlotId, _: &'a Tenant, _: &'a str) -> BoxFuture<'a, Restore> {
        Box::pin(async { Restore::Skipped })
    }
    fn autosave_due(&self, _: u32) -> bool {
        false
    }
}

#[tokio::test]
async fn full_table_evicts_least_used_and_saves_it_before_the_new_generation() {
    let fake = FakeLlama::builder().slots(2).events(1).build().await;
    let rec = Arc::new(Recorder::default());
    let kv = Kvgate::start_with_hooks(&fake.url(), rec.clone(), |_| {}).await;
    let url = format!("{}/completion", kv.url);
    // Alice twice (usage 2), Bob once (usage 1); then Carol needs a slot.
    for (turn, who) in ["Alice", "Alice", "Bob", "Carol"].into_iter().enumerate() {
        let (s, h, _) = post_json(&url, &[], &group_turn(who, turn)).await;
        assert_eq!(s, 200);
        if who == "Carol" {
            assert_eq!(h["x-kvgate-slot"], "1", "Bob has the least usage");
        }
        kv.wait_idle().await;
    }
    let log = rec.log.lock().unwrap().clone();
    let saves: Vec<_> = log
        .iter()
        .filter(|e| e.0.starts_with("eviction-save"))
        .collect();
    assert_eq!(saves.len(), 1, "{log:?}");
    assert_eq!(
        (saves[0].0.as_str(), saves[0].1, saves[0].2.as_str()),
        ("eviction-save", 1, "Bob")
    );
    let carol_call = fake
        .calls()
        .into_iter()
        .find(|c| c.is_completion() && String::from_utf8_lossy(&c.body).contains("Write Carol"))
        .unwrap();
    assert!(
        saves[0].3 < carol_call.at,
        "evict-save must precede the new owner's generation"
    );
    let restore = log
        .iter()
        .find(|e| e.0 == "restore" && e.2 == "Carol")
        .unwrap();
    assert_eq!(restore.1, 1);
    assert!(
        saves[0].3 <= restore.3 && restore.3 < carol_call.at,
        "save, then restore, then generate"
    );
    // Usage ties go to the least recently used: Carol (1) vs Alice (2):
    // Dave takes Carol's slot; the evicted usage is reported.
    let (_, h, _) = post_json(&url, &[], &group("Dave")).await;
    assert_eq!(h["x-kvgate-slot"], "1");
    kv.wait_idle().await;
    assert_eq!(
        rec.log
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.0.starts_with("eviction-save"))
            .count(),
        2
    );
}

#[tokio::test]
async fn full_table_makes_a_newcomer_wait_for_the_first_free_slot() {
    let fake = FakeLlama::builder()
        .slots(2)
        .events(2)
        .gate(true)
        .build()
        .await;
    let rec = Arc::new(Recorder::default());
    let kv = Kvgate::start_with_hooks(&fake.url(), rec.clone(), |_| {}).await;
    let url = format!("{}/completion", kv.url);
    let spawn = |who: &'static str| spawn_post(&url, group(who));
    // One after the other: Alice gets slot 0 and waits first for each gated
    // event (the gate is a fair semaphore), so her generation ends first.
    let a = spawn("Alice");
    assert!(
        fake.wait_for(Duration::from_secs(5), |f| f.active_requests() == 1)
            .await
    );
    let b = spawn("Bob");
    assert!(
        fake.wait_for(Duration::from_secs(5), |f| f.active_requests() == 2)
            .await
    );
    let c = spawn("Carol");
    kv.wait_queued(1).await; // Carol waits in kvgate
    assert_eq!(
        fake.completions().len(),
        2,
        "Carol has not reached llama-server"
    );
    // One event at a time until Alice's generation ends and Carol comes
    // in: she takes Alice's slot, never Bob's busy one.
    let alice_slot: usize = 0;
    let mut released = 0;
    while !fake
        .wait_for(Duration::from_millis(50), |f| f.completions().len() == 3)
        .await
    {
        assert!(released < 20, "Carol never reached llama-server");
        fake.release_event();
        released += 1;
    }
    assert_eq!(
        fake.completions()[2]["id_slot"],
        alice_slot,
        "Carol runs in the slot that freed"
    );
    fake.set_gate(false);
    fake.release_events(20);
    for h in [a, b, c] {
        assert_eq!(h.await.unwrap().0, 200);
    }
    kv.wait_idle().await;
    let log = rec.log.lock().unwrap().clone();
    assert!(
        log.iter()
            .any(|e| e.0 == "eviction-save" && e.1 == 0 && e.2 == "Alice"),
        "Alice's message was saved before Carol took her slot: {log:?}"
    );
}

#[tokio::test]
async fn queue_bound_gives_503_json() {
    let fake = FakeLlama::builder()
        .slots(1)
        .events(1)
        .gate(true)
        .build()
        .await;
    let kv = Kvgate::start(&fake.url(), |c| c.max_queue = 1).await;
    let url = format!("{}/completion", kv.url);
    let first = spawn_post(&url, group("Alice"));
    assert!(
        fake.wait_for(Duration::from_secs(5), |f| f.active_requests() == 1)
            .await
    );
    let second = spawn_post(&url, group("Bob"));
    kv.wait_queued(1).await; // Bob fills the queue
    let (status, _, body) = post_json(&url, &[], &group("Carol")).await;
    assert_eq!(status, 503);
    let v = json_body(&body);
    assert_api_error(503, &v, "the request over the queue limit");
    assert_eq!(v["error"]["type"], "unavailable_error");
    fake.set_gate(false);
    fake.release_events(10);
    assert_eq!(first.await.unwrap().0, 200);
    assert_eq!(second.await.unwrap().0, 200);
    kv.wait_idle().await;
}

#[tokio::test]
async fn queue_timeout_gives_503_and_leaves_nothing_queued() {
    let fake = FakeLlama::builder()
        .slots(1)
        .events(1)
        .gate(true)
        .build()
        .await;
    let kv = Kvgate::start(&fake.url(), |c| {
        c.queue_timeout = Duration::from_millis(200)
    })
    .await;
    let url = format!("{}/completion", kv.url);
    let first = spawn_post(&url, group("Alice"));
    assert!(
        fake.wait_for(Duration::from_secs(5), |f| f.active_requests() == 1)
            .await
    );
    let (status, _, body) = post_json(&url, &[], &group("Bob")).await;
    assert_eq!(status, 503);
    assert!(
        String::from_utf8_lossy(&body).contains("within"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(kv.upstream.pool.queued(), 0);
    fake.set_gate(false);
    fake.release_events(10);
    first.await.unwrap();
    kv.wait_idle().await;
}

#[tokio::test]
async fn oversized_body_gets_413_and_never_reaches_upstream() {
    let fake = FakeLlama::start().await;
    let kv = Kvgate::start(&fake.url(), |c| c.max_body_bytes = 4096).await;
    let big = json!({"prompt": "x".repeat(10_000), "stream": true});
    let (status, _, body) = post_json(&format!("{}/completion", kv.url), &[], &big).await;
    assert_eq!(status, 413);
    let v = json_body(&body);
    assert_api_error(413, &v, "an oversized body");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(fake.completions().is_empty());
    kv.wait_idle().await;
}

#[tokio::test]
async fn non_json_bodies_reach_llama_server_untouched() {
    let fake = FakeLlama::start().await;
    let kv = Kvgate::start(&fake.url(), |_| {}).await;
    // The fake answers errors the way llama-server does.
    for (raw, compare_answer) in [
        (&b"{not json"[..], true),
        (b"\xff\xfe", true),
        (b"[1,2,3]", true),
    ] {
        fake.clear_calls();
        let direct = send(
            "POST",
            &format!("{}/completion", fake.url()),
            &[("content-type", "application/json")],
            Bytes::copy_from_slice(raw),
        )
        .await;
        let d_status = direct.status();
        let d_body = direct.into_body().collect().await.unwrap().to_bytes();
        let via = send(
            "POST",
            &format!("{}/completion", kv.url),
            &[("content-type", "application/json")],
            Bytes::copy_from_slice(raw),
        )
        .await;
        assert_eq!(via.status(), d_status);
        assert!(via.headers().get("x-kvgate-slot").is_none());
        let v_body = via.into_body().collect().await.unwrap().to_bytes();
        if compare_answer {
            assert_eq!(v_body, d_body, "the client sees llama-server's own error");
        }
        let calls = fake.calls_to("/completion");
        assert_eq!(calls.len(), 2);
        assert_eq!(
            calls[1].body,
            Bytes::copy_from_slice(raw),
            "forwarded byte for byte"
        );
    }
    // A malformed explicit identity is kvgate's own 400.
    let mut b = group("Alice");
    b["kvgate"] = json!({"kind": "dance"});
    let (status, _, body) = post_json(&format!("{}/completion", kv.url), &[], &b).await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("dance"));
    kv.wait_idle().await;
}

#[tokio::test]
async fn client_chosen_id_slot_is_honoured_and_serialised() {
    let fake = FakeLlama::builder()
        .slots(2)
        .events(2)
        .gate(true)
        .build()
        .await;
    let kv = Kvgate::start(&fake.url(), |_| {}).await;
    let url = format!("{}/completion", kv.url);
    // Alice in slot 0, busy.
    let a = spawn_post(&url, group("Alice"));
    assert!(
        fake.wait_for(Duration::from_secs(5), |f| f.active_requests() == 1)
            .await
    );
    // A client pins slot 0 itself (as the seed extension did): it waits in
    // kvgate, not inside llama-server.
    let mut pinned = json!({"prompt": "raw prompt", "n_predict": 2, "id_slot": 0});
    let p = spawn_post(&url, pinned.clone());
    kv.wait_queued(1).await;
    assert_eq!(
        fake.completions().len(),
        1,
        "the pinned request waits for Alice's generation"
    );
    fake.set_gate(false);
    fake.release_events(10);
    a.await.unwrap();
    let (status, headers, _) = p.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(headers["x-kvgate-slot"], "0");
    assert_eq!(fake.completions().last().unwrap()["id_slot"], 0);
    kv.wait_idle().await;
    assert_eq!(
        kv.upstream.pool.snapshot()[0].owner,
        None,
        "slot 0's contents are unknown now"
    );
    // Ids past the slot count wrap as llama-server wraps them.
    pinned["id_slot"] = json!(3);
    let (_, headers, _) = post_json(&url, &[], &pinned).await;
    assert_eq!(headers["x-kvgate-slot"], "1");
    assert_eq!(
        fake.completions().last().unwrap()["id_slot"],
        1,
        "forwarded as the slot kvgate leased"
    );
    kv.wait_idle().await;
}

#[tokio::test]
async fn upstream_restart_marks_every_slot_unknown() {
    let fake = FakeLlama::builder().slots(2).events(1).build().await;
    let kv = Kvgate::start(&fake.url(), |_| {}).await;
    for who in ["Alice", "Bob"] {
        let (s, _, _) = post_json(&format!("{}/completion", kv.url), &[], &group(who)).await;
        assert_eq!(s, 200);
    }
    kv.wait_idle().await;
    assert!(kv.upstream.pool.snapshot().iter().all(|s| s.live));
    fake.restart().await;
    kv.wait_all_lost(Duration::from_secs(5)).await;
    let owners: Vec<Option<String>> = kv
        .upstream
        .pool
        .snapshot()
        .iter()
        .map(|s| {
            s.owner
                .as_ref()
                .and_then(|t| t.character())
                .map(String::from)
        })
        .collect();
    assert_eq!(
        owners,
        [Some("Alice".to_string()), Some("Bob".to_string())],
        "affinity kept"
    );
    assert!(
        kv.upstream.pool.snapshot().iter().all(|s| s.usage == 0),
        "nothing left to save"
    );
}

#[tokio::test]
async fn upstream_down_gives_502_json_and_frees_the_slot() {
    let fake = FakeLlama::builder().slots(1).events(1).build().await;
    let kv = Kvgate::start(&fake.url(), |_| {}).await;
    fake.kill().await;
    let (status, _, body) =
        post_json(&format!("{}/completion", kv.url), &[], &group("Alice")).await;
    assert_eq!(status, 502);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["type"], "server_error");
    let via = send("GET", &format!("{}/props", kv.url), &[], Bytes::new()).await;
    assert_eq!(via.status(), 502);
    kv.wait_idle().await;
}

#[tokio::test]
async fn shutdown_lets_a_stream_finish() {
    let fake = FakeLlama::builder()
        .slots(1)
        .events(5)
        .event_delay(Duration::from_millis(40))
        .build()
        .await;
    let kv = Kvgate::start(&fake.url(), |_| {}).await;
    let url = format!("{}/completion", kv.url);
    let req = spawn_post(&url, group("Alice"));
    assert!(
        fake.wait_for(Duration::from_secs(5), |f| f.active_requests() == 1)
            .await
    );
    kv.stop().await;
    let (status, _, body) = req.await.unwrap();
    assert_eq!(status, 200);
    let events = sse_events(&body);
    assert_eq!(
        events.last().unwrap()["stop"],
        true,
        "not truncated by the shutdown"
    );
}

#[tokio::test]
async fn upstream_dying_mid_stream_ends_cleanly_with_an_error_event() {
    let fake = FakeLlama::builder().slots(1).events(6).build().await;
    let kv = Kvgate::start(&fake.url(), |_| {}).await;
    let (s, _, _) = post_json(&format!("{}/completion", kv.url), &[], &group("Alice")).await;
    assert_eq!(s, 200);
    kv.wait_idle().await;
    fake.die_mid_stream_after(2);
    let resp = send(
        "POST",
        &format!("{}/completion", kv.url),
        &[("content-type", "application/json")],
        group_turn("Alice", 1).to_string(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    // The body ends cleanly (no transport error) with an error event.
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("a clean end")
        .to_bytes();
    let events = sse_events(&body);
    assert_eq!(events.len(), 3, "two tokens, then the error: {events:?}");
    assert_eq!(events[0]["content"], fake_llama::event_text(0));
    assert_eq!(events[2]["error"]["type"], "server_error");
    kv.wait_idle().await;
    let slot = &kv.upstream.pool.snapshot()[0];
    assert!(!slot.live, "contents unknown after a broken stream");
    assert!(slot.lease.is_none());
}

#[tokio::test]
async fn a_completion_reaches_llama_server_as_the_client_wrote_it_plus_the_pin() {
    let fake = FakeLlama::start().await;
    let kv = Kvgate::start(&fake.url(), |_| {}).await;
    fake.clear_calls();
    // Spellings a re-serialisation would change: spaces, a float's
    // trailing zero, an exponent, escapes, a duplicate key.
    let raw = "{ \"prompt\": \"Say \\u0068i\", \"temperature\": 0.70, \"n_predict\": 1e0, \"top_k\": 40, \"top_k\": 41 }";
    let resp = send(
        "POST",
        &format!("{}/completion", kv.url),
        &[("content-type", "application/json")],
        raw.to_string(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let slot = resp.headers()["x-kvgate-slot"]
        .to_str()
        .unwrap()
        .to_string();
    let _ = resp.into_body().collect().await;
    let sent = fake.calls_to("/completion").pop().expect("forwarded");
    assert_eq!(
        String::from_utf8(sent.body.to_vec()).unwrap(),
        format!("{{\"id_slot\":{slot},{}", &raw[1..]),
        "only the pin is added"
    );
    // A body kvgate must change (its own identity object) is rewritten.
    let (status, _, _) = post_json(
        &format!("{}/completion", kv.url),
        &[],
        &json!({"prompt": "x", "kvgate": {"character": "Alice", "chat": "c"}}),
    )
    .await;
    assert_eq!(status, 200);
    let sent = fake.calls_to("/completion").pop().unwrap().json().unwrap();
    assert!(sent.get("kvgate").is_none(), "{sent}");
    kv.wait_idle().await;
}
