use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hyper::{Method, StatusCode};

use super::*;

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/admin/dashboard/web")
}

/// Every file under `dir`, as a path relative to `root` with `/`.
fn files_under(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(root, &path, out);
        } else {
            let rel = path.strip_prefix(root).unwrap();
            out.insert(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

fn served(method: &Method, path: &str) -> Option<&'static str> {
    match lookup(method, path) {
        Some(Ok(asset)) => Some(asset.name),
        _ => None,
    }
}

#[test]
fn the_page_and_its_files_are_found_by_exact_path() {
    assert_eq!(served(&Method::GET, "/"), Some("index.html"));
    assert_eq!(served(&Method::HEAD, "/"), Some("index.html"));
    assert_eq!(served(&Method::GET, "/dashboard/app.js"), Some("app.js"));
    assert_eq!(
        served(&Method::GET, "/dashboard/vendor/uPlot.esm.js"),
        Some("vendor/uPlot.esm.js")
    );
    let js = lookup(&Method::GET, "/dashboard/app.js").unwrap().unwrap();
    assert_eq!(js.content_type, "text/javascript; charset=utf-8");
    let css = lookup(&Method::GET, "/dashboard/style.css")
        .unwrap()
        .unwrap();
    assert_eq!(css.content_type, "text/css; charset=utf-8");
}

#[test]
fn other_paths_are_the_apis_and_unknown_files_are_404() {
    // Not the dashboard's: the API answers them (behind the key).
    for (method, path) in [
        (Method::GET, "/health"),
        (Method::GET, "/dashboard"),
        (Method::GET, "/dashboardx/app.js"),
        (Method::GET, "/api/plugins/kv-cache-manager/"),
        (Method::POST, "/"),
        (Method::PUT, "/dashboard/app.js"),
        (Method::DELETE, "/dashboard/app.js"),
    ] {
        assert!(lookup(&method, path).is_none(), "{method} {path}");
    }
    // Under the prefix, only exact names: no directory, no traversal, no
    // case folding, no query tricks (the router passes the path alone).
    for path in [
        "/dashboard/",
        "/dashboard/nope.js",
        "/dashboard/APP.JS",
        "/dashboard/../Cargo.toml",
        "/dashboard/vendor/",
        "/dashboard/vendor/../app.js",
        "/dashboard//app.js",
        "/dashboard/app.js/",
        "/dashboard/%61pp.js",
        "/dashboard/tests.rs",
    ] {
        let err = lookup(&Method::GET, path).unwrap().unwrap_err();
        assert_eq!(err.status, StatusCode::NOT_FOUND, "{path}");
    }
}

#[test]
fn answers_carry_the_type_and_the_security_headers() {
    let resp = response(lookup(&Method::GET, "/").unwrap().unwrap());
    let h = resp.headers();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-content-type-options"], "nosniff");
    let csp = h["content-security-policy"].to_str().unwrap();
    for directive in [
        "default-src 'self'",
        "connect-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
}

#[test]
fn the_table_is_every_file_of_the_folder() {
    let root = web_dir();
    let mut on_disk = BTreeSet::new();
    files_under(&root, &root, &mut on_disk);
    let table: BTreeSet<String> = ASSETS.iter().map(|a| a.name.to_string()).collect();
    assert_eq!(table.len(), ASSETS.len(), "a name listed twice");
    assert_eq!(table, on_disk, "ASSETS must list every file of {root:?}");
}

/// The quoted string starting right after `at` in `text`.
fn quoted_at(text: &str, at: usize) -> Option<&str> {
    let rest = &text[at..];
    let quote = rest.chars().next().filter(|c| matches!(c, '\'' | '"'))?;
    rest[1..].split(quote).next()
}

/// Where `text` refers to other files: the HTML's `src=`/`href=`, the
/// scripts' `import … from '…'` and `import('…')`.
fn references(text: &str) -> Vec<String> {
    let mut refs = Vec::new();
    for marker in ["src=", "href=", "from ", "import("] {
        for (at, _) in text.match_indices(marker) {
            if let Some(r) = quoted_at(text, at + marker.len()) {
                refs.push(r.to_string());
            }
        }
    }
    refs
}

#[test]
fn every_reference_between_the_files_resolves_to_an_asset() {
    let mut checked = 0;
    // The page and kvgate's own scripts (the vendored library imports
    // nothing).
    for asset in ASSETS.iter().filter(|a| {
        !a.name.starts_with("vendor/") && (a.name.ends_with(".html") || a.name.ends_with(".js"))
    }) {
        let text = std::str::from_utf8(asset.body).unwrap();
        let dir = asset.name.rsplit_once('/').map_or("", |(d, _)| d);
        // In-page anchors (`#live`) are not files.
        for r in references(text).into_iter().filter(|r| !r.starts_with('#')) {
            let path = if let Some(rel) = r.strip_prefix("./") {
                if dir.is_empty() {
                    format!("{PREFIX}{rel}")
                } else {
                    format!("{PREFIX}{dir}/{rel}")
                }
            } else {
                r.clone()
            };
            assert!(
                path.starts_with('/') && !path.starts_with("//"),
                "{}: {r:?} is not on this port (absolute path or ./ only)",
                asset.name
            );
            assert!(
                matches!(lookup(&Method::GET, &path), Some(Ok(_))),
                "{}: {r:?} ({path}) is not an asset",
                asset.name
            );
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} references found");
}

#[test]
fn the_vendored_chart_library_says_its_version_and_comes_with_its_license() {
    let esm = lookup(&Method::GET, "/dashboard/vendor/uPlot.esm.js")
        .unwrap()
        .unwrap();
    let head = std::str::from_utf8(&esm.body[..400]).unwrap();
    assert!(head.contains("(v1.6."), "{head}");
    let license = lookup(&Method::GET, "/dashboard/vendor/uPlot.LICENSE")
        .unwrap()
        .unwrap();
    assert!(std::str::from_utf8(license.body)
        .unwrap()
        .contains("MIT License"));
}
