//! Requests no character owns, against the real llama-server: kvgate places
//! them where llama-server itself would (the slot sharing the longest
//! prompt prefix), so the same traffic reuses the same prompt tokens
//! (`timings.cache_n`) straight and through kvgate, and two of them run side
//! by side as they would without kvgate.

use serde_json::{json, Value};

use crate::support::kvgate::saving_over_llama;
use crate::support::kvgate::{json_body, post_json, spawn_post, Kvgate};
use crate::support::llama::{LlamaOpts, LlamaServer};

/// A long system text several prompts start with.
fn shared() -> String {
    "You are a careful assistant for a small library. You answer questions about books, \
     opening hours and loans, briefly and politely, and you never invent a title. "
        .repeat(4)
}

/// The traffic: a prompt, an unrelated one, one that shares only the
/// first ~200 characters of the first (so it starts differently from it
/// within 256 characters, where kvgate's anonymous keys used to split
/// prompts), then the first again.
fn traffic() -> Vec<String> {
    let s = shared();
    vec![
        format!("{s}Question: when do you open on Sundays?"),
        "Tell me a story about a lighthouse keeper and a storm at sea, in ten sentences."
            .repeat(3),
        format!(
            "{}{}",
            &s[..200],
            "and about the cafe next door, whose cakes are famous across town. Question: which cake?"
                .repeat(2)
        ),
        format!("{s}Question: when do you open on Sundays?"),
    ]
}

/// Sends the traffic to `base`, one request after the other; returns each
/// answer's slot and `cache_n`.
async fn replay(base: &str) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for prompt in traffic() {
        let body =
            json!({"prompt": prompt, "n_predict": 4, "temperature": 0, "cache_prompt": true});
        let (status, _, bytes) = post_json(&format!("{base}/completion"), &[], &body).await;
        let v: Value = json_body(&bytes);
        assert_eq!(status, 200, "{v}");
        out.push((
            v["id_slot"].as_u64().expect("id_slot"),
            v["timings"]["cache_n"].as_u64().expect("cache_n"),
        ));
    }
    out
}

/// Which earlier request each request shared its slot with: the slots' ids
/// may differ (llama-server's LRU takes the last empty slot, kvgate the
/// first), their sharing may not.
fn sharing(run: &[(u64, u64)]) -> Vec<Option<usize>> {
    run.iter()
        .enumerate()
        .map(|(i, (slot, _))| run[..i].iter().rposition(|(s, _)| s == slot))
        .collect()
}

#[tokio::test]
async fn requests_without_a_character_reuse_what_they_would_reuse_directly() {
    let Some(mut llama) = LlamaServer::start(LlamaOpts::default()).await else {
        return;
    };
    let direct = replay(&llama.base_url).await;
    assert!(
        direct[2].1 > 0,
        "llama-server reuses the shared start of request 3 (the test's premise): {direct:?}"
    );
    llama.restart().await;

    let kv = Kvgate::start_saving(&llama.base_url, &llama.save_dir, |_| {}).await;
    let through = replay(&kv.url).await;
    assert_eq!(
        through.iter().map(|r| r.1).collect::<Vec<_>>(),
        direct.iter().map(|r| r.1).collect::<Vec<_>>(),
        "cache_n per request, through kvgate {through:?} vs direct {direct:?}"
    );
    assert_eq!(sharing(&through), sharing(&direct));
    kv.wait_idle().await;
    // kvgate started no work of its own: no save of a request no
    // character owns.
    let files = crate::support::kvgate::names_in(&llama.save_dir);
    assert!(files.iter().all(|f| f.starts_with(".kvgate")), "{files:?}");
    kv.stop().await;
}

#[tokio::test]
async fn the_same_prompt_twice_at_once_runs_in_two_slots() {
    let Some(llama) = LlamaServer::start(LlamaOpts::default()).await else {
        return;
    };
    let kv = Kvgate::start_saving(&llama.base_url, &llama.save_dir, |_| {}).await;
    let body = json!({"prompt": shared(), "n_predict": 48, "temperature": 0});
    let url = format!("{}/completion", kv.url);
    let (a, b) = (spawn_post(&url, body.clone()), spawn_post(&url, body));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!((a.0, b.0), (200, 200));
    let (sa, sb) = (&a.1["x-kvgate-slot"], &b.1["x-kvgate-slot"]);
    assert_ne!(
        sa, sb,
        "llama-server runs both at once in two slots; kvgate must not queue one behind the other"
    );
    kv.stop().await;
}

/// POSTs `body` to `path` through kvgate; status, headers, JSON answer.
async fn post_route(kv: &Kvgate, path: &str, body: &Value) -> (u16, hyper::HeaderMap, Value) {
    let (status, headers, bytes) = post_json(&format!("{}{path}", kv.url), &[], body).await;
    (status, headers, json_body(&bytes))
}

#[tokio::test]
async fn anthropic_messages_and_openai_responses_are_pinned_saved_and_restored() {
    let Some((llama, kv)) = saving_over_llama(1, |_| {}).await else {
        return;
    };
    let story = shared();
    let messages = |who: &str| {
        json!({
            "max_tokens": 4,
            "messages": [{"role": "user", "content": format!("{story} {who}, tell me about your day.")}],
            "kvgate": {"chat": "library", "character": who},
        })
    };
    let responses = |who: &str| {
        json!({
            "max_output_tokens": 4,
            "input": format!("{story} {who}, which book do you recommend?"),
            "kvgate": {"chat": "library", "character": who},
        })
    };
    // Anna over Anthropic messages, then Ben over OpenAI responses takes the
    // only slot: Anna's unsaved turn is saved first.
    let (status, headers, v) = post_route(&kv, "/v1/messages", &messages("Anna")).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(headers["x-kvgate-character"], "Anna");
    let (status, headers, v) = post_route(&kv, "/v1/responses", &responses("Ben")).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(headers["x-kvgate-character"], "Ben");
    kv.wait_idle().await;
    let saves = crate::support::kvgate::complete_saves(&llama.save_dir);
    assert!(
        saves
            .iter()
            .any(|m| m.character == "Anna" && m.kind.as_str() == "eviction"),
        "Anna saved on eviction: {saves:?}"
    );
    // Anna comes back: restored from her save, her prompt mostly cached.
    let (status, headers, v) = post_route(&kv, "/v1/messages", &messages("Anna")).await;
    assert_eq!(status, 200, "{v}");
    assert!(headers.contains_key("x-kvgate-restored"), "{headers:?}");
    let cached = v["usage"]["cache_read_input_tokens"].as_u64().unwrap_or(0);
    assert!(cached > 0, "restored cache reused: {v}");
    // And Ben, over responses, the same way.
    let (status, headers, v) = post_route(&kv, "/v1/responses", &responses("Ben")).await;
    assert_eq!(status, 200, "{v}");
    assert!(headers.contains_key("x-kvgate-restored"), "{headers:?}");
    let cached = v["usage"]["input_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    assert!(cached > 0, "restored cache reused: {v}");
    kv.stop().await;
}
