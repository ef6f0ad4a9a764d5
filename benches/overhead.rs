//! Proxy overhead: what kvgate adds to a streamed completion, measured as
//! differences and ratios against a baseline taken in the same run.
//!
//! Run: `cargo bench --bench overhead` (about 75 s on 2 cores after the
//! build; loopback only; stops by itself). Knobs: `OVERHEAD_SECS` (measured
//! seconds per cell, default 2), `OVERHEAD_ROUNDS` (default 2),
//! `OVERHEAD_LEVELS` (default `1,16,256`), `OVERHEAD_NGINX=off` to skip
//! nginx, `OVERHEAD_KVGATE=PATH` to measure another kvgate build,
//! `OVERHEAD_FRAMES=whole` (diagnostic: the fake sends its events as one
//! body frame). Run without `--bench` (e.g. `cargo test --bench overhead`) it
//! only checks the set-up: one round of 0.2 s cells.
//!
//! # Set-up
//! - A fast fake llama-server inside this process (hyper 1, 127.0.0.1:0):
//!   `GET /props`, `/slots`, `/v1/models`, `/health`, and `POST /completion`,
//!   which reads the body and streams 200 `data: {…}\n\n` events of about
//!   100 bytes each (one body frame per event, chunked, no delay), then a
//!   final chunk with `"stop":true`, the `id_slot` it was asked for and
//!   `timings` (`text/event-stream`, ≈ 21 KB per response).
//! - It reports **256 slots**, so each of the up-to-256 concurrent streams
//!   (one character each) owns a slot and kvgate never queues: queuing would
//!   measure the fake's slot count, not kvgate, and with fewer slots than
//!   streams kvgate's default queue bound (64) would turn the excess into
//!   503s.
//! - kvgate runs as a separate process, the binary cargo built for this bench
//!   (`CARGO_BIN_EXE_kvgate`, bench profile = release), with `--listen`,
//!   `--admin-listen`, `--upstream` pointing at the fake and `--log warn`, no
//!   `--save-dir`: identity resolution and slot pinning on, no save/restore.
//!   Its peak RSS is `VmHWM` from `/proc/<pid>/status`, reset through
//!   `/proc/<pid>/clear_refs` before each concurrency level.
//! - nginx, when installed (`nginx` on `PATH` or `/usr/sbin/nginx`), runs as a
//!   third path: `proxy_pass` to the fake with `proxy_buffering off`,
//!   HTTP/1.1 upstream keep-alive, `worker_processes auto`, access log off.
//!   Otherwise the bench says it skipped nginx.
//! - The load generator is in this process too: hyper 1 client connections,
//!   one keep-alive connection per stream, each stream sending its requests
//!   back to back. Requests are SillyTavern-shaped text completions (≈ 4 KB
//!   prompt ending `\nAlice-<i>:`, stop `["\nUser:", "\nBob:"]`, ST's sampler
//!   fields, `stream: true`, ≈ 4.9 KB body); stream `i` is character
//!   `Alice-<i>` and sends `Authorization: Bearer bench-<i>`, i.e. every
//!   stream is its own client in its own chat (one client hopping between
//!   256 chats would make kvgate run its chat-switch path on every request).
//! - Per cell (path × concurrency 1, 16, 256): 0.5 s warm-up on the same
//!   connections, then `OVERHEAD_SECS` measured; a request counts when it
//!   completes inside the measured window. TTFB is the time from sending the
//!   request to the first body byte (the first SSE event), TTLB to the end
//!   of the body. Rounds run the paths in rotating order and pool their
//!   samples; req/s is completions / measured time.
//! - Everything shares 2 cores: the client and the fake use this process's
//!   runtime (2 workers), kvgate and nginx use 2 more threads/processes. The
//!   direct path's throughput at high concurrency is therefore "what the
//!   client and the fake can do alone", and a proxy's ratio includes the CPU
//!   it takes away from them.
//!
//! # Last result
//! 2026-11-21, `cargo bench --bench overhead` (defaults: 2 rounds, 2 s per
//! cell), kvgate after the relay rewrite (completions drive their own
//! upstream connection and coalesce ready data), bench profile; AMD EPYC VM,
//! 2 cores, 24 GiB, Linux 6.18, rustc 1.95.0, nginx 1.22.1 (Debian 12):
//!
//! ```text
//! path     conc   TTFB p50   TTFB p99   TTLB p50   TTLB p99     req/s  samples errors
//!                       ms         ms         ms         ms
//! direct      1      0.044      0.134      0.156      0.279      5698    22791      0
//! kvgate      1      0.243      0.540      0.322      0.555      2811    11243      0
//! nginx       1      0.144      0.207      0.157      0.238      6142    24570      0
//! direct     16      0.171      0.493      1.490      2.505     10900    43599      0
//! kvgate     16      2.415      4.655      2.450      4.864      6250    25001      0
//! nginx      16      1.398      3.273      1.655      3.689      9464    37857      0
//! direct    256      0.587      1.523     26.249     46.103      9694    38778      0
//! kvgate    256     47.869    102.161     47.960    102.162      4974    19898      0
//! nginx     256     17.824     37.399     25.151     55.414      9728    38910      0
//!
//! vs direct  conc  +TTFB p50  +TTFB p99  +TTLB p50  +TTLB p99  throughput
//! kvgate      1       +199       +405       +166       +276       0.49×
//! nginx       1       +101        +73         +2        -41       1.08×
//! kvgate     16      +2245      +4162       +960      +2359       0.57×
//! nginx      16      +1227      +2779       +165      +1184       0.87×
//! kvgate    256     +47283    +100638     +21710     +56059       0.51×
//! nginx     256     +17238     +35876      -1099      +9311       1.00×
//!
//! kvgate peak RSS (VmHWM): 31.0 MiB over the run (32.5 MB); c=256: 26.5 MiB
//! ```
//!
//! Targets: added TTFB at c=1 p50 +199 µs (< 200) and p99 +405 µs (< 1000):
//! met; throughput at 256 streams 0.51× direct (≥ 0.9): missed; fewer added
//! µs than nginx: missed; peak RSS with 256 streams < 50 MB: met.
//!
//! The run before the rewrite (kvgate at 8187dfe) gave 0.10–0.13× direct
//! throughput and +230 / +1247 µs TTFB p50 / p99 at c=1. Its profile (perf,
//! strace): each of the 200 SSE events went from hyper's client-connection
//! task to the front connection's task through a one-slot channel (≈ 110
//! cross-thread wake-ups per completion) and was written to the client with a
//! `writev` of its own.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

/// Slots the fake reports (see the module docs).
const FAKE_SLOTS: usize = 256;
/// SSE events per completion.
const EVENTS: usize = 200;
/// Concurrency levels (`OVERHEAD_LEVELS` overrides, comma-separated).
const LEVELS: [usize; 3] = [1, 16, 256];
/// Warm-up per cell.
const WARM_UP: Duration = Duration::from_millis(500);
/// Longest a single request may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

// === fake llama-server ===

/// Counters and canned answers of the fake upstream.
#[derive(Debug)]
struct Fake {
    events: Arc<[Bytes]>,
    events_len: usize,
    completions: AtomicU64,
    pinned: AtomicU64,
}

/// A body made of shared chunks, one frame each, then an optional tail.
/// No exact size hint, so hyper sends it chunked as llama-server does.
#[derive(Debug)]
struct FakeBody {
    chunks: Arc<[Bytes]>,
    next: usize,
    tail: Option<Bytes>,
}

impl FakeBody {
    fn json(v: &serde_json::Value) -> Self {
        FakeBody {
            chunks: Arc::from(Vec::new()),
            next: 0,
            tail: Some(Bytes::from(v.to_string())),
        }
    }
}

impl Body for FakeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(c) = self.chunks.get(self.next).cloned() {
            self.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        Poll::Ready(self.tail.take().map(|t| Ok(Frame::data(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.next >= self.chunks.len() && self.tail.is_none()
    }
}

fn sse_events() -> Vec<Bytes> {
    (0..EVENTS)
        .map(|i| {
            Bytes::from(format!(
                "data: {{\"index\":0,\"content\":\" tok{i:03}\",\"tokens\":[{}],\"stop\":false,\
                 \"id_slot\":-1,\"tokens_predicted\":{}}}\n\n",
                1000 + i,
                i + 1
            ))
        })
        .collect()
}

fn final_chunk(slot: i64) -> Bytes {
    let slot = slot.max(0);
    Bytes::from(format!(
        "data: {{\"index\":0,\"content\":\"\",\"tokens\":[],\"id_slot\":{slot},\"stop\":true,\
         \"model\":\"bench.gguf\",\"tokens_predicted\":{EVENTS},\"tokens_evaluated\":1024,\
         \"stop_type\":\"limit\",\"stopping_word\":\"\",\"tokens_cached\":1223,\
         \"timings\":{{\"cache_n\":1000,\"prompt_n\":24,\"prompt_ms\":1.2,\
         \"prompt_per_token_ms\":0.05,\"prompt_per_second\":20000.0,\"predicted_n\":{EVENTS},\
         \"predicted_ms\":10.0,\"predicted_per_token_ms\":0.05,\"predicted_per_second\":20000.0}}}}\n\n"
    ))
}

/// The `id_slot` of a compact JSON body, without parsing it (kvgate writes
/// `"id_slot":N`; SillyTavern sends none).
fn find_id_slot(body: &[u8]) -> Option<i64> {
    const KEY: &[u8] = b"\"id_slot\":";
    let at = body.windows(KEY.len()).rposition(|w| w == KEY)? + KEY.len();
    let rest = &body[at..];
    let end = rest
        .iter()
        .position(|b| !(b.is_ascii_digit() || *b == b'-'))
        .unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

async fn fake_handle(
    fake: Arc<Fake>,
    req: Request<Incoming>,
) -> Result<Response<FakeBody>, Infallible> {
    let json_ok = |v: serde_json::Value| {
        let mut r = Response::new(FakeBody::json(&v));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(r)
    };
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::POST, "/completion" | "/completions" | "/v1/completions") => {
            let body = match req.into_body().collect().await {
                Ok(c) => c.to_bytes(),
                Err(_) => Bytes::new(),
            };
            fake.completions.fetch_add(1, Ordering::Relaxed);
            let slot = find_id_slot(&body).unwrap_or(-1);
            if slot >= 0 {
                fake.pinned.fetch_add(1, Ordering::Relaxed);
            }
            let mut r = Response::new(FakeBody {
                chunks: Arc::clone(&fake.events),
                next: 0,
                tail: Some(final_chunk(slot)),
            });
            let h = r.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            h.insert("server", HeaderValue::from_static("llama.cpp"));
            h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
            Ok(r)
        }
        (Method::GET, "/props") => json_ok(json!({
            "total_slots": FAKE_SLOTS,
            "model_path": "/models/bench.gguf",
            "build_info": "b0-bench",
            "default_generation_settings": {"n_ctx": 4096},
        })),
        (Method::GET, "/slots") => json_ok(serde_json::Value::Array(
            (0..FAKE_SLOTS)
                .map(|i| json!({"id": i, "n_ctx": 4096, "is_processing": false, "id_task": 1}))
                .collect(),
        )),
        (Method::GET, "/v1/models" | "/models") => json_ok(json!({
            "object": "list",
            "data": [{"id": "bench.gguf", "object": "model",
                      "meta": {"n_params": 1000, "size": 2000, "n_vocab": 256}}],
        })),
        (Method::GET, "/health") => json_ok(json!({"status": "ok"})),
        _ => {
            let mut r = Response::new(FakeBody::json(
                &json!({"error": {"code": 400, "message": "not in the bench fake"}}),
            ));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            Ok(r)
        }
    }
}

async fn serve_fake(listener: TcpListener, fake: Arc<Fake>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let fake = Arc::clone(&fake);
        tokio::spawn(async move {
            let svc = service_fn(move |req| fake_handle(Arc::clone(&fake), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

// === requests ===

/// A SillyTavern text completion for character `Alice-<i>` (≈ 4 KB prompt).
fn st_request(i: usize) -> Bytes {
    let me = format!("Alice-{i}");
    let mut p = format!(
        "Write {me}'s next reply in a fictional chat between {me}, Bob and User.\n\
         {me} is the thirty-four-year-old keeper of the Lantern and Quill, a narrow three-storey \
         inn that leans against the harbor wall of the fishing town of Saltmere. Before she \
         inherited the inn from her aunt, she spent twelve years as a surveyor and cartographer \
         for the Coastal Charting Office, walking every cove and headland between Saltmere and \
         the Grey Capes with a chain, a compass and a notebook full of soundings.\n\
         {me}'s personality: precise, brisk, curious, warm underneath, loves maps and numbers\n\
         Scenario: A stormy autumn evening at the Lantern and Quill inn. Rain hammers the \
         shutters, and User has just come in from the quay, soaked, looking for a room.\n***\n"
    );
    let turns = [
        ("User", "How far is it to the lighthouse, and is the cliff path safe tonight?"),
        (me.as_str(), "Two miles and a quarter along the cliff path, four hundred and ten yards more if you take the beach at low tide. *She taps the map with an inky finger.* Go by the path tonight."),
        ("Bob", "*Bob sets down the lantern he was mending.* Storm's early this year. Hang your coat by the stove, it'll dry by morning if the chimney holds."),
        ("User", "Do you ever miss surveying? You talk about the coast as if you walked every yard of it."),
        (me.as_str(), "Every morning. *She smiles and rolls the map back up.* Then a guest complains about the soup and I remember that a reef never talks back."),
    ];
    let mut t = 0;
    while p.len() < 3900 {
        let (who, text) = turns[t % turns.len()];
        p.push_str(&format!("{who}: {text}\n"));
        t += 1;
    }
    p.push_str(&format!(
        "User: Thank you, {me}. I'd love that room and a hot meal.\n{me}:"
    ));
    let body = json!({
        "prompt": p,
        "max_new_tokens": 200, "max_tokens": 200, "n_predict": 200,
        "temperature": 1, "top_p": 0.95, "typical_p": 1, "min_p": 0.01, "top_k": 0,
        "repetition_penalty": 1.1, "repeat_penalty": 1.1, "repeat_last_n": 0,
        "frequency_penalty": 0, "presence_penalty": 0,
        "dry_allowed_length": 2, "dry_multiplier": 0, "dry_base": 1.75,
        "dry_sequence_breakers": ["\n", ":", "\"", "*"], "dry_penalty_last_n": 0,
        "samplers": ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "tfs_z",
                     "typical_p", "xtc", "top_p", "min_p", "temperature"],
        "stopping_strings": ["\nUser:", "\nBob:"],
        "stop": ["\nUser:", "\nBob:"],
        "truncation_length": 4096, "num_ctx": 4096,
        "ban_eos_token": false, "skip_special_tokens": true,
        "mirostat": 0, "mirostat_tau": 5, "mirostat_eta": 0.1,
        "xtc_threshold": 0.1, "xtc_probability": 0,
        "grammar": "", "n_probs": 0, "cache_prompt": true, "stream": true,
        "api_type": "llamacpp",
    });
    Bytes::from(serde_json::to_vec(&body).expect("serialisable"))
}

/// What one stream (or one cell, merged) measured.
#[derive(Debug, Default)]
struct Samples {
    ttfb: Vec<u64>,
    ttlb: Vec<u64>,
    done: u64,
    errors: u64,
    slot_headers: u64,
    window: Duration,
}

impl Samples {
    fn merge(&mut self, o: Samples) {
        self.ttfb.extend(o.ttfb);
        self.ttlb.extend(o.ttlb);
        self.done += o.done;
        self.errors += o.errors;
        self.slot_headers += o.slot_headers;
        self.window += o.window;
    }

    fn rps(&self) -> f64 {
        self.done as f64 / self.window.as_secs_f64().max(1e-9)
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Option<Sender> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(sender)
}

/// One request: (time to first body byte, time to last byte, slot header).
async fn one_request(
    sender: &mut Sender,
    body: &Bytes,
    auth: &HeaderValue,
    expect: (usize, usize),
) -> Result<(Duration, Duration, bool), ()> {
    sender.ready().await.map_err(drop)?;
    let req = Request::post("/completion")
        .header(HOST, "127.0.0.1")
        .header(CONTENT_TYPE, "application/json")
        .header(AUTHORIZATION, auth.clone())
        .body(Full::new(body.clone()))
        .map_err(drop)?;
    let t0 = Instant::now();
    let resp = sender.send_request(req).await.map_err(drop)?;
    let ok = resp.status() == StatusCode::OK;
    let slot = resp.headers().contains_key("x-kvgate-slot");
    let mut body = resp.into_body();
    let mut first = None;
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(drop)?;
        if let Some(d) = frame.data_ref() {
            if first.is_none() && !d.is_empty() {
                first = Some(t0.elapsed());
            }
            n += d.len();
        }
    }
    let last = t0.elapsed();
    if !ok || n < expect.0 || n > expect.1 {
        return Err(());
    }
    Ok((first.unwrap_or(last), last, slot))
}

async fn run_stream(
    addr: SocketAddr,
    body: Bytes,
    auth: HeaderValue,
    expect: (usize, usize),
    from: Instant,
    until: Instant,
) -> Samples {
    let mut s = Samples::default();
    let mut sender = None;
    while Instant::now() < until {
        if sender.is_none() {
            sender = connect(addr).await;
            if sender.is_none() {
                s.errors += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        }
        let snd = sender.as_mut().expect("connected above");
        let r = tokio::time::timeout(REQUEST_TIMEOUT, one_request(snd, &body, &auth, expect)).await;
        let end = Instant::now();
        match r {
            Ok(Ok((ttfb, ttlb, slot))) => {
                if end >= from && end <= until {
                    s.ttfb.push(ttfb.as_nanos() as u64);
                    s.ttlb.push(ttlb.as_nanos() as u64);
                    s.done += 1;
                    s.slot_headers += u64::from(slot);
                }
            }
            _ => {
                s.errors += 1;
                sender = None;
            }
        }
    }
    s
}

/// One cell: `conc` streams against `addr` for warm-up + `secs`.
async fn run_cell(
    addr: SocketAddr,
    conc: usize,
    bodies: &[(Bytes, HeaderValue)],
    expect: (usize, usize),
    measure: Duration,
) -> Samples {
    let from = Instant::now() + WARM_UP;
    let until = from + measure;
    let tasks: Vec<_> = bodies[..conc]
        .iter()
        .map(|(b, a)| tokio::spawn(run_stream(addr, b.clone(), a.clone(), expect, from, until)))
        .collect();
    let mut all = Samples::default();
    for t in tasks {
        if let Ok(s) = t.await {
            all.merge(s);
        }
    }
    all.window = measure;
    all
}

// === processes ===

/// A child process ended by its pid when dropped (TERM, then KILL).
#[derive(Debug)]
struct Proc {
    name: &'static str,
    bin: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resets the peak RSS of `pid` (Linux ≥ 4.0); false when not allowed.
fn reset_peak(pid: u32) -> bool {
    std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/clear_refs"))
        .and_then(|mut f| f.write_all(b"5"))
        .is_ok()
}

/// `pid` and its direct children (nginx's master and workers).
fn family(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // pid (comm) state ppid …; comm may hold spaces, so split after ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pid) {
                out.push(child);
            }
        }
    }
    out
}

fn family_peak_kib(pid: u32) -> u64 {
    family(pid)
        .into_iter()
        .filter_map(|p| status_kib(p, "VmHWM:"))
        .sum()
}

fn reset_family_peak(pid: u32) {
    for p in family(pid) {
        reset_peak(p);
    }
}

/// Sends completions until one succeeds (the proxy is up and knows the slots).
async fn wait_ready(addr: SocketAddr, body: &(Bytes, HeaderValue), expect: (usize, usize)) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Some(mut s) = connect(addr).await {
            if let Ok(Ok(_)) = tokio::time::timeout(
                Duration::from_secs(2),
                one_request(&mut s, &body.0, &body.1, expect),
            )
            .await
            {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn start_kvgate(dir: &Path, fake: SocketAddr) -> (Proc, SocketAddr) {
    // The binary cargo built for this bench, or another build to compare.
    let bin =
        std::env::var("OVERHEAD_KVGATE").unwrap_or_else(|_| env!("CARGO_BIN_EXE_kvgate").into());
    let port = free_port();
    let admin = free_port();
    let log = dir.join("kvgate.log");
    let mut cmd = Command::new(&bin);
    cmd.args([
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--admin-listen",
        &format!("127.0.0.1:{admin}"),
        "--upstream",
        &format!("http://{fake}"),
        "--log",
        "warn",
    ]);
    for (k, _) in std::env::vars_os() {
        if k.to_str()
            .is_some_and(|k| k.starts_with("KVGATE_") || k == "KV_SAVE_DIR")
        {
            cmd.env_remove(k);
        }
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    let proc = Proc {
        name: "kvgate",
        bin,
        child,
        log,
    };
    (proc, SocketAddr::from(([127, 0, 0, 1], port)))
}

fn find_nginx() -> Option<PathBuf> {
    if std::env::var("OVERHEAD_NGINX").is_ok_and(|v| v == "off" || v == "0") {
        return None;
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn start_nginx(bin: &Path, dir: &Path, fake: SocketAddr) -> Result<(Proc, SocketAddr), String> {
    let port = free_port();
    let d = dir.join("nginx");
    std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
    let p = d.display();
    let user = if is_root() { "user root;\n" } else { "" };
    let conf = format!(
        "{user}worker_processes auto;\nworker_rlimit_nofile 8192;\ndaemon off;\n\
         pid {p}/nginx.pid;\nerror_log {p}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  tcp_nodelay on;\n\
           client_body_temp_path {p}/client_body;\n  proxy_temp_path {p}/proxy;\n\
           fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n\
           client_max_body_size 64m;\n  client_body_buffer_size 128k;\n\
           keepalive_requests 1000000;\n  keepalive_timeout 75s;\n\
           upstream llama {{ server {fake}; keepalive 512; keepalive_requests 1000000; keepalive_timeout 60s; }}\n\
           server {{\n    listen 127.0.0.1:{port} backlog=1024;\n\
             location / {{\n      proxy_pass http://llama;\n      proxy_http_version 1.1;\n\
               proxy_set_header Connection \"\";\n      proxy_buffering off;\n\
               proxy_read_timeout 600s;\n    }}\n  }}\n}}\n"
    );
    let conf_path = d.join("nginx.conf");
    std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
    let log = d.join("stderr.log");
    let child = Command::new(bin)
        .arg("-p")
        .arg(&d)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(d.join("error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    Ok((
        Proc {
            name: "nginx",
            bin: bin.display().to_string(),
            child,
            log,
        },
        SocketAddr::from(([127, 0, 0, 1], port)),
    ))
}

fn nginx_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default()
}

// === report ===

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    ttfb50: u64,
    ttfb99: u64,
    ttlb50: u64,
    ttlb99: u64,
    rps: f64,
    n: u64,
    errors: u64,
}

fn stats(mut s: Samples) -> Stats {
    s.ttfb.sort_unstable();
    s.ttlb.sort_unstable();
    Stats {
        ttfb50: pct(&s.ttfb, 0.50),
        ttfb99: pct(&s.ttfb, 0.99),
        ttlb50: pct(&s.ttlb, 0.50),
        ttlb99: pct(&s.ttlb, 0.99),
        rps: s.rps(),
        n: s.done,
        errors: s.errors,
    }
}

fn ms(ns: u64) -> String {
    format!("{:.3}", ns as f64 / 1e6)
}

fn added_us(a: u64, b: u64) -> String {
    format!("{:+.0}", (a as f64 - b as f64) / 1e3)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(String::new(), |k| {
            format!(", {:.0} GiB", k as f64 / 1048576.0)
        });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores{mem}, Linux {}", kernel.trim())
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Run settings, from the environment (see the module docs).
#[derive(Debug)]
struct Opts {
    measure: Duration,
    rounds: usize,
    levels: Vec<usize>,
    /// Diagnostic: the fake sends its 200 events as one body frame.
    whole: bool,
}

fn main() {
    // `cargo bench` passes `--bench`; run without it (`cargo test --benches`)
    // only a short check that the set-up works.
    let quick = !std::env::args().any(|a| a == "--bench");
    let secs: f64 = env_num("OVERHEAD_SECS", if quick { 0.2 } else { 2.0 });
    let levels: Vec<usize> = std::env::var("OVERHEAD_LEVELS")
        .ok()
        .map(|v| {
            v.split(',')
                .filter_map(|n| n.trim().parse().ok())
                .filter(|n| (1..=1024).contains(n))
                .collect()
        })
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| LEVELS.to_vec());
    let opts = Opts {
        measure: Duration::from_secs_f64(secs.max(0.05)),
        rounds: env_num("OVERHEAD_ROUNDS", if quick { 1 } else { 2 }).max(1),
        levels,
        whole: std::env::var("OVERHEAD_FRAMES").is_ok_and(|v| v == "whole"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if quick {
        println!(
            "set-up check only (no --bench): short cells, numbers are not meaningful; \
             measure with `cargo bench --bench overhead`"
        );
    }
    rt.block_on(bench(opts));
}

async fn bench(opts: Opts) {
    let Opts {
        measure,
        rounds,
        ref levels,
        whole,
    } = opts;
    let dir = tempfile::tempdir().expect("temp dir");
    println!("kvgate proxy overhead — {}", machine());

    // The fake upstream.
    let mut events: Vec<Bytes> = sse_events();
    let events_len: usize = events.iter().map(Bytes::len).sum();
    if whole {
        println!("diagnostic: the fake sends all events as one body frame");
        events = vec![Bytes::from(events.concat())];
    }
    let fake = Arc::new(Fake {
        events: Arc::from(events),
        events_len,
        completions: AtomicU64::new(0),
        pinned: AtomicU64::new(0),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake");
    let fake_addr = listener.local_addr().expect("fake addr");
    tokio::spawn(serve_fake(listener, Arc::clone(&fake)));
    let final_len = final_chunk(0).len();
    let expect = (fake.events_len + final_len, fake.events_len + final_len + 8);

    let max_conc = *levels.iter().max().expect("at least one level");
    let bodies: Vec<(Bytes, HeaderValue)> = (0..max_conc)
        .map(|i| {
            (
                st_request(i),
                HeaderValue::from_str(&format!("Bearer bench-{i}")).expect("ascii"),
            )
        })
        .collect();
    println!(
        "fake upstream: {FAKE_SLOTS} slots, {EVENTS} events of ~{} B + final chunk ({} B per response); \
         request body ~{} B",
        events_len / EVENTS,
        expect.0,
        bodies[0].0.len()
    );

    // The proxies.
    let (mut kvgate, kv_addr) = start_kvgate(dir.path(), fake_addr);
    if !wait_ready(kv_addr, &bodies[0], expect).await {
        panic!("kvgate did not come up; its log:\n{}", kvgate.log_tail());
    }
    println!("kvgate: {} (pid {}, {kv_addr})", kvgate.bin, kvgate.pid());
    let mut nginx = None;
    match find_nginx() {
        Some(bin) => match start_nginx(&bin, dir.path(), fake_addr) {
            Ok((p, addr)) => {
                if wait_ready(addr, &bodies[0], expect).await {
                    println!("nginx: {} ({})", bin.display(), nginx_version(&bin));
                    nginx = Some((p, addr));
                } else {
                    println!("nginx: did not come up, skipped; its log:\n{}", p.log_tail());
                }
            }
            Err(e) => println!("nginx: skipped ({e})"),
        },
        None => println!(
            "nginx: not installed, skipped (Debian: apt-get install nginx; OVERHEAD_NGINX=off skips it)"
        ),
    }

    let mut paths: Vec<(&'static str, SocketAddr)> =
        vec![("direct", fake_addr), ("kvgate", kv_addr)];
    if let Some((_, addr)) = &nginx {
        paths.push(("nginx", *addr));
    }
    println!(
        "{} round(s) × {} levels × {} paths, {:.1} s measured + {:.1} s warm-up per cell\n",
        rounds,
        levels.len(),
        paths.len(),
        measure.as_secs_f64(),
        WARM_UP.as_secs_f64()
    );

    // results[level][path]
    let mut results: Vec<Vec<Samples>> = levels
        .iter()
        .map(|_| paths.iter().map(|_| Samples::default()).collect())
        .collect();
    let mut kv_peak = vec![0u64; levels.len()];
    let mut ng_peak = vec![0u64; levels.len()];
    let (mut kv_max, mut ng_max) = (0u64, 0u64);
    let mut rss_reset = true;
    for round in 0..rounds {
        for (li, &conc) in levels.iter().enumerate() {
            for k in 0..paths.len() {
                let pi = (k + round) % paths.len();
                let (name, addr) = paths[pi];
                if name == "kvgate" {
                    rss_reset &= reset_peak(kvgate.pid());
                }
                if let (Some((p, _)), "nginx") = (&nginx, name) {
                    reset_family_peak(p.pid());
                }
                let s = run_cell(addr, conc, &bodies, expect, measure).await;
                eprintln!(
                    "  round {} c={conc:<3} {name:<6} {:>7} req, {:>8.0} req/s, {} errors",
                    round + 1,
                    s.done,
                    s.rps(),
                    s.errors
                );
                if name == "kvgate" {
                    let hwm = status_kib(kvgate.pid(), "VmHWM:").unwrap_or(0);
                    kv_max = kv_max.max(hwm);
                    if round == 0 {
                        kv_peak[li] = hwm;
                    }
                    if s.slot_headers != s.done {
                        eprintln!(
                            "  warning: {} of {} kvgate responses had no x-kvgate-slot",
                            s.done - s.slot_headers,
                            s.done
                        );
                    }
                }
                if let (Some((p, _)), "nginx") = (&nginx, name) {
                    let hwm = family_peak_kib(p.pid());
                    ng_max = ng_max.max(hwm);
                    if round == 0 {
                        ng_peak[li] = hwm;
                    }
                }
                results[li][pi].merge(s);
            }
        }
    }
    let kv_rss_now = status_kib(kvgate.pid(), "VmRSS:").unwrap_or(0);
    kvgate.stop();
    if let Some((mut p, _)) = nginx.take() {
        p.stop();
    }

    // Report.
    let table: Vec<Vec<Stats>> = results
        .into_iter()
        .map(|row| row.into_iter().map(stats).collect())
        .collect();
    println!(
        "\n{:<7} {:>5} {:>10} {:>10} {:>10} {:>10} {:>9} {:>8} {:>6}",
        "path",
        "conc",
        "TTFB p50",
        "TTFB p99",
        "TTLB p50",
        "TTLB p99",
        "req/s",
        "samples",
        "errors"
    );
    println!(
        "{:<7} {:>5} {:>10} {:>10} {:>10} {:>10}",
        "", "", "ms", "ms", "ms", "ms"
    );
    for (li, &conc) in levels.iter().enumerate() {
        for (pi, (name, _)) in paths.iter().enumerate() {
            let s = table[li][pi];
            println!(
                "{:<7} {:>5} {:>10} {:>10} {:>10} {:>10} {:>9.0} {:>8} {:>6}",
                name,
                conc,
                ms(s.ttfb50),
                ms(s.ttfb99),
                ms(s.ttlb50),
                ms(s.ttlb99),
                s.rps,
                s.n,
                s.errors
            );
        }
    }
    println!(
        "\n{:<7} {:>5} {:>10} {:>10} {:>10} {:>10} {:>11}",
        "vs direct", "conc", "+TTFB p50", "+TTFB p99", "+TTLB p50", "+TTLB p99", "throughput"
    );
    println!(
        "{:<7} {:>5} {:>10} {:>10} {:>10} {:>10}",
        "", "", "µs", "µs", "µs", "µs"
    );
    for (li, &conc) in levels.iter().enumerate() {
        let d = table[li][0];
        for (pi, (name, _)) in paths.iter().enumerate().skip(1) {
            let s = table[li][pi];
            if s.n == 0 || d.n == 0 {
                println!("{name:<9} {conc:>3}  n/a (no samples)");
                continue;
            }
            println!(
                "{:<9} {:>3} {:>10} {:>10} {:>10} {:>10} {:>10.2}×",
                name,
                conc,
                added_us(s.ttfb50, d.ttfb50),
                added_us(s.ttfb99, d.ttfb99),
                added_us(s.ttlb50, d.ttlb50),
                added_us(s.ttlb99, d.ttlb99),
                s.rps / d.rps.max(1e-9)
            );
        }
    }
    let mb = |kib: u64| kib as f64 / 1024.0;
    let peaks = |v: &[u64]| {
        levels
            .iter()
            .zip(v)
            .map(|(c, k)| format!("c={c}: {:.1} MiB", mb(*k)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let note = if rss_reset {
        "round 1, reset before each level"
    } else {
        "round 1, cumulative: clear_refs not allowed"
    };
    println!(
        "\nkvgate peak RSS (VmHWM): {:.1} MiB over the run; per level ({note}): {}; RSS at the end {:.1} MiB",
        mb(kv_max),
        peaks(&kv_peak),
        mb(kv_rss_now)
    );
    if paths.len() > 2 {
        println!(
            "nginx peak RSS (master + workers, summed): {:.1} MiB over the run; per level: {}",
            mb(ng_max),
            peaks(&ng_peak)
        );
    }
    println!(
        "fake upstream: {} completions, {} of them pinned to a slot by kvgate",
        fake.completions.load(Ordering::Relaxed),
        fake.pinned.load(Ordering::Relaxed)
    );

    // Targets (printed, never asserted).
    let kv = |li: usize| table[li][1];
    let sampled = |li: usize| table[li].iter().all(|s| s.n > 0);
    let mark = |ok: bool| if ok { "met" } else { "MISSED" };
    println!("\ntargets:");
    if let Some(l1) = levels.iter().position(|&c| c == 1).filter(|&l| sampled(l)) {
        let a50 = kv(l1).ttfb50 as f64 - table[l1][0].ttfb50 as f64;
        let a99 = kv(l1).ttfb99 as f64 - table[l1][0].ttfb99 as f64;
        println!(
            "  added TTFB p50 at c=1 < 200 µs: {:+.0} µs — {}",
            a50 / 1e3,
            mark(a50 < 200e3)
        );
        println!(
            "  added TTFB p99 at c=1 < 1000 µs: {:+.0} µs — {}",
            a99 / 1e3,
            mark(a99 < 1000e3)
        );
    }
    let l256 = levels.iter().position(|&c| c == 256);
    if let Some(l) = l256 {
        let ratio = kv(l).rps / table[l][0].rps.max(1e-9);
        println!(
            "  throughput at c=256 ≥ 0.90× direct: {ratio:.2}× — {}",
            mark(ratio >= 0.9)
        );
    }
    if paths.len() > 2 {
        for (li, &conc) in levels.iter().enumerate().filter(|(l, _)| sampled(*l)) {
            let d = table[li][0];
            let n = table[li][2];
            let k = kv(li);
            let kadd = k.ttfb50 as f64 - d.ttfb50 as f64;
            let nadd = n.ttfb50 as f64 - d.ttfb50 as f64;
            let kadd_l = k.ttlb50 as f64 - d.ttlb50 as f64;
            let nadd_l = n.ttlb50 as f64 - d.ttlb50 as f64;
            println!(
                "  fewer added µs than nginx at c={conc}: TTFB p50 {:+.0} vs {:+.0}, TTLB p50 {:+.0} vs {:+.0} — {}",
                kadd / 1e3,
                nadd / 1e3,
                kadd_l / 1e3,
                nadd_l / 1e3,
                mark(kadd <= nadd && kadd_l <= nadd_l)
            );
        }
    } else {
        println!("  fewer added µs than nginx: not measured (no nginx)");
    }
    if l256.is_some() {
        println!(
            "  kvgate peak RSS with 256 streams < 50 MB: {:.1} MB (peak over the run) — {}",
            kv_max as f64 * 1024.0 / 1e6,
            mark(kv_max * 1024 < 50_000_000)
        );
    }
}
