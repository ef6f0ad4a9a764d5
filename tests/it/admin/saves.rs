//! Saves: `GET /saves` grouped by chat and character and filtered, the save
//! endpoints (tags, counters, rotation, refusals, failures) and `POST /load`
//! into slots.

use std::collections::BTreeSet;

use kvgate::store::{SaveKind, SaveMeta};
use serde_json::{json, Value};

use crate::support::kvgate::{assert_api_error, saves_in as saves, Kvgate, Saving};

use super::{
    admin, alice_and_bob_saved, cache_n, meta_of, names, poll, saved_file, say, setup, slot_of,
    slot_with, turn, with_identity, CHAT,
};

/// `POST /load` with these items.
async fn load(kv: &Kvgate, items: Value) -> (u16, Value) {
    admin(kv, "POST", "/load", Some(json!({ "items": items }))).await
}

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
