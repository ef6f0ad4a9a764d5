//! Runs kvgate in-process on port-0 listeners, plus a small HTTP client that
//! streams response bodies chunk by chunk and reports exact bytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kvgate::app::App;
use kvgate::config::Config;
use kvgate::store::hooks::{CacheHooks, NoCache};
use kvgate::upstream::Upstream;
use kvgate::Gateway;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A fake llama-server writing real slot files into a save directory, and
/// kvgate in front of it with the same directory.
pub struct Saving {
    pub fake: super::fake_llama::FakeLlama,
    pub kv: Kvgate,
    /// The save directory (kvgate's and the fake's).
    pub dir: PathBuf,
    /// Its parent: what must stay outside the save directory lives here.
    pub root: tempfile::TempDir,
}

impl Saving {
    /// `slots` slots, 3 events per completion unless `fake` says otherwise,
    /// `tweak` applied to kvgate's configuration last.
    pub async fn start(
        slots: usize,
        fake: impl FnOnce(super::fake_llama::FakeLlamaBuilder) -> super::fake_llama::FakeLlamaBuilder,
        tweak: impl FnOnce(&mut Config),
    ) -> Saving {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("saves");
        std::fs::create_dir(&dir).unwrap();
        let builder = super::fake_llama::FakeLlama::builder()
            .slots(slots)
            .events(3)
            .save_dir(&dir);
        let fake = fake(builder).build().await;
        let kv = Kvgate::start_saving(&fake.url(), &dir, tweak).await;
        Saving {
            fake,
            kv,
            dir,
            root,
        }
    }

    /// Messages since the last save of `slot`.
    pub fn usage(&self, slot: usize) -> u32 {
        self.kv.upstream.pool.snapshot()[slot].usage
    }
}

/// A real llama-server with `slots` slots running the tiny model, and kvgate
/// saving in front of it (`tweak` applied last); `None` when the test is to
/// be skipped (see `support::llama`).
pub async fn saving_over_llama(
    slots: u32,
    tweak: impl FnOnce(&mut Config),
) -> Option<(super::llama::LlamaServer, Kvgate)> {
    let llama = super::llama::LlamaServer::start(super::llama::LlamaOpts {
        slots,
        ..super::llama::LlamaOpts::default()
    })
    .await?;
    let kv = Kvgate::start_saving(&llama.base_url, &llama.save_dir, tweak).await;
    Some((llama, kv))
}

/// A preload's id from `POST /preload`'s answer (a number or a string).
pub fn preload_id(v: &Value) -> String {
    match &v["id"] {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("no id in {v} ({other})"),
    }
}

/// Character names of a preload's `succeeded` list (names or objects).
pub fn preload_succeeded(p: &Value) -> std::collections::BTreeSet<String> {
    p["succeeded"]
        .as_array()
        .unwrap_or_else(|| panic!("no succeeded array: {p}"))
        .iter()
        .map(|e| match e {
            Value::String(s) => s.clone(),
            o => o["character"].as_str().expect("character").to_string(),
        })
        .collect()
}

/// A running kvgate.
pub struct Kvgate {
    /// Front port base URL.
    pub url: String,
    /// Admin port base URL.
    pub admin_url: String,
    /// The first upstream's state, to inspect its slot table.
    pub upstream: Arc<Upstream>,
    /// The application: every upstream, and what they share.
    pub app: Arc<App>,
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<()>>,
}

impl Kvgate {
    /// Starts kvgate in front of `upstream` with test-friendly settings,
    /// `tweak` applied last; waits until it knows the upstream's slots.
    pub async fn start(upstream: &str, tweak: impl FnOnce(&mut Config)) -> Kvgate {
        Self::start_with_hooks(upstream, Arc::new(NoCache), tweak).await
    }

    /// As [`Kvgate::start`], with explicit cache hooks.
    pub async fn start_with_hooks(
        upstream: &str,
        hooks: Arc<dyn CacheHooks>,
        tweak: impl FnOnce(&mut Config),
    ) -> Kvgate {
        let mut cfg = test_config(upstream);
        tweak(&mut cfg);
        let gw = Gateway::with_hooks(cfg, hooks).expect("gateway");
        Self::serve(gw).await
    }

    /// kvgate with the save directory `dir` in front of `upstream` (the real
    /// cache layer), `tweak` applied last; waits until it knows the
    /// upstream's slots and model fingerprint (saves need it).
    pub async fn start_saving(
        upstream: &str,
        dir: &Path,
        tweak: impl FnOnce(&mut Config),
    ) -> Kvgate {
        let mut cfg = test_config(upstream);
        cfg.save_dir = Some(dir.to_path_buf());
        tweak(&mut cfg);
        let kv = Self::serve(Gateway::new(cfg).expect("gateway")).await;
        kv.wait_fingerprint().await;
        kv
    }

    /// Waits until exactly `n` requests wait for a slot in kvgate.
    pub async fn wait_queued(&self, n: usize) {
        let what = format!("{n} waiters");
        poll_until(&what, Duration::from_secs(5), || {
            self.upstream.pool.queued() == n
        })
        .await;
    }

    /// Waits until kvgate knows every upstream's model fingerprint.
    pub async fn wait_fingerprint(&self) {
        poll_until("the model fingerprints", Duration::from_secs(10), || {
            self.app
                .upstreams()
                .iter()
                .all(|a| a.fingerprint.get().is_some())
        })
        .await;
    }

    /// Serves an already built gateway.
    pub async fn serve(gw: Gateway) -> Kvgate {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", front.local_addr().unwrap());
        let admin_url = format!("http://{}", admin.local_addr().unwrap());
        let upstream = gw.upstream().expect("kvgate has an upstream");
        let app = Arc::clone(gw.app());
        let (tx, rx) = oneshot::channel::<()>();
        let join = tokio::spawn(gw.serve(front, admin, async {
            let _ = rx.await;
        }));
        let k = Kvgate {
            url,
            admin_url,
            upstream,
            app,
            stop: Some(tx),
            join: Some(join),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while k.app.upstreams().iter().any(|a| a.pool.is_empty()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "kvgate never saw the upstream's slots"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        k
    }

    /// Shuts down gracefully and waits.
    pub async fn stop(mut self) {
        shut_down(self.stop.take(), self.join.take(), Duration::from_secs(30)).await;
    }

    /// Waits until no lease is held and nobody waits (lifecycle tasks may
    /// finish just after the client's last byte).
    pub async fn wait_idle(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !(self.app.upstreams().iter().all(|a| a.pool.is_idle())
            && self.upstream.shared.tasks.running() == 0)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "slot table still busy: {:?}",
                self.upstream.pool.snapshot()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// POSTs a completion, waits until kvgate is idle again and asserts 200;
    /// returns the headers and the answer's events.
    pub async fn say_body(&self, body: &Value) -> (u16, hyper::HeaderMap, Vec<Value>) {
        let (status, headers, bytes) =
            post_json(&format!("{}/completion", self.url), &[], body).await;
        self.wait_idle().await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
        (status, headers, sse_events(&bytes))
    }

    /// Waits until `done` holds for kvgate's state, `limit` at most (`what`
    /// names the wait in the failure).
    pub async fn wait_until(&self, what: &str, limit: Duration, done: impl Fn(&Upstream) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        while !done(&self.upstream) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within {limit:?}; slots {:?}",
                self.upstream.pool.snapshot()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until no slot holds a live cache (kvgate noticed llama-server
    /// restart).
    pub async fn wait_all_lost(&self, limit: Duration) {
        self.wait_until("kvgate to notice the restart", limit, |app| {
            app.pool.snapshot().iter().all(|s| !s.live)
        })
        .await;
    }

    /// `GET path` on the admin port, which must answer 200 with JSON within
    /// 30 s.
    pub async fn admin_get(&self, path: &str) -> Value {
        let (status, v) = self.admin_raw("GET", path, &[], "").await;
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    /// `method path` on the admin port with `headers` and a raw `body`
    /// (labelled JSON when there is one); the status and the answer as JSON,
    /// which must arrive whole within 30 s.
    pub async fn admin_raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.admin_url);
        let mut h = headers.to_vec();
        if !body.is_empty() {
            h.push(("content-type", "application/json"));
        }
        let fut = async {
            let resp = send(method, &url, &h, body.to_string()).await;
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await.expect("body").to_bytes();
            (status, json_body(&bytes))
        };
        tokio::time::timeout(Duration::from_secs(30), fut)
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no complete answer within 30 s"))
    }

    /// `method path` on the admin port with `key` as `X-Admin-Key` and
    /// `body` as JSON; the status and the JSON answer.
    pub async fn admin_json(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        admin_json(&self.admin_url, method, path, key, body).await
    }

    /// kvgate's slot table as `GET /slots` shows it.
    pub async fn admin_slots(&self) -> Vec<Value> {
        let v = self.admin_get("/slots").await;
        v["slots"].as_array().expect("slots array").clone()
    }

    /// Polls `GET /preload/{id}` until the preload is no longer running
    /// (`limit` at most).
    pub async fn wait_preload(&self, id: &str, limit: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let p = self.admin_get(&format!("/preload/{id}")).await;
            if p["state"] != "running" {
                return p;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "preload {id} still running after {limit:?}: {p}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The value of an unlabelled (or fully labelled) sample in `/metrics`:
    /// `name` is everything before the value.
    pub async fn metric(&self, name: &str) -> u64 {
        let text = self.metrics_text().await;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the metrics:\n{text}"))
    }

    /// The admin port's Prometheus text (asserts 200 and its content type).
    pub async fn metrics_text(&self) -> String {
        let resp = send("GET", &format!("{}/metrics", self.admin_url), &[], "").await;
        assert_eq!(resp.status(), 200);
        let ct = content_type(&resp);
        assert!(ct.starts_with("text/plain"), "content-type {ct:?}");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).expect("metrics are UTF-8")
    }
}

impl Drop for Kvgate {
    fn drop(&mut self) {
        if let Some(j) = self.join.take() {
            j.abort();
        }
    }
}

/// kvgate served in-process from a configuration that may name no upstream
/// at all (its upstreams are instances started through the admin API).
pub struct Bare {
    /// Front port base URL.
    pub url: String,
    /// Admin port base URL.
    pub admin_url: String,
    /// The application: every upstream, and what they share.
    pub app: Arc<App>,
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<()>>,
}

impl Bare {
    /// Builds kvgate from `cfg` and serves it on ephemeral ports.
    pub async fn start(cfg: Config) -> Bare {
        let gw = Gateway::new(cfg).expect("gateway");
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = Arc::clone(gw.app());
        let (tx, rx) = oneshot::channel::<()>();
        Bare {
            url: format!("http://{}", front.local_addr().unwrap()),
            admin_url: format!("http://{}", admin.local_addr().unwrap()),
            app,
            stop: Some(tx),
            join: Some(tokio::spawn(gw.serve(front, admin, async {
                let _ = rx.await;
            }))),
        }
    }

    /// Waits until upstream `name` is in the fleet with its slots known
    /// (`limit` at most).
    pub async fn wait_upstream(&self, name: &str, limit: Duration) -> Arc<Upstream> {
        let serving = || self.app.upstream(name).filter(|a| !a.pool.is_empty());
        poll_until(&format!("upstream {name} serving"), limit, || {
            serving().is_some()
        })
        .await;
        serving().expect("serving")
    }

    /// Waits until no upstream has a lease out and no lifecycle task runs.
    pub async fn wait_idle(&self) {
        poll_until("kvgate idle", Duration::from_secs(30), || {
            self.app.upstreams().iter().all(|a| a.pool.is_idle())
                && self.app.shared.tasks.running() == 0
        })
        .await;
    }

    /// Shuts down gracefully (saves, stops the instances) and waits.
    pub async fn stop(mut self) {
        shut_down(self.stop.take(), self.join.take(), Duration::from_secs(60)).await;
    }
}

/// Polls `done` until it holds; fails the test naming `what` after `limit`.
pub async fn poll_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Tells a served kvgate to shut down and waits for it, `limit` at most.
async fn shut_down(
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<()>>,
    limit: Duration,
) {
    if let Some(tx) = stop {
        let _ = tx.send(());
    }
    if let Some(j) = join {
        tokio::time::timeout(limit, j)
            .await
            .unwrap_or_else(|_| panic!("kvgate stops within {limit:?}"))
            .unwrap();
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        if let Some(j) = self.join.take() {
            j.abort();
        }
    }
}

/// Test-friendly settings: fast upstream polling, bounded waits.
pub fn test_config(upstream: &str) -> Config {
    Config {
        upstreams: vec![kvgate::config::parse_upstream(upstream).expect("upstream url")],
        health_interval: Duration::from_millis(100),
        queue_timeout: Duration::from_secs(20),
        shutdown_grace: Duration::from_secs(5),
        // Off unless a test is about idle saves: a save appearing after a
        // test's pause would be a race with what it checks.
        // Prefill ahead is off too: its requests would race with what a
        // test counts. Tests about either turn it on.
        cache: kvgate::config::CacheSettings {
            idle_save_s: 0,
            prefill_ahead: false,
            ..kvgate::config::CacheSettings::default()
        },
        // The fake llama-server has no RAM prompt cache, and tests about
        // disk restores must see them: tests about the RAM cache turn it on.
        ram_cache: false,
        ..Config::default()
    }
}

/// Every entry of a directory, sorted.
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A fresh (non-pooled) client, so each test controls its connections.
pub fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http()
}

/// Sends a request and returns the response with its body unread.
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<Incoming> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).unwrap();
    client().request(req).await.expect("request")
}

/// `method path` on an admin port at `admin_url` (see
/// [`Kvgate::admin_json`]).
pub async fn admin_json(
    admin_url: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(k) = key {
        headers.push(("x-admin-key", k));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let resp = send(method, &format!("{admin_url}{path}"), &headers, body).await;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, json_body(&bytes))
}

/// POSTs JSON and returns status, headers and the whole body.
pub async fn post_json(
    url: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, hyper::HeaderMap, Bytes) {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    let resp = send("POST", url, &h, body.to_string()).await;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, headers, bytes)
}

/// A SillyTavern-shaped group turn for `speaker` in a chat of `roster` (plus
/// "User"): kvgate infers the speaker from the prompt's last line and the
/// other members from the `\nName:` stop strings; `history` makes prompts
/// grow like a chat's.
pub fn group_turn(roster: &[&str], speaker: &str, history: &str) -> Value {
    let mut stop = vec!["\nUser:".to_string()];
    stop.extend(
        roster
            .iter()
            .filter(|n| **n != speaker)
            .map(|o| format!("\n{o}:")),
    );
    serde_json::json!({
        "prompt": format!("Write {speaker}'s next reply in a fictional chat.\n{speaker}'s card.\n***\n{history}\n{speaker}:"),
        "stop": stop,
        "stream": true,
        "n_predict": 8,
        "cache_prompt": true,
    })
}

/// The complete saves of a directory: `.bin` files with their sidecar.
/// Asserts that nothing else of kvgate's is there (no temporary file, no
/// `.bin` without its sidecar, no sidecar without its `.bin`).
pub fn complete_saves(dir: &Path) -> Vec<kvgate::store::SaveMeta> {
    let all = names_in(dir);
    let mut out = Vec::new();
    for n in &all {
        assert!(
            !n.starts_with(kvgate::store::TEMP_PREFIX),
            "temporary file {n} left in {all:?}"
        );
        if let Some(stem) = n.strip_suffix(".bin") {
            let meta = format!("{stem}{}", kvgate::store::META_SUFFIX);
            assert!(all.contains(&meta), "{n} has no sidecar: {all:?}");
            let m: kvgate::store::SaveMeta =
                serde_json::from_slice(&std::fs::read(dir.join(&meta)).unwrap())
                    .expect("sidecar is JSON");
            assert_eq!(m.file, *n);
            out.push(m);
        } else if let Some(stem) = n.strip_suffix(kvgate::store::META_SUFFIX) {
            assert!(
                all.contains(&format!("{stem}.bin")),
                "sidecar {n} without its save: {all:?}"
            );
        }
    }
    out.sort_by(|a, b| a.file.cmp(&b.file));
    out
}

/// The metadata of every save in a save directory (read from the
/// sidecars), oldest first.
pub fn saves_in(dir: &Path) -> Vec<kvgate::store::SaveMeta> {
    let mut v: Vec<kvgate::store::SaveMeta> = std::fs::read_dir(dir)
        .expect("save dir")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .ends_with(kvgate::store::META_SUFFIX)
        })
        .map(|e| {
            serde_json::from_slice(&std::fs::read(e.path()).expect("sidecar"))
                .expect("sidecar JSON")
        })
        .collect();
    v.sort_by(|a, b| a.created.cmp(&b.created).then(a.file.cmp(&b.file)));
    v
}

/// One streamed SillyTavern turn of `speaker` through kvgate at `url`:
/// asserts a complete answer, appends a fixed reply to the history (so
/// prompts stay deterministic) and returns the headers and the final chunk.
pub async fn turn_through(
    url: &str,
    chat: &mut super::st_chat::GroupChat,
    speaker: &str,
) -> (hyper::HeaderMap, Value) {
    let body = chat.body_for(speaker, true, 4);
    let (status, headers, bytes) = post_json(&format!("{url}/completion"), &[], &body).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    let last = sse_events(&bytes).pop().expect("events");
    assert_eq!(last["stop"], true, "{last}");
    let n = chat.history.len();
    chat.push(speaker, &format!("{speaker} answers, turn {n}."));
    (headers, last)
}

/// POSTs JSON in a task of its own (for requests that must wait).
pub fn spawn_post(url: &str, body: Value) -> JoinHandle<(u16, hyper::HeaderMap, Bytes)> {
    let url = url.to_string();
    tokio::spawn(async move { post_json(&url, &[], &body).await })
}

/// A response's content type ("" when there is none).
pub fn content_type<B>(resp: &Response<B>) -> String {
    resp.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// A body as JSON: `Null` when empty, a JSON string holding the text when it
/// is not JSON (so assertions show what came instead).
pub fn json_body(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// Asserts llama.cpp's error shape, `{"error":{"code","message","type"}}`,
/// as kvgate answers it: `code` is the HTTP `status`, the message says
/// something, the type is named. `what` names the request in a failure.
pub fn assert_api_error(status: u16, v: &Value, what: &str) {
    assert_eq!(v["error"]["code"], status, "{what}: {v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: {v}"
    );
    assert!(v["error"]["type"].is_string(), "{what}: {v}");
}

/// The `data:` JSON events of an SSE body (`[DONE]` skipped).
pub fn sse_events(body: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("event is JSON"))
        .collect()
}

/// Writes `request` byte for byte on a fresh connection (no client-side
/// parsing or normalisation; the request should say `connection: close`) and
/// returns the status, the response head and the de-chunked body.
pub async fn raw_exchange(base: &str, request: Vec<u8>) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer (and close) before it has read everything.
    let _ = conn.write_all(&request).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut buf))
        .await
        .expect("an answer within 20 s");
    let at = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {:?}", String::from_utf8_lossy(&buf)));
    let head = String::from_utf8_lossy(&buf[..at]).into_owned();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    // A server refusing a request may reset the connection after its
    // answer; a successful answer must arrive whole.
    if let Err(e) = read {
        assert!(status >= 400, "{status} answer cut off: {e}");
    }
    let mut body = buf[at + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, head, body)
}

/// The data of a chunked body (extensions ignored, trailers dropped).
fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&rest[..eol]);
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("0").trim(), 16)
            .expect("a chunk size");
        if n == 0 {
            break;
        }
        let data = &rest[eol + 2..];
        out.extend_from_slice(&data[..n.min(data.len())]);
        rest = data.get(n + 2..).unwrap_or(&[]);
    }
    out
}

/// Reads the next data frame of a streaming body.
pub async fn next_chunk(body: &mut Incoming) -> Option<Bytes> {
    loop {
        let frame = body.frame().await?.ok()?;
        if let Ok(data) = frame.into_data() {
            return Some(data);
        }
    }
}

/// A live subscription to kvgate's admin `/events`, collecting every event
/// in order. The subscription is in place once the response head is out
/// (kvgate subscribes before answering), so nothing after `open` is missed.
pub struct EventTap {
    seen: Arc<std::sync::Mutex<Seen>>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct Seen {
    events: Vec<Value>,
    /// A `data:` line that was not JSON (kvgate only sends JSON).
    garbled: Option<String>,
}

impl EventTap {
    pub async fn open(kv: &Kvgate) -> EventTap {
        EventTap::open_with(kv, &[]).await
    }

    /// [`EventTap::open`] with `headers` (an admin key).
    pub async fn open_with(kv: &Kvgate, headers: &[(&str, &str)]) -> EventTap {
        let resp = send("GET", &format!("{}/events", kv.admin_url), headers, "").await;
        assert_eq!(resp.status(), 200);
        let ct = content_type(&resp);
        assert!(ct.starts_with("text/event-stream"), "content-type {ct:?}");
        let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
        let into = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            let mut body = resp.into_body();
            let mut buf: Vec<u8> = Vec::new();
            while let Some(chunk) = next_chunk(&mut body).await {
                buf.extend_from_slice(&chunk);
                while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                    let event: Vec<u8> = buf.drain(..end + 2).collect();
                    let text = String::from_utf8_lossy(&event);
                    let mut seen = into.lock().unwrap();
                    for data in text.lines().filter_map(|l| l.strip_prefix("data:")) {
                        match serde_json::from_str(data.trim()) {
                            Ok(v) => seen.events.push(v),
                            Err(_) => seen.garbled = Some(data.to_string()),
                        }
                    }
                }
            }
        });
        EventTap { seen, task }
    }

    /// Every event so far, in order.
    pub fn all(&self) -> Vec<Value> {
        let seen = self.seen.lock().unwrap();
        if let Some(data) = &seen.garbled {
            panic!("an event's data is not JSON: {data}");
        }
        seen.events.clone()
    }

    /// The events of type `kind` so far.
    pub fn of(&self, kind: &str) -> Vec<Value> {
        self.all()
            .into_iter()
            .filter(|e| e["type"] == kind)
            .collect()
    }

    /// Waits (5 s at most) for the `n`th event of type `kind`; returns every
    /// event up to and including it.
    pub async fn until(&self, kind: &str, n: usize) -> Vec<Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let all = self.all();
            let nth = all
                .iter()
                .enumerate()
                .filter(|(_, e)| e["type"] == kind)
                .nth(n - 1)
                .map(|(at, _)| at);
            if let Some(at) = nth {
                return all[..=at].to_vec();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{n} {kind} event(s) expected within 5 s; got {all:#?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits (5 s at most) until `n` events of type `kind` arrived; returns
    /// them.
    pub async fn wait_for(&self, kind: &str, n: usize) -> Vec<Value> {
        let upto = self.until(kind, n).await;
        upto.into_iter().filter(|e| e["type"] == kind).collect()
    }
}

impl Drop for EventTap {
    fn drop(&mut self) {
        self.task.abort();
    }
}
