//! The admin port's browser rules (README "Security"): a foreign page can
//! neither change anything (cross-site POSTs, whatever their content type)
//! nor read the API through a DNS-rebound name; CORS answers the port's own
//! origin and `--admin-cors-origin` ones exactly, never `*`; `--admin-host`
//! names are answered. The rules hold on the seed plugin's prefix too.

use http_body_util::BodyExt;
use hyper::HeaderMap;
use serde_json::{json, Value};

use crate::support::kvgate::{assert_api_error, json_body, raw_exchange, send, Kvgate};

use super::{names, say, setup, slot_with, PLUGIN};

/// `method path` on the admin port with exactly these extra `headers`
/// (nothing added, so content types are the test's); status, headers, JSON.
async fn request(
    kv: &Kvgate,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, HeaderMap, Value) {
    let url = format!("{}{path}", kv.admin_url);
    let resp = send(method, &url, headers, body.to_string()).await;
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, h, json_body(&bytes))
}

/// The admin port's `host:port`.
fn authority(kv: &Kvgate) -> String {
    kv.admin_url.trim_start_matches("http://").to_string()
}

fn acao(h: &HeaderMap) -> Option<&str> {
    h.get("access-control-allow-origin")
        .map(|v| v.to_str().unwrap())
}

const EVIL: &str = "http://evil.example";

#[tokio::test]
async fn a_cross_site_post_erases_and_saves_nothing() {
    let s = setup(2, |_| {}).await;
    say(&s, "Alice", "User: one").await;
    say(&s, "Bob", "User: one").await;
    let files = names(&s.dir);
    let erase = json!({"erase": true}).to_string();
    // The reported attack, and what a page can send without a preflight.
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        for path in ["/slots/clear", &format!("{PLUGIN}/slots/clear")] {
            let headers = [("origin", EVIL), ("content-type", ct)];
            let (status, h, v) = request(&s.kv, "POST", path, &headers, &erase).await;
            assert_eq!(status, 403, "{ct} {path}: {v}");
            assert_api_error(403, &v, path);
            assert_eq!(v["error"]["type"], "permission_error", "{v}");
            assert!(acao(&h).is_none(), "{h:?}");
            // No Origin (an old browser): the content type alone refuses it.
            let (status, _, v) =
                request(&s.kv, "POST", path, &[("content-type", ct)], &erase).await;
            assert_eq!(status, 415, "{ct} {path} without Origin: {v}");
            assert_api_error(415, &v, path);
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(msg.contains("Content-Type: application/json"), "{msg}");
        }
        // Bodyless actions too: a form can post nothing at all.
        let (status, _, v) = request(
            &s.kv,
            "POST",
            "/save",
            &[("origin", EVIL), ("content-type", ct)],
            "",
        )
        .await;
        assert_eq!(status, 403, "/save {ct}: {v}");
        let (status, _, v) = request(&s.kv, "POST", "/save", &[("content-type", ct)], "").await;
        assert_eq!(status, 415, "/save {ct} without Origin: {v}");
    }
    // A JSON-labelled request from a foreign page is refused as well.
    let headers = [("origin", EVIL), ("content-type", "application/json")];
    let (status, _, v) = request(&s.kv, "POST", "/slots/clear", &headers, &erase).await;
    assert_eq!(status, 403, "{v}");
    let (status, _, v) = request(&s.kv, "POST", "/slots/clear", &[("origin", "null")], "").await;
    assert_eq!(status, 403, "Origin null: {v}");

    assert!(
        s.fake.slot_actions().iter().all(|a| a.1 != "erase"),
        "{:?}",
        s.fake.slot_actions()
    );
    assert!(
        !s.fake.slot_tokens(0).is_empty(),
        "slot 0 still holds Alice"
    );
    let slots = s.kv.admin_slots().await;
    assert!(slot_with(&slots, "Alice").is_some(), "{slots:?}");
    assert!(slot_with(&slots, "Bob").is_some(), "{slots:?}");
    assert_eq!(names(&s.dir), files, "nothing saved");

    // The port's own page, with JSON, may; so may curl (no Origin, JSON).
    let own = format!("http://{}", authority(&s.kv));
    let headers = [
        ("origin", own.as_str()),
        ("content-type", "application/json"),
    ];
    let (status, h, v) = request(&s.kv, "POST", "/slots/clear", &headers, &erase).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(acao(&h), Some(own.as_str()));
    assert!(v["erased"].as_array().is_some_and(|e| !e.is_empty()), "{v}");
    assert!(
        s.fake.slot_tokens(0).is_empty(),
        "erased by the allowed request"
    );
}

#[tokio::test]
async fn a_rebound_host_is_refused_on_every_method() {
    let s = setup(2, |_| {}).await;
    let port = authority(&s.kv)
        .rsplit_once(':')
        .map(|(_, p)| p.to_string())
        .unwrap();
    let attacker = format!("attacker.example:{port}");
    for (method, path, body) in [
        ("GET", "/settings".to_string(), ""),
        ("GET", format!("{PLUGIN}/files"), ""),
        ("GET", "/events".to_string(), ""),
        ("OPTIONS", "/settings".to_string(), ""),
        ("PUT", "/settings".to_string(), r#"{"save_every":1}"#),
    ] {
        let headers = [
            ("host", attacker.as_str()),
            ("content-type", "application/json"),
        ];
        let (status, h, v) = request(&s.kv, method, &path, &headers, body).await;
        assert_eq!(status, 403, "{method} {path}: {v}");
        assert_api_error(403, &v, &path);
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("Host") && msg.contains("--admin-host"),
            "{msg}"
        );
        assert!(acao(&h).is_none(), "{h:?}");
    }
    assert_eq!(s.kv.admin_get("/settings").await["save_every"], 5);
    // Loopback names and the bound address are answered, with any port
    // (an SSH tunnel moves it).
    for host in [
        "localhost".to_string(),
        format!("localhost:{port}"),
        "127.0.0.1:9999".into(),
        format!("[::1]:{port}"),
        authority(&s.kv),
    ] {
        let (status, _, v) = request(&s.kv, "GET", "/settings", &[("host", &host)], "").await;
        assert_eq!(status, 200, "Host {host}: {v}");
    }
    // HTTP/1.1 without a Host at all.
    let (status, _, body) = raw_exchange(
        &s.kv.admin_url,
        b"GET /settings HTTP/1.1\r\nconnection: close\r\n\r\n".to_vec(),
    )
    .await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert_api_error(400, &json_body(&body), "no Host");
}

#[tokio::test]
async fn admin_host_names_are_answered() {
    let s = setup(1, |c| {
        c.admin_hosts = vec!["kvgate.lan".into(), "box.lan:9000".into()];
    })
    .await;
    for (host, want) in [
        ("kvgate.lan", 200),
        ("KVGATE.lan:8090", 200),
        ("box.lan:9000", 200),
        ("box.lan:9001", 403),
        ("other.lan", 403),
    ] {
        let (status, _, v) = request(&s.kv, "GET", "/health", &[("host", host)], "").await;
        assert_eq!(status, want, "Host {host}: {v}");
    }
    // Its own origin follows the name the browser used.
    let headers = [
        ("host", "kvgate.lan"),
        ("origin", "http://kvgate.lan"),
        ("content-type", "application/json"),
    ];
    let (status, h, v) = request(&s.kv, "PUT", "/settings", &headers, r#"{"save_every":2}"#).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(acao(&h), Some("http://kvgate.lan"));
}

#[tokio::test]
async fn cors_answers_listed_origins_exactly_and_never_star() {
    const ST: &str = "http://192.168.1.20:8000";
    let s = setup(1, |c| c.admin_cors_origins = vec![ST.into()]).await;
    let own = format!("http://{}", authority(&s.kv));
    for (origin, want) in [
        (ST, Some(ST)),
        (own.as_str(), Some(own.as_str())),
        ("http://192.168.1.20:8001", None),
        ("https://192.168.1.20:8000", None),
        ("http://192.168.1.20:8000.evil.example", None),
        (EVIL, None),
        ("null", None),
    ] {
        let (status, h, v) = request(&s.kv, "GET", "/settings", &[("origin", origin)], "").await;
        // A read is answered; only the allowed origin's page may see it.
        assert_eq!(status, 200, "{origin}: {v}");
        assert_eq!(acao(&h), want, "{origin}");
        assert_eq!(h["vary"], "Origin", "{origin}");
    }
    // Without Origin: no CORS headers.
    let (_, h, _) = request(&s.kv, "GET", "/settings", &[], "").await;
    assert!(acao(&h).is_none());

    // The preflight a page's keyed JSON POST triggers.
    let preflight = |origin: &'static str| {
        let kv = &s.kv;
        async move {
            request(
                kv,
                "OPTIONS",
                "/slots/clear",
                &[
                    ("origin", origin),
                    ("access-control-request-method", "POST"),
                    ("access-control-request-headers", "content-type,x-admin-key"),
                ],
                "",
            )
            .await
        }
    };
    let (status, h, _) = preflight(ST).await;
    assert_eq!(status, 204);
    assert_eq!(acao(&h), Some(ST));
    let allowed = h["access-control-allow-headers"].to_str().unwrap();
    for name in [
        "Content-Type",
        "X-Admin-Key",
        "Authorization",
        "X-ST-Admin-Key",
    ] {
        assert!(allowed.contains(name), "{allowed}");
    }
    let methods = h["access-control-allow-methods"].to_str().unwrap();
    for m in ["GET", "POST", "PUT", "DELETE"] {
        assert!(methods.contains(m), "{methods}");
    }
    assert!(h.contains_key("access-control-max-age"), "{h:?}");
    let (status, h, v) = preflight(EVIL).await;
    assert_eq!(status, 403, "{v}");
    assert!(acao(&h).is_none() && !h.contains_key("access-control-allow-headers"));

    // The listed origin's page may act, and reads the answer.
    let headers = [("origin", ST), ("content-type", "application/json")];
    let (status, h, v) = request(&s.kv, "PUT", "/settings", &headers, r#"{"save_every":3}"#).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(acao(&h), Some(ST));
    // Errors reach it too, so it can show them.
    let (status, h, v) = request(&s.kv, "GET", "/no-such", &[("origin", ST)], "").await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(acao(&h), Some(ST));
    // The event stream carries the header (its head is enough).
    let resp = send(
        "GET",
        &format!("{}/events", s.kv.admin_url),
        &[("origin", ST)],
        "",
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(acao(resp.headers()), Some(ST));
    drop(resp);
    let (status, h, v) = request(&s.kv, "GET", "/health", &[("origin", ST)], "").await;
    assert_eq!(status, 200, "{v}");
    assert_ne!(acao(&h), Some("*"));
}

#[tokio::test]
async fn the_rules_come_before_the_admin_key() {
    const KEY: &str = "s3cret-admin-key";
    let s = setup(1, |c| c.admin_key = Some(KEY.into())).await;
    // Even with the key, a foreign page cannot write.
    let headers = [
        ("origin", EVIL),
        ("content-type", "application/json"),
        ("x-admin-key", KEY),
    ];
    let (status, _, v) = request(&s.kv, "PUT", "/settings", &headers, r#"{"save_every":1}"#).await;
    assert_eq!(status, 403, "{v}");
    // A preflight carries no key and is answered without one.
    let own = format!("http://{}", authority(&s.kv));
    let (status, h, _) = request(
        &s.kv,
        "OPTIONS",
        "/settings",
        &[
            ("origin", own.as_str()),
            ("access-control-request-method", "PUT"),
        ],
        "",
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(acao(&h), Some(own.as_str()));
    // The key still applies to what the rules let through.
    let (status, h, v) = request(&s.kv, "GET", "/settings", &[("origin", own.as_str())], "").await;
    assert_eq!(status, 401, "{v}");
    assert_eq!(acao(&h), Some(own.as_str()), "the page can read why");
    let (status, _, v) = request(&s.kv, "GET", "/settings", &[("x-admin-key", KEY)], "").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["save_every"], 5, "{v}");
}
