//! The front port's slot rules against the fake llama-server: every way a
//! request can name a slot waits for kvgate's lease, ambiguous spellings are
//! refused, and slot actions can't name kvgate's own files.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{json, Value};

use crate::support::fake_llama::FakeLlama;
use crate::support::kvgate::{
    assert_api_error, complete_saves, group_turn, json_body, names_in, post_json, raw_exchange,
    send, spawn_post, test_config, Bare, Kvgate, Saving,
};

/// POSTs the JSON text `body` to `path` on `base`; status and JSON answer.
async fn post_json_text(base: &str, path: &str, body: &str) -> (u16, Value) {
    post(base, path, "application/json", body).await
}

/// POSTs `body` to `path` on `base`; status and JSON answer.
async fn post(base: &str, path: &str, content_type: &str, body: &str) -> (u16, Value) {
    let resp = send(
        "POST",
        &format!("{base}{path}"),
        &[("content-type", content_type)],
        body.to_string(),
    )
    .await;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, json_body(&bytes))
}

#[tokio::test]
async fn slot_actions_cannot_name_kvgates_own_files() {
    let s = Saving::start(2, |f| f, |_| {}).await;
    s.fake.clear_calls();
    // Something of kvgate's own to protect, as a real deployment has.
    std::fs::write(s.dir.join("kvgate-settings.json"), "{}").unwrap();
    let before = names_in(&s.dir);
    for name in [
        "kvgate-settings.json",
        "KVGATE-SETTINGS.JSON",
        "kvgate-instances.json",
        "chat_20260101120000_character_Alice.meta.json",
        ".kvgate-tmp-1-x.bin",
        ".kvgate.lock",
        "x_99991231235959_character_Alice.bin",
        "chat_20260101120000_tag_t_character_Bob.bin",
    ] {
        for action in ["save", "restore"] {
            let body = json!({ "filename": name }).to_string();
            let path = format!("/slots/0?action={action}");
            let (status, v) = post_json_text(&s.kv.url, &path, &body).await;
            assert_eq!(status, 400, "{action} {name}: {v}");
            assert_api_error(400, &v, name);
            assert!(
                v["error"]["message"].as_str().unwrap().contains(name),
                "the refusal names the file: {v}"
            );
        }
    }
    assert!(
        s.fake.slot_actions().is_empty(),
        "llama-server never saw them: {:?}",
        s.fake.slot_actions()
    );
    assert_eq!(names_in(&s.dir), before, "no file written or replaced");
    assert_eq!(
        std::fs::read_to_string(s.dir.join("kvgate-settings.json")).unwrap(),
        "{}"
    );

    // Every other name passes as before (llama.cpp's own tests use these).
    let body = json!({ "filename": "slot1.bin" }).to_string();
    let (status, v) = post_json_text(&s.kv.url, "/slots/0?action=save", &body).await;
    assert_eq!(status, 200, "{v}");
    assert!(s.dir.join("slot1.bin").is_file());
    let (status, v) = post_json_text(&s.kv.url, "/slots/1?action=restore", &body).await;
    assert_eq!(status, 200, "{v}");
    s.kv.wait_idle().await;
}

#[tokio::test]
async fn every_spelling_of_a_slot_waits_for_its_lease() {
    let roster = ["Alice", "Bob"];
    // llama-server decodes the path twice, reads the id with stoi and wraps
    // it in size_t (-2 is slot 0 of 2): each of these erases slot 0 there,
    // so each must wait for slot 0 here.
    for path in [
        "/slots/%30?action=erase",
        "/slots/0abc?action=erase",
        "/slots/%2530?action=erase",
        "/slots/0/?action=erase",
        "/slots/%20+0?action=erase",
        "/slots/0?action=%65rase",
        "/slots/2?action=erase",
        "/slots/-2?action=erase",
    ] {
        // A fresh pair each time: gate permits left over would let the next
        // generation finish early.
        let fake = FakeLlama::builder()
            .slots(2)
            .events(2)
            .gate(true)
            .build()
            .await;
        let kv = Kvgate::start(&fake.url(), |_| {}).await;
        let alice = spawn_post(
            &format!("{}/completion", kv.url),
            group_turn(&roster, "Alice", path),
        );
        assert!(
            fake.wait_for(Duration::from_secs(5), |f| f.slot_is_processing(0))
                .await,
            "Alice generates in slot 0"
        );
        let url = format!("{}{path}", kv.url);
        let erase = tokio::spawn(async move {
            let resp = send("POST", &url, &[], Bytes::new()).await;
            resp.status().as_u16()
        });
        kv.wait_queued(1).await;
        let reached = fake
            .calls()
            .iter()
            .filter(|c| c.path.starts_with("/slots/") && c.query.as_deref() != Some("action=save"))
            .count();
        assert_eq!(
            reached,
            0,
            "{path} reached llama-server during a generation: {:?}",
            fake.calls()
                .iter()
                .map(|c| (c.path.clone(), c.query.clone()))
                .collect::<Vec<_>>()
        );
        fake.set_gate(false);
        fake.release_events(10);
        assert_eq!(alice.await.unwrap().0, 200);
        erase.await.unwrap();
        kv.wait_idle().await;
        assert_eq!(
            kv.upstream.pool.snapshot()[0].owner,
            None,
            "{path}: after the erase slot 0 holds nobody"
        );
    }
}

#[tokio::test]
async fn ambiguous_slot_actions_are_refused() {
    let s = Saving::start(2, |f| f, |_| {}).await;
    s.fake.clear_calls();
    let body = json!({ "filename": "slot1.bin" }).to_string();
    let (status, v) = post_json_text(&s.kv.url, "/slots/0?action=save&action=restore", &body).await;
    assert_eq!(status, 400, "{v}");
    assert_api_error(400, &v, "two actions");
    // httplib adds a form body's fields to the query's.
    let (status, v) = post(
        &s.kv.url,
        "/slots/0",
        "application/x-www-form-urlencoded",
        "action=erase",
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_api_error(400, &v, "form body");
    // Nested deeper than kvgate reads: llama-server would read it.
    let deep = format!(
        "{{\"filename\":\"slot1.bin\",\"x\":{}1{}}}",
        "[".repeat(200),
        "]".repeat(200)
    );
    let (status, v) = post_json_text(&s.kv.url, "/slots/0?action=save", &deep).await;
    assert_eq!(status, 400, "{v}");
    assert!(s.fake.slot_actions().is_empty());
    assert!(s
        .fake
        .calls()
        .iter()
        .all(|c| !c.path.starts_with("/slots/")));
}

#[tokio::test]
async fn a_completion_names_its_slot_as_llama_server_reads_it() {
    let fake = FakeLlama::builder().slots(2).events(1).build().await;
    let kv = Kvgate::start(&fake.url(), |_| {}).await;
    let url = format!("{}/completion", kv.url);
    // A string is "any slot" to llama-server: kvgate places it and leases.
    let (status, headers, _) = post_json(&url, &[], &json!({"prompt": "x", "id_slot": "0"})).await;
    assert_eq!(status, 200);
    let slot = headers["x-kvgate-slot"].to_str().unwrap().to_string();
    assert_eq!(
        fake.completions().last().unwrap()["id_slot"],
        json!(slot.parse::<u64>().unwrap()),
        "forwarded with the slot kvgate leased"
    );
    // `true` and 1.9 are slot 1 to llama-server (nlohmann's int cast).
    for id in [json!(true), json!(1.9)] {
        let (status, headers, _) =
            post_json(&url, &[], &json!({"prompt": "x", "id_slot": id})).await;
        assert_eq!(status, 200);
        assert_eq!(headers["x-kvgate-slot"], "1", "{id}");
        assert_eq!(fake.completions().last().unwrap()["id_slot"], 1, "{id}");
    }
    // Too deep for kvgate to read, so it can't be leased: refused.
    let n = fake.completions().len();
    let deep = format!(
        "{{\"prompt\":\"x\",\"id_slot\":0,\"x\":{}1{}}}",
        "[".repeat(200),
        "]".repeat(200)
    );
    let (status, v) = post_json_text(&kv.url, "/completion", &deep).await;
    assert_eq!(status, 400, "{v}");
    assert_api_error(400, &v, "deep body");
    assert_eq!(fake.completions().len(), n, "it never reached llama-server");
    kv.wait_idle().await;
}

#[tokio::test]
async fn spellings_that_route_elsewhere_in_llama_server_are_leased_too() {
    let s = Saving::start(2, |f| f, |_| {}).await;
    s.fake.clear_calls();
    // httplib decodes the path before routing: this is /completion.
    let (status, headers, _) = post_json(
        &format!("{}/complet%69on", s.kv.url),
        &[],
        &json!({"prompt": "x", "id_slot": 1, "n_predict": 1}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-kvgate-slot"], "1", "leased like /completion");
    // Routes where llama-server generates in a slot chosen by id_slot.
    for path in ["/infill", "/v1/messages", "/v1/responses"] {
        let (_, headers, _) = post_json(
            &format!("{}{path}", s.kv.url),
            &[],
            &json!({"prompt": "x", "input_prefix": "a", "messages": [], "input": "x"}),
        )
        .await;
        let slot = headers["x-kvgate-slot"].to_str().unwrap();
        let sent = s.fake.calls_to(path).pop().unwrap().json().unwrap();
        assert_eq!(
            sent["id_slot"].to_string(),
            slot,
            "{path} pinned to its lease"
        );
    }
    // A byte-order mark, which llama-server skips: read, leased.
    let (status, v) = post_json_text(
        &s.kv.url,
        "/completion",
        "\u{feff}{\"prompt\":\"x\",\"id_slot\":0,\"n_predict\":1}",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let sent = s.fake.calls_to("/completion").pop().unwrap();
    assert!(sent.json().is_some(), "forwarded without the mark");
    s.kv.wait_idle().await;
}

#[tokio::test]
async fn several_answers_lease_the_slots_llama_server_runs_them_in() {
    let s = Saving::start(3, |f| f, |_| {}).await;
    let url = format!("{}/completion", s.kv.url);
    // Alice's turn leaves her unsaved in slot 0.
    let (status, headers, _) =
        post_json(&url, &[], &group_turn(&["Alice", "Bob"], "Alice", "")).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-kvgate-slot"], "0");
    s.kv.wait_idle().await;
    assert!(complete_saves(&s.dir).is_empty());
    // Two answers: the first in a free slot (1), the second where
    // llama-server will run it, the lowest other slot: Alice's, saved first.
    let (status, headers, _) = post_json(&url, &[], &json!({"prompt": "x", "n": 2})).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-kvgate-slot"], "1");
    s.kv.wait_idle().await;
    let sent = s
        .fake
        .calls_to("/completion")
        .pop()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        (sent["id_slot"].as_u64(), sent["n"].as_u64()),
        (Some(1), Some(2))
    );
    let saves = complete_saves(&s.dir);
    assert_eq!(saves.len(), 1, "{saves:?}");
    assert_eq!(
        (saves[0].character.as_str(), saves[0].kind.as_str()),
        ("Alice", "eviction")
    );
    let table = s.kv.upstream.pool.snapshot();
    assert_eq!(
        table[0].owner, None,
        "llama-server clears a further answer's slot"
    );
    assert!(table.iter().all(|slot| slot.lease.is_none()));
    // Three answers in 3 slots: every slot; n_cmpl wins over n.
    let (status, headers, _) =
        post_json(&url, &[], &json!({"prompt": "y", "n_cmpl": 3, "n": 1})).await;
    assert_eq!(status, 200);
    s.kv.wait_idle().await;
    let parent: usize = headers["x-kvgate-slot"].to_str().unwrap().parse().unwrap();
    let table = s.kv.upstream.pool.snapshot();
    for (id, slot) in table.iter().enumerate() {
        assert_eq!(slot.owner.is_some(), id == parent, "slot {id}: {slot:?}");
    }
    // More answers than slots: llama-server refuses it before any slot is
    // used, so kvgate forwards it in one lease for that answer.
    let (status, _, _) = post_json(&url, &[], &json!({"prompt": "z", "n_cmpl": 4})).await;
    assert_eq!(status, 200, "the fake answers; llama-server would refuse");
    let sent = s
        .fake
        .calls_to("/completion")
        .pop()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(sent["n_cmpl"], 4);
    s.kv.wait_idle().await;
}

#[tokio::test]
async fn several_answers_that_cannot_have_their_slots_lose_nobody_s_messages() {
    let s = Saving::start(2, |f| f, |c| c.queue_timeout = Duration::from_millis(300)).await;
    let url = format!("{}/completion", s.kv.url);
    // Alice unsaved in slot 0; Bob generating in slot 1 (held open).
    let (status, _, _) = post_json(&url, &[], &group_turn(&["Alice", "Bob"], "Alice", "")).await;
    assert_eq!(status, 200);
    s.kv.wait_idle().await;
    s.fake.set_gate(true);
    let bob = spawn_post(&url, group_turn(&["Alice", "Bob"], "Bob", "Alice: hi\n"));
    s.kv.wait_until("Bob in slot 1", Duration::from_secs(5), |u| {
        u.pool.snapshot()[1].lease.is_some()
    })
    .await;
    // Two answers: the request's own slot is Alice's (the only idle one);
    // the second answer's, Bob's, stays busy past the queue timeout.
    let (status, _, _) = post_json(&url, &[], &json!({"prompt": "x", "n": 2})).await;
    assert_eq!(status, 503);
    // Alice's message was saved before her slot was given away.
    let saves = complete_saves(&s.dir);
    assert_eq!(saves.len(), 1, "{saves:?}");
    assert_eq!(
        (saves[0].character.as_str(), saves[0].kind.as_str()),
        ("Alice", "eviction")
    );
    assert!(s.kv.upstream.pool.snapshot()[0].lease.is_none());
    s.fake.set_gate(false);
    assert_eq!(bob.await.unwrap().0, 200);
    s.kv.wait_idle().await;
}

#[tokio::test]
async fn slot_action_bodies_are_checked_as_llama_server_reads_them() {
    let s = Saving::start(2, |f| f, |_| {}).await;
    s.fake.clear_calls();
    // A byte-order mark before a reserved name.
    let (status, v) = post_json_text(
        &s.kv.url,
        "/slots/0?action=save",
        "\u{feff}{\"filename\":\"kvgate-settings.json\"}",
    )
    .await;
    assert_eq!(status, 400, "{v}");
    // A Content-Type kvgate can't read may be a form to httplib.
    let body = b"x=1&action=save";
    let mut request = format!(
        "POST /slots/0?action=erase HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\nContent-Type: application/x-www-form-urlencoded;",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(b"\xff\r\n\r\n");
    request.extend_from_slice(body);
    let (status, _, _) = raw_exchange(&s.kv.url, request).await;
    assert_eq!(status, 400);
    // A body kvgate can't read for a save: refused (llama-server refuses it
    // too), not passed by the check.
    let (status, v) = post_json_text(&s.kv.url, "/slots/0?action=save", "{oops").await;
    assert_eq!(status, 400, "{v}");
    assert!(
        s.fake.slot_actions().is_empty(),
        "{:?}",
        s.fake.slot_actions()
    );
    // llama-server gets the plain spelling of what kvgate leased.
    let (status, v) = post_json_text(&s.kv.url, "/slots/%2B3/?action=%65rase&x=y", "{}").await;
    assert_eq!(status, 200, "{v}");
    let call = s
        .fake
        .calls()
        .into_iter()
        .rev()
        .find(|c| c.path.starts_with("/slots/"))
        .unwrap();
    assert_eq!(
        (call.path.as_str(), call.query.as_deref()),
        ("/slots/1", Some("action=erase"))
    );
    s.kv.wait_idle().await;
}

#[tokio::test]
async fn without_its_slots_kvgate_passes_requests_through_unpinned() {
    // llama-server wants a key kvgate was not given: kvgate can't read its
    // slots, so it passes completions and slot actions through as
    // llama-server alone would answer them (it used to answer 503).
    const KEY: &str = "upstream-secret-0123";
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeLlama::builder()
        .slots(2)
        .events(1)
        .api_key(KEY)
        .save_dir(dir.path())
        .build()
        .await;
    let kv = Bare::start(test_config(&fake.url())).await;
    let url = format!("{}/completion", kv.url);
    let bearer = format!("Bearer {KEY}");
    let body = json!({"prompt": "x", "n_predict": 1});
    let (status, headers, _) = post_json(&url, &[("authorization", bearer.as_str())], &body).await;
    assert_eq!(status, 200);
    assert!(
        headers.get("x-kvgate-slot").is_none(),
        "unpinned: {headers:?}"
    );
    let sent = fake.completions().pop().unwrap();
    assert!(sent.get("id_slot").is_none(), "llama-server chose: {sent}");
    let (status, _, bytes) = post_json(&url, &[], &body).await;
    assert_eq!(status, 401, "llama-server's own answer");
    assert_api_error(401, &json_body(&bytes), "no key");
    let (status, _, _) = post_json(
        &format!("{}/slots/%30?action=erase", kv.url),
        &[("authorization", bearer.as_str())],
        &json!({}),
    )
    .await;
    assert_eq!(status, 200);
    let erase = fake
        .calls()
        .into_iter()
        .rev()
        .find(|c| c.path.starts_with("/slots/"))
        .unwrap();
    assert_eq!(
        (erase.path.as_str(), erase.query.as_deref()),
        ("/slots/0", Some("action=erase"))
    );
    kv.stop().await;
}
