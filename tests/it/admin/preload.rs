//! `POST /preload`: restoring saves or evaluating a character's last prompt,
//! failures and bad requests, cancellation that frees every slot, and
//! `preload_timeout_s`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kvgate::store::{SaveKind, SaveMeta};
use serde_json::{json, Value};

use crate::support::kvgate::{
    assert_api_error, preload_id, preload_succeeded, saves_in as saves, EventTap,
};

use super::{admin, alice_and_bob_saved, cache_n, say, setup, slot_of, slot_with, turn, CHAT};

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

    // Each member its own prompt ("swap character cards": each prompt
    // starts with the member's own card), the shared one for the rest.
    let own = |who: &str| format!("{who}'s card.\nUser: hi\n{who}:");
    let before = s.fake.completions().len();
    let (status, v) = admin(
        &s.kv,
        "POST",
        "/preload",
        Some(json!({
            "chat": "trio",
            "characters": ["Xan", "Yul", "Wim"],
            "prompts": {"Xan": own("Xan"), "Yul": own("Yul")},
            "prompt": "Shared card.\nUser: hi\nWim:",
        })),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let p =
        s.kv.wait_preload(&preload_id(&v), Duration::from_secs(10))
            .await;
    assert_eq!(preload_succeeded(&p).len(), 3, "{p}");
    let evaluated: Vec<Value> = s.fake.completions()[before..]
        .iter()
        .map(|c| c["prompt"].clone())
        .collect();
    assert_eq!(
        evaluated,
        vec![
            json!(own("Xan")),
            json!(own("Yul")),
            json!("Shared card.\nUser: hi\nWim:")
        ]
    );

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
        json!({"chat": "x", "characters": ["Alice"], "prompts": ["p"]}),
        json!({"chat": "x", "characters": ["Alice"], "prompts": {"Alice": 3}}),
        // A prompt for someone the job does not warm up is a mistake.
        json!({"chat": "x", "characters": ["Alice"], "prompts": {"Bob": "p"}}),
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

#[tokio::test]
async fn preload_jobs_are_bounded_and_old_finished_ones_forgotten() {
    const MAX_ACTIVE: usize = 8;
    const KEEP_FINISHED: usize = 64;
    let s = setup(2, |_| {}).await;
    // Jobs that stay at work: llama-server is slow to evaluate their prompt
    // (two hold the slots, the others wait for one).
    s.fake.set_first_byte_delay(Duration::from_secs(60));
    let slow =
        |i: usize| json!({"chat": CHAT, "characters": [format!("Slow{i}")], "prompt": "x\nSlow:"});
    let mut ids = Vec::new();
    for i in 0..MAX_ACTIVE {
        let (status, v) = admin(&s.kv, "POST", "/preload", Some(slow(i))).await;
        assert_eq!(status, 202, "job {i}: {v}");
        ids.push(preload_id(&v));
    }
    let refused = |v: &serde_json::Value| {
        assert_api_error(503, v, "a job too many");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("preload jobs"), "{msg}");
    };
    let (status, v) = admin(&s.kv, "POST", "/preload", Some(slow(99))).await;
    assert_eq!(status, 503, "{v}");
    refused(&v);
    // Cancelling one makes room for exactly one.
    let (status, v) = admin(&s.kv, "DELETE", &format!("/preload/{}", ids[0]), None).await;
    assert_eq!(
        (status, v["state"].as_str()),
        (200, Some("cancelled")),
        "{v}"
    );
    let (status, v) = admin(&s.kv, "POST", "/preload", Some(slow(100))).await;
    assert_eq!(status, 202, "{v}");
    ids.push(preload_id(&v));
    let (status, v) = admin(&s.kv, "POST", "/preload", Some(slow(101))).await;
    assert_eq!(status, 503, "{v}");
    refused(&v);
    for id in &ids {
        let (status, v) = admin(&s.kv, "DELETE", &format!("/preload/{id}"), None).await;
        assert_eq!(status, 200, "{v}");
    }
    s.fake.set_first_byte_delay(Duration::ZERO);

    // Quick jobs (no save, no prompt: they fail at once), one after the
    // other: only the newest finished ones stay readable.
    for i in 0..70 {
        let body = json!({"chat": CHAT, "characters": [format!("Nobody{i}")]});
        let (status, v) = admin(&s.kv, "POST", "/preload", Some(body)).await;
        assert_eq!(status, 202, "quick job {i}: {v}");
        let id = preload_id(&v);
        let p = s.kv.wait_preload(&id, Duration::from_secs(10)).await;
        assert_eq!(p["state"], "done", "{p}");
        ids.push(id);
    }
    // When the last job started, every earlier one had finished: all but
    // the newest KEEP_FINISHED of those were forgotten.
    let earlier = ids.len() - 1;
    let forgotten = earlier - KEEP_FINISHED;
    for (n, id) in ids.iter().enumerate() {
        let (status, v) = admin(&s.kv, "GET", &format!("/preload/{id}"), None).await;
        let want = if n < forgotten { 404 } else { 200 };
        assert_eq!(status, want, "job #{n} ({id}): {v}");
    }
}
