//! Cache files against the fake llama-server, which writes real slot files:
//! checked saves, restores before the generation, autosave and rotation,
//! chat switches, failures that must leave nothing behind.

use std::time::Duration;

use kvgate::store::{SaveKind, SaveMeta, TEMP_PREFIX};
use serde_json::{json, Value};

use crate::support::fake_llama::FakeLlama;
use crate::support::kvgate::{
    complete_saves, names_in as names, post_json, saves_in as saves, Saving,
};

const ROSTER: [&str; 4] = ["Alice", "Bob", "Carol", "Dave"];

/// A group turn in this file's chat.
fn turn(speaker: &str, history: &str) -> Value {
    crate::support::kvgate::group_turn(&ROSTER, speaker, history)
}

type Setup = Saving;

async fn setup(slots: usize, tweak: impl FnOnce(&mut kvgate::config::Config)) -> Setup {
    Saving::start(slots, |b| b, tweak).await
}

/// Slot actions llama-server performed (without kvgate's start-up probe,
/// a save with an empty name that llama-server refuses).
fn slot_actions(fake: &FakeLlama) -> Vec<(usize, String, Option<String>)> {
    fake.slot_actions()
        .into_iter()
        .filter(|a| a.2.as_deref() != Some(""))
        .collect()
}

async fn say(s: &Setup, speaker: &str, history: &str) -> (u16, hyper::HeaderMap, Vec<Value>) {
    s.kv.say_body(&turn(speaker, history)).await
}

#[tokio::test]
async fn evicted_character_is_saved_then_restored_with_cache_reuse() {
    let s = setup(2, |_| {}).await;
    let h1 = "User: Hello!";
    say(&s, "Alice", h1).await;
    say(&s, "Bob", h1).await;
    assert!(saves(&s.dir).is_empty(), "nothing saved yet");
    // Carol evicts the least used (Alice, usage 1, older): Alice is saved
    // first, inside Carol's lease, before Carol's generation.
    let (_, h, _) = say(&s, "Carol", h1).await;
    assert_eq!(h["x-kvgate-slot"], "0");
    // (Bob may also be saved behind during Carol's stream: that is the
    // save-behind test's subject, not this one's.)
    let v: Vec<SaveMeta> = saves(&s.dir)
        .into_iter()
        .filter(|m| m.character == "Alice")
        .collect();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(
        (v[0].character.as_str(), v[0].kind, v[0].chat.as_str()),
        ("Alice", SaveKind::Eviction, "Alice+Bob+Carol+Dave+User")
    );
    assert!(v[0].n_tokens > 10);
    assert!(v[0].fingerprint.is_some());
    let actions = slot_actions(&s.fake);
    assert_eq!(
        (actions[0].0, actions[0].1.as_str()),
        (0, "save"),
        "Alice's slot saved first"
    );
    assert!(
        actions[0].2.as_deref().unwrap().starts_with(TEMP_PREFIX),
        "llama-server writes a temporary name"
    );

    // Alice comes back (history grew): her save is restored into the slot
    // she gets, right before her generation, and llama-server reuses it.
    let h2 = "User: Hello!\nBob: Hi.\nCarol: Hey.";
    let (status, h, events) = say(&s, "Alice", h2).await;
    assert_eq!(status, 200);
    assert_eq!(h["x-kvgate-restored"], v[0].file.as_str());
    let slot: usize = h["x-kvgate-slot"].to_str().unwrap().parse().unwrap();
    let actions = slot_actions(&s.fake);
    let restore = actions
        .iter()
        .find(|a| a.1 == "restore")
        .expect("a restore");
    assert_eq!(
        (restore.0, restore.2.as_deref()),
        (slot, Some(v[0].file.as_str()))
    );
    let last = events.last().unwrap();
    assert!(
        last["timings"]["cache_n"].as_u64().unwrap() > 10,
        "restored prefix reused: {last}"
    );
    // The restore happened after Alice's slot's previous owner was saved and
    // before Alice's completion reached llama-server.
    let calls = s.fake.calls();
    let restore_at = calls
        .iter()
        .position(|c| c.query.as_deref() == Some("action=restore"))
        .unwrap();
    let alice_again = calls.iter().rposition(|c| c.is_completion()).unwrap();
    assert!(restore_at < alice_again);
    assert_eq!(
        s.kv.upstream.pool.snapshot()[slot].usage,
        1,
        "restore resets, the new message counts"
    );
}

#[tokio::test]
async fn autosave_every_n_messages_with_rotation() {
    let s = setup(1, |c| {
        c.cache.save_every = 2;
        c.cache.max_files = 3;
    })
    .await;
    let mut history = String::from("User: Hi");
    for i in 0..10 {
        history.push_str(&format!("\nUser: message {i}"));
        say(&s, "Alice", &history).await;
    }
    let v = saves(&s.dir);
    assert_eq!(v.len(), 3, "5 autosaves, rotated down to 3: {v:?}");
    assert!(v
        .iter()
        .all(|m| m.kind == SaveKind::Autosave && m.character == "Alice"));
    assert_eq!(
        slot_actions(&s.fake)
            .iter()
            .filter(|a| a.1 == "save")
            .count(),
        5
    );
    // Tokens grow from save to save: the newest holds the longest history.
    assert!(v[0].n_tokens < v[2].n_tokens);
    let bins: Vec<String> = names(&s.dir)
        .into_iter()
        .filter(|n| n.ends_with(".bin"))
        .collect();
    assert_eq!(bins.len(), 3, "{bins:?}");
    assert_eq!(
        s.kv.upstream.pool.snapshot()[0].usage,
        0,
        "the 10th message was just saved"
    );
}

#[tokio::test]
async fn failed_save_keeps_no_file_and_no_reset_then_retries() {
    let s = setup(1, |c| c.cache.save_every = 2).await;
    say(&s, "Alice", "User: one").await;
    s.fake.fail_next_save(500);
    say(&s, "Alice", "User: one\nUser: two").await;
    assert!(complete_saves(&s.dir).is_empty());
    assert_eq!(
        s.kv.upstream.pool.snapshot()[0].usage,
        2,
        "counter not reset by a failed save"
    );
    say(&s, "Alice", "User: one\nUser: two\nUser: three").await;
    let v = saves(&s.dir);
    assert_eq!(v.len(), 1, "the next autosave retried");
    assert_eq!(s.kv.upstream.pool.snapshot()[0].usage, 0);
}

#[tokio::test]
async fn saves_under_min_save_bytes_are_refused_and_leave_nothing() {
    // The fake's slot files are a few hundred bytes.
    let s = setup(1, |c| {
        c.cache.save_every = 1;
        c.cache.min_save_bytes = 1 << 20;
    })
    .await;
    say(&s, "Alice", "User: one").await;
    assert!(complete_saves(&s.dir).is_empty());
    assert_eq!(
        s.kv.upstream.pool.snapshot()[0].usage,
        1,
        "nothing was saved"
    );
}

#[tokio::test]
async fn failed_restore_still_generates_on_an_empty_slot() {
    let s = setup(1, |_| {}).await;
    say(&s, "Alice", "User: a").await;
    say(&s, "Bob", "User: a").await; // evicts and saves Alice
    assert_eq!(saves(&s.dir).len(), 1);
    s.fake.fail_next_restore();
    let (status, h, events) = say(&s, "Alice", "User: a\nBob: b").await; // evicts Bob, restores Alice
    assert_eq!(status, 200);
    assert!(h.get("x-kvgate-restored").is_none());
    assert_eq!(events.last().unwrap()["stop"], true);
    assert_eq!(
        s.kv.upstream
            .shared
            .metrics
            .restore_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn chat_switch_saves_and_releases_the_previous_chat_but_speaker_changes_do_not() {
    let s = setup(3, |_| {}).await;
    // A group chat: speakers change, history is trimmed from the front (as
    // SillyTavern does once the context is full) — never a chat switch.
    say(&s, "Alice", "User: Hi all\nAlice: Hello").await;
    say(&s, "Bob", "User: Hi all\nAlice: Hello\nBob: Hey").await;
    say(&s, "Alice", "Bob: Hey\nUser: trimmed history").await;
    assert!(
        saves(&s.dir).is_empty(),
        "no chat switch inside one group chat"
    );
    // The same client opens a 1:1 chat with Carol: a different roster.
    let solo = json!({
        "prompt": "Write Carol's next reply.\nUser: Hi Carol\nCarol:",
        "stop": ["\nUser:", "\n***"],
        "stream": true,
        "n_predict": 4,
    });
    let (status, h, _) = post_json(&format!("{}/completion", s.kv.url), &[], &solo).await;
    s.kv.wait_idle().await;
    assert_eq!(status, 200);
    let v = saves(&s.dir);
    let mut who: Vec<(&str, SaveKind)> = v.iter().map(|m| (m.character.as_str(), m.kind)).collect();
    who.sort();
    assert_eq!(
        who,
        vec![
            ("Alice", SaveKind::ChatSwitch),
            ("Bob", SaveKind::ChatSwitch)
        ]
    );
    assert_eq!(
        h["x-kvgate-slot"], "0",
        "the previous chat's slots were released"
    );
    let owners: Vec<Option<String>> =
        s.kv.upstream
            .pool
            .snapshot()
            .iter()
            .map(|x| {
                x.owner
                    .as_ref()
                    .and_then(|t| t.character().map(str::to_string))
            })
            .collect();
    assert_eq!(owners, vec![Some("Carol".to_string()), None, None]);

    // Another client (another API key) in another chat is no switch for the first.
    let before = saves(&s.dir).len();
    let (status, _, _) = post_json(
        &format!("{}/completion", s.kv.url),
        &[("authorization", "Bearer other-user")],
        &turn("Dave", "User: hi"),
    )
    .await;
    s.kv.wait_idle().await;
    assert_eq!(status, 200);
    assert_eq!(saves(&s.dir).len(), before);
}

#[tokio::test]
async fn restart_of_llama_server_means_restore_from_disk() {
    let s = setup(2, |c| c.cache.save_every = 1).await;
    say(&s, "Alice", "User: a").await; // autosaved
    assert_eq!(saves(&s.dir).len(), 1);
    s.fake.restart().await;
    s.kv.wait_all_lost(Duration::from_secs(5)).await;
    let (status, h, events) = say(&s, "Alice", "User: a\nBob: b").await;
    assert_eq!(status, 200);
    assert!(
        h.get("x-kvgate-restored").is_some(),
        "restored after the restart"
    );
    assert!(
        events.last().unwrap()["timings"]["cache_n"]
            .as_u64()
            .unwrap()
            > 5
    );
}

#[tokio::test]
async fn saves_of_another_model_are_listed_but_never_restored() {
    let s = setup(1, |c| c.cache.save_every = 1).await;
    say(&s, "Alice", "User: a").await;
    assert_eq!(saves(&s.dir).len(), 1);
    // llama-server comes back with another model.
    let before = s.kv.upstream.fingerprint.get().expect("fingerprint");
    s.fake.set_model_path("/models/other.gguf");
    s.fake.restart().await;
    // kvgate has noticed: a new fingerprint, and Alice's slot is not live.
    s.kv.wait_until(
        "kvgate to notice the new model",
        Duration::from_secs(5),
        |app| app.fingerprint.get().as_ref() != Some(&before) && !app.pool.snapshot()[0].live,
    )
    .await;
    let (status, h, _) = say(&s, "Alice", "User: a\nBob: b").await;
    assert_eq!(status, 200);
    assert!(
        h.get("x-kvgate-restored").is_none(),
        "a save of another model must not be restored"
    );
    assert!(slot_actions(&s.fake).iter().all(|a| a.1 != "restore"));
    assert_eq!(
        saves(&s.dir).len(),
        2,
        "the old save stays, a new one is made under the new model"
    );
    let v = saves(&s.dir);
    assert_eq!(v[0].fingerprint.as_deref(), Some(before.id.as_str()));
    assert_ne!(v[0].fingerprint, v[1].fingerprint, "{v:?}");
}

#[tokio::test]
async fn shutdown_saves_every_slot_with_unsaved_messages() {
    let s = setup(2, |_| {}).await;
    say(&s, "Alice", "User: a").await;
    say(&s, "Bob", "User: a").await;
    assert!(saves(&s.dir).is_empty());
    let Setup { fake, kv, dir, .. } = s;
    kv.stop().await;
    let v = saves(&dir);
    let mut who: Vec<(&str, SaveKind)> = v.iter().map(|m| (m.character.as_str(), m.kind)).collect();
    who.sort();
    assert_eq!(
        who,
        vec![("Alice", SaveKind::Shutdown), ("Bob", SaveKind::Shutdown)]
    );
    drop(fake);
}

#[tokio::test]
async fn client_slot_actions_pass_through_and_update_the_table() {
    let s = setup(2, |_| {}).await;
    say(&s, "Alice", "User: a").await;
    // A client erases slot 0 itself: Alice's unsaved message is saved first,
    // then the slot is empty as far as kvgate knows.
    let (status, _, body) = post_json(
        &format!("{}/slots/0?action=erase", s.kv.url),
        &[],
        &json!({}),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    s.kv.wait_idle().await;
    assert_eq!(s.kv.upstream.pool.snapshot()[0].owner, None);
    assert_eq!(saves(&s.dir).len(), 1);
    assert_eq!(saves(&s.dir)[0].kind, SaveKind::Eviction);
    // A client's own save goes through and leaves ownership alone.
    say(&s, "Bob", "User: b").await;
    let (status, _, _) = post_json(
        &format!("{}/slots/0?action=save", s.kv.url),
        &[],
        &json!({"filename": "mine.bin"}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(&s.dir.join("mine.bin").exists());
    assert_eq!(
        s.kv.upstream.pool.snapshot()[0]
            .owner
            .as_ref()
            .and_then(|t| t.character()),
        Some("Bob")
    );
}

#[tokio::test]
async fn a_save_that_dies_midway_leaves_no_file() {
    let s = setup(1, |c| c.cache.save_every = 1).await;
    s.fake.set_save_delay(Duration::from_millis(400));
    let url = format!("{}/completion", s.kv.url);
    let (status, _, _) = post_json(&url, &[], &turn("Alice", "User: a")).await;
    assert_eq!(
        status, 200,
        "the client's stream is complete before the autosave"
    );
    // The autosave is under way (llama-server is slow to write): kill it.
    assert!(
        s.fake
            .wait_for(Duration::from_secs(5), |f| f
                .slot_actions()
                .iter()
                .any(|a| a.1 == "save" && a.2.as_deref() != Some("")))
            .await
    );
    s.fake.kill().await;
    s.kv.wait_idle().await;
    // Nothing of the broken save stays.
    assert!(complete_saves(&s.dir).is_empty());
    assert_eq!(
        s.kv.upstream.pool.snapshot()[0].usage,
        1,
        "the message is still unsaved"
    );
}

#[tokio::test]
async fn save_behind_keeps_saves_off_the_next_speakers_path() {
    let s = setup(2, |_| {}).await;
    say(&s, "Alice", "User: a").await;
    say(&s, "Bob", "User: a\nAlice: hi").await;
    // Carol evicts Alice (saved before eviction: no pressure was known yet).
    say(&s, "Carol", "User: a\nAlice: hi\nBob: yo").await;
    // Now there is pressure. During Dave's (slow) stream, the idle dirty
    // slot — Bob's or Carol's, whichever Dave does not take — is saved
    // behind, not when the next speaker needs it.
    s.fake.set_event_delay(Duration::from_millis(60));
    say(&s, "Dave", "User: a\nAlice: hi\nBob: yo\nCarol: hey").await;
    let after_dave = saves(&s.dir);
    let snapshot = s.kv.upstream.pool.snapshot();
    let dirty_idle = snapshot
        .iter()
        .filter(|x| x.usage >= 1 && x.owner.as_ref().and_then(|t| t.character()) != Some("Dave"))
        .count();
    assert_eq!(
        dirty_idle, 0,
        "the other slot was saved during Dave's stream: {snapshot:?}"
    );
    assert!(after_dave.len() >= 2, "{after_dave:?}");
    // The next speaker evicts the clean slot: no save on its path, only a
    // restore. (Dave's slot is saved behind once Alice's first token is out.)
    s.fake.set_event_delay(Duration::from_millis(0));
    s.fake.clear_calls();
    let (status, h, _) = say(
        &s,
        "Alice",
        "User: a\nAlice: hi\nBob: yo\nCarol: hey\nDave: hello",
    )
    .await;
    assert_eq!(status, 200);
    assert!(h.get("x-kvgate-restored").is_some(), "Alice was restored");
    let calls = s.fake.calls();
    let alice = calls
        .iter()
        .position(|c| c.is_completion())
        .expect("Alice's completion");
    let on_path: Vec<_> = calls[..alice]
        .iter()
        .filter(|c| c.query.as_deref().is_some_and(|q| q.contains("action=")))
        .map(|c| c.query.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        on_path,
        vec!["action=restore".to_string()],
        "only a restore before Alice's generation"
    );
}
