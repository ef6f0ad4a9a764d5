//! `kvgate demo`, as a user runs it: the binary against the pinned
//! llama-server exits 0, its table shows a restore from disk that
//! llama-server reused (`cache_n > 0`), and no llama-server it started is
//! left running.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use crate::support::kvgate_bin::kvgate_command;
use crate::support::llama::llama_server_bin_async;

/// The whole demo: building nothing, it takes seconds; this only bounds a
/// hang.
const DEMO_LIMIT: Duration = Duration::from_secs(300);

/// llama-server processes, but `not`, whose command line mentions `needle`
/// (the demo's directory: llama-server gets its model and save path from
/// there; the demo itself, `not`, names it too).
fn llama_servers_mentioning(needle: &str, not: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == not {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("llama-server") && cmdline.contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// A turn line of the demo's table: `turn speaker slot cache_n prompt_n
/// <ms> ms restored`, the restored file `-` when none.
#[derive(Debug)]
struct Row {
    cache_n: u64,
    restored: Option<String>,
}

fn rows(stdout: &str) -> Vec<Row> {
    stdout
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let [turn, _speaker, slot, cache_n, prompt_n, _ms, "ms", restored] = f[..] else {
                return None;
            };
            turn.parse::<u32>().ok()?;
            slot.parse::<u32>().ok()?;
            prompt_n.parse::<u64>().ok()?;
            Some(Row {
                cache_n: cache_n.parse().ok()?,
                restored: (restored != "-").then(|| restored.to_string()),
            })
        })
        .collect()
}

#[tokio::test]
async fn the_demo_restores_from_disk_and_leaves_nothing_running() {
    let Some(bin) = llama_server_bin_async().await else {
        return;
    };
    // --keep a directory of the test's own: llama-server's command line
    // names it, which identifies the demo's llama-server below.
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("demo");
    let log = dir.path().join("demo.log");
    let mut child = tokio::process::Command::from(kvgate_command())
        .arg("demo")
        .arg("--llama-server")
        .arg(&bin)
        .arg("--keep")
        .arg(&keep)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start kvgate demo");
    let mut stdout = child.stdout.take().unwrap();
    let reader = tokio::spawn(async move {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s).await;
        s
    });

    // While it runs, note every llama-server it starts.
    let needle = keep.display().to_string();
    let demo_pid = child.id().unwrap();
    let mut started = Vec::new();
    let deadline = Instant::now() + DEMO_LIMIT;
    let status = loop {
        for pid in llama_servers_mentioning(&needle, demo_pid) {
            if !started.contains(&pid) {
                started.push(pid);
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "kvgate demo still running after {DEMO_LIMIT:?}:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let out = reader.await.unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.success(),
        "{status:?}\nstdout:\n{out}\nstderr:\n{stderr}"
    );

    let rows = rows(&out);
    assert!(!rows.is_empty(), "a table of turns:\n{out}");
    assert!(
        rows.iter().any(|r| r.restored.is_some() && r.cache_n > 0),
        "a restore from disk reused by llama-server:\n{out}"
    );
    for file in rows.iter().filter_map(|r| r.restored.as_ref()) {
        assert!(
            keep.join("slots").join(file).is_file(),
            "the restored file {file} is in the kept directory"
        );
    }

    assert!(!started.is_empty(), "the demo's llama-server was seen");
    for pid in &started {
        assert!(!alive(*pid), "llama-server {pid} left running:\n{out}");
    }
    assert_eq!(
        llama_servers_mentioning(&needle, demo_pid),
        Vec::<u32>::new()
    );
}
