//! Cache files against a REAL llama-server: an evicted character comes back
//! with its cache restored from disk (`timings.cache_n` > 0), a restarted
//! llama-server is refilled from disk, and SIGTERM to the kvgate binary saves
//! every slot that has unsaved messages.

use std::time::Duration;

use kvgate::store::{SaveKind, SaveMeta};

use crate::support::kvgate::{saves_in, saving_over_llama, turn_through};
use crate::support::kvgate_bin::KvgateBin;
use crate::support::llama::{LlamaOpts, LlamaServer};
use crate::support::st_chat::GroupChat;

#[tokio::test]
async fn evicted_character_comes_back_from_disk_with_cache_reuse() {
    let Some((llama, kv)) = saving_over_llama(2, |c| c.cache.save_every = 5).await else {
        return;
    };
    let mut chat = GroupChat::demo(3);
    let names = chat.names();
    let (a, b, c) = (names[0].clone(), names[1].clone(), names[2].clone());
    turn_through(&kv.url, &mut chat, &a).await;
    turn_through(&kv.url, &mut chat, &b).await;
    // The third character evicts the first (least usage, least recent):
    // the first is saved before the slot changes hands.
    turn_through(&kv.url, &mut chat, &c).await;
    kv.wait_idle().await;
    // (The second character may also be saved behind during the third's
    // stream; this test is about the first.)
    let v: Vec<SaveMeta> = saves_in(&llama.save_dir)
        .into_iter()
        .filter(|m| m.character == a)
        .collect();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(
        (v[0].character.as_str(), v[0].kind),
        (a.as_str(), SaveKind::Eviction)
    );
    assert!(v[0].n_tokens > 500, "a card-sized cache: {}", v[0].n_tokens);

    // The first character returns: its save is restored into the slot it
    // gets, and llama-server reuses the restored prefix.
    let (h, last) = turn_through(&kv.url, &mut chat, &a).await;
    assert_eq!(h["x-kvgate-restored"], v[0].file.as_str());
    let cache_n = last["timings"]["cache_n"].as_u64().unwrap();
    let prompt_n = last["timings"]["prompt_n"].as_u64().unwrap();
    assert!(
        cache_n > 500,
        "restored tokens reused: cache_n={cache_n} prompt_n={prompt_n}"
    );
    assert_eq!(
        last["id_slot"].as_u64().unwrap().to_string(),
        h["x-kvgate-slot"].to_str().unwrap()
    );
    kv.wait_idle().await;
}

#[tokio::test]
async fn after_llama_server_restarts_the_next_request_restores_from_disk() {
    let Some((mut llama, kv)) = saving_over_llama(2, |c| c.cache.save_every = 1).await else {
        return;
    };
    let mut chat = GroupChat::demo(2);
    let a = chat.names()[0].clone();
    turn_through(&kv.url, &mut chat, &a).await; // autosaved (save_every = 1)
    kv.wait_idle().await;
    assert_eq!(saves_in(&llama.save_dir).len(), 1);

    llama.restart().await;
    kv.wait_all_lost(Duration::from_secs(10)).await;
    let (h, last) = turn_through(&kv.url, &mut chat, &a).await;
    assert!(h.get("x-kvgate-restored").is_some(), "restored from disk");
    let cache_n = last["timings"]["cache_n"].as_u64().unwrap();
    assert!(cache_n > 500, "cache_n={cache_n}");
    kv.wait_idle().await;
}

#[tokio::test]
async fn sigterm_saves_every_slot_with_unsaved_messages() {
    let Some(llama) = LlamaServer::start(LlamaOpts {
        slots: 2,
        ..LlamaOpts::default()
    })
    .await
    else {
        return;
    };
    let (upstream, dir) = (&llama.base_url, llama.save_dir.display().to_string());
    let args = [
        "--upstream",
        upstream,
        "--save-dir",
        &dir,
        "--health-interval",
        "0.1",
    ];
    let logs = tempfile::tempdir().unwrap();
    let ready = Duration::from_secs(20);
    let mut kv = KvgateBin::start(args, logs.path().join("kvgate.log"), 2, ready).await;
    let url = kv.url.clone();

    let mut chat = GroupChat::demo(2);
    let names = chat.names();
    turn_through(&url, &mut chat, &names[0]).await;
    turn_through(&url, &mut chat, &names[1]).await;
    assert!(
        saves_in(&llama.save_dir).is_empty(),
        "nothing saved before shutdown (save_every 5)"
    );

    let pid = kv.child.id().expect("pid").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(30), kv.child.wait())
        .await
        .expect("kvgate exits after SIGTERM")
        .unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    let mut who: Vec<(String, SaveKind)> = saves_in(&llama.save_dir)
        .into_iter()
        .map(|m| (m.character, m.kind))
        .collect();
    who.sort();
    let mut expected: Vec<(String, SaveKind)> = names
        .iter()
        .map(|n| (n.clone(), SaveKind::Shutdown))
        .collect();
    expected.sort();
    assert_eq!(who, expected);
    for m in saves_in(&llama.save_dir) {
        let size = std::fs::metadata(llama.save_dir.join(&m.file))
            .unwrap()
            .len();
        assert_eq!(size, m.bytes, "complete file for {}", m.file);
    }
}
