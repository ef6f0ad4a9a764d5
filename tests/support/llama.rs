//! A real llama-server for end-to-end tests.
//!
//! [`LlamaServer::start`] runs the pinned llama-server binary (see
//! [`llama_server_bin`]) on a free local port with the tiny random-weight model
//! from `kvgate::demo::tiny_model`, waits until `/health` answers 200 and kills the
//! process again when dropped. When no binary can be had the tests skip (they
//! print `SKIP: ...` and return), except under `CI=true`, where that is a
//! failure.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kvgate::demo::tiny_model::{write_tiny_model, TinyModelSpec};
use tokio::process::{Child, Command};

/// How long llama-server gets to load the model and answer `/health`.
const HEALTH_DEADLINE: Duration = Duration::from_secs(60);

/// Upper bound for one [`http_json`] exchange; prompt processing on the
/// bigger benchmark models can take a while.
const HTTP_DEADLINE: Duration = Duration::from_secs(300);

/// True when missing prerequisites must fail the run instead of skipping.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Path of the llama-server binary.
///
/// `$LLAMA_SERVER` if set; otherwise `scripts/build-llama-server.sh` is run,
/// which builds the pinned version once (several minutes), caches it and
/// prints its path. Returns `None` if no binary can be had, which callers
/// treat as "skip"; under `CI=true` that panics instead, because CI must never
/// silently skip the end-to-end tests. The answer is computed once per
/// process, and this blocks while the build runs.
pub fn llama_server_bin() -> Option<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(find_llama_server) {
        Ok(path) => Some(path.clone()),
        Err(why) if in_ci() => panic!("llama-server is required when CI=true, but {why}"),
        Err(why) => {
            // Straight to stderr: the test harness captures eprintln!, and a
            // skipped end-to-end test would otherwise look like a pass.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIP: llama-server not available: {why}");
            None
        }
    }
}

/// [`llama_server_bin`] for async tests: the first call may build
/// llama-server for minutes, so it runs off the runtime, and a CI panic
/// surfaces with its own message.
pub async fn llama_server_bin_async() -> Option<PathBuf> {
    match tokio::task::spawn_blocking(llama_server_bin).await {
        Ok(bin) => bin,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

fn find_llama_server() -> Result<PathBuf, String> {
    // As in scripts/build-llama-server.sh, an empty LLAMA_SERVER is unset.
    if let Some(path) = std::env::var_os("LLAMA_SERVER").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("LLAMA_SERVER={} is not a file", path.display()))
        };
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-llama-server.sh");
    // The script's progress goes straight to our stderr: a first build takes
    // minutes, and a silent test run would look hung.
    let out = std::process::Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed ({})", script.display(), out.status));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = PathBuf::from(stdout.lines().last().unwrap_or("").trim());
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} printed {:?}, which is not a file",
            script.display(),
            stdout.trim()
        ))
    }
}

/// Whether process `pid` runs (a zombie, dead but not reaped, does not).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

/// Path of the default tiny model ([`TinyModelSpec::default`]).
///
/// Written once per process into Cargo's per-target temp dir (under
/// `target/`, so nothing accumulates in `/tmp`). The write goes through a
/// temp file and a rename, so test processes running at the same time never
/// see a partial file.
pub fn tiny_model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let spec = TinyModelSpec::default();
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "kvgate-tiny-e{}-l{}-h{}-f{}-c{}-s{}.gguf",
            spec.n_embd, spec.n_layer, spec.n_head, spec.n_ff, spec.n_ctx_train, spec.seed
        ));
        write_tiny_model(&path, &spec)
            .unwrap_or_else(|e| panic!("writing tiny model {}: {e}", path.display()));
        path
    })
    .clone()
}

/// How to start a [`LlamaServer`].
#[derive(Debug, Clone)]
pub struct LlamaOpts {
    /// Number of slots (`-np`). An explicit count also turns unified KV off.
    pub slots: u32,
    /// Context per slot; the server gets `-c slots * ctx_per_slot`.
    pub ctx_per_slot: u32,
    /// `--slot-save-path`; a fresh temp dir when `None`.
    pub save_dir: Option<PathBuf>,
    /// Appended after the standard arguments.
    pub extra_args: Vec<String>,
    /// Model file; the default tiny model when `None`.
    pub model: Option<PathBuf>,
    /// Port to listen on; a free one when `None`.
    pub port: Option<u16>,
    /// Environment variables for the server (`LLAMA_SERVER_SLOTS_DEBUG`).
    pub env: Vec<(String, String)>,
}

impl Default for LlamaOpts {
    fn default() -> Self {
        Self {
            slots: 2,
            ctx_per_slot: 4096,
            save_dir: None,
            extra_args: Vec::new(),
            model: None,
            port: None,
            env: Vec::new(),
        }
    }
}

/// A running llama-server child process. Dropping it kills the process.
#[derive(Debug)]
pub struct LlamaServer {
    /// Port on 127.0.0.1 the server listens on; stable across [`Self::restart`].
    pub port: u16,
    /// `http://127.0.0.1:{port}`, without a trailing slash.
    pub base_url: String,
    /// The directory given as `--slot-save-path`.
    pub save_dir: PathBuf,
    /// Where the child's stdout and stderr go (appended across restarts).
    pub log_path: PathBuf,
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// Holds the log and, unless one was given, the save dir.
    tmp: tempfile::TempDir,
}

// === impl LlamaServer ===

impl LlamaServer {
    /// Starts llama-server and waits until `/health` answers 200.
    ///
    /// Returns `None` only when [`llama_server_bin`] does (the skip path);
    /// every other failure panics with the tail of the server's log.
    pub async fn start(opts: LlamaOpts) -> Option<LlamaServer> {
        let bin = llama_server_bin_async().await?;
        let tmp = tempfile::Builder::new()
            .prefix("kvgate-llama-")
            .tempdir()
            .expect("create temp dir for llama-server");
        let save_dir = match opts.save_dir {
            Some(dir) => dir,
            None => {
                let dir = tmp.path().join("slots");
                std::fs::create_dir(&dir).expect("create slot save dir");
                dir
            }
        };
        let model = opts.model.unwrap_or_else(tiny_model_path);
        let port = opts.port.unwrap_or_else(free_port);
        let mut args: Vec<String> = vec![
            "-m".into(),
            model.display().to_string(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "-np".into(),
            opts.slots.to_string(),
            "-c".into(),
            (opts.slots * opts.ctx_per_slot).to_string(),
            "--slot-save-path".into(),
            save_dir.display().to_string(),
            "-t".into(),
            "2".into(),
            // `--no-webui` still works but is the deprecated spelling.
            "--no-ui".into(),
            "--no-warmup".into(),
        ];
        args.extend(opts.extra_args);
        let mut server = LlamaServer {
            port,
            base_url: format!("http://127.0.0.1:{port}"),
            save_dir,
            log_path: tmp.path().join("llama-server.log"),
            bin,
            args,
            env: opts.env,
            child: None,
            tmp,
        };
        server.spawn_and_wait().await;
        Some(server)
    }

    /// Kills the server (SIGKILL) and waits for it to exit. Idempotent.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // An error means it has already exited; `kill` still reaps it.
            let _ = child.kill().await;
        }
    }

    /// Kills the server if it runs, then starts it again on the same port with
    /// the same arguments and waits until it is healthy. Slot state is lost;
    /// files in `save_dir` are kept.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn_and_wait().await;
    }

    /// The last `n` lines of the server's log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    async fn spawn_and_wait(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open llama-server log");
        let mut header = log.try_clone().expect("clone log handle");
        let _ = writeln!(
            header,
            "### kvgate test: {} {}",
            self.bin.display(),
            self.args.join(" ")
        );
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("clone log handle")))
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        // LLAMA_ARG_* variables would silently change the server under test.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("LLAMA_ARG_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        self.child = Some(child);
        self.wait_healthy().await;
    }

    async fn wait_healthy(&mut self) {
        let started = Instant::now();
        let url = format!("{}/health", self.base_url);
        let client = new_client();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    self.startup_failure(&format!("exited ({status}) before becoming healthy"));
                }
            }
            let probe = request(&client, "GET", &url, None);
            if let Ok(Ok((200, _))) = tokio::time::timeout(Duration::from_secs(2), probe).await {
                return;
            }
            if started.elapsed() > HEALTH_DEADLINE {
                self.kill().await;
                self.startup_failure(&format!("not healthy after {HEALTH_DEADLINE:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Panics with the log's tail, keeping the temp dir so the whole log can
    /// still be read after the test has failed.
    fn startup_failure(&mut self, what: &str) -> ! {
        self.tmp.disable_cleanup(true);
        panic!(
            "llama-server {what}; full log kept at {}:\n{}",
            self.log_path.display(),
            self.log_tail(30)
        );
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = child.start_kill();
        // Drop cannot await; SIGKILL is quick, so poll for the exit to reap
        // the process and be sure nothing is left running.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                _ => return,
            }
        }
    }
}

/// Binds port 0 on 127.0.0.1 and returns the port the OS picked.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn new_client() -> HttpClient {
    // No pooling: servers in these tests are killed and restarted, and a
    // pooled connection to a dead process only produces confusing errors.
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http()
}

async fn request(
    client: &HttpClient,
    method: &str,
    url: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, Bytes), String> {
    let mut req = hyper::Request::builder().method(method).uri(url);
    let body = match body {
        Some(json) => {
            req = req.header("content-type", "application/json");
            Bytes::from(serde_json::to_vec(json).expect("serialize body"))
        }
        None => Bytes::new(),
    };
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, bytes))
}

/// Sends one HTTP request with an optional JSON body and returns the status
/// and the body parsed as JSON (a JSON string holding the raw text if the body
/// is not JSON, `null` if it is empty).
///
/// Panics on a transport error or after 5 minutes: this is for tests.
pub async fn http_json(
    method: &str,
    url: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let client = new_client();
    let fut = request(&client, method, url, body.as_ref());
    let (status, bytes) = match tokio::time::timeout(HTTP_DEADLINE, fut).await {
        Ok(Ok(res)) => res,
        Ok(Err(e)) => panic!("{method} {url}: {e}"),
        Err(_) => panic!("{method} {url}: no answer within {HTTP_DEADLINE:?}"),
    };
    let json = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        })
    };
    (status, json)
}
