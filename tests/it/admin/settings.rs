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
