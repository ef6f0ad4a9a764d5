//! The kvgate binary as a child process, for what only a process shows:
//! the real command line, signals, exit codes, crash recovery. Its log goes
//! to a file (never to a pipe nobody reads) and is shown when a wait fails.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use serde_json::Value;

use super::kvgate::client;
use super::llama::free_port;

/// The kvgate binary with the environment's settings (`KVGATE_*`,
/// `KV_SAVE_DIR`, `LLAMA_SERVER`) removed: a test's arguments say it all.
/// Idle saves and prefill ahead are off (`KVGATE_IDLE_SAVE=0`,
/// `KVGATE_PREFILL_AHEAD=false`; arguments win), as in `test_config`: a save
/// or a request appearing by itself would race with what a test checks.
pub fn kvgate_command() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"));
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("KVGATE_") || k == "KV_SAVE_DIR" || k == "LLAMA_SERVER" {
            cmd.env_remove(&key);
        }
    }
    cmd.env("KVGATE_IDLE_SAVE", "0");
    cmd.env("KVGATE_PREFILL_AHEAD", "false");
    cmd
}

pub struct KvgateBin {
    pub child: tokio::process::Child,
    /// The proxy port's base URL.
    pub url: String,
    /// The admin port's base URL.
    pub admin: String,
    log: PathBuf,
}

impl KvgateBin {
    /// Starts `kvgate --listen … --admin-listen …` on free loopback ports,
    /// followed by `args` (see [`kvgate_command`]), logging to `log`, and
    /// waits until it is ready (`wait_ready`).
    pub async fn start<S: AsRef<OsStr>>(
        args: impl IntoIterator<Item = S>,
        log: PathBuf,
        slots: usize,
        within: Duration,
    ) -> KvgateBin {
        let (front, admin) = (free_port(), free_port());
        let mut cmd = tokio::process::Command::from(kvgate_command());
        cmd.args(["--listen", &format!("127.0.0.1:{front}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("kvgate log file"))
            .kill_on_drop(true);
        let kv = KvgateBin {
            child: cmd.spawn().expect("start the kvgate binary"),
            url: format!("http://127.0.0.1:{front}"),
            admin: format!("http://127.0.0.1:{admin}"),
            log,
        };
        kv.wait_ready(slots, within).await;
        kv
    }

    /// Waits until `/health` shows llama-server up with `slots` slots and
    /// the model fingerprint known (saves are keyed by it).
    pub async fn wait_ready(&self, slots: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = self.health().await {
                let up = &v["upstream"];
                if up["up"] == true
                    && up["slots"].as_u64() == Some(slots as u64)
                    && up["fingerprint"].is_string()
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "kvgate did not become ready within {within:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The admin `/health` answer; `None` while the port is not up.
    async fn health(&self) -> Option<Value> {
        let res = client()
            .get(format!("{}/health", self.admin).parse().unwrap())
            .await
            .ok()?;
        let body = res.into_body().collect().await.ok()?.to_bytes();
        serde_json::from_slice(&body).ok()
    }

    /// Everything kvgate (and a llama-server it runs) logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
