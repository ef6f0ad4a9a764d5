//! Idle saves against the fake llama-server: once no generation has run
//! for `idle_save_s`, the characters' unsaved messages are saved (kind
//! `idle`); never while a generation runs; never when the setting is 0.

use std::time::Duration;

use crate::support::kvgate::{
    complete_saves, group_turn, poll_until, post_json, saves_in, spawn_post, Saving,
};

/// The (character, kind) of every save in `dir` (as its sidecar says:
/// readable while a save is under way), sorted.
fn saved(dir: &std::path::Path) -> Vec<(String, String)> {
    let mut v: Vec<_> = saves_in(dir)
        .into_iter()
        .map(|m| (m.character, m.kind.as_str().to_string()))
        .collect();
    v.sort();
    v
}

fn pair(name: &str) -> (String, String) {
    (name.to_string(), "idle".to_string())
}

#[tokio::test]
async fn a_quiet_moment_saves_what_is_unsaved() {
    let s = Saving::start(2, |f| f, |c| c.cache.idle_save_s = 1).await;
    let url = format!("{}/completion", s.kv.url);
    let (status, _, _) = post_json(&url, &[], &group_turn(&["Alice", "Bob"], "Alice", "")).await;
    assert_eq!(status, 200);
    assert!(
        saved(&s.dir).is_empty(),
        "not at once: the user may answer quickly"
    );
    poll_until("an idle save", Duration::from_secs(5), || {
        !saved(&s.dir).is_empty()
    })
    .await;
    s.kv.wait_idle().await;
    assert_eq!(complete_saves(&s.dir).len(), 1);
    assert_eq!(saved(&s.dir), vec![pair("Alice")]);
    assert_eq!(s.usage(0), 0, "nothing unsaved is left");
    // Nothing new, nothing saved again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(saved(&s.dir).len(), 1);
}

#[tokio::test]
async fn nothing_is_saved_while_a_generation_runs() {
    let s = Saving::start(2, |f| f, |c| c.cache.idle_save_s = 1).await;
    let url = format!("{}/completion", s.kv.url);
    let (status, _, _) = post_json(&url, &[], &group_turn(&["Alice", "Bob"], "Alice", "")).await;
    assert_eq!(status, 200);
    // Bob's generation starts at once and runs for 2.5 s.
    s.fake.set_gate(true);
    let bob = spawn_post(&url, group_turn(&["Alice", "Bob"], "Bob", "Alice: hi\n"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        saved(&s.dir).is_empty(),
        "llama-server was busy: {:?}",
        saved(&s.dir)
    );
    s.fake.set_gate(false);
    assert_eq!(bob.await.unwrap().0, 200);
    poll_until("idle saves", Duration::from_secs(5), || {
        saved(&s.dir).len() == 2
    })
    .await;
    s.kv.wait_idle().await;
    assert_eq!(complete_saves(&s.dir).len(), 2);
    assert_eq!(saved(&s.dir), vec![pair("Alice"), pair("Bob")]);
}

#[tokio::test]
async fn zero_turns_idle_saves_off() {
    let s = Saving::start(2, |f| f, |c| c.cache.idle_save_s = 0).await;
    let url = format!("{}/completion", s.kv.url);
    let (status, _, _) = post_json(&url, &[], &group_turn(&["Alice", "Bob"], "Alice", "")).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(saved(&s.dir).is_empty(), "{:?}", saved(&s.dir));
}
