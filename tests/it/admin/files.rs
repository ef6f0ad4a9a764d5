//! The file API, also under the seed plugin's prefix: listing (while files
//! vanish), deleting a save with its sidecar, and refusing hostile names
//! without deleting anything.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvgate::store::TEMP_PREFIX;
use serde_json::{json, Value};

use crate::support::kvgate::{assert_api_error, json_body, raw_exchange};

use super::{
    admin, meta_of, names, saved_file, say, setup, turn, with_identity, PLUGIN, PLUGIN_README,
};

/// Percent-encodes every byte but the unreserved ones.
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// One request written byte for byte on a fresh connection (no client-side
/// URI parsing or normalisation); status and body.
async fn raw_http(
    base: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    // The admin port answers only its own names (its Host rule).
    let host = base.trim_start_matches("http://");
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\ncontent-length: 0\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let (status, _, body) = raw_exchange(base, req.into_bytes()).await;
    (status, json_body(&body))
}

#[tokio::test]
async fn files_list_and_delete_also_under_the_plugin_prefix() {
    let s = setup(2, |_| {}).await;
    say(&s, "Alice", "User: hi").await;
    let (status, r) = admin(&s.kv, "POST", "/save", Some(json!({}))).await;
    assert_eq!(status, 200, "{r}");
    let fa = saved_file(&r, "Alice");
    // A Unicode character in another chat (its name keeps its letters).
    s.kv.say_body(&with_identity(
        turn("Alice", "User: привет"),
        "таверна",
        "Мария",
    ))
    .await;
    let (status, r) = admin(&s.kv, "POST", "/save", Some(json!({}))).await;
    assert_eq!(status, 200, "{r}");
    let fm = saved_file(&r, "Мария");
    assert!(fm.contains("Мария"), "{fm}");
    // A file the extension wrote, with no sidecar.
    let legacy = "chat1_20240115143022_character_Alice.bin";
    std::fs::write(s.dir.join(legacy), b"legacy bytes").unwrap();

    for prefix in ["", PLUGIN] {
        let v = s.kv.admin_get(&format!("{prefix}/files")).await;
        let files = v["files"].as_array().unwrap_or_else(|| panic!("{v}"));
        for f in [&fa, &fm, &legacy.to_string()] {
            let e = files
                .iter()
                .find(|e| e["name"] == f.as_str())
                .unwrap_or_else(|| panic!("{prefix}/files misses {f}: {v}"));
            let size = std::fs::metadata(s.dir.join(f)).unwrap().len();
            assert_eq!(e["size"].as_u64(), Some(size), "{e}");
            assert_eq!(e["isDirectory"], false, "{e}");
            assert!(!e["modified"].is_null(), "{e}");
        }
    }

    // Delete: a percent-encoded UTF-8 name, a legacy file under the plugin
    // prefix, a plain name; each takes its sidecar along.
    for (path, file) in [
        (format!("/files/{}", pct(&fm)), fm.clone()),
        (format!("{PLUGIN}/files/{legacy}"), legacy.to_string()),
        (format!("/files/{fa}"), fa.clone()),
    ] {
        let (status, v) = admin(&s.kv, "DELETE", &path, None).await;
        assert_eq!(status, 200, "DELETE {path}: {v}");
        assert_eq!(v["success"], true, "{v}");
        assert_eq!(
            v["message"],
            format!("File {file} deleted successfully"),
            "{v}"
        );
        assert!(!s.dir.join(&file).exists(), "{file} still there");
        assert!(
            !s.dir.join(meta_of(&file)).exists(),
            "sidecar of {file} still there"
        );
    }
    let v = s.kv.admin_get("/files").await;
    for f in [&fa, &fm] {
        assert!(
            !v["files"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == f.as_str()),
            "{v}"
        );
    }
    let v = s.kv.admin_get("/saves").await;
    assert!(
        !v.to_string().contains(&fa) && !v.to_string().contains(&fm),
        "deleted saves are no longer listed: {v}"
    );
    for path in [
        format!("/files/{fa}"),
        format!("{PLUGIN}/files/{legacy}"),
        "/files/never_20240101000000_character_Nobody.bin".to_string(),
    ] {
        let (status, v) = admin(&s.kv, "DELETE", &path, None).await;
        assert_eq!(status, 404, "DELETE {path}: {v}");
        assert_api_error(404, &v, &path);
        assert_eq!(v["error"]["type"], "not_found_error");
    }
}

#[tokio::test]
async fn files_listing_survives_files_vanishing_midway() {
    let s = setup(1, |_| {}).await;
    let dir = s.dir.clone();
    let stable = "stable_20240101000000_character_S.bin";
    std::fs::write(dir.join(stable), b"s").unwrap();
    std::os::unix::fs::symlink(
        "/nonexistent/kvgate-test",
        dir.join("dangling_20240101000000_character_D.bin"),
    )
    .unwrap();
    const N: usize = 300;
    let churn = |dir: &Path, i: usize| dir.join(format!("churn{i}_20240101000000_character_C.bin"));
    for i in 0..N {
        std::fs::write(churn(&dir, i), b"c").unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let churner = std::thread::spawn({
        let (stop, dir) = (Arc::clone(&stop), dir.clone());
        move || {
            let mut rounds = 0u64;
            while !stop.load(Ordering::SeqCst) {
                for i in 0..N {
                    let p = churn(&dir, i);
                    let _ = std::fs::remove_file(&p);
                    let _ = std::fs::write(&p, b"c");
                }
                rounds += 1;
            }
            rounds
        }
    });
    for round in 0..60 {
        // The seed plugin's prefix, and the underscore spelling its README
        // documents, name the same listing.
        let path = match round % 3 {
            0 => "/files".to_string(),
            1 => format!("{PLUGIN}/files"),
            _ => format!("{PLUGIN_README}/files"),
        };
        let (status, v) = admin(&s.kv, "GET", &path, None).await;
        assert_eq!(status, 200, "listing {round} failed: {v}");
        let files = v["files"]
            .as_array()
            .unwrap_or_else(|| panic!("listing {round}: {v}"));
        assert!(files.iter().any(|f| f["name"] == stable), "{v}");
        for f in files {
            assert!(
                f["name"].is_string() && f["size"].is_u64() && f["isDirectory"].is_boolean(),
                "listing {round}: bad entry {f}"
            );
        }
    }
    stop.store(true, Ordering::SeqCst);
    assert!(
        churner.join().unwrap() > 0,
        "files churned during the listings"
    );
}

const STRICT: &[u16] = &[403];
const MISSING: &[u16] = &[404];
const REFUSED_OR_MISSING: &[u16] = &[403, 404];
const BAD_OR_REFUSED: &[u16] = &[400, 403];
const RAW_SEPARATOR: &[u16] = &[403, 404, 405];

#[tokio::test]
async fn delete_refuses_hostile_names_and_deletes_nothing() {
    let s = setup(2, |_| {}).await;
    say(&s, "Alice", "User: hi").await;
    let (status, r) = admin(&s.kv, "POST", "/save", Some(json!({}))).await;
    assert_eq!(status, 200, "{r}");
    let victim = saved_file(&r, "Alice");
    let victim_meta = meta_of(&victim);
    let root = s.root.path();
    let d = &s.dir;
    // Outside the save directory: a sentinel a traversal would reach.
    std::fs::write(root.join("x.bin"), "SENTINEL").unwrap();
    // Inside: things that are not cache files.
    let link_out = "link_20240101000000_character_Eve.bin";
    let link_in = "inlink_20240101000000_character_Eve.bin";
    std::os::unix::fs::symlink(root.join("x.bin"), d.join(link_out)).unwrap();
    std::os::unix::fs::symlink(d.join(&victim), d.join(link_in)).unwrap();
    std::fs::create_dir(d.join("d.bin")).unwrap();
    std::fs::write(d.join("notes.txt"), "notes").unwrap();
    std::fs::write(d.join("model.gguf"), "gguf").unwrap();
    let temp = format!("{TEMP_PREFIX}1234.bin");
    std::fs::write(d.join(&temp), "partial").unwrap();
    let before = names(d);

    let abs = |p: &Path| pct(p.to_str().unwrap());
    let table: Vec<(String, &[u16])> = vec![
        ("..".into(), STRICT),
        (".".into(), STRICT),
        ("%2e%2e".into(), STRICT),
        ("%2e".into(), STRICT),
        ("..%2fx.bin".into(), STRICT),
        ("%2e%2e%2fx.bin".into(), STRICT),
        ("%2E%2E%2Fx.bin".into(), STRICT),
        ("..%5cx.bin".into(), STRICT),
        ("..%2f..%2f..%2f..%2f..%2fetc%2fpasswd".into(), STRICT),
        ("%2fetc%2fpasswd".into(), STRICT),
        (abs(&root.join("x.bin")), STRICT),
        (abs(&d.join(&victim)), STRICT),
        (format!(".%2f{victim}"), STRICT),
        (format!("..%2fsaves%2f{victim}"), STRICT),
        (format!("{victim}%2f"), STRICT),
        (format!("{victim}%2f..%2f..%2fx.bin"), STRICT),
        ("x.bin%00.txt".into(), STRICT),
        (format!("{victim}%00"), STRICT),
        (format!("{victim}%00.txt"), STRICT),
        (format!("{victim}%3a%3a%24DATA"), STRICT),
        (format!("{victim}."), STRICT),
        (format!("{victim}%20"), STRICT),
        ("%5c%5c%3f%5cC%3a%5cx.bin".into(), STRICT),
        ("C%3a%5cx.bin".into(), STRICT),
        ("~%2fx.bin".into(), STRICT),
        (link_out.into(), STRICT),
        (link_in.into(), STRICT),
        ("d.bin".into(), STRICT),
        ("notes.txt".into(), STRICT),
        ("model.gguf".into(), STRICT),
        (victim_meta.clone(), STRICT),
        (temp.clone(), STRICT),
        // Unicode look-alikes of the slash after `..`.
        ("..%E2%88%95x.bin".into(), STRICT),
        ("..%EF%BC%8Fx.bin".into(), STRICT),
        ("..%E2%81%84x.bin".into(), STRICT),
        // Lenient where an exact answer is a matter of taste; the point is
        // that nothing is deleted and nothing fails with 5xx.
        ("%E2%80%A5%EF%BC%8Fx.bin".into(), REFUSED_OR_MISSING),
        ("%c0%ae%c0%ae%c0%afx.bin".into(), BAD_OR_REFUSED),
        ("%252e%252e%252fx.bin".into(), REFUSED_OR_MISSING),
        (format!("{}.bin", "a".repeat(300)), REFUSED_OR_MISSING),
        (format!("{}.bin", "%C3%A9".repeat(200)), REFUSED_OR_MISSING),
        // Raw separators: a router may see another path (404, 405) or the
        // name (403).
        ("../x.bin".into(), RAW_SEPARATOR),
        (format!("../saves/{victim}"), RAW_SEPARATOR),
        (format!("./{victim}"), RAW_SEPARATOR),
        ("".into(), &[403, 404, 405]),
        // A plain cache-file name that exists only outside: simply missing.
        ("x.bin".into(), MISSING),
    ];
    for prefix in ["/files".to_string(), format!("{PLUGIN}/files")] {
        for (name, allowed) in &table {
            let target = format!("{prefix}/{name}");
            let (status, v) = raw_http(&s.kv.admin_url, "DELETE", &target, &[]).await;
            assert!(
                allowed.contains(&status),
                "DELETE {target}: {status} (want one of {allowed:?}): {v}"
            );
            if status == 403 || status == 404 {
                assert_api_error(status, &v, &target);
            }
            assert_eq!(
                std::fs::read_to_string(root.join("x.bin")).ok().as_deref(),
                Some("SENTINEL"),
                "DELETE {target} touched the file outside the save directory"
            );
            assert_eq!(names(d), before, "DELETE {target} deleted something");
        }
    }
    assert!(d.join(&victim).is_file() && d.join(&victim_meta).is_file());
    assert!(std::fs::symlink_metadata(d.join(link_out)).is_ok());
    assert!(std::fs::symlink_metadata(d.join(link_in)).is_ok());
    assert!(d.join("d.bin").is_dir());

    // The real thing still works, and takes the sidecar along.
    let (status, v) = admin(&s.kv, "DELETE", &format!("/files/{victim}"), None).await;
    assert_eq!(status, 200, "{v}");
    assert!(!d.join(&victim).exists() && !d.join(&victim_meta).exists());
    assert_eq!(
        std::fs::read_to_string(root.join("x.bin")).unwrap(),
        "SENTINEL"
    );
}
