//! Tests of the fake llama-server itself, so proxy tests can trust it.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use crate::support::fake_llama::{self, FakeLlama};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn send(
    fake: &FakeLlama,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Response<Incoming> {
    let req = Request::builder()
        .method(method)
        .uri(format!("{}{}", fake.url(), path))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
        .unwrap();
    client().request(req).await.expect("request")
}

async fn body_bytes(resp: Response<Incoming>) -> Bytes {
    resp.into_body().collect().await.expect("body").to_bytes()
}

async fn call_json(
    fake: &FakeLlama,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let body = body.map(|b| b.to_string());
    let resp = send(fake, method, path, body.as_deref()).await;
    let status = resp.status();
    let bytes = body_bytes(resp).await;
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Splits an SSE body into its `data:` payloads.
fn sse_data(body: &[u8]) -> Vec<String> {
    let text = std::str::from_utf8(body).unwrap();
    assert!(text.ends_with("\n\n"), "{text:?}");
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn info_endpoints_and_tokenizer() {
    let fake = FakeLlama::builder().slots(2).n_ctx(1024).build().await;
    let (s, v) = call_json(&fake, "GET", "/health", None).await;
    assert_eq!((s, v), (StatusCode::OK, json!({"status": "ok"})));

    let (_, props) = call_json(&fake, "GET", "/props", None).await;
    assert_eq!(props["total_slots"], 2);
    assert_eq!(props["default_generation_settings"]["n_ctx"], 1024);
    assert_eq!(props["model_path"], "/models/fake.gguf");
    assert!(props["build_info"].is_string());

    let (_, models) = call_json(&fake, "GET", "/v1/models", None).await;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["meta"]["n_vocab"], fake_llama::N_VOCAB);
    assert!(models["data"][0]["meta"]["n_params"].is_u64());

    let (_, slots) = call_json(&fake, "GET", "/slots", None).await;
    assert_eq!(
        slots,
        json!([
            {"id": 0, "n_ctx": 1024, "speculative": false, "is_processing": false},
            {"id": 1, "n_ctx": 1024, "speculative": false, "is_processing": false},
        ])
    );

    let (_, t) = call_json(
        &fake,
        "POST",
        "/tokenize",
        Some(json!({"content": "hé", "add_special": true})),
    )
    .await;
    assert_eq!(t["tokens"], json!([1, 104 + 3, 0xc3 + 3, 0xa9 + 3]));
    assert_eq!(fake_llama::tokenize("hé", true), vec![1, 107, 198, 172]);
    let (_, d) = call_json(
        &fake,
        "POST",
        "/detokenize",
        Some(json!({"tokens": [107, 198, 172]})),
    )
    .await;
    assert_eq!(d["content"], "hé");

    let resp = send(&fake, "GET", "/metrics", None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        String::from_utf8_lossy(&body_bytes(resp).await).contains("llamacpp:prompt_tokens_total")
    );

    let (s, e) = call_json(&fake, "POST", "/completion", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert_eq!(e["error"]["code"], 400);
}

#[tokio::test]
async fn native_stream_and_prompt_cache() {
    let fake = FakeLlama::builder().events(3).build().await;
    let body = json!({"prompt": "Hello", "stream": true, "id_slot": 2}).to_string();
    let resp = send(&fake, "POST", "/completion", Some(&body)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = sse_data(&body_bytes(resp).await);
    assert_eq!(events.len(), 4, "3 tokens + final, no [DONE]: {events:?}");
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["content"], " tok0");
    assert_eq!(first["id_slot"], -1);
    assert_eq!(first["stop"], false);
    let last: Value = serde_json::from_str(&events[3]).unwrap();
    assert_eq!(last["stop"], true);
    assert_eq!(last["id_slot"], 2);
    assert_eq!(last["content"], "");
    assert_eq!(last["timings"]["cache_n"], 0);
    assert_eq!(last["timings"]["prompt_n"], 6);
    let cached = 6 + fake_llama::expected_content(3).len();
    assert_eq!(last["tokens_cached"], cached);
    assert_eq!(fake.slot_tokens(2).len(), cached);

    // Continue the conversation on the same slot: the whole previous state is reused.
    let prompt2 = format!("Hello{} more", fake_llama::expected_content(3));
    let (s, v) = call_json(
        &fake,
        "POST",
        "/completion",
        Some(json!({"prompt": prompt2, "id_slot": 2, "n_predict": 2})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["content"], " tok0 tok1");
    assert_eq!(v["stop_type"], "limit");
    assert_eq!(v["timings"]["cache_n"], cached);
    assert_eq!(v["timings"]["prompt_n"], 5);

    // Byte-identical replies for identical requests (timings are synthetic).
    let b = json!({"prompt": "x", "id_slot": 0, "cache_prompt": false}).to_string();
    let a1 = body_bytes(send(&fake, "POST", "/completion", Some(&b)).await).await;
    let a2 = body_bytes(send(&fake, "POST", "/completion", Some(&b)).await).await;
    assert_eq!(a1, a2);

    let bodies = fake.completions();
    assert_eq!(bodies.len(), 4);
    assert_eq!(bodies[0]["id_slot"], 2);
}

#[tokio::test]
async fn openai_routes() {
    let fake = FakeLlama::builder().events(2).build().await;
    let req =
        json!({"messages": [{"role": "user", "content": "hi"}], "stream": true, "id_slot": 1})
            .to_string();
    let resp = send(&fake, "POST", "/v1/chat/completions", Some(&req)).await;
    let events = sse_data(&body_bytes(resp).await);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let role: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
    let fin: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(fin["choices"][0]["finish_reason"], "stop");
    assert_eq!(fin["timings"]["predicted_n"], 2);
    let prompt = fake_llama::chat_prompt(&json!([{"role": "user", "content": "hi"}]));
    assert!(fake
        .slot_tokens(1)
        .starts_with(&fake_llama::tokenize(&prompt, true)));

    let (_, v) = call_json(
        &fake,
        "POST",
        "/v1/chat/completions",
        Some(json!({"messages": []})),
    )
    .await;
    assert_eq!(v["choices"][0]["message"]["content"], " tok0 tok1");
    assert_eq!(v["object"], "chat.completion");

    let resp = send(
        &fake,
        "POST",
        "/v1/completions",
        Some(&json!({"prompt": "a", "stream": true}).to_string()),
    )
    .await;
    let events = sse_data(&body_bytes(resp).await);
    assert_eq!(events.len(), 4);
    assert_eq!(events[3], "[DONE]");
    let t: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(t["choices"][0]["text"], " tok0");
}

#[tokio::test]
async fn busy_slot_waits_and_gate_paces_events() {
    let fake = FakeLlama::builder().events(3).gate(true).build().await;
    let body = json!({"prompt": "A", "stream": true, "id_slot": 0}).to_string();
    let mut a = send(&fake, "POST", "/completion", Some(&body))
        .await
        .into_body();
    // The first event comes without a release; the second does not.
    let f = a.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(f.starts_with(b"data: {"), "{f:?}");
    assert!(tokio::time::timeout(Duration::from_millis(100), a.frame())
        .await
        .is_err());

    // A second request for slot 0 gets no headers while the slot is busy.
    let fake2 = fake.handle();
    let b = tokio::spawn(async move {
        let req = Request::builder()
            .method("POST")
            .uri(format!("{}/completion", fake2.url()))
            .body(Full::new(Bytes::from(
                json!({"prompt": "B", "id_slot": 0}).to_string(),
            )))
            .unwrap();
        let resp = client().request(req).await.unwrap();
        body_bytes(resp).await
    });
    assert!(
        fake.wait_for(Duration::from_secs(2), |f| f.deferred_requests() == 1)
            .await
    );
    assert!(fake.slot_is_processing(0));

    fake.release_event();
    let f = a.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(std::str::from_utf8(&f).unwrap().contains(" tok1"));
    fake.set_gate(false); // let everything else through
    while let Some(fr) = a.frame().await {
        fr.unwrap();
    }
    let b: Value = serde_json::from_slice(&b.await.unwrap()).unwrap();
    assert_eq!(b["id_slot"], 0);
    assert_eq!(b["content"], fake_llama::expected_content(3));
    assert_eq!(fake.active_requests(), 0);
}

#[tokio::test]
async fn client_disconnect_frees_slot() {
    let fake = FakeLlama::builder().events(5).gate(true).build().await;
    let body = json!({"prompt": "A", "stream": true, "id_slot": 3}).to_string();
    let mut a = send(&fake, "POST", "/completion", Some(&body))
        .await
        .into_body();
    a.frame().await.unwrap().unwrap();
    assert!(fake.slot_is_processing(3));
    drop(a);
    assert!(
        fake.wait_for(Duration::from_secs(2), |f| !f.slot_is_processing(3))
            .await
    );
    assert!(
        fake.wait_for(Duration::from_secs(2), |f| f.active_requests() == 0)
            .await
    );

    // Also while a non-streaming request waits for its events.
    let body = json!({"prompt": "A", "id_slot": 3}).to_string();
    let f2 = fake.handle();
    let waiting = tokio::spawn(async move {
        let req = Request::builder()
            .method("POST")
            .uri(format!("{}/completion", f2.url()))
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let _ = client().request(req).await;
    });
    assert!(
        fake.wait_for(Duration::from_secs(2), |f| f.slot_is_processing(3))
            .await,
        "the request reached the slot"
    );
    waiting.abort();
    assert!(
        fake.wait_for(Duration::from_secs(2), |f| !f.slot_is_processing(3))
            .await,
        "dropping it freed the slot"
    );
}

#[tokio::test]
async fn die_mid_stream() {
    let fake = FakeLlama::builder().events(4).build().await;
    fake.die_mid_stream_after(2);
    let body = json!({"prompt": "A", "stream": true}).to_string();
    let resp = send(&fake, "POST", "/completion", Some(&body)).await;
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let err = loop {
        match body.frame().await {
            Some(Ok(f)) => got.extend_from_slice(&f.into_data().unwrap()),
            Some(Err(e)) => break Some(e),
            None => break None,
        }
    };
    assert!(err.is_some(), "stream should abort");
    assert_eq!(String::from_utf8(got).unwrap().matches("data: ").count(), 2);
    // One-shot: the next one completes.
    let (s, v) = call_json(&fake, "POST", "/completion", Some(json!({"prompt": "A"}))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["content"], fake_llama::expected_content(4));
    assert!(
        fake.wait_for(Duration::from_secs(2), |f| !f.slot_is_processing(0))
            .await
    );
}

#[tokio::test]
async fn slot_actions() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeLlama::builder()
        .events(1)
        .save_dir(dir.path())
        .build()
        .await;
    call_json(
        &fake,
        "POST",
        "/completion",
        Some(json!({"prompt": "abc", "id_slot": 1})),
    )
    .await;
    let tokens = fake.slot_tokens(1);
    assert_eq!(tokens.len(), 4 + 5);

    let (s, v) = call_json(
        &fake,
        "POST",
        "/slots/1?action=save",
        Some(json!({"filename": "a.bin"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["n_saved"], 9);
    let path = fake.saved_file("a.bin");
    assert_eq!(v["n_written"], std::fs::metadata(&path).unwrap().len());
    assert_eq!(
        kvgate::llama::slot_file::read_tokens(&path).unwrap(),
        tokens
    );

    let (s, v) = call_json(
        &fake,
        "POST",
        "/slots/0?action=restore",
        Some(json!({"filename": "a.bin"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["n_restored"], 9);
    assert_eq!(fake.slot_tokens(0), tokens);

    let (s, v) = call_json(
        &fake,
        "POST",
        "/slots/0?action=restore",
        Some(json!({"filename": "missing.bin"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Unable to restore slot"));
    assert!(
        fake.slot_tokens(0).is_empty(),
        "a failed restore clears the slot"
    );

    for bad in ["../x", "a/b", "", "x.", " x", "a:b"] {
        let (s, v) = call_json(
            &fake,
            "POST",
            "/slots/0?action=save",
            Some(json!({"filename": bad})),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad:?}");
        assert_eq!(v["error"]["message"], "Invalid filename");
    }
    let (s, _) = call_json(&fake, "POST", "/slots/0?action=nope", Some(json!({}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    fake.fail_next_save(500);
    let (s, v) = call_json(
        &fake,
        "POST",
        "/slots/1?action=save",
        Some(json!({"filename": "b.bin"})),
    )
    .await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(v["error"]["type"], "server_error");
    assert!(!fake.saved_file("b.bin").exists());

    fake.fail_next_restore();
    let (s, _) = call_json(
        &fake,
        "POST",
        "/slots/1?action=restore",
        Some(json!({"filename": "a.bin"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(fake.slot_tokens(1).is_empty());

    call_json(
        &fake,
        "POST",
        "/slots/1?action=restore",
        Some(json!({"filename": "a.bin"})),
    )
    .await;
    let (s, v) = call_json(&fake, "POST", "/slots/5?action=erase", None).await; // wraps to 1
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v, json!({"id_slot": 1, "n_erased": 9}));

    let actions = fake.slot_actions();
    assert_eq!(
        actions[0],
        (1, "save".to_string(), Some("a.bin".to_string()))
    );
    assert_eq!(actions.last().unwrap(), &(5, "erase".to_string(), None));

    let plain = FakeLlama::start().await;
    let (s, v) = call_json(&plain, "POST", "/slots/0?action=erase", None).await;
    assert_eq!(s, StatusCode::NOT_IMPLEMENTED);
    assert_eq!(v["error"]["type"], "not_supported_error");
}

#[tokio::test]
async fn slot_action_waits_for_busy_slot() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeLlama::builder()
        .events(2)
        .gate(true)
        .save_dir(dir.path())
        .build()
        .await;
    let body = json!({"prompt": "A", "stream": true, "id_slot": 0}).to_string();
    let mut a = send(&fake, "POST", "/completion", Some(&body))
        .await
        .into_body();
    a.frame().await.unwrap().unwrap();
    let h = fake.handle();
    let save = tokio::spawn(async move {
        let req = Request::builder()
            .method("POST")
            .uri(format!("{}/slots/0?action=save", h.url()))
            .body(Full::new(Bytes::from(r#"{"filename":"s.bin"}"#)))
            .unwrap();
        let resp = client().request(req).await.unwrap();
        (resp.status(), body_bytes(resp).await)
    });
    assert!(
        fake.wait_for(Duration::from_secs(2), |f| f.deferred_requests() == 1)
            .await
    );
    fake.release_events(2);
    while let Some(f) = a.frame().await {
        f.unwrap();
    }
    let (status, _) = save.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        kvgate::llama::slot_file::read_tokens(&fake.saved_file("s.bin")).unwrap(),
        fake.slot_tokens(0)
    );
}

#[tokio::test]
async fn kill_restart_and_hang() {
    let fake = FakeLlama::builder().events(1).build().await;
    call_json(
        &fake,
        "POST",
        "/completion",
        Some(json!({"prompt": "abc", "id_slot": 0})),
    )
    .await;
    assert!(!fake.slot_tokens(0).is_empty());

    // An in-flight stream is cut off by kill().
    fake.set_gate(true);
    let body = json!({"prompt": "A", "stream": true}).to_string();
    let mut a = send(&fake, "POST", "/completion", Some(&body))
        .await
        .into_body();
    a.frame().await.unwrap().unwrap();
    fake.kill().await;
    assert!(tokio::net::TcpStream::connect(fake.addr()).await.is_err());
    let end = tokio::time::timeout(Duration::from_secs(2), a.frame())
        .await
        .unwrap();
    assert!(matches!(end, Some(Err(_))), "{end:?}");
    fake.set_gate(false);
    fake.start_again().await;
    let (s, _) = call_json(&fake, "GET", "/health", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        fake.slot_tokens(0).is_empty(),
        "a restart empties the slots"
    );
    let (_, slots) = call_json(&fake, "GET", "/slots", None).await;
    assert!(slots[0].get("id_task").is_none());

    fake.hang();
    let fut = send(&fake, "GET", "/health", None);
    assert!(tokio::time::timeout(Duration::from_millis(150), fut)
        .await
        .is_err());
    fake.unhang();
    let (s, _) = call_json(&fake, "GET", "/health", None).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn echo_and_raw_stream() {
    let fake = FakeLlama::start().await;
    let resp = send(&fake, "PUT", "/some/where?x=1&y", Some("payload")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-fake"], "1");
    let v: Value = serde_json::from_slice(&body_bytes(resp).await).unwrap();
    assert_eq!(v["method"], "PUT");
    assert_eq!(v["path"], "/some/where");
    assert_eq!(v["query"], "x=1&y");
    let call = fake.calls().pop().unwrap();
    assert_eq!(call.body, Bytes::from("payload"));
    assert_eq!(call.header("content-type"), Some("application/json"));

    let resp = send(&fake, "GET", "/stream-raw?chunks=4&delay_ms=5", None).await;
    let got = body_bytes(resp).await;
    assert_eq!(got, fake_llama::raw_stream(4));
    assert!(std::str::from_utf8(&got).is_err());
}

#[tokio::test]
async fn non_stream_death_auth_loading_and_delays() {
    let fake = FakeLlama::builder().events(2).api_key("k1").build().await;
    let (s, v) = call_json(&fake, "GET", "/props", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"]["message"], "Invalid API Key");
    let (s, _) = call_json(&fake, "GET", "/health", None).await;
    assert_eq!(s, StatusCode::OK);
    fake.set_api_key(None);

    fake.die_mid_stream_after(1);
    let req = Request::builder()
        .method("POST")
        .uri(format!("{}/completion", fake.url()))
        .body(Full::new(Bytes::from(json!({"prompt": "A"}).to_string())))
        .unwrap();
    assert!(
        client().request(req).await.is_err(),
        "connection closed without a reply"
    );

    fake.set_first_byte_delay(Duration::from_millis(150));
    let t0 = std::time::Instant::now();
    let resp = send(
        &fake,
        "POST",
        "/completion",
        Some(r#"{"prompt":"A","stream":true}"#),
    )
    .await;
    assert!(t0.elapsed() >= Duration::from_millis(150));
    body_bytes(resp).await;
    fake.set_first_byte_delay(Duration::ZERO);

    fake.set_loading(true);
    let (s, v) = call_json(&fake, "GET", "/health", None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["error"]["type"], "unavailable_error");
    fake.set_loading(false);

    fake.set_model_path("/models/other.gguf");
    let (_, v) = call_json(&fake, "GET", "/v1/models", None).await;
    assert_eq!(v["data"][0]["id"], "other.gguf");

    let (s, v) = call_json(
        &fake,
        "POST",
        "/completion",
        Some(json!({"prompt": "x".repeat(5000)})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["type"], "exceed_context_size_error");
    assert_eq!(v["error"]["n_ctx"], 4096);
}
