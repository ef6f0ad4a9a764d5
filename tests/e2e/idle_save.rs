//! Idle saves with the real llama-server: a 1:1 chat, saved while the user
//! reads, comes back from disk after llama-server restarts, long before
//! `save_every` messages would have saved it.

use std::time::Duration;

use crate::support::kvgate::{complete_saves, poll_until, post_json, saves_in, sse_events, Kvgate};
use crate::support::llama::{LlamaOpts, LlamaServer};
use crate::support::st_chat::{Character, GroupChat};

#[tokio::test]
async fn a_one_to_one_chat_saved_while_the_user_reads_survives_a_restart() {
    let Some(mut llama) = LlamaServer::start(LlamaOpts::default()).await else {
        return;
    };
    let kv = Kvgate::start_saving(&llama.base_url, &llama.save_dir, |c| {
        c.cache.idle_save_s = 1;
        c.cache.save_every = 5;
    })
    .await;
    let url = format!("{}/completion", kv.url);
    let mut chat = GroupChat::solo(Character::demo(0));
    let name = chat.names()[0].clone();
    chat.push("User", "Tell me about the harbour.");
    let (status, _, _) = post_json(&url, &[], &chat.body_for(&name, true, 4)).await;
    assert_eq!(status, 200);
    chat.push(&name, "The boats are in.");
    // The user reads: kvgate saves the one message (save_every is 5).
    let dir = llama.save_dir.clone();
    poll_until("an idle save", Duration::from_secs(10), || {
        saves_in(&dir).iter().any(|m| m.kind.as_str() == "idle")
    })
    .await;
    kv.wait_idle().await;
    assert_eq!(complete_saves(&dir).len(), 1);
    llama.restart().await;
    kv.wait_all_lost(Duration::from_secs(10)).await;
    chat.push("User", "And the lighthouse?");
    let body = chat.body_for(&name, true, 4);
    let prompt_len = body["prompt"].as_str().unwrap().len() as u64;
    let (status, headers, bytes) = post_json(&url, &[], &body).await;
    assert_eq!(status, 200);
    assert!(headers.contains_key("x-kvgate-restored"), "{headers:?}");
    let last = sse_events(&bytes).pop().expect("events");
    let cached = last["timings"]["cache_n"].as_u64().unwrap();
    assert!(
        cached * 10 >= prompt_len * 8,
        "{cached} of ~{prompt_len} tokens reused after the restart"
    );
    kv.stop().await;
}
