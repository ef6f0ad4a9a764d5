//! `/settings`: get, put and validation, applied live and kept across
//! restarts.

use kvgate::store::SaveKind;
use serde_json::{json, Value};

use crate::support::kvgate::{assert_api_error, saves_in as saves, Kvgate, Saving};

use super::{admin, say, setup, turn};

#[tokio::test]
async fn settings_get_put_validate_and_apply_live() {
    let s = setup(1, |_| {}).await;
    let v = s.kv.admin_get("/settings").await;
    for (k, want) in [
        ("autosave", json!(true)),
        ("save_every", json!(5)),
        ("max_files", json!(10)),
        ("clear_on_chat_change", json!(true)),
        ("preload_timeout_s", json!(1200)),
    ] {
        assert_eq!(v[k], want, "{k}: {v}");
    }

    for bad in [
        json!({"save_every": 0}),
        json!({"save_every": -1}),
        json!({"save_every": "3"}),
        json!({"save_every": 1.5}),
        json!({"max_files": 0}),
        json!({"autosave": "yes"}),
        json!({"clear_on_chat_change": 1}),
        json!({"preload_timeout_s": 0}),
        json!({"save_every": 2, "max_files": 0}),
        // An unknown setting is refused, not silently ignored.
        json!({"save_evry": 2}),
        json!([1]),
        json!("save_every"),
    ] {
        let (status, e) = admin(&s.kv, "PUT", "/settings", Some(bad.clone())).await;
        assert_eq!(status, 400, "{bad}: {e}");
        assert_api_error(400, &e, &bad.to_string());
    }
    let (status, _) =
        s.kv.admin_raw("PUT", "/settings", &[], "save_every=3")
            .await;
    assert_eq!(status, 400);
    assert_eq!(
        s.kv.admin_get("/settings").await,
        v,
        "a refused PUT changes nothing"
    );

    // Live: every message autosaves from now on.
    let (status, r) = admin(&s.kv, "PUT", "/settings", Some(json!({"save_every": 1}))).await;
    assert_eq!(status, 200, "{r}");
    let now = s.kv.admin_get("/settings").await;
    assert_eq!(now["save_every"], 1, "{now}");
    assert_eq!(now["max_files"], 10, "a subset leaves the rest: {now}");
    let file: Value =
        serde_json::from_slice(&std::fs::read(s.dir.join("kvgate-settings.json")).unwrap())
            .expect("kvgate-settings.json is JSON");
    assert_eq!(file["save_every"], 1, "{file}");
    say(&s, "Alice", "User: one").await;
    let v = saves(&s.dir);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].kind, SaveKind::Autosave);

    let (status, _) = admin(&s.kv, "PUT", "/settings", Some(json!({"autosave": false}))).await;
    assert_eq!(status, 200);
    say(&s, "Alice", "User: one\nUser: two").await;
    assert_eq!(saves(&s.dir).len(), 1, "autosave off");

    let (status, _) = admin(
        &s.kv,
        "PUT",
        "/settings",
        Some(json!({"autosave": true, "max_files": 1})),
    )
    .await;
    assert_eq!(status, 200);
    say(&s, "Alice", "User: one\nUser: two\nUser: three").await;
    say(&s, "Alice", "User: one\nUser: two\nUser: three\nUser: four").await;
    let v = saves(&s.dir);
    assert_eq!(v.len(), 1, "rotated to max_files 1: {v:?}");
}

#[tokio::test]
async fn settings_persist_across_restarts() {
    let s = setup(1, |_| {}).await;
    let (status, v) = admin(
        &s.kv,
        "PUT",
        "/settings",
        Some(json!({"save_every": 1, "max_files": 3, "clear_on_chat_change": false, "preload_timeout_s": 77})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let Saving {
        fake,
        kv,
        root,
        dir,
    } = s;
    kv.stop().await;

    // Same save directory, default configuration: the saved settings win.
    let kv = Kvgate::start_saving(&fake.url(), &dir, |_| {}).await;
    let v = kv.admin_get("/settings").await;
    for (k, want) in [
        ("autosave", json!(true)),
        ("save_every", json!(1)),
        ("max_files", json!(3)),
        ("clear_on_chat_change", json!(false)),
        ("preload_timeout_s", json!(77)),
    ] {
        assert_eq!(v[k], want, "{k} after a restart: {v}");
    }
    kv.say_body(&turn("Alice", "User: one")).await;
    assert_eq!(
        saves(&dir).len(),
        1,
        "save_every 1 applies after the restart"
    );

    let (status, _) = admin(&kv, "PUT", "/settings", Some(json!({"save_every": 4}))).await;
    assert_eq!(status, 200);
    kv.stop().await;
    let kv = Kvgate::start_saving(&fake.url(), &dir, |_| {}).await;
    let v = kv.admin_get("/settings").await;
    assert_eq!(
        (v["save_every"].as_u64(), v["max_files"].as_u64()),
        (Some(4), Some(3)),
        "{v}"
    );
    drop(root);
}

// Several workers, so the PUTs' handlers really run at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_puts_leave_a_whole_file_that_holds_the_live_value() {
    let s = setup(1, |_| {}).await;
    let file = s.dir.join(kvgate::settings::SETTINGS_FILE);
    for round in 0..5u64 {
        let puts = (1..=20u64).map(|n| {
            let url = s.kv.admin_url.clone();
            let body = json!({"save_every": n + round, "max_files": 100 - n});
            tokio::spawn(async move {
                crate::support::kvgate::admin_json(&url, "PUT", "/settings", None, Some(body)).await
            })
        });
        for p in puts.collect::<Vec<_>>() {
            let (status, v) = p.await.unwrap();
            assert_eq!(status, 200, "round {round}: {v}");
        }
        let live = s.kv.admin_get("/settings").await;
        let on_disk: Value = serde_json::from_slice(&std::fs::read(&file).unwrap())
            .expect("the settings file is whole JSON");
        assert_eq!(
            on_disk, live,
            "round {round}: the file holds the live value"
        );
        assert_eq!(
            live["save_every"].as_u64().unwrap() + live["max_files"].as_u64().unwrap(),
            100 + round,
            "one PUT's values, not a mix: {live}"
        );
    }
    let temps: Vec<String> = crate::support::kvgate::names_in(&s.dir)
        .into_iter()
        .filter(|n| n.starts_with(kvgate::store::TEMP_PREFIX))
        .collect();
    assert!(temps.is_empty(), "{temps:?}");
}

#[tokio::test]
async fn a_bad_settings_file_is_ignored_at_start_and_replaced_by_the_next_put() {
    let s = setup(1, |_| {}).await;
    let Saving {
        fake,
        kv,
        root,
        dir,
    } = s;
    kv.stop().await;
    let file = dir.join(kvgate::settings::SETTINGS_FILE);
    for bad in [
        &b"{\"save_every\": 3"[..],
        b"{\"save_every\": 3, \"max_files\": 0}",
    ] {
        std::fs::write(&file, bad).unwrap();
        // kvgate starts, on the flags' settings (none of the file's).
        let kv = Kvgate::start_saving(&fake.url(), &dir, |c| c.cache.save_every = 2).await;
        let v = kv.admin_get("/settings").await;
        assert_eq!(
            (v["save_every"].as_u64(), v["max_files"].as_u64()),
            (Some(2), Some(10)),
            "{v}"
        );
        let (status, _) = admin(&kv, "PUT", "/settings", Some(json!({"max_files": 4}))).await;
        assert_eq!(status, 200);
        let on_disk: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(on_disk, kv.admin_get("/settings").await);
        kv.stop().await;
    }
    drop(root);
}
