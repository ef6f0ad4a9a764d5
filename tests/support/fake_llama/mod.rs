//! A programmable fake llama-server (modelled on llama.cpp b11434) for
//! integration tests of the proxy.
//!
//! It speaks the parts of llama-server's HTTP API that matter to a
//! slot-pinning proxy, with the same wire shapes:
//!
//! * slots: `id_slot` pins a completion to a slot; a busy slot makes the
//!   request wait (no headers are sent until the task starts); `id_slot: -1`
//!   takes the lowest idle slot. Each slot caches its tokens, so `cache_n` /
//!   `prompt_n` in `timings` reflect prefix reuse.
//! * `POST /slots/{id}?action=save|restore|erase` writes and reads real files
//!   whose header is [`kvgate::llama::slot_file::encode_header`].
//! * streaming in `data: {json}\n\n` events; the OpenAI routes end with
//!   `data: [DONE]`, `/completion` does not.
//! * a byte-level tokenizer: token = byte + 3, BOS = 1 (see [`tokenize`]).
//!
//! Generation is deterministic: event `i` has the content `" tok{i}"`
//! ([`event_text`]); `created` and all timings are derived from counts, not
//! clocks, so responses can be byte-compared.
//!
//! Faults and pacing are programmable both on the builder and at run time
//! through [`FakeHandle`] (which [`FakeLlama`] derefs to): delays, a gate
//! that holds back every event after the first until [`FakeHandle::release_event`],
//! failing saves/restores, dying mid-stream, hanging, and killing/restarting
//! the whole "process" on the same port.
//!
//! Every HTTP call is recorded ([`FakeHandle::calls`]).
//!
//! Deliberate simplifications:
//! * one "event" is one generated token for `n_predict`, `tokens_predicted`
//!   and `predicted_n`, but it adds the byte tokens of `" tok{i}"` to the
//!   slot, so `tokenize(prompt + content)` extends the slot's cache exactly;
//! * `cache_n` is the common prefix with the slot, capped at prompt length
//!   minus one (the last prompt token is always evaluated);
//! * `id_slot: -1` picks the lowest idle slot (no LRU or similarity);
//! * `parse_special` is ignored; `<s>` in text is six bytes, not BOS;
//! * `save_ms` / `restore_ms` are wall time; completion timings are synthetic
//!   (0.5 ms per prompt token, 10 ms per generated event).
//!
//! Here: the builder, [`FakeLlama`] (start, kill, restart) and
//! [`FakeHandle`]. The rest, by concern: `knobs` (what tests change at run
//! time), `state` (what every "process" shares, and the slots a restart
//! wipes), `calls` (the recorded calls), `routes` (the accept loop, the
//! router and the simple endpoints), `http` (bodies, responses, errors),
//! `slot_actions`, `completion`, `tokenizer` and `wire` (what the fake
//! sends, byte for byte). The public items of `tokenizer` and `wire` are
//! re-exported here, and the other files reach them through here as tests
//! do, so every test binary uses the re-exports.

mod calls;
mod completion;
mod http;
mod knobs;
mod routes;
mod slot_actions;
mod state;
mod tokenizer;
mod wire;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;

pub use calls::Call;
pub use tokenizer::*;
pub use wire::*;

use knobs::Knobs;
use routes::{bind, serve};
use state::{lock, Process, Shared};

/// Builder for [`FakeLlama`].
#[derive(Debug, Clone)]
pub struct FakeLlamaBuilder {
    slots: usize,
    n_ctx: usize,
    save_dir: Option<PathBuf>,
    payload_bytes_per_token: usize,
    build_info: String,
    knobs: Knobs,
}

impl FakeLlamaBuilder {
    /// Number of slots (`-np`); default 4.
    pub fn slots(mut self, n: usize) -> Self {
        assert!(n > 0);
        self.slots = n;
        self
    }
    /// Context size per slot; default 4096.
    pub fn n_ctx(mut self, n: usize) -> Self {
        self.n_ctx = n;
        self
    }
    /// Token events per completion (before `n_predict` limits); default 8.
    pub fn events(mut self, n: usize) -> Self {
        self.knobs.events = n;
        self
    }
    /// Delay between consecutive events of a completion (also before the
    /// final chunk).
    pub fn event_delay(mut self, d: Duration) -> Self {
        self.knobs.event_delay = d;
        self
    }
    /// Delay after a completion got its slot and before response headers.
    pub fn first_byte_delay(mut self, d: Duration) -> Self {
        self.knobs.first_byte_delay = d;
        self
    }
    /// Enables `--slot-save-path`; without it slot actions answer 501.
    pub fn save_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.save_dir = Some(dir.into());
        self
    }
    /// Gate mode: every event of a completion after the first waits for a
    /// `release_event()`. The final chunk counts as an event, so N token
    /// events need N releases. Applies to non-streaming completions too.
    /// Permits are shared by all completions and accumulate.
    pub fn gate(mut self, on: bool) -> Self {
        self.knobs.gate = on;
        self
    }
    /// Time a save takes (while holding the slot).
    pub fn save_delay(mut self, d: Duration) -> Self {
        self.knobs.save_delay = d;
        self
    }
    /// Time a restore takes (while holding the slot).
    pub fn restore_delay(mut self, d: Duration) -> Self {
        self.knobs.restore_delay = d;
        self
    }
    /// KV payload bytes written after the header per token; default 64.
    pub fn payload_bytes_per_token(mut self, n: usize) -> Self {
        self.payload_bytes_per_token = n;
        self
    }
    /// `model_path` in /props (the model id is its file name).
    pub fn model_path(mut self, p: impl Into<String>) -> Self {
        self.knobs.model_path = p.into();
        self
    }
    /// `build_info` in /props.
    pub fn build_info(mut self, s: impl Into<String>) -> Self {
        self.build_info = s.into();
        self
    }
    /// Requires `Authorization: Bearer KEY` (or `X-Api-Key`) except on /health.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.knobs.api_key = Some(key.into());
        self
    }

    /// Binds 127.0.0.1:0 and starts serving.
    pub async fn build(self) -> FakeLlama {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind fake llama-server");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            addr,
            n_slots: self.slots,
            n_ctx: self.n_ctx,
            save_dir: self.save_dir,
            payload_bytes_per_token: self.payload_bytes_per_token,
            build_info: self.build_info,
            knobs: Mutex::new(self.knobs),
            calls: Mutex::new(Vec::new()),
            process: Mutex::new(Arc::new(Process::new(self.slots))),
            gate: Semaphore::new(0),
            knobs_changed: Notify::new(),
            active: AtomicUsize::new(0),
        });
        let server = tokio::spawn(serve(listener, shared.clone()));
        FakeLlama {
            handle: FakeHandle { shared },
            server: Mutex::new(Some(server)),
        }
    }
}

/// A running fake llama-server. Derefs to [`FakeHandle`] for the setters and
/// inspectors. Stops serving when dropped.
#[derive(Debug)]
pub struct FakeLlama {
    handle: FakeHandle,
    server: Mutex<Option<JoinHandle<()>>>,
}

/// Cloneable handle to a fake's state: runtime knobs and recorded calls.
/// Usable from other tasks while requests are in flight.
#[derive(Debug, Clone)]
pub struct FakeHandle {
    shared: Arc<Shared>,
}

impl std::ops::Deref for FakeLlama {
    type Target = FakeHandle;
    fn deref(&self) -> &FakeHandle {
        &self.handle
    }
}

impl FakeLlama {
    pub fn builder() -> FakeLlamaBuilder {
        FakeLlamaBuilder {
            slots: 4,
            n_ctx: 4096,
            save_dir: None,
            payload_bytes_per_token: 64,
            build_info: BUILD_INFO.to_string(),
            knobs: Knobs::default(),
        }
    }

    /// A fake with the default settings.
    pub async fn start() -> FakeLlama {
        Self::builder().build().await
    }

    /// A cloneable handle for use from other tasks.
    pub fn handle(&self) -> FakeHandle {
        self.handle.clone()
    }

    /// Whether the fake is currently listening.
    pub fn is_running(&self) -> bool {
        lock(&self.server).is_some()
    }

    /// Stops listening and drops every open connection (in-flight requests
    /// see their connection close); new connections are refused.
    pub async fn kill(&self) {
        let task = lock(&self.server).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// Starts listening again on the same port, as a freshly started
    /// llama-server: empty slots, task ids from 0. Recorded calls, knobs and
    /// files in the save dir are kept.
    pub async fn start_again(&self) {
        self.kill().await;
        *lock(&self.shared.process) = Arc::new(Process::new(self.shared.n_slots));
        let mut tries = 0;
        let listener = loop {
            match bind(self.shared.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("rebind {}: {e}", self.shared.addr),
            }
        };
        *lock(&self.server) = Some(tokio::spawn(serve(listener, self.shared.clone())));
    }

    /// Simulates a llama-server restart: [`kill`](Self::kill) then
    /// [`start_again`](Self::start_again).
    pub async fn restart(&self) {
        self.start_again().await;
    }

    /// Stops serving (same as [`kill`](Self::kill)).
    pub async fn stop(&self) {
        self.kill().await;
    }
}

impl Drop for FakeLlama {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.server).take() {
            task.abort();
        }
    }
}

impl FakeHandle {
    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }
    pub fn n_slots(&self) -> usize {
        self.shared.n_slots
    }
    pub fn n_ctx(&self) -> usize {
        self.shared.n_ctx
    }
    pub fn save_dir(&self) -> Option<&Path> {
        self.shared.save_dir.as_deref()
    }
    /// Path of a file in the save dir.
    pub fn saved_file(&self, name: &str) -> PathBuf {
        self.shared
            .save_dir
            .as_ref()
            .expect("fake has no save_dir")
            .join(name)
    }
    /// Polls `cond` every 5 ms until it holds; false after `timeout`.
    pub async fn wait_for(&self, timeout: Duration, cond: impl Fn(&FakeHandle) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    fn knobs(&self) -> MutexGuard<'_, Knobs> {
        lock(&self.shared.knobs)
    }
    fn process(&self) -> Arc<Process> {
        self.shared.process()
    }
}
