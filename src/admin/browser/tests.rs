use hyper::header::{HeaderName, ACCESS_CONTROL_ALLOW_ORIGIN};

use super::*;

fn rules(bound: &str, hosts: &[&str], origins: &[&str]) -> BrowserRules {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    BrowserRules::new(bound.parse().unwrap(), &s(hosts), &s(origins))
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn host_ok(r: &BrowserRules, host: &str) -> bool {
    r.check_host(Version::HTTP_11, &headers(&[("host", host)]))
        .is_ok()
}

#[test]
fn host_must_name_this_port() {
    let r = rules("127.0.0.1:8090", &["kv.lan", "box.lan:9000"], &[]);
    for ok in [
        "127.0.0.1:8090",
        "127.0.0.1",
        "localhost",
        "LocalHost:8090",
        "localhost:9999",
        "[::1]",
        "[::1]:8090",
        "kv.lan",
        "KV.LAN:8090",
        "kv.lan:1234",
        "box.lan:9000",
    ] {
        assert!(host_ok(&r, ok), "{ok} should be answered");
    }
    for bad in [
        "attacker.example",
        "attacker.example:8090",
        "localhost.attacker.example",
        "box.lan",
        "box.lan:9001",
        "10.0.0.5:8090",
        "user@localhost:8090",
        "",
        "*",
    ] {
        assert!(!host_ok(&r, bad), "{bad} should be refused");
    }
}

#[test]
fn bound_address_is_answered_on_its_port_only() {
    let r = rules("192.0.2.10:8090", &[], &[]);
    assert!(host_ok(&r, "192.0.2.10:8090"));
    assert!(!host_ok(&r, "192.0.2.10:8091"));
    assert!(!host_ok(&r, "192.0.2.10"), "port 80 is not the bound one");
    assert!(!host_ok(&r, "192.0.2.11:8090"));
    let v6 = rules("[2001:db8::1]:8090", &[], &[]);
    assert!(host_ok(&v6, "[2001:db8::1]:8090"));
    assert!(host_ok(&v6, "[2001:DB8:0::1]:8090"), "any spelling");
    assert!(!host_ok(&v6, "[2001:db8::2]:8090"));
    // A wildcard bind answers any IP literal on its port, never a name.
    let any = rules("0.0.0.0:8090", &[], &[]);
    assert!(host_ok(&any, "192.0.2.77:8090"));
    assert!(!host_ok(&any, "192.0.2.77:8091"));
    assert!(!host_ok(&any, "attacker.example:8090"));
}

#[test]
fn wrong_host_is_403_missing_host_400_on_http11() {
    let r = rules("127.0.0.1:8090", &[], &[]);
    let e = r
        .check_host(
            Version::HTTP_11,
            &headers(&[("host", "attacker.example:8090")]),
        )
        .unwrap_err();
    assert_eq!(
        (e.status, e.kind),
        (StatusCode::FORBIDDEN, ErrorType::Permission)
    );
    assert!(e.message.contains("--admin-host"), "{}", e.message);
    assert!(e.message.contains("attacker.example"), "{}", e.message);
    let e = r
        .check_host(Version::HTTP_11, &HeaderMap::new())
        .unwrap_err();
    assert_eq!(e.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.check_host(Version::HTTP_10, &HeaderMap::new()), Ok(None));
}

#[test]
fn own_origin_follows_the_host_used() {
    let r = rules("127.0.0.1:8090", &[], &["https://st.example"]);
    let cors = |origin: &str, host: &str| r.cors(&headers(&[("origin", origin)]), Some(host));
    assert!(matches!(
        cors("http://127.0.0.1:8090", "127.0.0.1:8090"),
        Cors::Allowed(_)
    ));
    assert!(matches!(
        cors("http://localhost:8090", "localhost:8090"),
        Cors::Allowed(_)
    ));
    // Another local page (another port) is another origin.
    assert!(matches!(
        cors("http://localhost:3000", "localhost:8090"),
        Cors::Denied(_)
    ));
    assert!(matches!(
        cors("https://127.0.0.1:8090", "127.0.0.1:8090"),
        Cors::Denied(_)
    ));
    assert!(matches!(cors("null", "127.0.0.1:8090"), Cors::Denied(_)));
    assert!(matches!(
        cors("http://evil.example", "127.0.0.1:8090"),
        Cors::Denied(_)
    ));
    // Listed origins: exactly, never a prefix or another scheme.
    assert!(matches!(
        cors("https://st.example", "127.0.0.1:8090"),
        Cors::Allowed(_)
    ));
    assert!(matches!(
        cors("http://st.example", "127.0.0.1:8090"),
        Cors::Denied(_)
    ));
    assert!(matches!(
        cors("https://st.example.evil", "127.0.0.1:8090"),
        Cors::Denied(_)
    ));
    assert_eq!(
        r.cors(&HeaderMap::new(), Some("127.0.0.1:8090")),
        Cors::Absent
    );
}

#[test]
fn origins_normalize_as_browsers_send_them() {
    assert_eq!(
        normalize_origin("HTTP://ST.example:80/").as_deref(),
        Some("http://st.example")
    );
    assert_eq!(
        normalize_origin("https://a:8443").as_deref(),
        Some("https://a:8443")
    );
    assert_eq!(
        normalize_origin("https://a:443").as_deref(),
        Some("https://a")
    );
    for bad in [
        "*",
        "null",
        "st.example",
        "ftp://a",
        "http://a/path",
        "http://*",
        "http://u@a",
    ] {
        assert_eq!(normalize_origin(bad), None, "{bad}");
    }
}

fn write(
    r: &BrowserRules,
    method: Method,
    pairs: &[(&str, &str)],
    has_body: bool,
) -> Result<(), StatusCode> {
    let h = headers(pairs);
    let cors = r.cors(&h, Some("127.0.0.1:8090"));
    r.check_write(&method, &h, &cors, has_body)
        .map_err(|e| e.status)
}

#[test]
fn writes_need_an_allowed_origin_and_json() {
    let r = rules("127.0.0.1:8090", &[], &["https://st.example"]);
    let json = ("content-type", "application/json; charset=utf-8");
    let evil = ("origin", "http://evil.example");
    // The attack: a text/plain POST from a foreign page.
    assert_eq!(
        write(
            &r,
            Method::POST,
            &[evil, ("content-type", "text/plain")],
            true
        ),
        Err(StatusCode::FORBIDDEN)
    );
    assert_eq!(
        write(&r, Method::POST, &[evil, json], true),
        Err(StatusCode::FORBIDDEN)
    );
    assert_eq!(
        write(&r, Method::DELETE, &[evil], false),
        Err(StatusCode::FORBIDDEN)
    );
    assert_eq!(
        write(&r, Method::PUT, &[("origin", "null"), json], true),
        Err(StatusCode::FORBIDDEN)
    );
    // Without an Origin (old browsers, curl): the content type decides.
    for simple in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        assert_eq!(
            write(&r, Method::POST, &[("content-type", simple)], true),
            Err(StatusCode::UNSUPPORTED_MEDIA_TYPE),
            "{simple}"
        );
        assert_eq!(
            write(&r, Method::POST, &[("content-type", simple)], false),
            Err(StatusCode::UNSUPPORTED_MEDIA_TYPE),
            "{simple}, empty"
        );
    }
    assert_eq!(
        write(&r, Method::POST, &[], true),
        Err(StatusCode::UNSUPPORTED_MEDIA_TYPE)
    );
    assert_eq!(write(&r, Method::POST, &[], false), Ok(()));
    assert_eq!(write(&r, Method::POST, &[json], true), Ok(()));
    assert_eq!(
        write(
            &r,
            Method::POST,
            &[("content-type", "Application/JSON")],
            true
        ),
        Ok(())
    );
    assert_eq!(
        write(
            &r,
            Method::POST,
            &[("origin", "http://127.0.0.1:8090"), json],
            true
        ),
        Ok(())
    );
    assert_eq!(
        write(
            &r,
            Method::PUT,
            &[("origin", "https://st.example"), json],
            true
        ),
        Ok(())
    );
    // Reads are never refused for their Origin: the browser hides the answer.
    assert_eq!(
        write(
            &r,
            Method::GET,
            &[evil, ("content-type", "text/plain")],
            true
        ),
        Ok(())
    );
}

#[test]
fn preflight_and_cors_headers() {
    let allowed = Cors::Allowed(HeaderValue::from_static("https://st.example"));
    let resp = preflight(&allowed);
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let h = resp.headers();
    assert_eq!(h[ACCESS_CONTROL_ALLOW_ORIGIN], "https://st.example");
    assert_eq!(h[ACCESS_CONTROL_ALLOW_HEADERS], HEADERS);
    assert!(h[ACCESS_CONTROL_ALLOW_METHODS]
        .to_str()
        .unwrap()
        .contains("DELETE"));
    assert_eq!(h[ACCESS_CONTROL_MAX_AGE], MAX_AGE);
    assert_eq!(h[VARY], "Origin");

    let denied = preflight(&Cors::Denied("http://evil.example".into()));
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    assert!(denied.headers().get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
    assert!(denied.headers().get(ACCESS_CONTROL_ALLOW_HEADERS).is_none());

    let plain = preflight(&Cors::Absent);
    assert_eq!(plain.status(), StatusCode::NO_CONTENT);
    assert!(plain.headers().get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
    assert_eq!(plain.headers()[ALLOW], METHODS);

    let resp = with_cors(Response::new(empty()), &Cors::Denied("http://e".into()));
    assert!(resp.headers().get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
    assert_eq!(resp.headers()[VARY], "Origin");
}
