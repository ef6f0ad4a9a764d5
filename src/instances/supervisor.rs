//! kvgate runs llama-server for you (`--model`): it finds the binary, starts
//! it on a free loopback port with the flags kvgate needs (`-np N`,
//! `--slot-save-path`), waits for `/health`, restarts it with backoff when it
//! dies, and stops it (SIGTERM, then SIGKILL after a grace period) when
//! kvgate shuts down. The child's output goes to kvgate's log with the target
//! `llama-server`.
//!
//! No orphan is left when kvgate itself is killed: on Linux the child is
//! started through util-linux's `setpriv --pdeathsig KILL`, so the kernel
//! kills it with its parent; `kill_on_drop` covers every other exit.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tracing::{info, warn};

use super::log::LogTail;

/// Lines of llama-server's output a start error quotes.
const ERROR_LINES: usize = 20;
/// Longest line of llama-server's output kept (bytes); the rest of a longer
/// line is read and dropped.
const MAX_OUTPUT_LINE_BYTES: u64 = 4096;

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The llama-server binary.
    pub binary: PathBuf,
    /// The GGUF model.
    pub model: PathBuf,
    /// Slots (`-np`, explicit so idle slots are not cleared).
    pub slots: u32,
    /// Context per slot (`-c` is `slots × ctx`).
    pub ctx: u32,
    /// `--slot-save-path`.
    pub save_dir: PathBuf,
    /// Extra llama-server arguments (after `--` on kvgate's command line).
    pub args: Vec<String>,
    /// The loopback port to listen on; a free one when `None`.
    pub port: Option<u16>,
}

/// Why llama-server could not be run.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// No binary was found.
    #[error("llama-server not found: pass --llama-server PATH, set LLAMA_SERVER, put it on PATH, or run scripts/build-llama-server.sh")]
    NotFound,
    /// It could not be started or never became healthy.
    #[error("llama-server failed to start: {0}")]
    Start(String),
}

/// Finds llama-server: `explicit` (the flag or `LLAMA_SERVER`), then `PATH`,
/// then the build cached by `scripts/build-llama-server.sh`.
pub fn find_binary(explicit: Option<&Path>) -> Result<PathBuf, SupervisorError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(SupervisorError::NotFound)
        };
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("llama-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let cache = std::env::var_os("KVGATE_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("kvgate")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kvgate")));
    if let Some(c) = cache {
        let candidate = c.join("llama-server-11434.0.0/bin/llama-server");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(SupervisorError::NotFound)
}

/// A supervised llama-server.
#[derive(Debug)]
pub struct Supervisor {
    /// Its base URL (`http://127.0.0.1:PORT`).
    pub url: String,
    /// Its port.
    pub port: u16,
    state: Arc<State>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// What the supervising task reports about the process.
#[derive(Debug, Default)]
struct State {
    pid: AtomicU32,
    restarts: AtomicU32,
    /// Unix seconds the current process became healthy.
    since: AtomicU64,
    up: AtomicBool,
}

/// The process as last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// The process id (of `setpriv`, which execs llama-server in place).
    pub pid: u32,
    /// Restarts after a crash.
    pub restarts: u32,
    /// Unix seconds the current process became healthy.
    pub since: u64,
    /// Healthy (not being restarted).
    pub up: bool,
}

impl State {
    fn up(&self, child: &Child) {
        self.pid.store(child.id().unwrap_or(0), Ordering::Relaxed);
        self.since
            .store(crate::store::meta::now_unix(), Ordering::Relaxed);
        self.up.store(true, Ordering::Relaxed);
    }
}

/// A free loopback port.
pub fn free_port() -> Result<u16, SupervisorError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| SupervisorError::Start(format!("no free port: {e}")))
}

fn command(spec: &Spec, port: u16) -> Command {
    let mut args: Vec<String> = vec![
        "-m".into(),
        spec.model.display().to_string(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
        "-np".into(),
        spec.slots.to_string(),
        "-c".into(),
        (u64::from(spec.slots) * u64::from(spec.ctx)).to_string(),
        "--slot-save-path".into(),
        format!("{}/", spec.save_dir.display()),
    ];
    args.extend(spec.args.iter().cloned());
    // The kernel kills the child with kvgate (even on SIGKILL) when setpriv
    // can arrange it.
    let setpriv = Path::new("/usr/bin/setpriv");
    let mut cmd = if cfg!(target_os = "linux") && setpriv.is_file() {
        let mut c = Command::new(setpriv);
        c.args(["--pdeathsig", "KILL", "--"])
            .arg(&spec.binary)
            .args(&args);
        c
    } else {
        let mut c = Command::new(&spec.binary);
        c.args(&args);
        c
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

fn spawn(
    spec: &Spec,
    port: u16,
    log: &Arc<LogTail>,
) -> Result<(Child, Vec<tokio::task::JoinHandle<()>>), SupervisorError> {
    let mut child = command(spec, port)
        .spawn()
        .map_err(|e| SupervisorError::Start(format!("{}: {e}", spec.binary.display())))?;
    // The child's output goes to kvgate's log; the last lines are kept for
    // the admin API and error messages.
    let mut readers = Vec::new();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child.stderr.take().map(|s| Box::new(s) as _),
    ]
    .into_iter()
    .flatten()
    {
        let log = Arc::clone(log);
        readers.push(tokio::spawn(forward_output(stream, log)));
    }
    Ok((child, readers))
}

/// Forwards llama-server's output to kvgate's log and the instance's tail,
/// to its end. A line that is not UTF-8 (a random model's token pieces) is
/// shown lossily and a huge one is cut, but the pipe is always drained: a
/// reader that stopped would leave llama-server blocked writing to it.
async fn forward_output(stream: Box<dyn tokio::io::AsyncRead + Unpin + Send>, log: Arc<LogTail>) {
    let mut reader = BufReader::new(stream);
    let mut raw = Vec::new();
    while read_line_capped(&mut reader, &mut raw).await {
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end_matches(['\n', '\r']);
        info!(target: "llama-server", "{line}");
        log.push(line);
    }
}

/// Reads one line into `raw` (cleared first), keeping at most
/// [`MAX_OUTPUT_LINE_BYTES`] and skipping the rest of a longer line; false at
/// the end of the output.
async fn read_line_capped<R: AsyncBufRead + Unpin>(reader: &mut R, raw: &mut Vec<u8>) -> bool {
    raw.clear();
    match (&mut *reader)
        .take(MAX_OUTPUT_LINE_BYTES)
        .read_until(b'\n', raw)
        .await
    {
        Ok(0) | Err(_) => return false,
        Ok(_) => {}
    }
    if raw.ends_with(b"\n") || (raw.len() as u64) < MAX_OUTPUT_LINE_BYTES {
        return true;
    }
    let mut rest = Vec::new();
    loop {
        rest.clear();
        match (&mut *reader)
            .take(MAX_OUTPUT_LINE_BYTES)
            .read_until(b'\n', &mut rest)
            .await
        {
            Ok(0) | Err(_) => return true,
            Ok(_) if rest.ends_with(b"\n") => return true,
            Ok(_) => {}
        }
    }
}

/// Starts llama-server and waits until it is healthy; when it is not,
/// the error carries its last lines of output (of this start only).
async fn start_healthy(
    spec: &Spec,
    port: u16,
    url: &str,
    log: &Arc<LogTail>,
) -> Result<Child, SupervisorError> {
    let mark = log.mark();
    let (mut child, readers) = spawn(spec, port, log)?;
    let Err(e) = healthy(url, &mut child, Duration::from_secs(300)).await else {
        return Ok(child);
    };
    let _ = child.kill().await;
    // Its last words may still be in the pipes: the readers end at their end
    // of file, which a dead child has reached.
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
    }
    let last = log.since(mark, ERROR_LINES).join("\n");
    Err(SupervisorError::Start(format!(
        "{e}; its last lines:\n{last}"
    )))
}

async fn healthy(url: &str, child: &mut Child, limit: Duration) -> Result<(), String> {
    let client = crate::llama::client::LlamaClient::new(
        url.parse().map_err(|e| format!("{e}"))?,
        Duration::from_secs(5),
    );
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("it exited with {status}"));
        }
        if let Ok((status, _)) = client
            .call_json(hyper::Method::GET, "/health", None, Duration::from_secs(2))
            .await
        {
            if status.is_success() {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("no healthy answer within {} s", limit.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Resolves once a stop is requested (or the supervisor is gone). The watch
/// guard is dropped before this returns, so no lock outlives it.
async fn until_stop(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

/// Stops a child: SIGTERM, then SIGKILL after `grace`.
async fn stop_child(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
        warn!(pid, "llama-server ignored SIGTERM; killing it");
    }
    let _ = child.kill().await;
}

// === impl Supervisor ===

impl Supervisor {
    /// Starts llama-server and waits until it is healthy; then keeps it
    /// running (restarting it with backoff) until [`Supervisor::stop`].
    /// Its output goes to `log` as well as kvgate's log.
    pub async fn start(spec: Spec, log: Arc<LogTail>) -> Result<Supervisor, SupervisorError> {
        let port = match spec.port {
            Some(p) => p,
            None => free_port()?,
        };
        let url = format!("http://127.0.0.1:{port}");
        let mut child = start_healthy(&spec, port, &url, &log).await?;
        info!(%url, model = %spec.model.display(), slots = spec.slots, "llama-server is up");
        let state = Arc::new(State::default());
        state.up(&child);
        let (stop, mut stopped) = watch::channel(false);
        let url2 = url.clone();
        let state2 = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let state = state2;
            let mut backoff = Duration::from_millis(500);
            loop {
                tokio::select! {
                    status = child.wait() => {
                        warn!(?status, "llama-server exited; restarting it");
                        state.up.store(false, Ordering::Relaxed);
                    }
                    _ = until_stop(&mut stopped) => {
                        stop_child(&mut child, Duration::from_secs(10)).await;
                        info!("llama-server stopped");
                        return;
                    }
                }
                // Until it is back: a stop request ends every wait at once (a
                // model can take minutes to load; shutdown must not wait).
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = until_stop(&mut stopped) => return,
                    }
                    match spawn(&spec, port, &log) {
                        Ok((mut c, _)) => {
                            let up = tokio::select! {
                                r = healthy(&url2, &mut c, Duration::from_secs(300)) => Some(r),
                                _ = until_stop(&mut stopped) => None,
                            };
                            match up {
                                None => {
                                    stop_child(&mut c, Duration::from_secs(10)).await;
                                    info!("llama-server stopped while starting again");
                                    return;
                                }
                                Some(Ok(())) => {
                                    info!(url = %url2, "llama-server is up again");
                                    state.restarts.fetch_add(1, Ordering::Relaxed);
                                    state.up(&c);
                                    child = c;
                                    backoff = Duration::from_millis(500);
                                    break;
                                }
                                Some(Err(e)) => {
                                    let _ = c.kill().await;
                                    warn!(error = %e, "llama-server did not come back");
                                }
                            }
                        }
                        Err(e) => warn!(error = %e, "cannot restart llama-server"),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        });
        Ok(Supervisor {
            url,
            port,
            state,
            stop,
            task,
        })
    }

    /// The process as last seen.
    pub fn status(&self) -> Status {
        let s = &self.state;
        Status {
            pid: s.pid.load(Ordering::Relaxed),
            restarts: s.restarts.load(Ordering::Relaxed),
            since: s.since.load(Ordering::Relaxed),
            up: s.up.load(Ordering::Relaxed),
        }
    }

    /// Stops llama-server and waits for it to be gone.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_lines_that_are_not_utf8_or_too_long_do_not_stop_the_reader() {
        let long = "x".repeat(MAX_OUTPUT_LINE_BYTES as usize * 3);
        let mut out = b"first\n\xbd\xff piece\n".to_vec();
        out.extend_from_slice(long.as_bytes());
        out.extend_from_slice(b"\nlast");
        let mut reader = BufReader::new(out.as_slice());
        let mut raw = Vec::new();
        let mut lines = Vec::new();
        while read_line_capped(&mut reader, &mut raw).await {
            lines.push(String::from_utf8_lossy(&raw).trim_end().to_string());
        }
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(lines[0], "first");
        assert_eq!(lines[1], "\u{fffd}\u{fffd} piece");
        assert_eq!(lines[2].len(), MAX_OUTPUT_LINE_BYTES as usize);
        assert_eq!(lines[3], "last");
    }
}
