//! The instances API's refusals, against a kvgate whose llama-server binary
//! is a script that fails: every bad request gets a clear llama.cpp-style
//! error with the right status, and nothing is left behind (no instance, no
//! record, no process). Running instances are tested against the real
//! llama-server in `tests/e2e/instances.rs`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::support::fake_llama::FakeLlama;
use crate::support::kvgate::{assert_api_error, Kvgate};

const KEY: &str = "instances-test-key";

/// A "llama-server" that writes two lines and exits with 1.
fn failing_binary(dir: &Path) -> PathBuf {
    let path = dir.join("llama-server");
    std::fs::write(
        &path,
        "#!/bin/sh\necho 'loading the model'\necho 'error: this model is broken' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn error_message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn instances_need_an_admin_key_and_a_save_directory() {
    let fake = FakeLlama::start().await;
    // No admin key configured: the API refuses to run processes.
    let kv = Kvgate::start(&fake.url(), |_| {}).await;
    let (status, v) = kv.admin_json("GET", "/instances", None, None).await;
    assert_api_error(status, &v, "no admin key");
    assert_eq!(status, 401);
    assert!(error_message(&v).contains("--admin-key"), "{v}");
    kv.stop().await;

    // A key, but no save directory: 501, nothing started.
    let kv = Kvgate::start(&fake.url(), |c| c.admin_key = Some(KEY.into())).await;
    let (status, v) = kv.admin_json("GET", "/instances", None, None).await;
    assert_eq!(status, 401, "{v}");
    let (status, v) = kv
        .admin_json("GET", "/instances", Some("wrong"), None)
        .await;
    assert_eq!(status, 401, "{v}");
    let (status, v) = kv
        .admin_json(
            "POST",
            "/instances",
            Some(KEY),
            Some(json!({"model": "/m.gguf"})),
        )
        .await;
    assert_api_error(status, &v, "no save directory");
    assert_eq!(status, 501);
    assert!(error_message(&v).contains("--save-dir"), "{v}");
    kv.stop().await;
}

#[tokio::test]
async fn bad_instance_requests_are_refused_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = tempfile::tempdir().unwrap();
    let fake = FakeLlama::builder().save_dir(dir.path()).build().await;
    let binary = failing_binary(bin_dir.path());
    let kv = Kvgate::start_saving(&fake.url(), dir.path(), |c| {
        c.admin_key = Some(KEY.into());
        c.llama_server = Some(binary);
    })
    .await;
    let model = bin_dir.path().join("tiny.gguf");
    std::fs::write(&model, b"GGUF\x03\x00\x00\x00 not really a model").unwrap();
    let not_gguf = bin_dir.path().join("notes.txt");
    std::fs::write(&not_gguf, b"hello").unwrap();
    let model_s = model.display().to_string();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = held.local_addr().unwrap().port();

    for (body, status, words) in [
        (json!({}), 400, "\"model\""),
        (
            json!({"model": "/nonexistent/m.gguf"}),
            400,
            "/nonexistent/m.gguf",
        ),
        (
            json!({"model": not_gguf.display().to_string()}),
            400,
            "not a GGUF",
        ),
        (json!({"model": model_s, "slots": 0}), 400, "\"slots\""),
        (json!({"model": model_s, "ctx": 16}), 400, "\"ctx\""),
        (
            json!({"model": model_s, "args": ["--port", "1"]}),
            400,
            "set by kvgate",
        ),
        (json!({"model": model_s, "args": "-t 2"}), 400, "\"args\""),
        (json!({"model": model_s, "port": busy_port}), 400, "in use"),
        (
            json!({"model": model_s, "gpus": 2}),
            400,
            "unknown parameter",
        ),
        // A start that fails: 500 with llama-server's last lines.
        (json!({"model": model_s}), 500, "this model is broken"),
    ] {
        let (got, v) = kv
            .admin_json("POST", "/instances", Some(KEY), Some(body.clone()))
            .await;
        assert_api_error(got, &v, &body.to_string());
        assert_eq!(got, status, "{body}: {v}");
        assert!(error_message(&v).contains(words), "{body}: {v}");
    }
    let (status, v) = kv.admin_json("POST", "/instances", Some(KEY), None).await;
    assert_eq!(status, 400, "an empty body has no model: {v}");

    // Nothing was created, recorded or left running.
    let (status, v) = kv.admin_json("GET", "/instances", Some(KEY), None).await;
    assert_eq!(status, 200);
    assert_eq!(v, json!({"instances": []}));
    assert!(!dir.path().join(kvgate::instances::INSTANCES_FILE).exists());
    assert_eq!(kv.app.upstreams().len(), 1);

    for (method, path) in [
        ("GET", "/instances/llama-1"),
        ("POST", "/instances/llama-1/start"),
        ("POST", "/instances/llama-1/stop"),
        ("DELETE", "/instances/llama-1"),
    ] {
        let (status, v) = kv.admin_json(method, path, Some(KEY), None).await;
        assert_api_error(status, &v, path);
        assert_eq!(status, 404, "{method} {path}: {v}");
    }
    let (status, v) = kv.admin_json("PUT", "/instances", Some(KEY), None).await;
    assert_eq!(status, 405, "{v}");
    drop(held);
    kv.stop().await;
}
