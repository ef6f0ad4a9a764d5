//! A SillyTavern group chat (swap-cards mode, streaming) replayed through
//! kvgate against a real llama-server with 2 slots and 3 characters: every
//! turn lands on the speaker's slot while it is resident, the stream arrives
//! intact, evictions happen, and no lease leaks. A swipe reuses the slot's
//! whole prompt cache.

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::support::kvgate::{post_json, sse_events, Kvgate};
use crate::support::llama::{http_json, LlamaOpts, LlamaServer};
use crate::support::st_chat::GroupChat;

/// llama-server's slots.
const SLOTS: usize = 2;

/// Tokens per reply.
const N_PREDICT: u32 = 16;

/// The tiny model's end-of-sequence token (`</s>`).
const EOS: i64 = 2;

/// `logit_bias` that bans `<unk>`, `<s>` and the 128 non-ASCII byte tokens
/// (`<0x80>`..`<0xFF>` are ids 131..=258 in the tiny model's vocabulary).
///
/// With the random model's raw bytes, llama-server would hold back tokens that
/// leave an incomplete UTF-8 sequence (they are never streamed as their own
/// event) and replace invalid sequences with U+FFFD, so neither the token count
/// nor the detokenized text could be compared exactly. ASCII (control bytes
/// included) keeps both checks exact.
fn ascii_only_bias() -> Value {
    let mut bias: Vec<Value> = vec![json!([0, false]), json!([1, false])];
    bias.extend((131..=258).map(|id| json!([id, false])));
    Value::from(bias)
}

/// SillyTavern's body for `speaker`, plus what the checks need: token ids in
/// the stream (`return_tokens`), a fixed seed, ASCII-only output.
fn st_body(chat: &GroupChat, speaker: &str, seed: u64) -> Value {
    let mut body = chat.body_for(speaker, true, N_PREDICT);
    body["return_tokens"] = json!(true);
    body["seed"] = json!(seed);
    body["logit_bias"] = ascii_only_bias();
    body
}

/// What one streamed generation through kvgate produced.
#[derive(Debug)]
struct Turn {
    /// kvgate's slot (`x-kvgate-slot`), equal to the final chunk's `id_slot`.
    slot: usize,
    /// The streamed text (all `content` fields, in order).
    text: String,
    /// The final chunk (`stop: true`), with `timings`.
    last: Value,
}

/// Posts `body` to kvgate's `/completion` and checks the response and the
/// stream in detail (see the module docs); `what` labels failures.
async fn generate(
    kv: &Kvgate,
    llama: &LlamaServer,
    body: &Value,
    speaker: &str,
    what: &str,
) -> Turn {
    let (status, headers, bytes) = post_json(&format!("{}/completion", kv.url), &[], body).await;
    let raw = String::from_utf8_lossy(&bytes);
    assert_eq!(status, 200, "{what}: {raw}");
    let header = |name: &str| {
        headers
            .get(name)
            .unwrap_or_else(|| panic!("{what}: no {name} header in {headers:?}"))
            .to_str()
            .unwrap_or_else(|e| panic!("{what}: {name}: {e}"))
            .to_string()
    };
    assert!(
        header("content-type").starts_with("text/event-stream"),
        "{what}: {headers:?}"
    );
    let slot: usize = header("x-kvgate-slot")
        .parse()
        .unwrap_or_else(|e| panic!("{what}: x-kvgate-slot: {e}"));
    assert!(slot < SLOTS, "{what}: slot {slot}");
    // The demo names are plain ASCII, which percent-encoding leaves alone.
    assert_eq!(header("x-kvgate-character"), speaker, "{what}");

    let events = sse_events(&bytes);
    let (last, chunks) = events
        .split_last()
        .unwrap_or_else(|| panic!("{what}: no events in {raw}"));
    assert_eq!(last["stop"], true, "{what}: last event {last}");
    assert_eq!(
        last["id_slot"],
        json!(slot),
        "{what}: kvgate's slot vs llama-server's"
    );
    assert!(last.get("error").is_none(), "{what}: {last}");
    assert_eq!(
        last["content"], "",
        "{what}: streaming puts no text in the final chunk"
    );

    // One event per generated token, each carrying its token id.
    let mut text = String::new();
    let mut tokens: Vec<i64> = Vec::new();
    for (i, ev) in chunks.iter().enumerate() {
        assert_eq!(ev["stop"], false, "{what}: event {i}: {ev}");
        text.push_str(
            ev["content"]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: event {i}: {ev}")),
        );
        match ev["tokens"].as_array().map(Vec::as_slice) {
            Some([t]) => tokens.push(t.as_i64().expect("token id")),
            _ => panic!("{what}: event {i} should carry exactly one token: {ev}"),
        }
    }
    let predicted = last["tokens_predicted"].as_u64().expect("tokens_predicted");
    assert_eq!(
        tokens.len() as u64,
        predicted,
        "{what}: token events vs tokens_predicted"
    );
    assert_eq!(last["timings"]["predicted_n"], json!(predicted), "{what}");
    assert!(
        predicted >= 1 && predicted <= u64::from(N_PREDICT),
        "{what}: {predicted}"
    );

    // The text is exactly what the streamed tokens spell (detokenized by
    // llama-server itself, bypassing kvgate), minus what llama-server holds
    // back: the stop string, or a pending prefix of one at the token limit.
    let stop_type = last["stop_type"].as_str().unwrap_or_default().to_string();
    let eos = tokens.last() == Some(&EOS);
    assert_eq!(
        eos,
        stop_type == "eos",
        "{what}: stop_type {stop_type}, tokens {tokens:?}"
    );
    let spelled = if eos {
        &tokens[..tokens.len() - 1]
    } else {
        &tokens[..]
    };
    let (status, detok) = http_json(
        "POST",
        &format!("{}/detokenize", llama.base_url),
        Some(json!({ "tokens": spelled })),
    )
    .await;
    assert_eq!(status, 200, "{what}: {detok}");
    let detok = detok["content"].as_str().expect("detokenize content");
    let stops: Vec<&str> = body["stop"]
        .as_array()
        .expect("stop list")
        .iter()
        .map(|s| s.as_str().expect("stop string"))
        .collect();
    match stop_type.as_str() {
        "eos" => assert_eq!(text, detok, "{what}"),
        "word" => {
            let word = last["stopping_word"].as_str().unwrap_or_default();
            assert!(stops.contains(&word), "{what}: stopping_word {word:?}");
            assert_eq!(format!("{text}{word}"), detok, "{what}");
        }
        "limit" => {
            let held = detok
                .strip_prefix(text.as_str())
                .unwrap_or_else(|| panic!("{what}: streamed {text:?}, tokens spell {detok:?}"));
            assert!(
                held.is_empty() || stops.iter().any(|s| s.starts_with(held)),
                "{what}: held back {held:?}, which starts no stop string"
            );
            assert_eq!(predicted, u64::from(N_PREDICT), "{what}");
        }
        other => panic!("{what}: stop_type {other:?}: {last}"),
    }
    for s in &stops {
        assert!(!text.contains(s), "{what}: stop string {s:?} in {text:?}");
    }
    Turn {
        slot,
        text,
        last: last.clone(),
    }
}

fn u64_at(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no {pointer} in {v}"))
}

async fn start() -> Option<(LlamaServer, Kvgate)> {
    let llama = LlamaServer::start(LlamaOpts {
        slots: SLOTS as u32,
        ctx_per_slot: 4096,
        ..LlamaOpts::default()
    })
    .await?;
    let kv = Kvgate::start(&llama.base_url, |_| {}).await;
    assert_eq!(kv.upstream.pool.len(), SLOTS);
    Some((llama, kv))
}

#[tokio::test]
async fn three_characters_share_two_slots_in_a_swap_cards_group_chat() {
    let Some((llama, kv)) = start().await else {
        return;
    };
    let mut chat = GroupChat::demo(3);
    let roster_key = "Alice+Bob+Carol+User";
    chat.push(
        "User",
        "Good evening, all of you. The pass is shut; can I stay until it clears?",
    );
    let order = [
        "Alice", "Bob", "Carol", "Carol", "Bob", "Alice", "Bob", "Alice", "Carol",
    ];

    // What kvgate's headers say each slot holds, and each speaker's last
    // prompt length (in tokens) while it sat in its slot.
    let mut owner: [Option<&str>; SLOTS] = [None; SLOTS];
    let mut last_prompt: HashMap<&str, u64> = HashMap::new();
    let (mut resident_turns, mut evictions) = (0u64, 0u64);
    let mut slots_seen = Vec::new();
    for (i, speaker) in order.into_iter().enumerate() {
        if i == 4 {
            chat.push(
                "User",
                "Bob, could the generator survive three more days of this?",
            );
        }
        let what = format!("turn {i} ({speaker})");
        let resident = owner.iter().position(|o| *o == Some(speaker));
        let body = st_body(&chat, speaker, 1000 + i as u64);
        let turn = generate(&kv, &llama, &body, speaker, &what).await;
        slots_seen.push(turn.slot);

        match resident {
            Some(s) => {
                // A resident speaker keeps its slot, and llama-server reuses
                // at least its whole previous prompt (the new one extends it).
                assert_eq!(
                    turn.slot, s,
                    "{what}: left its slot; slots so far {slots_seen:?}"
                );
                resident_turns += 1;
                let cached = u64_at(&turn.last, "/timings/cache_n");
                let before = last_prompt[speaker];
                assert!(
                    cached >= before,
                    "{what}: cache_n {cached} < previous prompt {before}"
                );
            }
            None => {
                if owner[turn.slot].is_some() {
                    evictions += 1;
                    // Only a full table evicts.
                    assert!(
                        owner.iter().all(Option::is_some),
                        "{what}: evicted with a free slot"
                    );
                }
            }
        }
        if i > 0 && order[i - 1] == speaker {
            assert_eq!(
                turn.slot,
                slots_seen[i - 1],
                "{what}: a second turn in a row moved"
            );
        }
        owner[turn.slot] = Some(speaker);
        last_prompt.insert(speaker, u64_at(&turn.last, "/tokens_evaluated"));
        chat.push(speaker, turn.text.trim());
    }
    eprintln!("slots per turn: {slots_seen:?}; {resident_turns} resident, {evictions} evictions");
    // Three characters on two slots: someone must have been evicted, and
    // the second Carol turn at least was resident.
    assert!(evictions >= 1, "slots per turn {slots_seen:?}");
    assert!(resident_turns >= 1, "slots per turn {slots_seen:?}");

    kv.wait_idle().await;
    let slots = kv.admin_slots().await;
    assert_eq!(slots.len(), SLOTS, "{slots:?}");
    for (id, s) in slots.iter().enumerate() {
        assert_eq!(s["id"], json!(id), "{s}");
        assert_eq!(s["chat"], roster_key, "{s}");
        assert_eq!(s["character"], json!(owner[id]), "{s}");
        assert_eq!(s["busy"], false, "{s}");
        assert_eq!(s["live"], true, "{s}");
    }
    assert_ne!(slots[0]["character"], slots[1]["character"]);

    let text = kv.metrics_text().await;
    assert_eq!(
        kv.metric("kvgate_requests_total{route=\"/completion\",status=\"200\"}")
            .await,
        order.len() as u64,
        "{text}"
    );
    assert_eq!(
        kv.metric("kvgate_resident_hits_total").await,
        resident_turns,
        "{text}"
    );
    assert_eq!(
        kv.metric("kvgate_evictions_total").await,
        evictions,
        "{text}"
    );
    assert_eq!(kv.metric("kvgate_upstream_errors_total").await, 0, "{text}");
    assert_eq!(
        kv.metric("kvgate_ttft_seconds_count").await,
        order.len() as u64,
        "{text}"
    );
    kv.stop().await;
}

#[tokio::test]
async fn a_swipe_lands_on_the_speakers_slot_and_reuses_its_cache() {
    let Some((llama, kv)) = start().await else {
        return;
    };
    let mut chat = GroupChat::demo(3);
    chat.push("User", "Alice, Bob: is anyone flying down this week?");

    let alice = generate(&kv, &llama, &st_body(&chat, "Alice", 7), "Alice", "Alice").await;
    chat.push("Alice", alice.text.trim());
    let bob_body = st_body(&chat, "Bob", 8);
    let bob = generate(&kv, &llama, &bob_body, "Bob", "Bob").await;
    assert_ne!(bob.slot, alice.slot, "two characters, two free slots");
    kv.wait_idle().await;
    let usage_before = kv.admin_slots().await[bob.slot]["usage"].clone();
    // `Kvgate::start` runs without a cache layer (`NoCache`): nothing is
    // ever saved, so usage counts every message since Bob took the slot.
    assert_eq!(usage_before, 1, "one message since Bob got the slot");

    // Swipe: SillyTavern re-sends the identical body.
    let swipe = generate(&kv, &llama, &bob_body, "Bob", "Bob's swipe").await;
    assert_eq!(swipe.slot, bob.slot, "the swipe left Bob's slot");
    let cached = u64_at(&swipe.last, "/timings/cache_n");
    let prompt = u64_at(&swipe.last, "/tokens_evaluated");
    assert!(cached > 0, "{}", swipe.last);
    // All but the last prompt token (which llama-server always re-evaluates)
    // came from the slot's cache.
    assert!(
        cached + 1 >= prompt,
        "cache_n {cached} of {prompt}: {}",
        swipe.last
    );
    kv.wait_idle().await;
    let slots = kv.admin_slots().await;
    assert_eq!(slots[bob.slot]["character"], "Bob", "{slots:?}");
    // kvgate saw a swipe, not a new message: usage is unchanged.
    assert_eq!(slots[bob.slot]["usage"], usage_before, "{slots:?}");

    // Alice, still resident, continues in her slot with her cache.
    chat.push("Bob", swipe.text.trim());
    let again = generate(
        &kv,
        &llama,
        &st_body(&chat, "Alice", 9),
        "Alice",
        "Alice again",
    )
    .await;
    assert_eq!(again.slot, alice.slot);
    let cached = u64_at(&again.last, "/timings/cache_n");
    let before = u64_at(&alice.last, "/tokens_evaluated");
    assert!(
        cached >= before,
        "cache_n {cached} < Alice's previous prompt {before}"
    );
    kv.wait_idle().await;
    kv.stop().await;
}
