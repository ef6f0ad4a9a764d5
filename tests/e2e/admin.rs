//! The admin API's load and preload against a REAL llama-server (2 slots,
//! the tiny model): a save loaded through `POST /load`, and a group preload
//! through `POST /preload`, leave the character's cache in its slot, so its
//! next request reuses it (`timings.cache_n` > 0) without a restore.

use std::collections::BTreeSet;
use std::time::Duration;

use kvgate::store::SaveKind;
use serde_json::{json, Value};

use crate::support::kvgate::{
    preload_id, preload_succeeded, saves_in as saves, saving_over_llama, turn_through, Kvgate,
};
use crate::support::llama::http_json;
use crate::support::st_chat::GroupChat;

/// One turn through kvgate, then wait until kvgate is idle (its autosave
/// done).
async fn turn(kv: &Kvgate, chat: &mut GroupChat, speaker: &str) -> (hyper::HeaderMap, Value) {
    let out = turn_through(&kv.url, chat, speaker).await;
    kv.wait_idle().await;
    out
}

async fn admin(kv: &Kvgate, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    http_json(method, &format!("{}{path}", kv.admin_url), body).await
}

/// The slot id and chat `character` holds, from `GET /slots`.
async fn slot_of(kv: &Kvgate, character: &str) -> Option<(u64, String)> {
    kv.admin_slots().await.iter().find_map(|s| {
        (s["character"] == character).then(|| {
            (
                s["id"].as_u64().unwrap(),
                s["chat"].as_str().unwrap().to_string(),
            )
        })
    })
}

fn cache_n(last: &Value) -> u64 {
    last["timings"]["cache_n"]
        .as_u64()
        .expect("timings.cache_n")
}

fn header_slot(h: &hyper::HeaderMap) -> u64 {
    h["x-kvgate-slot"].to_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_loaded_save_is_in_its_slot_for_the_next_request() {
    let Some((_llama, kv)) = saving_over_llama(2, |_| {}).await else {
        return;
    };
    let mut chat = GroupChat::demo(3);
    let names = chat.names();
    let (a, b, c) = (names[0].clone(), names[1].clone(), names[2].clone());
    turn(&kv, &mut chat, &a).await;
    turn(&kv, &mut chat, &b).await;
    let (_, roster) = slot_of(&kv, &a).await.expect("a in a slot");

    // A manual save of both, then every slot dropped in llama-server too.
    let (status, v) = admin(&kv, "POST", "/save", Some(json!({}))).await;
    assert_eq!(status, 200, "{v}");
    let fa = v["saved"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["character"] == a.as_str())
        .unwrap_or_else(|| panic!("{a} not saved: {v}"))["file"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, v) = admin(&kv, "POST", "/slots/clear", Some(json!({"erase": true}))).await;
    assert_eq!(status, 200, "{v}");
    turn(&kv, &mut chat, &c).await;

    let (status, v) = admin(&kv, "POST", "/load", Some(json!({"items": [{"file": fa}]}))).await;
    assert_eq!(status, 200, "{v}");
    let loaded = &v["loaded"][0];
    assert_eq!(loaded["character"], a.as_str(), "{v}");
    assert_eq!(loaded["chat"], roster.as_str(), "{v}");
    assert!(loaded["tokens"].as_u64().unwrap() > 500, "{v}");
    let slot = loaded["slot"].as_u64().unwrap();
    assert_eq!(slot_of(&kv, &a).await, Some((slot, roster.clone())));

    // a's next message: the cache is already there, nothing to restore.
    let (h, last) = turn(&kv, &mut chat, &a).await;
    assert_eq!(header_slot(&h), slot);
    assert_eq!(last["id_slot"].as_u64(), Some(slot), "{last}");
    assert!(h.get("x-kvgate-restored").is_none(), "{h:?}");
    let n = cache_n(&last);
    assert!(
        n > 500,
        "loaded tokens reused: cache_n={n} prompt_n={}",
        last["timings"]["prompt_n"]
    );
}

#[tokio::test]
async fn a_group_preload_warms_every_characters_slot() {
    let Some((llama, kv)) = saving_over_llama(2, |_| {}).await else {
        return;
    };
    let mut chat = GroupChat::demo(3);
    let names = chat.names();
    let (a, b) = (names[0].clone(), names[1].clone());
    // kvgate sees both prompts; nothing is saved yet (save_every 5).
    turn(&kv, &mut chat, &a).await;
    turn(&kv, &mut chat, &b).await;
    assert!(saves(&llama.save_dir).is_empty());
    let (_, roster) = slot_of(&kv, &a).await.expect("a in a slot");
    let mut members: Vec<String> = names.clone();
    members.push(chat.user.clone());
    members.sort();
    assert_eq!(roster, members.join("+"), "the roster chat key");
    let (status, v) = admin(&kv, "POST", "/slots/clear", Some(json!({"erase": true}))).await;
    assert_eq!(status, 200, "{v}");

    let (status, v) = admin(
        &kv,
        "POST",
        "/preload",
        Some(json!({"chat": roster, "characters": [a, b]})),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let id = preload_id(&v);
    let p = kv.wait_preload(&id, Duration::from_secs(240)).await;
    assert_eq!(p["state"], "done", "{p}");
    assert_eq!(p["failed"], json!([]), "{p}");
    let ok = preload_succeeded(&p);
    assert_eq!(ok, BTreeSet::from([a.clone(), b.clone()]), "{p}");
    // Neither had a save: each was evaluated and saved as `preload`.
    let mut preloaded: Vec<String> = saves(&llama.save_dir)
        .into_iter()
        .filter(|m| m.kind == SaveKind::Preload && m.chat == roster)
        .map(|m| m.character)
        .collect();
    preloaded.sort();
    assert_eq!(preloaded, vec![a.clone(), b.clone()]);
    kv.wait_idle().await;

    for who in [&a, &b] {
        let (slot, chat_key) = slot_of(&kv, who).await.expect("preloaded into a slot");
        assert_eq!(chat_key, roster);
        let (h, last) = turn(&kv, &mut chat, who).await;
        assert_eq!(header_slot(&h), slot, "{who}");
        assert!(h.get("x-kvgate-restored").is_none(), "{who}: {h:?}");
        let n = cache_n(&last);
        assert!(
            n > 500,
            "{who}: preloaded prompt reused: cache_n={n} prompt_n={}",
            last["timings"]["prompt_n"]
        );
    }
}
