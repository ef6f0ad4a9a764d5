//! Clients of a clients file against the fake llama-server: each sees only
//! its own work in `GET /slots`, and one client can't take the whole wait
//! queue or jump ahead of the others.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::fake_llama::FakeLlama;
use crate::support::kvgate::{assert_api_error, group_turn, json_body, post_json, send, Kvgate};

const HOME: &str = "Bearer k-home-0123456789";
const OTHER: &str = "Bearer k-other-0123456789";
const ROSTER: [&str; 5] = ["A", "B", "C", "D", "E"];

/// A clients file with two trusted clients, `home` and `other`.
fn clients_file(dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("clients.toml");
    std::fs::write(
        &path,
        "[[client]]\nid = \"home\"\nkey = \"k-home-0123456789\"\ntrusted = true\n\n\
         [[client]]\nid = \"other\"\nkey = \"k-other-0123456789\"\ntrusted = true\n",
    )
    .unwrap();
    path
}

/// `speaker`'s turn sent by the client whose bearer is `who`.
fn turn_by(kv: &Kvgate, who: &'static str, speaker: &str) -> tokio::task::JoinHandle<u16> {
    let url = format!("{}/completion", kv.url);
    let body = group_turn(&ROSTER, speaker, speaker);
    tokio::spawn(async move { post_json(&url, &[("authorization", who)], &body).await.0 })
}

/// `GET /slots` (spelled `path`) as the client whose bearer is `who`.
async fn listing_as(kv: &Kvgate, path: &str, who: &str) -> Vec<Value> {
    let resp = send(
        "GET",
        &format!("{}{path}", kv.url),
        &[("authorization", who)],
        "",
    )
    .await;
    assert_eq!(resp.status(), 200);
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    json_body(&bytes).as_array().unwrap().clone()
}

#[tokio::test]
async fn each_client_sees_only_its_own_slots() {
    let dir = tempfile::tempdir().unwrap();
    let clients = clients_file(&dir);
    let fake = FakeLlama::builder().slots(2).events(2).build().await;
    let kv = Kvgate::start(&fake.url(), |c| c.clients = Some(clients)).await;
    assert_eq!(turn_by(&kv, HOME, "A").await.unwrap(), 200);
    assert_eq!(turn_by(&kv, OTHER, "B").await.unwrap(), 200);
    kv.wait_idle().await;
    let owner = |name: &str| {
        kv.upstream
            .pool
            .snapshot()
            .iter()
            .position(|s| s.owner.as_ref().and_then(|t| t.character()) == Some(name))
            .unwrap()
    };
    let (home_slot, other_slot) = (owner("A"), owner("B"));
    for (who, mine, theirs) in [
        (HOME, home_slot, other_slot),
        (OTHER, other_slot, home_slot),
    ] {
        let slots = listing_as(&kv, "/slots", who).await;
        assert_eq!(slots.len(), 2, "every slot keeps its place");
        assert!(
            slots[mine].get("id_task").is_some() && slots[mine].get("params").is_some(),
            "a client sees its own slot in full: {}",
            slots[mine]
        );
        assert_eq!(
            slots[theirs],
            json!({"id": theirs, "n_ctx": fake.n_ctx(), "is_processing": false}),
            "nothing of another client's work"
        );
    }
}

#[tokio::test]
async fn one_client_gets_its_share_of_the_queue_and_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let clients = clients_file(&dir);
    let fake = FakeLlama::builder()
        .slots(2)
        .events(2)
        .gate(true)
        .build()
        .await;
    let kv = Kvgate::start(&fake.url(), |c| {
        c.clients = Some(clients);
        c.max_queue = 3;
        c.max_queue_per_client = 1;
    })
    .await;
    // The greedy client fills both slots and queues one more.
    let a = turn_by(&kv, HOME, "A");
    let b = turn_by(&kv, HOME, "B");
    assert!(
        fake.wait_for(Duration::from_secs(5), |f| f.slot_is_processing(0)
            && f.slot_is_processing(1))
            .await
    );
    let c = turn_by(&kv, HOME, "C");
    kv.wait_queued(1).await;
    // Its next request is over its share: 503, while the queue has room.
    let url = format!("{}/completion", kv.url);
    let (status, _, bytes) = post_json(
        &url,
        &[("authorization", HOME)],
        &group_turn(&ROSTER, "D", "D"),
    )
    .await;
    assert_eq!(status, 503);
    let v = json_body(&bytes);
    assert_api_error(503, &v, "over the client's share");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("this client"),
        "{v}"
    );
    // The other client still gets in line, and is served first: it holds
    // no slot while the greedy client holds one.
    let e = turn_by(&kv, OTHER, "E");
    kv.wait_queued(2).await;
    fake.set_gate(false);
    fake.release_events(100);
    for h in [a, b, c, e] {
        assert_eq!(h.await.unwrap(), 200);
    }
    let order: Vec<String> = fake
        .completions()
        .iter()
        .map(|b| {
            b["prompt"]
                .as_str()
                .unwrap()
                .lines()
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    let pos = |who: &str| {
        order
            .iter()
            .position(|l| l.contains(&format!("Write {who}'s")))
            .unwrap()
    };
    assert!(
        pos("E") < pos("C"),
        "the other client went first: {order:?}"
    );
    kv.wait_idle().await;
}

#[tokio::test]
async fn encoded_listings_are_cut_down_and_only_own_slots_can_be_saved() {
    let dir = tempfile::tempdir().unwrap();
    let clients = clients_file(&dir);
    let s = crate::support::kvgate::Saving::start(2, |f| f, |c| c.clients = Some(clients)).await;
    let kv = &s.kv;
    assert_eq!(turn_by(kv, HOME, "A").await.unwrap(), 200);
    kv.wait_idle().await;
    let home_slot = kv
        .upstream
        .pool
        .snapshot()
        .iter()
        .position(|s| s.owner.is_some())
        .unwrap();
    // httplib decodes /%73lots to /slots: the other client still sees
    // nothing of home's work.
    let listing = listing_as(kv, "/%73lots", OTHER).await;
    assert_eq!(listing.len(), 2, "the listing itself: {listing:?}");
    assert!(listing[home_slot].get("id_task").is_none(), "{listing:?}");
    // Saving home's slot (to restore it into its own) is home's alone.
    let save = |who: &'static str| {
        let url = format!("{}/slots/{home_slot}?action=save", kv.url);
        async move {
            post_json(
                &url,
                &[("authorization", who)],
                &json!({"filename": "copy.bin"}),
            )
            .await
            .0
        }
    };
    assert_eq!(save(OTHER).await, 403);
    assert!(!s.dir.join("copy.bin").exists());
    assert_eq!(save(HOME).await, 200);
    assert!(s.dir.join("copy.bin").is_file());
    kv.wait_idle().await;
}
