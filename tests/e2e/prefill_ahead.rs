//! Prefill ahead against a REAL llama-server: while one member of a
//! SillyTavern group chat generates, the member the user's message names
//! next gets its cache extended, so its own turn is resident and reads only
//! the reply before it (and the 64 tokens left on purpose).

use crate::support::kvgate::{turn_through, Kvgate};
use crate::support::llama::{LlamaOpts, LlamaServer};
use crate::support::st_chat::GroupChat;

/// One round: the user's message, then each speaker in order.
async fn round(
    kv: &Kvgate,
    chat: &mut GroupChat,
    message: &str,
    speakers: &[&str],
) -> Vec<(hyper::HeaderMap, serde_json::Value)> {
    chat.push("User", message);
    let mut answers = Vec::new();
    for s in speakers {
        answers.push(turn_through(&kv.url, chat, s).await);
        // The prefill ahead set off by this turn is done before the next.
        kv.wait_idle().await;
    }
    answers
}

/// llama-server (2 slots) and kvgate (prefill ahead `on` or off), after a
/// first round of a 3-member group in which everyone spoke once (3
/// characters on 2 slots), so that kvgate remembers each one's last prompt.
async fn after_a_first_round(on: bool) -> Option<(LlamaServer, Kvgate, GroupChat)> {
    let llama = LlamaServer::start(LlamaOpts::default()).await?;
    let kv = Kvgate::start_saving(&llama.base_url, &llama.save_dir, |c| {
        c.ram_cache = true;
        c.cache.prefill_ahead = on;
    })
    .await;
    let mut chat = GroupChat::demo(3);
    let names = chat.names();
    let greeting = format!("{}, {}, {}: good evening!", names[0], names[1], names[2]);
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    round(&kv, &mut chat, &greeting, &all).await;
    Some((llama, kv, chat))
}

#[tokio::test]
async fn the_member_named_next_is_resident_and_reads_only_the_reply_before_it() {
    let Some((_llama, kv, mut chat)) = after_a_first_round(true).await else {
        return;
    };
    let names = chat.names();
    let (a, c) = (names[0].as_str(), names[2].as_str());
    let before = kv.metric("kvgate_prefill_ahead_total").await;

    // The user names the last speaker, then the first: while the former
    // answers, the latter (whose slot was taken) is brought back and
    // extended with everything said since it spoke.
    round(&kv, &mut chat, &format!("{c}, and you {a}?"), &[c]).await;
    assert_eq!(kv.metric("kvgate_prefill_ahead_total").await, before + 1);
    let (h, last) = &turn_through(&kv.url, &mut chat, a).await;
    kv.wait_idle().await;
    assert_eq!(h["x-kvgate-cache"], "resident", "{h:?}");
    let prompt_n = last["timings"]["prompt_n"].as_u64().unwrap();
    let cache_n = last["timings"]["cache_n"].as_u64().unwrap();
    // Left to read: the 64 tokens prefill ahead leaves on purpose (fewer
    // would hit llama-server's slow path for small batches on CPU) and the
    // reply before it (a short scripted line and the tag).
    assert!(
        (64..64 + 40).contains(&prompt_n) && cache_n > 500,
        "prompt_n={prompt_n} cache_n={cache_n}"
    );
    assert!(kv.metric("kvgate_prefill_ahead_tokens_total").await > 0);
    // Every guess came true: the second and third speakers of the first
    // round, and this one (the end of a round is not guessed; the guess
    // after this turn is not scored yet).
    let hits = "kvgate_next_speaker_predictions_total{result=\"hit\"}";
    let misses = "kvgate_next_speaker_predictions_total{result=\"miss\"}";
    assert_eq!((kv.metric(hits).await, kv.metric(misses).await), (3, 0));
}

#[tokio::test]
async fn off_by_setting_nothing_is_read_ahead() {
    let Some((_llama, kv, mut chat)) = after_a_first_round(false).await else {
        return;
    };
    let names = chat.names();
    let (a, c) = (names[0].as_str(), names[2].as_str());
    let answers = round(&kv, &mut chat, &format!("{c}, and you {a}?"), &[c, a]).await;
    assert_eq!(kv.metric("kvgate_prefill_ahead_total").await, 0);
    let (h, last) = &answers[1];
    assert_ne!(h["x-kvgate-cache"], "resident");
    // Without it, the turn reads everything said since it last spoke.
    assert!(last["timings"]["prompt_n"].as_u64().unwrap() > 40);
}
