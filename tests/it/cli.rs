//! The binary's command line: bad flags and values give one clear line and
//! exit code 64; an unusable save directory, clients file or admin key file
//! stops kvgate before it serves; a non-loopback admin port needs a key.

use std::time::{Duration, Instant};

use crate::support::kvgate_bin::kvgate_command;
use crate::support::llama::free_port;

fn kvgate(args: &[&str]) -> (Option<i32>, String) {
    let out = kvgate_command().args(args).output().expect("run kvgate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_and_values_exit_64_with_one_line() {
    for (args, needle) in [
        (vec!["--bogus"], "--bogus"),
        (vec!["--listen", "nope"], "--listen"),
        (vec!["--admin-cors-origin", "*"], "--admin-cors-origin"),
        (vec!["--admin-host", "http://kv.lan/"], "--admin-host"),
        (vec!["--upstream", "ftp://x"], "--upstream"),
        (vec!["--save-every", "0"], "--save-every"),
        (vec!["--max-queue", "many"], "--max-queue"),
        (vec!["--policy", "/nonexistent.toml"], "/nonexistent.toml"),
        (vec!["demo", "--bogus"], "--bogus"),
        (
            vec!["--upstream", "http://127.0.0.1:1,http://127.0.0.1:1"],
            "given twice",
        ),
    ] {
        let (code, err) = kvgate(&args);
        assert_eq!(code, Some(64), "{args:?}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: one line, got {err:?}"
        );
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn help_names_the_demo_and_the_demo_has_its_own() {
    let out = kvgate_command().arg("--help").output().expect("run kvgate");
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("kvgate demo"));
    let out = kvgate_command()
        .args(["demo", "--help"])
        .output()
        .expect("run kvgate demo");
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--llama-server") && help.contains("--keep"),
        "{help}"
    );
}

#[test]
fn unusable_save_dir_is_refused_at_start() {
    let (code, err) = kvgate(&[
        "--save-dir",
        "/nonexistent/kvgate-saves",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("/nonexistent/kvgate-saves"), "{err}");
    let f = tempfile::NamedTempFile::new().unwrap();
    let (code, err) = kvgate(&[
        "--save-dir",
        f.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("not a directory"), "{err}");
}

#[test]
fn help_and_version_exit_0() {
    assert_eq!(kvgate(&["--help"]).0, Some(0));
    assert_eq!(kvgate(&["--version"]).0, Some(0));
}

/// Environment variables for a child process.
type Env<'a> = Vec<(&'a str, &'a str)>;

#[test]
fn a_non_loopback_admin_port_needs_a_key() {
    let base = [
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "http://127.0.0.1:9",
    ];
    let dir = tempfile::tempdir().unwrap();
    let empty_key = dir.path().join("empty.key");
    std::fs::write(&empty_key, "\n").unwrap();
    for extra in [
        vec!["--admin-listen", "0.0.0.0:0"],
        vec!["--admin-listen", "[::]:0"],
        vec!["--admin-listen", "192.0.2.10:8090"],
        vec!["--admin-listen", "0.0.0.0:0", "--admin-key", " "],
        vec![
            "--admin-listen",
            "0.0.0.0:0",
            "--admin-key-file",
            empty_key.to_str().unwrap(),
        ],
    ] {
        let (code, err) = kvgate(&[&base[..], &extra[..]].concat());
        assert_eq!(code, Some(64), "{extra:?}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{extra:?}: one line, got {err:?}"
        );
        assert!(err.contains("--admin"), "{extra:?}: {err}");
    }
    // The same through the environment.
    let out = kvgate_command()
        .args(base)
        .env("KVGATE_ADMIN_LISTEN", "0.0.0.0:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));

    // With a key (flag, environment or file) it starts and serves.
    let key_file = dir.path().join("admin.key");
    std::fs::write(&key_file, "file-key\n").unwrap();
    let port = || free_port().to_string();
    let (p1, p2, p3, p4) = (port(), port(), port(), port());
    let (a1, a2, a3, a4) = (
        format!("0.0.0.0:{p1}"),
        format!("0.0.0.0:{p2}"),
        format!("0.0.0.0:{p3}"),
        format!("127.0.0.1:{p4}"),
    );
    // (flags, environment, the admin port, the key /health needs)
    type Variant<'a> = (Vec<&'a str>, Env<'a>, &'a str, Option<&'a str>);
    let variants: Vec<Variant<'_>> = vec![
        (
            vec!["--admin-listen", &a1, "--admin-key", "k1"],
            vec![],
            &p1,
            Some("k1"),
        ),
        (
            vec!["--admin-listen", &a2],
            vec![("KVGATE_ADMIN_KEY", "k2")],
            &p2,
            Some("k2"),
        ),
        (
            vec![
                "--admin-listen",
                &a3,
                "--admin-key-file",
                key_file.to_str().unwrap(),
            ],
            vec![],
            &p3,
            Some("file-key"),
        ),
        (vec!["--admin-listen", &a4], vec![], &p4, None),
    ];
    for (extra, env, admin_port, key) in variants {
        let (served, log) =
            serve_and_probe(&[&base[..], &extra[..]].concat(), &env, admin_port, key);
        assert_eq!(served, 200, "{extra:?} {env:?}: {log}");
    }
}

/// Runs kvgate with `args` and `env` until its admin `/health` on
/// `admin_port` answers (with `key`), then stops it; the status (0 when it
/// never answered within 10 s) and what it logged.
fn serve_and_probe(
    args: &[&str],
    env: &Env<'_>,
    admin_port: &str,
    key: Option<&str>,
) -> (u16, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("kvgate.log");
    let mut child = kvgate_command()
        .args(args)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // It serves: the admin /health answers (with the key).
    let deadline = Instant::now() + Duration::from_secs(10);
    let served = loop {
        if let Some(status) = blocking_health(admin_port, key) {
            break status;
        }
        if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            break 0;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    child.wait().unwrap();
    (served, std::fs::read_to_string(&log).unwrap_or_default())
}

#[test]
fn an_admin_key_with_stray_spaces_still_opens_the_port() {
    let port = || free_port().to_string();
    let (p1, p2) = (port(), port());
    let (a1, a2) = (format!("127.0.0.1:{p1}"), format!("127.0.0.1:{p2}"));
    let base = [
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "http://127.0.0.1:9",
    ];
    // A key pasted with spaces, on the command line and in the environment.
    let flag: Vec<&str> = [&base[..], &["--admin-listen", &a1, "--admin-key", "  k1 "]].concat();
    let (served, log) = serve_and_probe(&flag, &vec![], &p1, Some("k1"));
    assert_eq!(served, 200, "{log}");
    let env: Env<'_> = vec![("KVGATE_ADMIN_KEY", "\tk2  ")];
    let args: Vec<&str> = [&base[..], &["--admin-listen", &a2]].concat();
    let (served, log) = serve_and_probe(&args, &env, &p2, Some("k2"));
    assert_eq!(served, 200, "{log}");
    // Only spaces is no key: refused at start.
    let (code, err) = kvgate(&[&base[..], &["--admin-key", "  "]].concat());
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--admin-key"), "{err}");
}

#[test]
fn an_open_front_port_without_clients_is_warned_about_at_start() {
    // kvgate listening on `listen`: whether it served, and its log.
    let start = |listen: &str| {
        let admin_port = free_port().to_string();
        let admin = format!("127.0.0.1:{admin_port}");
        let args = [
            "--listen",
            listen,
            "--admin-listen",
            &admin,
            "--upstream",
            "http://127.0.0.1:9",
        ];
        serve_and_probe(&args, &vec![], &admin_port, None)
    };
    let (served, log) = start("0.0.0.0:0");
    assert_eq!(served, 200, "{log}");
    assert!(
        log.contains("WARN")
            && log.contains("any client on the network can use every character's cache"),
        "{log}"
    );
    // On loopback, no such warning.
    let (served, log) = start("127.0.0.1:0");
    assert_eq!(served, 200, "{log}");
    assert!(!log.contains("any client on the network"), "{log}");
}

/// `GET /health` on the admin port, blocking; the status, or `None` while
/// nothing listens.
fn blocking_health(port: &str, key: Option<&str>) -> Option<u16> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).ok()?;
    let key = key
        .map(|k| format!("x-admin-key: {k}\r\n"))
        .unwrap_or_default();
    write!(
        c,
        "GET /health HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n{key}connection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    c.read_to_string(&mut out).ok()?;
    out.get(9..12)?.parse().ok()
}

#[test]
fn unusable_clients_or_key_files_stop_kvgate_with_64() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("clients.toml");
    std::fs::write(&bad, "[[client]]\nid = \"no-key\"\n").unwrap();
    let missing = dir.path().join("missing.toml");
    for (flag, file) in [
        ("--clients", &missing),
        ("--clients", &bad),
        ("--admin-key-file", &missing),
    ] {
        let (code, err) = kvgate(&[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:9",
            flag,
            file.to_str().unwrap(),
        ]);
        assert_eq!(code, Some(64), "{flag} {file:?}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{flag}: one line, got {err:?}"
        );
        assert!(err.contains(file.to_str().unwrap()), "{flag}: {err}");
    }
}

/// Runs kvgate with `args` until it exits, `limit` at most (then kills it:
/// `None`); its exit code and what it wrote to stderr.
fn exit_within(args: &[&str], limit: Duration) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    let mut child = kvgate_command()
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, std::fs::read_to_string(&log).unwrap_or_default())
}

#[test]
fn a_second_kvgate_on_a_save_directory_is_refused_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().canonicalize().unwrap();
    let path = path.to_str().unwrap();
    // This test process owns the directory, as a running kvgate would; one
    // of its saves is being written.
    let _owner = kvgate::store::CacheStore::open(dir.path()).unwrap();
    let in_flight = dir
        .path()
        .join(format!("{}owner-0-slot.bin", kvgate::store::TEMP_PREFIX));
    std::fs::write(&in_flight, b"half a save").unwrap();
    let (code, err) = exit_within(
        &[
            "--save-dir",
            path,
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:9",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(64), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err:?}");
    assert!(err.contains(path), "names the directory: {err}");
    assert!(
        err.contains(&format!("process {}", std::process::id())),
        "names the owner: {err}"
    );
    assert!(
        in_flight.exists(),
        "the owner's save in flight is untouched"
    );
}

#[test]
fn a_corrupt_settings_file_is_reported_and_kvgate_serves() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(kvgate::settings::SETTINGS_FILE),
        b"{\"save_every\": ",
    )
    .unwrap();
    let admin_port = free_port().to_string();
    let admin = format!("127.0.0.1:{admin_port}");
    let log = dir.path().join("kvgate.log");
    let mut child = kvgate_command()
        .args(["--save-dir", dir.path().to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", &admin])
        .args(["--upstream", "http://127.0.0.1:9"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let served = loop {
        if let Some(status) = blocking_health(&admin_port, None) {
            break status;
        }
        if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            break 0;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(served, 200, "kvgate serves: {text}");
    assert!(
        text.contains("ERROR") && text.contains("IGNORED") && text.contains("kvgate-settings.json"),
        "reported loudly: {text}"
    );
}

#[test]
fn the_front_port_serves_every_address_given() {
    use std::io::{Read, Write};
    // As llama-server's `--host 127.0.0.1,::1` (two loopback addresses
    // here, so the test needs no IPv6).
    let (front, admin) = (free_port(), free_port().to_string());
    let listen = format!("127.0.0.1:{front},127.0.0.2:{front}");
    let mut child = kvgate_command()
        .args(["--listen", &listen, "--admin-listen"])
        .arg(format!("127.0.0.1:{admin}"))
        .args(["--upstream", "http://127.0.0.1:9"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while blocking_health(&admin, None).is_none() {
        assert!(Instant::now() < deadline, "kvgate did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    for host in ["127.0.0.1", "127.0.0.2"] {
        let mut c = std::net::TcpStream::connect((host, front)).expect("listening");
        write!(
            c,
            "GET /health HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 "), "{host}: {out}");
    }
    let _ = child.kill();
    child.wait().unwrap();
}

/// `kvgate demo --write-model PATH` writes only the tiny model (a GGUF file,
/// whole) and starts nothing; the browser tests take their model from it.
#[test]
fn demo_write_model_writes_a_whole_gguf_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let (code, err) = kvgate(&["demo", "--write-model", path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..4], b"GGUF");
    assert!(bytes.len() > 1_000_000, "{} bytes", bytes.len());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        [std::ffi::OsString::from("tiny.gguf")],
        "no temporary left"
    );
    // Into a folder that does not exist: a clear error, no file.
    let missing = dir.path().join("no/such/dir/tiny.gguf");
    let (code, err) = kvgate(&["demo", "--write-model", missing.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("writing"), "{err}");
    // It stands alone.
    let (code, err) = kvgate(&["demo", "--write-model", "x.gguf", "--keep", "d"]);
    assert_eq!(code, Some(64), "{err}");
}
