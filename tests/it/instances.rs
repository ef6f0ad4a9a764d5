//! The instances API's refusals, against a kvgate whose llama-server binary
//! is a script that fails: every bad request gets a clear llama.cpp-style
//! error with the right status, and nothing is left behind (no instance, no
//! record, no process); a failed start keeps llama-server's output in the
//! instance's log, and every change of status is told on `/events`.
//! Running instances are tested against the real llama-server in
//! `tests/e2e/instances.rs`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::support::fake_llama::FakeLlama;
use crate::support::kvgate::{assert_api_error, EventTap, Kvgate};

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
    let kv = with_binary(&fake, dir.path(), binary).await;
    let model_s = fake_model(bin_dir.path());
    let not_gguf = bin_dir.path().join("notes.txt");
    std::fs::write(&not_gguf, b"hello").unwrap();
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

/// A "llama-server" that writes its arguments, one a line, to `args.txt`
/// beside it, then fails.
fn recording_binary(dir: &Path) -> PathBuf {
    let path = dir.join("llama-server");
    let out = dir.join("args.txt");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > '{}'\necho 'error: recorded' >&2\nexit 1\n",
            out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// kvgate with the admin key, in front of `fake` saving to `dir`, running
/// `binary` as llama-server for the instances API.
async fn with_binary(fake: &FakeLlama, dir: &Path, binary: PathBuf) -> Kvgate {
    Kvgate::start_saving(&fake.url(), dir, |c| {
        c.admin_key = Some(KEY.into());
        c.llama_server = Some(binary);
    })
    .await
}

/// A file that starts like a GGUF model.
fn fake_model(dir: &Path) -> String {
    let model = dir.join("tiny.gguf");
    std::fs::write(&model, b"GGUF\x03\x00\x00\x00 not really a model").unwrap();
    model.display().to_string()
}

#[tokio::test]
async fn only_tuning_flags_reach_llama_server() {
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = tempfile::tempdir().unwrap();
    let fake = FakeLlama::builder().save_dir(dir.path()).build().await;
    let binary = recording_binary(bin_dir.path());
    let kv = with_binary(&fake, dir.path(), binary).await;
    let model = fake_model(bin_dir.path());
    let recorded = bin_dir.path().join("args.txt");

    // Flags that run programs, expose a shell tool, write or serve files, or
    // reach other hosts: 400 naming the flag, and nothing is run.
    for (args, flag) in [
        (
            json!(["--mcp-servers-json", "{\"x\":{\"command\":\"sh\"}}"]),
            "--mcp-servers-json",
        ),
        (json!(["--tools", "all"]), "--tools"),
        (json!(["-ag"]), "-ag"),
        (json!(["--log-file", "/tmp/x"]), "--log-file"),
        (json!(["--log_file", "/tmp/x"]), "--log_file"),
        (json!(["--path", "/"]), "--path"),
        (json!(["--models-dir", "/"]), "--models-dir"),
        (json!(["-dr"]), "-dr"),
        (json!(["--rpc", "10.0.0.1:50052"]), "--rpc"),
        (json!(["--api-prefix", "/x"]), "--api-prefix"),
        (
            json!(["-t", "4", "--chat-template-file", "/etc/passwd"]),
            "--chat-template-file",
        ),
    ] {
        let (status, v) = kv
            .admin_json(
                "POST",
                "/instances",
                Some(KEY),
                Some(json!({"model": model, "args": args})),
            )
            .await;
        assert_api_error(status, &v, flag);
        assert_eq!(status, 400, "{args}: {v}");
        assert!(
            error_message(&v).contains(&format!("{flag:?}")),
            "{args}: names {flag}: {v}"
        );
        assert!(!recorded.exists(), "{args}: llama-server was run");
    }
    // A value out of range is refused too.
    let (status, v) = kv
        .admin_json(
            "POST",
            "/instances",
            Some(KEY),
            Some(json!({"model": model, "args": ["-fa", "maybe"]})),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert!(error_message(&v).contains("\"-fa\""), "{v}");

    // Tuning flags pass, in either form, and llama-server gets them as it
    // reads them (it has no `--flag=value` form).
    let (status, v) = kv
        .admin_json(
            "POST",
            "/instances",
            Some(KEY),
            Some(json!({"model": model, "args": [
                "-ngl", "99", "--threads=4", "-fa", "on", "--cache-type-k=q8_0",
                "--temp", "0.7", "--seed", "-1", "--rope_freq_base", "10000", "-nkvo"
            ]})),
        )
        .await;
    assert_eq!(
        status, 500,
        "the start fails only because the binary does: {v}"
    );
    assert!(error_message(&v).contains("recorded"), "{v}");
    let given: Vec<String> = std::fs::read_to_string(&recorded)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let tail = &given[given.len() - 15..];
    assert_eq!(
        tail,
        [
            "-ngl",
            "99",
            "--threads",
            "4",
            "-fa",
            "on",
            "--cache-type-k",
            "q8_0",
            "--temp",
            "0.7",
            "--seed",
            "-1",
            "--rope-freq-base",
            "10000",
            "-nkvo"
        ],
        "{given:?}"
    );
    assert_eq!(
        given.iter().filter(|a| *a == "--port").count(),
        1,
        "kvgate's own --port only: {given:?}"
    );
    kv.stop().await;
}

#[tokio::test]
async fn a_recorded_instance_with_a_refused_flag_is_kept_but_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = tempfile::tempdir().unwrap();
    let model = fake_model(bin_dir.path());
    let record = |id: &str, args: Value, running: bool| {
        json!({"id": id, "model": model, "slots": 1, "ctx": 256, "port": null,
               "args": args, "running": running, "created": 1})
    };
    // Written by an older kvgate, which only refused flags it set itself.
    let junk = json!({"id": "llama-7", "note": "an operator's hand edit"});
    let file = dir.path().join(kvgate::instances::INSTANCES_FILE);
    let records = json!([
        record("llama-1", json!(["--tools", "all"]), true),
        record("llama-2", json!(["-t", "2"]), false),
        junk,
    ]);
    std::fs::write(&file, serde_json::to_vec(&records).unwrap()).unwrap();

    let fake = FakeLlama::builder().save_dir(dir.path()).build().await;
    let binary = recording_binary(bin_dir.path());
    // kvgate starts (it used to refuse the whole file, or run the record).
    let kv = with_binary(&fake, dir.path(), binary).await;
    let (status, v) = kv
        .admin_json("GET", "/instances/llama-1", Some(KEY), None)
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "failed", "{v}");
    assert!(v["error"].as_str().unwrap().contains("\"--tools\""), "{v}");
    let (status, v) = kv
        .admin_json("GET", "/instances/llama-2", Some(KEY), None)
        .await;
    assert_eq!((status, &v["status"]), (200, &json!("stopped")), "{v}");

    // Starting it is refused, naming the flag, and nothing runs.
    let (status, v) = kv
        .admin_json("POST", "/instances/llama-1/start", Some(KEY), None)
        .await;
    assert_api_error(status, &v, "start of a refused record");
    assert_eq!(status, 400, "{v}");
    assert!(error_message(&v).contains("\"--tools\""), "{v}");
    assert!(
        !bin_dir.path().join("args.txt").exists(),
        "llama-server was run"
    );

    // A rewrite of the file (a stop) keeps every record and the unusable
    // entry as it was.
    let (status, v) = kv
        .admin_json("POST", "/instances/llama-2/stop", Some(KEY), None)
        .await;
    assert_eq!(status, 200, "{v}");
    let back: Vec<Value> = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let ids: Vec<&str> = back.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["llama-1", "llama-2", "llama-7"], "{back:?}");
    assert_eq!(back[0]["args"], json!(["--tools", "all"]));
    assert_eq!(back[2], records[2]);
    kv.stop().await;
}

#[tokio::test]
async fn a_failed_start_keeps_its_output_in_the_log_and_each_change_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = tempfile::tempdir().unwrap();
    let model = fake_model(bin_dir.path());
    let record = json!([{"id": "llama-1", "model": model, "slots": 1, "ctx": 256,
        "port": null, "args": [], "running": false, "created": 1}]);
    let file = dir.path().join(kvgate::instances::INSTANCES_FILE);
    std::fs::write(&file, serde_json::to_vec(&record).unwrap()).unwrap();
    let fake = FakeLlama::builder().save_dir(dir.path()).build().await;
    let kv = with_binary(&fake, dir.path(), failing_binary(bin_dir.path())).await;
    let tap = EventTap::open_with(&kv, &[("x-admin-key", KEY)]).await;

    let (status, v) = kv
        .admin_json("GET", "/instances/llama-1/log", Some(KEY), None)
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!({"id": "llama-1", "lines": [], "total": 0}));

    for round in 1..=2u64 {
        let (status, v) = kv
            .admin_json("POST", "/instances/llama-1/start", Some(KEY), None)
            .await;
        assert_eq!(status, 500, "{v}");
        // The error quotes this start's lines only.
        let message = error_message(&v);
        assert_eq!(message.matches("this model is broken").count(), 1, "{v}");
        let (status, log) = kv
            .admin_json("GET", "/instances/llama-1/log", Some(KEY), None)
            .await;
        assert_eq!(status, 200, "{log}");
        // Kept across starts: both of each run's lines (stdout and stderr
        // are read side by side, so in either order).
        assert_eq!(log["total"], 2 * round, "{log}");
        let lines: Vec<&str> = log["lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap())
            .collect();
        assert_eq!(lines.len() as u64, 2 * round, "{log}");
        for line in ["loading the model", "error: this model is broken"] {
            assert_eq!(
                lines.iter().filter(|l| **l == line).count() as u64,
                round,
                "{log}"
            );
        }
    }
    let told: Vec<(String, String)> = tap
        .wait_for("instance", 4)
        .await
        .iter()
        .map(|e| {
            assert_eq!(e["id"], "llama-1", "{e}");
            (
                e["status"].as_str().unwrap().to_string(),
                e["error"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let statuses: Vec<&str> = told.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(statuses, ["starting", "failed", "starting", "failed"]);
    assert!(told[1].1.contains("this model is broken"), "{told:?}");

    let (status, v) = kv
        .admin_json("GET", "/instances/llama-9/log", Some(KEY), None)
        .await;
    assert_api_error(status, &v, "log of no instance");
    assert_eq!(status, 404, "{v}");
    let (status, _) = kv
        .admin_json("GET", "/instances/llama-1/log", None, None)
        .await;
    assert_eq!(status, 401);

    // Deleted: told too.
    let (status, v) = kv
        .admin_json("DELETE", "/instances/llama-1", Some(KEY), None)
        .await;
    assert_eq!(status, 200, "{v}");
    let told = tap.wait_for("instance", 6).await;
    assert_eq!(told[4]["status"], "stopping", "{told:?}");
    assert_eq!(told[5]["status"], "deleted", "{told:?}");
    kv.stop().await;
}
