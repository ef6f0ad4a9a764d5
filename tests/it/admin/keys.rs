//! Keys: the admin key on every admin endpoint; front-port clients that need
//! a trusted key while llama-server gets kvgate's own; without a clients
//! file, authorization passes through unchanged.

use std::time::Duration;

use serde_json::json;

use crate::support::fake_llama::FakeLlama;
use crate::support::kvgate::{assert_api_error, json_body, post_json, send, EventTap, Kvgate};

use super::{names, say, setup, turn, CHAT, PLUGIN};

#[tokio::test]
async fn admin_key_is_required_on_every_endpoint() {
    const KEY: &str = "s3cret-admin-key";
    let s = setup(2, |c| c.admin_key = Some(KEY.into())).await;
    // The front port does not need it.
    say(&s, "Alice", "User: hi").await;
    let legacy = "chat1_20240115143022_character_Alice.bin";
    std::fs::write(s.dir.join(legacy), b"legacy").unwrap();
    let files_before = names(&s.dir);
    let actions_before = s.fake.slot_actions().len();
    let settings_body = json!({"save_every": 1}).to_string();
    let clear_body = json!({"erase": true}).to_string();
    let load_body = json!({"items": [{"file": legacy}]}).to_string();
    let preload_body =
        json!({"chat": CHAT, "characters": ["Alice"], "prompt": "x\nAlice:"}).to_string();
    let endpoints: Vec<(&str, String, String)> = vec![
        ("GET", "/health".into(), String::new()),
        ("GET", "/slots".into(), String::new()),
        ("GET", "/saves".into(), String::new()),
        ("GET", "/saves?q=alice".into(), String::new()),
        ("GET", "/files".into(), String::new()),
        ("GET", format!("{PLUGIN}/files"), String::new()),
        ("DELETE", format!("/files/{legacy}"), String::new()),
        ("DELETE", format!("{PLUGIN}/files/{legacy}"), String::new()),
        ("POST", "/save".into(), "{}".into()),
        ("POST", "/slots/0/save".into(), String::new()),
        ("POST", "/slots/clear".into(), clear_body),
        ("POST", "/load".into(), load_body),
        ("POST", "/preload".into(), preload_body),
        ("GET", "/preload/1".into(), String::new()),
        ("DELETE", "/preload/1".into(), String::new()),
        ("GET", "/settings".into(), String::new()),
        ("PUT", "/settings".into(), settings_body),
        ("GET", "/events".into(), String::new()),
        ("GET", "/metrics".into(), String::new()),
        ("GET", "/no-such-endpoint".into(), String::new()),
    ];
    let bad: [&[(&str, &str)]; 8] = [
        &[],
        &[("x-admin-key", "wrong")],
        &[("x-st-admin-key", "wrong")],
        &[("authorization", "Bearer wrong")],
        &[("x-admin-key", "s3cret-admin-ke")],
        &[("x-admin-key", "s3cret-admin-key2")],
        &[("authorization", "Bearer ")],
        &[("authorization", "Basic czNjcmV0LWFkbWluLWtleQ==")],
    ];
    for (method, path, body) in &endpoints {
        for headers in bad {
            let (status, v) = s.kv.admin_raw(method, path, headers, body).await;
            assert_eq!(status, 401, "{method} {path} with {headers:?}: {v}");
            assert_api_error(401, &v, path);
        }
    }
    assert_eq!(names(&s.dir), files_before, "nothing deleted or saved");
    assert_eq!(
        s.fake.slot_actions().len(),
        actions_before,
        "no slot touched"
    );
    assert!(s.fake.completions().len() == 1, "no preload ran");

    // Every header form opens every door.
    let bearer = format!("Bearer {KEY}");
    for headers in [
        [("x-admin-key", KEY)],
        [("x-st-admin-key", KEY)],
        [("authorization", bearer.as_str())],
    ] {
        for path in ["/health", "/slots", "/settings", "/files", "/metrics"] {
            let (status, v) = s.kv.admin_raw("GET", path, &headers, "").await;
            assert_eq!(status, 200, "{path} with {headers:?}: {v}");
        }
        let (status, v) = s.kv.admin_raw("GET", "/nope", &headers, "").await;
        assert_eq!(status, 404, "{v}");
    }
    let v =
        s.kv.admin_raw("GET", "/settings", &[("x-admin-key", KEY)], "")
            .await
            .1;
    assert_eq!(v["save_every"], 5, "the refused PUT changed nothing: {v}");
}

#[tokio::test]
async fn front_clients_need_a_trusted_key_and_llama_server_gets_kvgates() {
    const UPSTREAM_KEY: &str = "upstream-secret-0123";
    let dir = tempfile::tempdir().unwrap();
    let clients = dir.path().join("clients.toml");
    std::fs::write(
        &clients,
        "[[client]]\nid = \"home\"\nkey = \"k-home-0123456789\"\ntrusted = true\n\n\
         [[client]]\nid = \"guest\"\nkey = \"k-guest-0123456789\"\ntrusted = false\n",
    )
    .unwrap();
    let fake = FakeLlama::builder()
        .slots(2)
        .events(3)
        .api_key(UPSTREAM_KEY)
        .build()
        .await;
    let kv = Kvgate::start(&fake.url(), |c| {
        c.clients = Some(clients.clone());
        c.upstream_api_key = Some(UPSTREAM_KEY.into());
    })
    .await;
    let url = format!("{}/completion", kv.url);
    let body = turn("Alice", "User: hi");
    let upstream_bearer = format!("Bearer {UPSTREAM_KEY}");
    let refused: [&[(&str, &str)]; 7] = [
        &[],
        &[("authorization", "Bearer nope")],
        &[("authorization", "Bearer k-guest-0123456789")],
        &[("x-api-key", "k-guest-0123456789")],
        &[("x-api-key", "nope")],
        &[("authorization", "Bearer k-home-012345678")],
        &[("authorization", upstream_bearer.as_str())],
    ];
    let calls_before = fake.calls().len();
    for headers in refused {
        let (status, _, bytes) = post_json(&url, headers, &body).await;
        assert_eq!(status, 401, "{headers:?}");
        assert_api_error(401, &json_body(&bytes), &format!("{headers:?}"));
        let resp = send("GET", &format!("{}/v1/models", kv.url), headers, "").await;
        assert_eq!(resp.status(), 401, "passthrough with {headers:?}");
        let (status, _, _) = post_json(
            &format!("{}/slots/0?action=erase", kv.url),
            headers,
            &json!({}),
        )
        .await;
        assert_eq!(status, 401, "slot action with {headers:?}");
    }
    assert!(
        fake.completions().is_empty(),
        "a refused completion reached llama-server"
    );
    assert!(
        fake.calls()[calls_before..]
            .iter()
            .all(|c| c.query.as_deref() != Some("action=erase")),
        "a refused slot action reached llama-server"
    );

    let tap = EventTap::open(&kv).await;
    for headers in [
        [("authorization", "Bearer k-home-0123456789")],
        [("x-api-key", "k-home-0123456789")],
    ] {
        fake.clear_calls();
        let (status, _, bytes) = post_json(&url, &headers, &body).await;
        assert_eq!(
            status,
            200,
            "{headers:?}: {}",
            String::from_utf8_lossy(&bytes)
        );
        kv.wait_idle().await;
        let resp = send("GET", &format!("{}/v1/models", kv.url), &headers, "").await;
        assert_eq!(resp.status(), 200);
        let calls = fake.calls();
        for path in ["/completion", "/v1/models"] {
            let c = calls
                .iter()
                .find(|c| c.path == path)
                .unwrap_or_else(|| panic!("{path} never reached llama-server"));
            assert_eq!(
                c.header("authorization"),
                Some(&*format!("Bearer {UPSTREAM_KEY}")),
                "{path}: {:?}",
                c.headers
            );
            assert!(
                c.headers.iter().all(|(_, v)| !v.contains("k-home")),
                "{path}: the client's key leaked upstream: {:?}",
                c.headers
            );
        }
    }
    // Events name the client by its id.
    let events = tap.until("generation_finished", 1).await;
    let assigned = events
        .iter()
        .find(|e| e["type"] == "slot_assigned")
        .unwrap_or_else(|| panic!("{events:#?}"));
    assert!(
        assigned["client"]
            .as_str()
            .is_some_and(|c| c.contains("home")),
        "the client id in events: {assigned}"
    );
    assert!(!assigned.to_string().contains("k-home"), "{assigned}");
}

#[tokio::test]
async fn without_a_clients_file_authorization_passes_through_unchanged() {
    for upstream_key in [None, Some("kvgates-own-key")] {
        let fake = FakeLlama::builder().slots(2).events(3).build().await;
        let kv = Kvgate::start(&fake.url(), |c| {
            c.upstream_api_key = upstream_key.map(Into::into);
            // The monitor's own `/props` polls must not be mistaken for the
            // client's: after the first one, none comes during the test.
            c.health_interval = Duration::from_secs(3600);
        })
        .await;
        for (name, value) in [
            ("authorization", "Bearer client-own-key"),
            ("x-api-key", "client-x-key"),
        ] {
            fake.clear_calls();
            let (status, _, _) = post_json(
                &format!("{}/completion", kv.url),
                &[(name, value)],
                &turn("Alice", "User: hi"),
            )
            .await;
            assert_eq!(status, 200);
            kv.wait_idle().await;
            let resp = send("GET", &format!("{}/props", kv.url), &[(name, value)], "").await;
            assert_eq!(resp.status(), 200);
            for path in ["/completion", "/props"] {
                let c = fake
                    .calls()
                    .into_iter()
                    .find(|c| c.path == path)
                    .unwrap_or_else(|| panic!("no {path}"));
                assert_eq!(
                    c.header(name),
                    Some(value),
                    "{path} with upstream key {upstream_key:?}: {:?}",
                    c.headers
                );
            }
        }
    }
}
