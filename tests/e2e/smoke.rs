//! Smoke test against the real llama-server with the tiny model: completion on
//! a chosen slot, slot save, restore into another slot, and byte-level
//! tokenization.

use serde_json::{json, Value};

use crate::support::llama::{http_json, LlamaOpts, LlamaServer};

fn completion(prompt: &str, id_slot: u32) -> Value {
    json!({
        "prompt": prompt,
        "n_predict": 4,
        "id_slot": id_slot,
        "cache_prompt": true,
    })
}

#[tokio::test]
async fn completes_saves_and_restores_a_slot() {
    let Some(server) = LlamaServer::start(LlamaOpts::default()).await else {
        return;
    };
    let url = |path: &str| format!("{}{path}", server.base_url);

    let (status, body) = http_json(
        "POST",
        &url("/completion"),
        Some(completion("Hello world", 1)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id_slot"], 1, "{body}");
    let prompt_n = body["timings"]["prompt_n"].as_u64().unwrap_or(0);
    assert!(prompt_n > 0, "{body}");

    let (status, saved) = http_json(
        "POST",
        &url("/slots/1?action=save"),
        Some(json!({"filename": "smoke.bin"})),
    )
    .await;
    assert_eq!(status, 200, "{saved}");
    let file = server.save_dir.join("smoke.bin");
    let size = std::fs::metadata(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .len();
    assert_eq!(Some(size), saved["n_written"].as_u64(), "{saved}");
    assert!(saved["n_saved"].as_u64().unwrap_or(0) > 0, "{saved}");

    let (status, restored) = http_json(
        "POST",
        &url("/slots/0?action=restore"),
        Some(json!({"filename": "smoke.bin"})),
    )
    .await;
    assert_eq!(status, 200, "{restored}");
    assert_eq!(restored["n_restored"], saved["n_saved"], "{restored}");

    let (status, body) = http_json(
        "POST",
        &url("/completion"),
        Some(completion("Hello world", 0)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id_slot"], 0, "{body}");
    assert!(
        body["timings"]["cache_n"].as_u64().unwrap_or(0) > 0,
        "{body}"
    );
}

#[tokio::test]
async fn tokenizes_one_token_per_byte() {
    let Some(server) = LlamaServer::start(LlamaOpts::default()).await else {
        return;
    };
    let url = format!("{}/tokenize", server.base_url);

    // "héllo" is 6 bytes: é is two.
    let (status, body) = http_json("POST", &url, Some(json!({"content": "héllo"}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tokens"].as_array().map(Vec::len), Some(6), "{body}");

    // A space is one token too (the `▁` piece), and add_special adds BOS.
    let (_, body) = http_json(
        "POST",
        &url,
        Some(json!({"content": "a b", "add_special": true})),
    )
    .await;
    assert_eq!(body["tokens"].as_array().map(Vec::len), Some(4), "{body}");
    assert_eq!(body["tokens"][0], 1, "BOS first: {body}");
}

#[tokio::test]
async fn prompt_length_is_byte_count_plus_bos() {
    let Some(server) = LlamaServer::start(LlamaOpts::default()).await else {
        return;
    };
    let prompt: String = "The quick brown fox jumps over the lazy dog. "
        .repeat(67)
        .chars()
        .take(3000)
        .collect();
    let (status, body) = http_json(
        "POST",
        &format!("{}/completion", server.base_url),
        Some(json!({"prompt": prompt, "n_predict": 1, "id_slot": 0, "cache_prompt": false})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["timings"]["prompt_n"], 3001, "{body}");
    eprintln!(
        "3000-byte prompt: prompt_ms = {}, predicted_ms = {}",
        body["timings"]["prompt_ms"], body["timings"]["predicted_ms"]
    );
}

#[tokio::test]
async fn restart_keeps_port_and_saved_files() {
    let Some(mut server) = LlamaServer::start(LlamaOpts::default()).await else {
        return;
    };
    let base = server.base_url.clone();
    let url = |path: &str| format!("{base}{path}");
    let prompt = "Once upon a time";

    let (status, _) = http_json("POST", &url("/completion"), Some(completion(prompt, 0))).await;
    assert_eq!(status, 200);
    let (status, saved) = http_json(
        "POST",
        &url("/slots/0?action=save"),
        Some(json!({"filename": "before-restart.bin"})),
    )
    .await;
    assert_eq!(status, 200, "{saved}");

    // Same port: the requests below go to `url(..)`, built from it.
    server.restart().await;

    let (status, restored) = http_json(
        "POST",
        &url("/slots/1?action=restore"),
        Some(json!({"filename": "before-restart.bin"})),
    )
    .await;
    assert_eq!(status, 200, "{restored}");
    let (status, body) = http_json("POST", &url("/completion"), Some(completion(prompt, 1))).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["timings"]["cache_n"].as_u64().unwrap_or(0) > 0,
        "{body}"
    );

    server.kill().await;
    server.kill().await;
}
