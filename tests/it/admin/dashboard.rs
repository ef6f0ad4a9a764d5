//! The web dashboard on the admin port (README "Dashboard"): the page and
//! its files are served without the admin key (they hold no data; a
//! browser opening a URL can't send one), with their types and the page's
//! security headers, while every API call still needs the key; a file the
//! dashboard does not have is a JSON 404; a DNS-rebound `Host` gets no
//! page, an `--admin-host` name (a phone on the LAN) does.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::HeaderMap;

use crate::support::kvgate::{assert_api_error, json_body, send, Kvgate};

use super::setup;

const KEY: &str = "dashboard-admin-key";

/// `GET path` on the admin port with exactly these `headers`.
async fn get(kv: &Kvgate, path: &str, headers: &[(&str, &str)]) -> (u16, HeaderMap, Bytes) {
    let resp = send("GET", &format!("{}{path}", kv.admin_url), headers, "").await;
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, h, body)
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).map_or("", |v| v.to_str().unwrap())
}

/// The headers every dashboard file comes with.
fn assert_page_headers(path: &str, h: &HeaderMap) {
    assert_eq!(header(h, "cache-control"), "no-cache", "{path}: {h:?}");
    assert_eq!(header(h, "x-content-type-options"), "nosniff", "{path}");
    let csp = header(h, "content-security-policy");
    for directive in [
        "default-src 'self'",
        "connect-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{path}: {csp}");
    }
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains('*'),
        "{csp}"
    );
}

#[tokio::test]
async fn the_page_is_served_without_the_key_and_the_api_still_wants_it() {
    let s = setup(1, |c| c.admin_key = Some(KEY.into())).await;
    let wrong = [("x-admin-key", "not-the-key")];
    for headers in [&[][..], &wrong[..]] {
        let (status, h, body) = get(&s.kv, "/", headers).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert_eq!(header(&h, "content-type"), "text/html; charset=utf-8");
        assert_page_headers("/", &h);
        let html = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            html.contains(r#"<script type="module" src="/dashboard/app.js">"#),
            "{html}"
        );
    }
    for (path, content_type, has) in [
        (
            "/dashboard/app.js",
            "text/javascript",
            "import * as api from './api.js';",
        ),
        ("/dashboard/api.js", "text/javascript", "X-Admin-Key"),
        (
            "/dashboard/style.css",
            "text/css",
            "prefers-color-scheme: dark",
        ),
        (
            "/dashboard/vendor/uPlot.esm.js",
            "text/javascript",
            "(v1.6.32)",
        ),
        ("/dashboard/vendor/uPlot.min.css", "text/css", ".uplot"),
        ("/dashboard/favicon.svg", "image/svg+xml", "<svg"),
    ] {
        let (status, h, body) = get(&s.kv, path, &[]).await;
        assert_eq!(status, 200, "{path}");
        assert!(
            header(&h, "content-type").starts_with(content_type),
            "{path}: {h:?}"
        );
        assert_page_headers(path, &h);
        assert!(String::from_utf8_lossy(&body).contains(has), "{path}");
    }

    // Everything with data still needs the key, the event stream included.
    for path in [
        "/health",
        "/slots",
        "/saves",
        "/settings",
        "/events",
        "/instances",
    ] {
        let (status, _, body) = get(&s.kv, path, &[]).await;
        assert_eq!(status, 401, "{path}");
        assert_api_error(401, &json_body(&body), path);
        let (status, _, _) = get(&s.kv, path, &wrong).await;
        assert_eq!(status, 401, "{path} with a wrong key");
    }
    let (status, _, body) = get(&s.kv, "/health", &[("x-admin-key", KEY)]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // Only GET (and HEAD) reach the page: anything else is the API's.
    let resp = send("POST", &format!("{}/", s.kv.admin_url), &[], "").await;
    assert_eq!(resp.status(), 401);
    let resp = send("HEAD", &format!("{}/", s.kv.admin_url), &[], "").await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn files_the_dashboard_does_not_have_are_json_404s() {
    let s = setup(1, |c| c.admin_key = Some(KEY.into())).await;
    for path in [
        "/dashboard/",
        "/dashboard/nope.js",
        "/dashboard/APP.JS",
        "/dashboard/vendor/",
        "/dashboard/vendor/../app.js",
        "/dashboard/%2e%2e/Cargo.toml",
        "/dashboard//app.js",
        "/dashboard/tests.rs",
    ] {
        let (status, h, body) = get(&s.kv, path, &[]).await;
        assert_eq!(status, 404, "{path}: {}", String::from_utf8_lossy(&body));
        assert!(
            header(&h, "content-type").starts_with("application/json"),
            "{path}"
        );
        let v = json_body(&body);
        assert_api_error(404, &v, path);
        assert_eq!(v["error"]["type"], "not_found_error", "{v}");
    }
    // Outside the dashboard's prefix it is the API's own 404 (behind the key).
    let (status, _, _) = get(&s.kv, "/dashboard", &[]).await;
    assert_eq!(status, 401);
    let (status, _, body) = get(&s.kv, "/index.html", &[("x-admin-key", KEY)]).await;
    assert_eq!(status, 404);
    assert_api_error(404, &json_body(&body), "/index.html");
}

#[tokio::test]
async fn a_foreign_host_gets_no_page_and_an_admin_host_name_does() {
    let s = setup(1, |c| {
        c.admin_key = Some(KEY.into());
        c.admin_hosts = vec!["kvgate.lan".into()];
    })
    .await;
    let port = s.kv.admin_url.rsplit(':').next().unwrap().to_string();
    let rebound = format!("attacker.example:{port}");
    for path in ["/", "/dashboard/app.js", "/dashboard/nope.js"] {
        let (status, h, body) = get(&s.kv, path, &[("host", &rebound)]).await;
        assert_eq!(status, 403, "{path}");
        let v = json_body(&body);
        assert_api_error(403, &v, path);
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--admin-host"),
            "{v}"
        );
        assert!(
            h.get("content-security-policy").is_none(),
            "{path}: no page"
        );
    }
    let lan = format!("kvgate.lan:{port}");
    let (status, _, body) = get(&s.kv, "/", &[("host", &lan)]).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("/dashboard/app.js"));
    // The page's own calls carry its origin: answered, with CORS for it.
    let origin = format!("http://{lan}");
    let (status, h, _) = get(
        &s.kv,
        "/health",
        &[("host", &lan), ("origin", &origin), ("x-admin-key", KEY)],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "access-control-allow-origin"), origin);
}
