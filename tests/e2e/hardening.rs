//! What the real llama-server does with the requests kvgate guards against:
//! it decodes slot paths and reads ids with `stoi` (so kvgate must lease
//! those spellings), coerces odd `id_slot` values, writes any plain file
//! name (so kvgate must refuse its own), and shows each slot's chat in
//! `/slots` with `LLAMA_SERVER_SLOTS_DEBUG` (so kvgate must not show it to
//! other clients).

use http_body_util::BodyExt;
use serde_json::{json, Value};

use crate::support::kvgate::{json_body, post_json, raw_exchange, send, Kvgate};
use crate::support::llama::{http_json, LlamaOpts, LlamaServer};

/// POST `path` (sent as written, not re-encoded) with a JSON body.
async fn post_raw(base: &str, path: &str, auth: Option<&str>, body: &Value) -> (u16, Value) {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = auth {
        headers.push(("authorization", a));
    }
    let resp = send("POST", &format!("{base}{path}"), &headers, body.to_string()).await;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, json_body(&bytes))
}

#[tokio::test]
async fn spellings_llama_server_reads_as_a_slot_are_leased_through_kvgate() {
    let Some(llama) = LlamaServer::start(LlamaOpts::default()).await else {
        return;
    };
    // llama-server itself: each spelling erases slot 0, and -1 the last
    // slot (the id wraps in size_t).
    for path in [
        "/slots/%30?action=erase",
        "/slots/0abc?action=erase",
        "/slots/%2530?action=erase",
        "/slots/0/?action=erase",
    ] {
        let (status, v) = post_raw(&llama.base_url, path, None, &json!({})).await;
        assert_eq!(status, 200, "{path}: {v}");
        assert_eq!(v["id_slot"], 0, "{path}: {v}");
    }
    let (status, v) = post_raw(&llama.base_url, "/slots/-1?action=erase", None, &json!({})).await;
    assert_eq!(status, 200, "{v}");
    let (_, slots) = http_json("GET", &format!("{}/slots", llama.base_url), None).await;
    assert_eq!(slots.as_array().unwrap().len(), 2);
    // A string id_slot is "any slot" to llama-server, `true` is slot 1.
    let (status, v) = http_json(
        "POST",
        &format!("{}/completion", llama.base_url),
        Some(json!({"prompt": "Hello", "n_predict": 2, "id_slot": true})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["id_slot"], 1, "{v}");
    let (status, v) = http_json(
        "POST",
        &format!("{}/completion", llama.base_url),
        Some(json!({"prompt": "Hello", "n_predict": 2, "id_slot": "0"})),
    )
    .await;
    assert_eq!(status, 200, "llama-server accepts a string id_slot: {v}");

    // Through kvgate: the same requests hold the slot they reach.
    let kv = Kvgate::start_saving(&llama.base_url, &llama.save_dir, |_| {}).await;
    let url = format!("{}/completion", kv.url);
    let (status, headers, _) = post_json(
        &url,
        &[],
        &json!({"prompt": "Hello", "n_predict": 2, "id_slot": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-kvgate-slot"], "1");
    let (status, headers, _) = post_json(
        &url,
        &[],
        &json!({"prompt": "Hello", "n_predict": 2, "id_slot": "0"}),
    )
    .await;
    assert_eq!(status, 200);
    let slot = headers["x-kvgate-slot"].to_str().unwrap().to_string();
    kv.wait_idle().await;
    let owned = |kv: &Kvgate| {
        kv.upstream.pool.snapshot()[slot.parse::<usize>().unwrap()]
            .owner
            .clone()
    };
    assert!(
        owned(&kv).is_some(),
        "kvgate placed the request and owns its slot"
    );
    // An encoded erase of that slot goes through kvgate's lease: kvgate
    // knows the slot is empty afterwards.
    let path = format!("/slots/%3{slot}?action=erase");
    let (status, v) = post_raw(&kv.url, &path, None, &json!({})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["id_slot"].to_string(), slot, "{v}");
    assert_eq!(owned(&kv), None, "the erase went through kvgate's lease");
    let (status, v) = post_raw(
        &kv.url,
        "/slots/0?action=save&action=restore",
        None,
        &json!({"filename": "slot1.bin"}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    kv.wait_idle().await;
}

#[tokio::test]
async fn kvgates_own_files_are_refused_and_other_names_still_save() {
    let Some(llama) = LlamaServer::start(LlamaOpts::default()).await else {
        return;
    };
    let kv = Kvgate::start_saving(&llama.base_url, &llama.save_dir, |_| {}).await;
    // llama-server alone would write this name.
    let (status, v) = post_raw(
        &llama.base_url,
        "/slots/0?action=save",
        None,
        &json!({"filename": "kvgate-instances.json"}),
    )
    .await;
    assert_eq!(status, 200, "llama-server's own check lets it through: {v}");
    std::fs::remove_file(llama.save_dir.join("kvgate-instances.json")).unwrap();
    for name in [
        "kvgate-settings.json",
        "kvgate-instances.json",
        "a_20260101000000_character_Alice.meta.json",
        "x_99991231235959_character_Alice.bin",
    ] {
        let (status, v) = post_raw(
            &kv.url,
            "/slots/0?action=save",
            None,
            &json!({ "filename": name }),
        )
        .await;
        assert_eq!(status, 400, "{name}: {v}");
        assert!(!llama.save_dir.join(name).exists(), "{name} was written");
    }
    let (status, v) = post_raw(
        &kv.url,
        "/slots/0?action=save",
        None,
        &json!({"filename": "slot1.bin"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(llama.save_dir.join("slot1.bin").is_file());
    kv.wait_idle().await;
}

#[tokio::test]
async fn a_client_never_sees_another_clients_chat_in_slots() {
    let Some(llama) = LlamaServer::start(LlamaOpts {
        env: vec![("LLAMA_SERVER_SLOTS_DEBUG".into(), "1".into())],
        ..LlamaOpts::default()
    })
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let clients = dir.path().join("clients.toml");
    std::fs::write(
        &clients,
        "[[client]]\nid = \"home\"\nkey = \"k-home-0123456789\"\ntrusted = true\n\n\
         [[client]]\nid = \"other\"\nkey = \"k-other-0123456789\"\ntrusted = true\n",
    )
    .unwrap();
    let kv = Kvgate::start_saving(&llama.base_url, &llama.save_dir, |c| {
        c.clients = Some(clients)
    })
    .await;
    let secret = "the treasure is under the old mill";
    let (status, _, _) = post_json(
        &format!("{}/completion", kv.url),
        &[("authorization", "Bearer k-home-0123456789")],
        &json!({"prompt": format!("Alice whispers: {secret}.\nBob:"), "n_predict": 4}),
    )
    .await;
    assert_eq!(status, 200);
    kv.wait_idle().await;
    let slots_as = |who: &'static str| {
        let url = format!("{}/slots", kv.url);
        async move {
            let resp = send("GET", &url, &[("authorization", who)], "").await;
            assert_eq!(resp.status(), 200);
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8_lossy(&bytes).into_owned()
        }
    };
    // llama-server shows the chat to whoever asks it directly.
    let (_, direct) = http_json("GET", &format!("{}/slots", llama.base_url), None).await;
    assert!(direct.to_string().contains(secret), "{direct}");
    assert!(
        slots_as("Bearer k-home-0123456789").await.contains(secret),
        "the client sees its own chat"
    );
    let other = slots_as("Bearer k-other-0123456789").await;
    assert!(
        !other.contains(secret),
        "another client's chat leaked: {other}"
    );
    assert!(!other.contains("id_task"), "{other}");
}

#[tokio::test]
async fn header_names_keep_llama_servers_case() {
    let Some(llama) = LlamaServer::start(LlamaOpts {
        extra_args: vec!["--metrics".into()],
        ..LlamaOpts::default()
    })
    .await
    else {
        return;
    };
    let kv = Kvgate::start_saving(&llama.base_url, &llama.save_dir, |_| {}).await;
    let request = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".to_vec();
    let (status, direct, _) = raw_exchange(&llama.base_url, request.clone()).await;
    assert_eq!(status, 200);
    assert!(direct.contains("Process-Start-Time-Unix:"), "{direct}");
    let (status, through, _) = raw_exchange(&kv.url, request).await;
    assert_eq!(status, 200);
    assert!(
        through.contains("Process-Start-Time-Unix:"),
        "passthrough keeps the header's case: {through}"
    );
}
