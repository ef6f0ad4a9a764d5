//! A group chat whose speakers share one long prefix (joined cards, a story
//! string that does not name the speaker first), against the real
//! llama-server with 3 characters on 2 slots: llama-server alone serves the
//! speakers from one slot by longest common prefix; through kvgate the
//! speakers share that slot too (each extends the previous one's cache), so
//! no turn evaluates more prompt tokens than it does straight to
//! llama-server, and kvgate saves and restores nothing to get there.

use serde_json::Value;

use crate::support::kvgate::saving_over_llama;
use crate::support::kvgate::{post_json, sse_events, Kvgate};
use crate::support::llama::{LlamaOpts, LlamaServer};
use crate::support::st_chat::GroupChat;

/// The speaking order: everyone, then back and forth.
const ORDER: [usize; 8] = [0, 1, 2, 0, 2, 1, 0, 1];

/// Replays the chat against `base`; each turn's `prompt_n` and `cache_n`.
async fn replay(base: &str) -> Vec<(u64, u64)> {
    let mut chat = GroupChat::demo(3);
    chat.join = true;
    let names = chat.names();
    let mut out = Vec::new();
    for (turn, &k) in ORDER.iter().enumerate() {
        let speaker = &names[k];
        let mut body = chat.body_for(speaker, true, 4);
        body["seed"] = Value::from(1);
        let (status, _, bytes) = post_json(&format!("{base}/completion"), &[], &body).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
        let last = sse_events(&bytes).pop().expect("events");
        let n = |k: &str| last["timings"][k].as_u64().expect("timings");
        out.push((n("prompt_n"), n("cache_n")));
        chat.push(speaker, &format!("{speaker} answers, turn {turn}."));
    }
    out
}

#[tokio::test]
async fn speakers_sharing_a_prefix_share_a_slot_and_evaluate_no_more_than_direct() {
    let Some(mut llama) = LlamaServer::start(LlamaOpts::default()).await else {
        return;
    };
    let direct = replay(&llama.base_url).await;
    llama.restart().await;
    let kv = Kvgate::start_saving(&llama.base_url, &llama.save_dir, |_| {}).await;
    let through = replay(&kv.url).await;
    eprintln!("(prompt_n, cache_n) per turn: direct {direct:?}, through kvgate {through:?}");
    for (i, (k, d)) in through.iter().zip(&direct).enumerate() {
        assert!(
            k.0 <= d.0,
            "turn {i}: {} prompt tokens evaluated through kvgate, {} straight\n kvgate {through:?}\n direct {direct:?}",
            k.0,
            d.0
        );
    }
    kv.wait_idle().await;
    let m = &kv.app.shared.metrics;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(load(&m.restores), 0, "nothing had to come back from disk");
    assert_eq!(m.saves_of("eviction"), 0, "nobody was evicted");
    // The whole chat is resident in one slot.
    let table = kv.upstream.pool.snapshot();
    let hosting: Vec<usize> = (0..table.len())
        .filter(|&i| table[i].owner.is_some())
        .collect();
    assert_eq!(hosting.len(), 1, "{table:?}");
    assert_eq!(table[hosting[0]].members.len(), 2, "{table:?}");
    kv.stop().await;
}

#[tokio::test]
async fn a_speaker_whose_cache_went_with_another_comes_back_from_that_save() {
    let Some((llama, kv)) = saving_over_llama(1, |_| {}).await else {
        return;
    };
    let url = format!("{}/completion", kv.url);
    let mut chat = GroupChat::demo(2);
    chat.join = true;
    let (alice, bob) = (chat.names()[0].clone(), chat.names()[1].clone());
    for speaker in [&alice, &bob] {
        let (status, _, _) = post_json(&url, &[], &chat.body_for(speaker, true, 4)).await;
        assert_eq!(status, 200);
        chat.push(speaker, &format!("{speaker} speaks."));
    }
    // Bob extended Alice's slot: both are in it.
    let table = kv.upstream.pool.snapshot();
    assert_eq!(table[0].members.len(), 1, "{table:?}");
    // The client moves to another chat, which takes the only slot: Bob's
    // slot (Alice's cache inside) is saved under Bob's name (a chat-switch
    // save, else it would be an eviction's).
    let other = crate::support::kvgate::group_turn(&["Xena", "Yuri"], "Xena", "");
    let (status, _, _) = post_json(&url, &[], &other).await;
    assert_eq!(status, 200);
    kv.wait_idle().await;
    let saves = crate::support::kvgate::complete_saves(&llama.save_dir);
    let bobs = saves
        .iter()
        .find(|m| m.character == *bob)
        .unwrap_or_else(|| panic!("Bob's slot saved: {saves:?}"));
    // Alice has no save of her own, but her context is in Bob's.
    assert!(!saves.iter().any(|m| m.character == *alice), "{saves:?}");
    let body = chat.body_for(&alice, true, 4);
    let prompt_len = body["prompt"].as_str().unwrap().len() as u64;
    let (status, headers, bytes) = post_json(&url, &[], &body).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-kvgate-restored"], bobs.file.as_str());
    let last = sse_events(&bytes).pop().expect("events");
    let cached = last["timings"]["cache_n"].as_u64().unwrap();
    // The byte-level model: one token per byte, plus BOS.
    assert!(
        cached * 10 >= prompt_len * 9,
        "{cached} of ~{prompt_len} tokens reused"
    );
    kv.stop().await;
}
