//! kvgate running its own llama-server (`--model`), as a separate process:
//! it starts it, restarts it after a `kill -9` (and the next request restores
//! from disk), stops it on SIGTERM after saving, and never leaves it behind,
//! not even when kvgate itself is killed with SIGKILL.

use std::path::Path;
use std::time::{Duration, Instant};

use kvgate::store::SaveKind;

use crate::support::kvgate::{poll_until, saves_in, turn_through as turn};
use crate::support::kvgate_bin::KvgateBin;
use crate::support::llama::{alive, http_json, llama_server_bin_async, tiny_model_path};
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

/// Waits long enough for llama-server to load the model.
const READY: Duration = Duration::from_secs(60);

/// kvgate running the pinned llama-server itself, with two slots.
async fn start_kvgate(bin: &Path, save_dir: &Path) -> KvgateBin {
    let (model, bin, dir) = (
        tiny_model_path().display().to_string(),
        bin.display().to_string(),
        save_dir.display().to_string(),
    );
    let args = [
        "--model",
        &model,
        "--llama-server",
        &bin,
        "--save-dir",
        &dir,
        "--slots",
        "2",
        "--save-every",
        "2",
        "--health-interval",
        "0.1",
        "--",
        "-t",
        "2",
        "--no-warmup",
    ];
    // The file API lists only cache files, so the log can live beside them.
    KvgateBin::start(args, save_dir.join("kvgate.log"), 2, READY).await
}

#[tokio::test]
async fn kvgate_runs_restarts_and_stops_its_llama_server() {
    let Some(bin) = llama_server_bin_async().await else {
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
    poll_until("an autosave", Duration::from_secs(20), || {
        !saves_in(dir.path()).is_empty()
    })
    .await;

    // kill -9 the child: kvgate restarts it, and the next request restores.
    assert!(std::process::Command::new("kill")
        .args(["-KILL", &first[0].to_string()])
        .status()
        .unwrap()
        .success());
    poll_until("llama-server restarted", Duration::from_secs(60), || {
        let now = llama_children(kv_pid);
        now.len() == 1 && now[0] != first[0]
    })
    .await;
    kv.wait_ready(2, READY).await;
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
    let Some(bin) = llama_server_bin_async().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut kv = start_kvgate(&bin, dir.path()).await;
    let kv_pid = kv.child.id().unwrap();
    let children = llama_children(kv_pid);
    assert_eq!(children.len(), 1);
    kv.child.kill().await.unwrap(); // SIGKILL
    let what = format!("llama-server {} gone with a SIGKILLed kvgate", children[0]);
    poll_until(&what, Duration::from_secs(10), || !alive(children[0])).await;
}

#[tokio::test]
async fn sigterm_while_llama_server_is_coming_back_does_not_wait_for_it() {
    let Some(bin) = llama_server_bin_async().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The first start runs the real llama-server; every restart hangs,
    // alive but never healthy (as a large model loading for minutes). The
    // script keeps "llama-server" in its command line, so llama_children
    // sees it.
    let wrapper = dir.path().join("llama-server-wrapper.sh");
    let mark = dir.path().join("started-once");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ -e '{mark}' ]; then\n  trap 'kill $!; exit 0' TERM\n  sleep 120 & wait $!\n  exit 1\nfi\n: > '{mark}'\nexec '{bin}' \"$@\"\n",
            mark = mark.display(),
            bin = bin.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let saves = dir.path().join("saves");
    std::fs::create_dir(&saves).unwrap();
    let mut kv = start_kvgate(&wrapper, &saves).await;
    let kv_pid = kv.child.id().unwrap();
    let first = llama_children(kv_pid);
    assert_eq!(first.len(), 1, "one llama-server child: {first:?}");
    assert!(std::process::Command::new("kill")
        .args(["-KILL", &first[0].to_string()])
        .status()
        .unwrap()
        .success());
    // Wait for the restart that will never become healthy.
    let deadline = Instant::now() + Duration::from_secs(30);
    let hanging = loop {
        let now = llama_children(kv_pid);
        if now.len() == 1 && now[0] != first[0] {
            break now[0];
        }
        assert!(Instant::now() < deadline, "no restart: {}", kv.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &kv_pid.to_string()])
        .status()
        .unwrap()
        .success());
    // The restart's health wait is 300 s; shutdown must not sit it out.
    let status = tokio::time::timeout(Duration::from_secs(60), kv.child.wait())
        .await
        .unwrap_or_else(|_| panic!("kvgate waited for a hanging restart:\n{}", kv.log_text()))
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        !alive(hanging),
        "the hanging restart {hanging} was left running"
    );
}
