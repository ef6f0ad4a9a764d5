//! kvgate running its own llama-server (`--model`), as a separate process:
//! it starts it, restarts it after a `kill -9` (and the next request restores
//! from disk), stops it on SIGTERM after saving, and never leaves it behind,
//! not even when kvgate itself is killed with SIGKILL.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use kvgate::cache_store::SaveKind;

use crate::support::kvgate::{saves_in, turn_through as turn};
use crate::support::llama::{free_port, http_json, llama_server_bin, tiny_model_path};
use crate::support::st_chat::GroupChat;

/// Children of `parent` whose command line mentions llama-server.
fn llama_children(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the ")" that closes the command name: state, ppid, …
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let ppid: u32 = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == parent && String::from_utf8_lossy(&cmdline).contains("llama-server") {
            out.push(pid);
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry: check its state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

struct Running {
    child: tokio::process::Child,
    url: String,
    admin: String,
    /// kvgate's log (with llama-server's lines), shown when it fails.
    log: std::path::PathBuf,
}

async fn start_kvgate(bin: &Path, save_dir: &Path) -> Running {
    let (front, admin) = (free_port(), free_port());
    // The file API lists only cache files, so the log can live beside them.
    let log = save_dir.join("kvgate.log");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args(["--listen", &format!("127.0.0.1:{front}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .arg("--model")
        .arg(tiny_model_path())
        .arg("--llama-server")
        .arg(bin)
        .args([
            "--slots",
            "2",
            "--save-every",
            "2",
            "--health-interval",
            "0.1",
        ])
        .arg("--save-dir")
        .arg(save_dir)
        .args(["--", "-t", "2", "--no-warmup"])
        .env_remove("LLAMA_SERVER")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("kvgate binary");
    let r = Running {
        child,
        url: format!("http://127.0.0.1:{front}"),
        admin: format!("http://127.0.0.1:{admin}"),
        log,
    };
    wait_healthy(&r, Duration::from_secs(60)).await;
    r
}

async fn wait_healthy(r: &Running, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        if tokio::net::TcpStream::connect(r.admin.trim_start_matches("http://"))
            .await
            .is_ok()
        {
            let (_, v) = http_json("GET", &format!("{}/health", r.admin), None).await;
            if v["upstream"]["up"] == true
                && v["upstream"]["slots"].as_u64() == Some(2)
                && v["upstream"]["fingerprint"].is_string()
            {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "kvgate with its llama-server did not become ready: {}",
            std::fs::read_to_string(&r.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn kvgate_runs_restarts_and_stops_its_llama_server() {
    let Some(bin) = tokio::task::spawn_blocking(llama_server_bin).await.unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut kv = start_kvgate(&bin, dir.path()).await;
    let kv_pid = kv.child.id().unwrap();
    let first = llama_children(kv_pid);
    assert_eq!(first.len(), 1, "one llama-server child: {first:?}");

    let mut chat = GroupChat::demo(2);
    let alice = chat.names()[0].clone();
    // Two messages: the second is autosaved (--save-every 2), after the
    // stream has ended: wait for its file.
    turn(&kv.url, &mut chat, &alice).await;
    turn(&kv.url, &mut chat, &alice).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while saves_in(dir.path()).is_empty() {
        assert!(Instant::now() < deadline, "no autosave appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // kill -9 the child: kvgate restarts it, and the next request restores.
    assert!(std::process::Command::new("kill")
        .args(["-KILL", &first[0].to_string()])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = llama_children(kv_pid);
        if now.len() == 1 && now[0] != first[0] {
            break;
        }
        assert!(Instant::now() < deadline, "llama-server was not restarted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_healthy(&kv, Duration::from_secs(60)).await;
    // The monitor has noticed the outage once the slots are no longer live.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = http_json("GET", &format!("{}/slots", kv.admin), None).await;
        if v["slots"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["live"] == false)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kvgate did not notice the restart: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (h, last) = turn(&kv.url, &mut chat, &alice).await;
    assert!(
        h.get("x-kvgate-restored").is_some(),
        "restored from disk after the restart"
    );
    assert!(last["timings"]["cache_n"].as_u64().unwrap() > 500, "{last}");

    // SIGTERM: kvgate saves the unsaved message, stops llama-server and
    // exits 0; nothing is left.
    assert!(
        saves_in(dir.path())
            .iter()
            .all(|m| m.kind != SaveKind::Shutdown),
        "no shutdown save yet"
    );
    let second = llama_children(kv_pid);
    assert_eq!(second.len(), 1, "one llama-server child: {second:?}");
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &kv_pid.to_string()])
        .status()
        .unwrap()
        .success());
    let status = tokio::time::timeout(Duration::from_secs(60), kv.child.wait())
        .await
        .expect("kvgate exits")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        saves_in(dir.path())
            .iter()
            .any(|m| m.kind == SaveKind::Shutdown && m.character == alice),
        "the message after the restart was saved at shutdown"
    );
    for pid in second {
        assert!(
            !alive(pid),
            "llama-server {pid} left running after kvgate's SIGTERM"
        );
    }
}

#[tokio::test]
async fn a_sigkilled_kvgate_takes_its_llama_server_with_it() {
    let Some(bin) = tokio::task::spawn_blocking(llama_server_bin).await.unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut kv = start_kvgate(&bin, dir.path()).await;
    let kv_pid = kv.child.id().unwrap();
    let children = llama_children(kv_pid);
    assert_eq!(children.len(), 1);
    kv.child.kill().await.unwrap(); // SIGKILL
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(children[0]) {
        assert!(
            Instant::now() < deadline,
            "llama-server {} outlived a SIGKILLed kvgate",
            children[0]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
