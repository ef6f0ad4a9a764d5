//! The binary's command line: bad flags and values give one clear line and
//! exit code 64; an unusable save directory stops kvgate before it serves.

use crate::support::kvgate_bin::kvgate_command;

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
