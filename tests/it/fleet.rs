//! Several upstreams (fake llama-servers): a character stays on the
//! upstream holding its slot, a newcomer goes where slots are free, a
//! request's `model` selects among upstreams serving different models, and
//! an upstream that goes down is skipped, its characters restoring from the
//! shared save directory on another one.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::fake_llama::FakeLlama;
use crate::support::kvgate::{assert_api_error, json_body, post_json, Kvgate};

fn upstream(url: &str) -> hyper::Uri {
    kvgate::config::parse_upstream(url).expect("url")
}

/// One completion for `character` (explicit identity), naming `model` if
/// given; waits until kvgate is idle (its autosave done).
async fn say(kv: &Kvgate, character: &str, model: Option<&str>) -> hyper::HeaderMap {
    let mut body = json!({"prompt": format!("{character}: hello there"), "n_predict": 4});
    if let Some(m) = model {
        body["model"] = m.into();
    }
    let headers = [
        ("x-kvgate-chat", "tavern"),
        ("x-kvgate-character", character),
    ];
    let (status, h, bytes) = post_json(&format!("{}/completion", kv.url), &headers, &body).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    kv.wait_idle().await;
    h
}

/// Which upstream holds each character, from `GET /slots`.
async fn placement(kv: &Kvgate) -> BTreeMap<String, String> {
    kv.admin_slots()
        .await
        .iter()
        .filter_map(|s| {
            Some((
                s["character"].as_str()?.to_string(),
                s["upstream"].as_str()?.to_string(),
            ))
        })
        .collect()
}

async fn admin_post(kv: &Kvgate, path: &str, body: Value) -> (u16, Value) {
    let (status, _, bytes) = post_json(&format!("{}{path}", kv.admin_url), &[], &body).await;
    (status, json_body(&bytes))
}

#[tokio::test]
async fn characters_stay_where_their_cache_is_and_newcomers_go_where_slots_are_free() {
    let (f1, f2) = (
        FakeLlama::builder().slots(2).build().await,
        FakeLlama::builder().slots(2).build().await,
    );
    let kv = Kvgate::start(&f1.url(), |c| c.upstreams.push(upstream(&f2.url()))).await;
    assert_eq!(kv.app.upstreams().len(), 2);

    for who in ["Alice", "Bob", "Carol", "Dave"] {
        say(&kv, who, None).await;
    }
    // Alice: both empty, the first listed. Bob: 1 free against 2. Carol: a
    // tie again. Dave: the last free slot.
    let expected: BTreeMap<String, String> = [
        ("Alice", "upstream-1"),
        ("Bob", "upstream-2"),
        ("Carol", "upstream-1"),
        ("Dave", "upstream-2"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(placement(&kv).await, expected);
    assert_eq!(f1.calls_to("/completion").len(), 2);
    assert_eq!(f2.calls_to("/completion").len(), 2);

    // Everyone comes back to their own upstream, as a resident; the answer
    // names the upstream (slot ids are per upstream).
    for who in ["Dave", "Alice", "Carol", "Bob"] {
        let h = say(&kv, who, None).await;
        assert!(h.get("x-kvgate-restored").is_none(), "{who}: {h:?}");
        assert_eq!(h["x-kvgate-upstream"], expected[who].as_str(), "{who}");
    }
    assert_eq!(placement(&kv).await, expected);
    assert_eq!(f1.calls_to("/completion").len(), 4);
    assert_eq!(f2.calls_to("/completion").len(), 4);
    assert_eq!(kv.metric("kvgate_resident_hits_total").await, 4);
    assert_eq!(kv.metric("kvgate_evictions_total").await, 0);

    // Slot ids are per upstream: the admin API lists both tables, and a
    // slot action must say which upstream it means.
    let slots = kv.admin_slots().await;
    assert_eq!(slots.len(), 4);
    let v = kv.admin_get("/slots?upstream=upstream-2").await;
    let names: Vec<&str> = v["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["upstream"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["upstream-2", "upstream-2"]);
    let (status, v) = admin_post(&kv, "/slots/0/save", json!({})).await;
    assert_api_error(status, &v, "slot save without an upstream");
    assert_eq!(status, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("several upstreams"),
        "{v}"
    );
    let (status, v) = admin_post(&kv, "/slots/clear?upstream=nope", json!({})).await;
    assert_eq!(status, 404, "{v}");
    // A name that is empty or does not decode is an error, never "all".
    for bad in ["/slots/clear?upstream=", "/slots/clear?upstream=%ZZ"] {
        let (status, v) = admin_post(&kv, bad, json!({"erase": true})).await;
        assert_api_error(status, &v, bad);
        assert_eq!(status, 400, "{bad}: {v}");
    }
    assert_eq!(placement(&kv).await, expected, "nothing was cleared");
    let (status, v) = admin_post(&kv, "/slots/clear?upstream=upstream-2", json!({})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["cleared"], json!([0, 1]), "{v}");
    let ups = kv.admin_get("/upstreams").await;
    let ups = ups["upstreams"].as_array().unwrap();
    assert_eq!(ups.len(), 2);
    assert_eq!(ups[1]["name"], "upstream-2");
    assert_eq!(ups[1]["up"], true);
    assert_eq!(ups[1]["url"], upstream(&f2.url()).to_string());
    assert_eq!(kv.metric("kvgate_upstreams{state=\"up\"}").await, 2);
    kv.stop().await;
}

#[tokio::test]
async fn a_clients_own_slot_is_on_the_upstream_its_slot_actions_reach() {
    let (f1, f2) = (
        FakeLlama::builder().slots(2).build().await,
        FakeLlama::builder().slots(2).build().await,
    );
    let kv = Kvgate::start(&f1.url(), |c| c.upstreams.push(upstream(&f2.url()))).await;
    say(&kv, "Alice", None).await;
    // upstream-2 has more free slots now, but a client that manages slots
    // itself (`id_slot`, `POST /slots/{id}`) talks to the first upstream.
    let body = json!({"prompt": "raw client", "n_predict": 4, "id_slot": 1});
    let (status, h, _) = post_json(&format!("{}/completion", kv.url), &[], &body).await;
    assert_eq!(status, 200);
    assert_eq!(h["x-kvgate-upstream"], "upstream-1");
    kv.wait_idle().await;
    // (The fake answers 501 without a save directory: the route matters.)
    post_json(&format!("{}/slots/1?action=erase", kv.url), &[], &json!({})).await;
    let id_slots: Vec<Option<i64>> = f1
        .calls_to("/completion")
        .iter()
        .map(|c| c.json().and_then(|v| v["id_slot"].as_i64()))
        .collect();
    assert_eq!(id_slots, [Some(0), Some(1)]);
    assert_eq!(f1.calls_to("/slots/1").len(), 1);
    assert!(f2.calls_to("/completion").is_empty());
    kv.stop().await;
}

#[tokio::test]
async fn a_requests_model_selects_the_upstream_serving_it() {
    let f1 = FakeLlama::builder()
        .slots(2)
        .model_path("/models/alpha-7b.gguf")
        .build()
        .await;
    let f2 = FakeLlama::builder()
        .slots(2)
        .model_path("/models/beta-3b.gguf")
        .build()
        .await;
    let kv = Kvgate::start(&f1.url(), |c| c.upstreams.push(upstream(&f2.url()))).await;
    kv.wait_fingerprint().await;
    kv.wait_until(
        "both upstreams named their models",
        Duration::from_secs(10),
        |_| {
            kv.app
                .upstreams()
                .iter()
                .all(|a| !a.state.get().models.is_empty())
        },
    )
    .await;

    // beta has no more free slots than alpha: the model decides.
    say(&kv, "Alice", Some("beta-3b")).await;
    say(&kv, "Bob", Some("BETA-3B.gguf")).await;
    // A model nobody serves selects nothing (llama-server ignores it).
    say(&kv, "Carol", Some("gpt-4o")).await;
    let p = placement(&kv).await;
    assert_eq!(p["Alice"], "upstream-2");
    assert_eq!(p["Bob"], "upstream-2");
    assert_eq!(p["Carol"], "upstream-1");
    // beta is full now: a newcomer asking for it waits for one of its slots
    // (evicting there) rather than going to alpha's free one.
    say(&kv, "Dave", Some("beta-3b")).await;
    assert_eq!(placement(&kv).await["Dave"], "upstream-2");
    assert_eq!(kv.metric("kvgate_evictions_total").await, 1);
    let ups = kv.admin_get("/upstreams").await;
    assert!(
        ups["upstreams"][1]["models"]
            .as_array()
            .unwrap()
            .contains(&json!("beta-3b")),
        "{ups}"
    );
    kv.stop().await;
}

#[tokio::test]
async fn an_upstream_going_down_moves_its_characters_which_restore_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let fake = || FakeLlama::builder().slots(2).save_dir(dir.path()).build();
    let (f1, f2) = (fake().await, fake().await);
    let kv = Kvgate::start_saving(&f1.url(), dir.path(), |c| {
        c.upstreams.push(upstream(&f2.url()));
        c.cache.save_every = 1;
    })
    .await;
    say(&kv, "Alice", None).await;
    say(&kv, "Bob", None).await;
    assert_eq!(placement(&kv).await["Alice"], "upstream-1");
    // Autosaved after its turn (save_every 1).
    let alice_save = kvgate::store::CacheStore::open(dir.path())
        .unwrap()
        .list()
        .into_iter()
        .find(|m| m.character == "Alice")
        .expect("Alice's save");

    f1.stop().await;
    kv.wait_until("upstream-1 seen down", Duration::from_secs(10), |_| {
        !kv.app.upstream("upstream-1").unwrap().state.get().up
    })
    .await;
    assert_eq!(kv.metric("kvgate_upstreams{state=\"down\"}").await, 1);

    let h = say(&kv, "Alice", None).await;
    assert_eq!(
        h["x-kvgate-restored"].to_str().unwrap(),
        alice_save.file,
        "Alice restored her save on upstream-2"
    );
    let restores: Vec<_> = f2
        .calls()
        .into_iter()
        .filter(|c| c.query.as_deref() == Some("action=restore"))
        .collect();
    assert_eq!(restores.len(), 1, "{restores:?}");
    let p = placement(&kv).await;
    assert_eq!(p["Bob"], "upstream-2");
    // upstream-1 still lists Alice (its table is as last seen), but her
    // request went where her cache could be restored.
    assert_eq!(
        kv.admin_get("/slots?upstream=upstream-2").await["slots"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["character"] == "Alice")
            .count(),
        1
    );
    kv.stop().await;
}

#[tokio::test]
async fn a_sleeping_llama_server_is_not_woken_by_kvgate() {
    // llama-server wakes for `/slots` (and its idle clock restarts): kvgate
    // reads only `/props` while it sleeps, and knows the caches are gone.
    let fake = FakeLlama::builder().slots(2).events(1).build().await;
    let kv = Kvgate::start(&fake.url(), |c| {
        c.health_interval = Duration::from_millis(50);
    })
    .await;
    say(&kv, "Alice", None).await;
    kv.wait_idle().await;
    assert!(kv.upstream.pool.snapshot().iter().any(|s| s.live));
    fake.set_sleeping(true);
    kv.wait_until("caches known lost", Duration::from_secs(5), |u| {
        u.pool.snapshot().iter().all(|s| !s.live)
    })
    .await;
    fake.clear_calls();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let calls = fake.calls();
    assert!(calls.iter().any(|c| c.path == "/props"), "still watched");
    assert!(
        calls.iter().all(|c| c.path != "/slots"),
        "kvgate woke it: {:?}",
        calls.iter().map(|c| &c.path).collect::<Vec<_>>()
    );
    assert_eq!(
        kv.metric("kvgate_upstream_restarts_total").await,
        0,
        "not a restart"
    );
    fake.set_sleeping(false);
    say(&kv, "Alice", None).await;
}
