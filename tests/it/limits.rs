//! What one client can hold (issue 15): connections (a header-read timeout
//! against slow-loris heads, an idle timeout between keep-alive requests
//! that spares a quiet stream, a connection cap per port), memory (a byte
//! budget for completion bodies in flight), the async workers (a flood of
//! names is parsed off them) and the log (long chat keys are hashed short).

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::fake_llama::FakeLlama;
use crate::support::kvgate::{admin_json, raw_exchange, Kvgate};

/// A raw connection to `base` (`http://host:port`).
async fn connect(base: &str) -> TcpStream {
    TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .expect("connect")
}

/// Reads until the server closes `conn`; how long that took from `since`
/// and what came. Fails if it stays open `within`.
async fn until_closed(
    conn: &mut TcpStream,
    since: Instant,
    within: Duration,
) -> (Duration, Vec<u8>) {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(within, conn.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the connection is still open after {within:?}"
    );
    (since.elapsed(), buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_head_is_cut_after_the_header_read_timeout() {
    let fake = FakeLlama::start().await;
    let kv = Kvgate::start(&fake.url(), |c| {
        c.header_read_timeout = Duration::from_millis(300);
        c.idle_timeout = Duration::from_secs(60);
    })
    .await;
    for base in [&kv.url, &kv.admin_url] {
        // Half a head, then nothing.
        let mut conn = connect(base).await;
        let t = Instant::now();
        conn.write_all(b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-")
            .await
            .unwrap();
        let (took, _) = until_closed(&mut conn, t, Duration::from_secs(5)).await;
        assert!(took >= Duration::from_millis(250), "closed after {took:?}");

        // A trickle: a byte every 50 ms keeps no head alive past the timeout.
        let mut conn = connect(base).await;
        let t = Instant::now();
        let trickle = async {
            for b in b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: "
                .iter()
                .cycle()
            {
                if conn.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                if t.elapsed() > Duration::from_secs(5) {
                    panic!("still writing after 5 s: the head was never cut");
                }
            }
        };
        trickle.await;
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
    }
    // Whole requests still pass.
    let (status, _) = admin_json(&kv.admin_url, "GET", "/health", None, None).await;
    assert_eq!(status, 200);
    kv.stop().await;
}

/// Reads one chunked response off a keep-alive connection (up to its last
/// chunk) and returns its text.
async fn one_chunked_response(conn: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.ends_with(b"0\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk))
            .await
            .expect("the response within 10 s")
            .expect("read");
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_but_a_quiet_stream_longer_than_the_timeout_does_not() {
    let fake = FakeLlama::start().await;
    let kv = Kvgate::start(&fake.url(), |c| {
        c.header_read_timeout = Duration::from_secs(30);
        c.idle_timeout = Duration::from_millis(400);
    })
    .await;

    // Connected, silent: closed after the idle timeout.
    let mut conn = connect(&kv.url).await;
    let (took, _) = until_closed(&mut conn, Instant::now(), Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(350), "closed after {took:?}");

    // A stream that is silent longer than the idle timeout, twice: before
    // its head (prompt processing) and between events.
    fake.set_first_byte_delay(Duration::from_millis(900));
    fake.set_event_delay(Duration::from_millis(300));
    let body =
        json!({"prompt": "Story\nBob:", "stop": ["\nUser:"], "stream": true, "n_predict": 4})
            .to_string();
    let request = format!(
        "POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut conn = connect(&kv.url).await;
    let t = Instant::now();
    conn.write_all(request.as_bytes()).await.unwrap();
    let text = one_chunked_response(&mut conn).await;
    assert!(
        t.elapsed() > Duration::from_millis(1200),
        "{:?}",
        t.elapsed()
    );
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("\"stop\":true"),
        "the stream ended whole: {text}"
    );
    // The stream's end starts the idle clock; the connection then closes.
    let ended = Instant::now();
    let (took, rest) = until_closed(&mut conn, ended, Duration::from_secs(5)).await;
    assert!(rest.is_empty());
    assert!(took >= Duration::from_millis(350), "closed after {took:?}");
    kv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_holds_newcomers_until_a_connection_ends() {
    let fake = FakeLlama::start().await;
    let kv = Kvgate::start(&fake.url(), |c| {
        c.admin_max_connections = 2;
        c.idle_timeout = Duration::from_secs(60);
    })
    .await;
    let mut held = vec![connect(&kv.admin_url).await, connect(&kv.admin_url).await];
    // Both are served: each answers a request (and stays open).
    for conn in &mut held {
        conn.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    }
    let admin = kv.admin_url.clone();
    let third = tokio::spawn(async move {
        raw_exchange(
            &admin,
            b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".to_vec(),
        )
        .await
    });
    // The third waits in the backlog while two are open...
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !third.is_finished(),
        "a third connection was served beside two"
    );
    // ...and is served as soon as one of them ends.
    drop(held.pop());
    let (status, _, body) = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("served once a connection ended")
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let _: Value = serde_json::from_slice(&body).unwrap();
    // The front port has its own cap.
    let (status, _) = admin_json(&kv.admin_url, "GET", "/health", None, None).await;
    assert_eq!(status, 200);
    kv.stop().await;
}

/// A completion body of exactly `len` bytes.
fn body_of_len(len: usize) -> String {
    let frame = json!({"prompt": "", "n_predict": 1}).to_string();
    let pad = len - frame.len();
    json!({"prompt": "x".repeat(pad), "n_predict": 1}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_in_flight_are_admitted_by_bytes() {
    const MIB: u64 = 1024 * 1024;
    let fake = FakeLlama::builder().n_ctx(1_000_000).build().await;
    let kv = Kvgate::start(&fake.url(), |c| {
        c.max_body_bytes = MIB;
        c.max_body_bytes_in_flight = MIB;
    })
    .await;
    let big = body_of_len(700_000);
    assert_eq!(big.len(), 700_000);

    // A slow client: its head and a first part of its body are in; kvgate
    // holds its declared bytes in the budget.
    let mut slow = connect(&kv.url).await;
    let head = format!(
        "POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        big.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&big.as_bytes()[..1000]).await.unwrap();
    let budget = kv.app.shared.body_budget.clone();
    crate::support::kvgate::poll_until("the slow body is admitted", Duration::from_secs(5), || {
        budget.available() < MIB - 600_000
    })
    .await;

    // A second big body does not fit beside it: 503, llama.cpp-style.
    let (status, _, bytes) = post_json_text(&format!("{}/completion", kv.url), big.clone()).await;
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    crate::support::kvgate::assert_api_error(status, &v, "over the byte budget");
    assert_eq!(status, 503);
    assert_eq!(v["error"]["type"], "unavailable_error");
    // A small one still fits.
    let (status, _, _) = post_json_text(&format!("{}/completion", kv.url), body_of_len(2000)).await;
    assert_eq!(status, 200);

    // The slow body, once whole, is served; then its bytes are free again.
    slow.write_all(&big.as_bytes()[1000..]).await.unwrap();
    let (took, answer) = until_closed(&mut slow, Instant::now(), Duration::from_secs(10)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "after {took:?}: {answer}"
    );
    kv.wait_idle().await;
    assert_eq!(budget.available(), MIB);
    let (status, _, _) = post_json_text(&format!("{}/completion", kv.url), big).await;
    assert_eq!(status, 200);
    kv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_refused_and_gives_its_bytes_back() {
    let fake = FakeLlama::start().await;
    let kv = Kvgate::start(&fake.url(), |c| {
        c.idle_timeout = Duration::from_millis(400);
    })
    .await;
    let budget = kv.app.shared.body_budget.clone();
    let full = budget.available();
    let big = body_of_len(500_000);
    let mut slow = connect(&kv.url).await;
    let head = format!(
        "POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        big.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&big.as_bytes()[..1000]).await.unwrap();
    let t = Instant::now();
    let (took, answer) = until_closed(&mut slow, t, Duration::from_secs(5)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "after {took:?}: {answer}"
    );
    assert!(
        answer.contains("invalid_request_error") && answer.contains("stalled"),
        "{answer}"
    );
    assert!(took >= Duration::from_millis(350), "{took:?}");
    assert_eq!(budget.available(), full);
    kv.stop().await;
}

/// POSTs a JSON text as is.
async fn post_json_text(url: &str, body: String) -> (u16, hyper::HeaderMap, bytes::Bytes) {
    use http_body_util::BodyExt;
    let resp =
        crate::support::kvgate::send("POST", url, &[("content-type", "application/json")], body)
            .await;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, bytes)
}

/// A chat body with 80 000 distinct message names (about 4 MB).
fn flood_of_names() -> Value {
    let mut messages: Vec<Value> = (0..80_000)
        .map(|i| json!({"role": "user", "name": format!("member-{i:06}"), "content": "hi"}))
        .collect();
    messages.push(json!({"role": "assistant", "name": "Bob", "content": ""}));
    json!({"messages": messages, "n_predict": 1})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_names_neither_stall_the_admin_port_nor_bloat_events() {
    let fake = FakeLlama::builder().n_ctx(3_000_000).build().await;
    let kv = Kvgate::start(&fake.url(), |_| {}).await;
    let tap = crate::support::kvgate::EventTap::open(&kv).await;
    let body = flood_of_names().to_string();
    assert!(body.len() > 3_500_000, "{}", body.len());
    let url = format!("{}/v1/chat/completions", kv.url);
    // Two at once: as many as the runtime has workers.
    let floods: Vec<_> = (0..2)
        .map(|_| tokio::spawn(post_json_text_owned(url.clone(), body.clone())))
        .collect();
    let mut slowest = Duration::ZERO;
    while !floods.iter().all(|f| f.is_finished()) {
        let t = Instant::now();
        let (status, _) = admin_json(&kv.admin_url, "GET", "/health", None, None).await;
        assert_eq!(status, 200);
        slowest = slowest.max(t.elapsed());
    }
    for f in floods {
        let (status, headers, bytes) = f.await.unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
        assert_eq!(headers["x-kvgate-character"], "Bob");
    }
    assert!(
        slowest < Duration::from_millis(500),
        "/health took {slowest:?}"
    );
    kv.wait_idle().await;
    // The events reach the tap over the stream: wait for both turns' own.
    let started = tap.wait_for("generation_started", 2).await;
    let events = tap.all();
    assert!(!events.is_empty());
    for e in &events {
        let line = e.to_string();
        assert!(
            line.len() < 1000,
            "an event of {} bytes: {:.300}",
            line.len(),
            line
        );
    }
    assert_eq!(started.len(), 2);
    assert_eq!(started[0]["character"], "Bob");
    kv.stop().await;
}

async fn post_json_text_owned(url: String, body: String) -> (u16, hyper::HeaderMap, bytes::Bytes) {
    post_json_text(&url, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_roster_leaves_short_log_lines_sidecars_and_names() {
    use crate::support::kvgate::{complete_saves, names_in, poll_until, post_json};
    use crate::support::kvgate_bin::KvgateBin;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("saves");
    std::fs::create_dir(&dir).unwrap();
    let fake = FakeLlama::builder()
        .slots(1)
        .events(3)
        .save_dir(&dir)
        .build()
        .await;
    let args = [
        "--upstream".to_string(),
        fake.url(),
        "--save-dir".into(),
        dir.display().to_string(),
        "--save-every".into(),
        "1".into(),
        "--health-interval".into(),
        "0.1".into(),
        "--log".into(),
        "debug".into(),
    ];
    let log = root.path().join("kvgate.log");
    let kv = KvgateBin::start(args, log, 1, Duration::from_secs(20)).await;
    // 15 000 stop names of 100 bytes: a 1.5 MB roster. Alone, it would
    // make a 1.5 MB chat key; an explicit 1000-character chat id too.
    let stops: Vec<String> = (0..15_000)
        .map(|i| format!("\n{:0>100}:", format!("M{i}")))
        .collect();
    let body = json!({"prompt": "Story\nBob:", "stop": stops, "stream": true});
    let url = format!("{}/completion", kv.url);
    let (status, headers, _) = post_json(&url, &[], &body).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-kvgate-character"], "Bob");
    let long_chat = "c".repeat(1000);
    let (status, _, _) = post_json(
        &url,
        &[("x-kvgate-chat", &long_chat), ("x-kvgate-character", "Ann")],
        &json!({"prompt": "Story\nAnn:", "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    poll_until("both autosaves", Duration::from_secs(10), || {
        complete_saves(&dir).len() == 2
    })
    .await;
    for meta in complete_saves(&dir) {
        assert!(
            meta.chat.len() <= 200,
            "sidecar chat of {} bytes",
            meta.chat.len()
        );
        assert!(meta.chat.contains('~'), "a hashed key: {}", meta.chat);
    }
    for name in names_in(&dir) {
        assert!(name.len() < 255, "file name of {} bytes", name.len());
        let size = std::fs::metadata(dir.join(&name)).unwrap().len();
        if name.ends_with(kvgate::store::META_SUFFIX) {
            assert!(size < 4096, "sidecar {name} of {size} bytes");
        }
    }
    let text = kv.log_text();
    assert!(text.lines().count() > 5, "debug logging on: {text:.2000}");
    let longest = text.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2000, "a log line of {longest} bytes");
}
