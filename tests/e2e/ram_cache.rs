//! kvgate and llama-server's RAM prompt cache, against a REAL llama-server:
//! a character whose slot another one took comes back from llama-server's
//! RAM (no disk restore, most of its prompt cached); with `--cache-ram 0`
//! the first such turn is a miss, and kvgate restores from disk after it.

use crate::support::kvgate::{turn_through, Kvgate};
use crate::support::llama::{LlamaOpts, LlamaServer};
use crate::support::st_chat::GroupChat;

const HITS: &str = "kvgate_ram_cache_loads_total{result=\"hit\"}";
const MISSES: &str = "kvgate_ram_cache_loads_total{result=\"miss\"}";

/// llama-server with `extra` arguments and kvgate (RAM cache relied on) in
/// front of it.
async fn over(extra: &[&str]) -> Option<(LlamaServer, Kvgate)> {
    let llama = LlamaServer::start(LlamaOpts {
        slots: 2,
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
        ..LlamaOpts::default()
    })
    .await?;
    let kv = Kvgate::start_saving(&llama.base_url, &llama.save_dir, |c| {
        c.ram_cache = true;
        c.cache.save_every = 100;
    })
    .await;
    Some((llama, kv))
}

/// Three speakers on two slots, in SillyTavern's default swap-cards mode:
/// the third takes the first's slot, then the first comes back.
async fn rotate(kv: &Kvgate, chat: &mut GroupChat) -> (hyper::HeaderMap, serde_json::Value, usize) {
    let names = chat.names();
    for name in &names {
        turn_through(&kv.url, chat, name).await;
    }
    let (h, last) = turn_through(&kv.url, chat, &names[0]).await;
    kv.wait_idle().await;
    let prompt_tokens = last["timings"]["cache_n"].as_u64().unwrap()
        + last["timings"]["prompt_n"].as_u64().unwrap();
    (h, last, prompt_tokens as usize)
}

#[tokio::test]
async fn a_character_whose_slot_was_taken_comes_back_from_llama_servers_ram() {
    let Some((_llama, kv)) = over(&[]).await else {
        return;
    };
    let restores = kv.metric("kvgate_restores_total").await;
    let (h, last, total) = rotate(&kv, &mut GroupChat::demo(3)).await;
    assert!(
        h.get("x-kvgate-restored").is_none(),
        "no disk restore: {h:?}"
    );
    assert_eq!(kv.metric("kvgate_restores_total").await, restores);
    let cache_n = last["timings"]["cache_n"].as_u64().unwrap() as usize;
    assert!(
        cache_n * 10 >= total * 8,
        "llama-server loaded the first speaker's cache from RAM: cache_n={cache_n} of {total}"
    );
    assert_eq!(kv.metric(HITS).await, 1);
    assert_eq!(kv.metric(MISSES).await, 0);
}

#[tokio::test]
async fn without_llama_servers_ram_cache_a_miss_turns_disk_restores_back_on() {
    let Some((_llama, kv)) = over(&["--cache-ram", "0"]).await else {
        return;
    };
    let mut chat = GroupChat::demo(3);
    let (h, last, total) = rotate(&kv, &mut chat).await;
    // kvgate relied on RAM that is not there: this turn pays what
    // llama-server alone would, and kvgate learns.
    assert!(h.get("x-kvgate-restored").is_none());
    let cache_n = last["timings"]["cache_n"].as_u64().unwrap() as usize;
    assert!(cache_n * 2 < total, "a miss: cache_n={cache_n} of {total}");
    assert_eq!(kv.metric(MISSES).await, 1);
    assert_eq!(kv.metric(HITS).await, 0);

    // From now on a returning speaker restores from disk (the second
    // speaker was saved when the first took its slot back).
    let names = chat.names();
    let (h, last) = turn_through(&kv.url, &mut chat, &names[1]).await;
    kv.wait_idle().await;
    assert!(
        h.get("x-kvgate-restored").is_some(),
        "restored from disk: {h:?}"
    );
    let cache_n = last["timings"]["cache_n"].as_u64().unwrap();
    assert!(cache_n > 500, "cache_n={cache_n}");
    assert_eq!(kv.metric(MISSES).await, 1);
}

#[tokio::test]
async fn a_cache_replaced_by_a_disk_restore_is_not_believed_in_ram() {
    let Some((mut llama, kv)) = over(&[]).await else {
        return;
    };
    let mut chat = GroupChat::demo(3);
    rotate(&kv, &mut chat).await;
    // llama-server restarts: slots and RAM are empty; every character has
    // a save (each was saved before its slot changed hands, or now).
    llama.restart().await;
    kv.wait_all_lost(std::time::Duration::from_secs(10)).await;
    let names = chat.names();
    for name in &names {
        let (h, _) = turn_through(&kv.url, &mut chat, name).await;
        assert_eq!(
            h["x-kvgate-cache"], "disk",
            "{name} after the restart: {h:?}"
        );
    }
    kv.wait_idle().await;
    // The third was restored over the first's cache: llama-server stashed
    // nothing, so the first comes back from disk, not from a RAM miss.
    let (h, last) = turn_through(&kv.url, &mut chat, &names[0]).await;
    kv.wait_idle().await;
    assert_eq!(h["x-kvgate-cache"], "disk", "{h:?}");
    assert!(last["timings"]["cache_n"].as_u64().unwrap() > 500);
    assert_eq!(kv.metric(MISSES).await, 0);
}
