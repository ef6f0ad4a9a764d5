use super::index::*;
use super::*;
use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::llama::slot_file;

fn fp(model: &str) -> Fingerprint {
    Fingerprint::from_upstream(
        &serde_json::json!({"model_path": format!("/models/{model}"), "default_generation_settings": {"n_ctx": 4096}}),
        &serde_json::json!({"data": [{"meta": {"n_params": 1000, "size": 4000, "n_vocab": 260}}]}),
    )
}

#[test]
fn seed_examples_parse() {
    assert_eq!(
        parse_name("chat1_20240115143022_character_Alice.bin"),
        Some(ParsedName {
            chat: "chat1".into(),
            stamp: "20240115143022".into(),
            tag: None,
            character: "Alice".into()
        })
    );
    assert_eq!(
        parse_name("chat1_20240115143022_tag_важный_момент_character_Alice.bin"),
        Some(ParsedName {
            chat: "chat1".into(),
            stamp: "20240115143022".into(),
            tag: Some("важный_момент".into()),
            character: "Alice".into()
        })
    );
    for bad in [
        "notes.txt",
        "chat1_slot0_20240115143022.bin",
        "_20240115143022_character_A.bin",
        "chat_20240115143022_character_.bin",
        "chat_2024011514302_character_A.bin",
        "chat_20240115143022_tag__character_A.bin",
    ] {
        assert_eq!(parse_name(bad), None, "{bad}");
    }
}

#[test]
fn normalization_keeps_unicode_and_separates_names() {
    assert_eq!(normalize("Алиса", 64), "Алиса");
    assert_ne!(
        normalize("Алиса", 64),
        normalize("Мария", 64),
        "the seed mapped both to _____"
    );
    assert_eq!(normalize("Alice Marlowe", 64), "Alice_Marlowe");
    assert_eq!(
        normalize("a/b\\c:d*e?f\"g<h>i|j..", 64),
        "a_b_c_d_e_f_g_h_i_j__"
    );
    assert_eq!(normalize("", 64), "_");
    assert_eq!(normalize("🦀 crab", 64), "__crab");
    assert_eq!(normalize("李白", 64), "李白");
    let long_a = "Ж".repeat(100);
    let long_b = format!("{}Я", "Ж".repeat(99));
    let (na, nb) = (normalize(&long_a, 64), normalize(&long_b, 64));
    assert!(na.len() <= 64 && nb.len() <= 64);
    assert_ne!(na, nb, "hash suffix keeps long names apart");
}

#[test]
fn names_round_trip_through_the_parser() {
    let t = parse_stamp("20240115143022").unwrap();
    assert_eq!(utc_stamp(t), "20240115143022");
    let cases: &[(&str, Option<&str>, &str)] = &[
        ("Alice+Bob+Carol+User", None, "Alice"),
        ("Алиса+Пользователь", Some("важный момент"), "Алиса"),
        ("李白+User", None, "李白"),
        ("🦀+User", Some("🎉"), "🦀"),
        ("my_character_chat", None, "Bob"),
        ("chat_tag_x", Some("t_character_y"), "Carol"),
        ("x_20240101000000_character_y", None, "Dave"),
        (
            &"c".repeat(1000),
            Some(&"t".repeat(1000)),
            &"n".repeat(1000),
        ),
    ];
    for (chat, tag, character) in cases {
        let name = file_name(chat, t, *tag, character);
        assert!(name.len() < 200, "{name} is {} bytes", name.len());
        assert!(is_cache_file_name(&name));
        let p = parse_name(&name).unwrap_or_else(|| panic!("{name} does not parse"));
        assert_eq!(p.chat, normalize(chat, MAX_NAME_BYTES), "{name}");
        assert_eq!(p.stamp, "20240115143022");
        assert_eq!(p.character, normalize(character, MAX_NAME_BYTES), "{name}");
        assert_eq!(p.tag, tag.map(|t| normalize(t, MAX_TAG_BYTES)), "{name}");
    }
}

#[test]
fn stamps_are_utc_civil_dates() {
    assert_eq!(utc_stamp(0), "19700101000000");
    assert_eq!(utc_stamp(951_782_400), "20000229000000");
    assert_eq!(utc_stamp(4_102_444_799), "20991231235959");
    for t in [0, 86_399, 951_782_400, 1_700_000_000, 4_102_444_799] {
        assert_eq!(parse_stamp(&utc_stamp(t)), Some(t));
    }
    assert_eq!(parse_stamp("20241340000000"), None);
}

fn meta(file: &str, chat: &str, ch: &str, tag: Option<&str>, created: u64) -> SaveMeta {
    SaveMeta {
        file: file.into(),
        chat: chat.into(),
        character: ch.into(),
        tag: tag.map(Into::into),
        kind: SaveKind::Autosave,
        created,
        n_tokens: 1,
        bytes: 1,
        fingerprint: Some("f".into()),
        model: None,
    }
}

#[test]
fn rotation_keeps_newest_untagged_per_chat_and_character() {
    let saves = vec![
        meta("a1", "c", "A", None, 1),
        meta("a2", "c", "A", None, 2),
        meta("a3", "c", "A", None, 3),
        meta("at", "c", "A", Some("keep"), 0),
        meta("b1", "c", "B", None, 1),
        meta("a_other", "d", "A", None, 0),
    ];
    assert_eq!(
        rotation_victims(&saves, "c", "A", 2),
        vec!["a1".to_string()]
    );
    assert_eq!(
        rotation_victims(&saves, "c", "A", 1),
        vec!["a2".to_string(), "a1".to_string()]
    );
    assert!(rotation_victims(&saves, "c", "B", 1).is_empty());
}

#[test]
fn best_save_is_longest_prefix_then_newest() {
    let prompt = vec![1, 5, 6, 7, 8, 9];
    let c = vec![
        (meta("short", "c", "A", None, 9), Arc::new(vec![1, 5, 6])),
        (
            meta("long_old", "c", "A", None, 1),
            Arc::new(vec![1, 5, 6, 7, 8, 42, 43]),
        ),
        (
            meta("long_new", "c", "A", None, 2),
            Arc::new(vec![1, 5, 6, 7, 8]),
        ),
        (
            meta("other", "c", "A", None, 99),
            Arc::new(vec![2, 5, 6, 7, 8]),
        ),
    ];
    let (m, lcp) = choose_best(&c, &prompt, 0).unwrap();
    assert_eq!((m.file.as_str(), lcp), ("long_new", 5));
    assert!(
        choose_best(&c, &prompt, 5).is_none(),
        "never restore less than the slot holds"
    );
}

fn new_save<'a>(f: &'a Fingerprint, n_saved: u64, n_written: u64) -> NewSave<'a> {
    NewSave {
        chat: "Alice+User",
        character: "Алиса",
        tag: None,
        kind: SaveKind::Autosave,
        fingerprint: Some(f),
        n_saved,
        n_written,
    }
}

/// Writes what llama-server would under a temp name.
fn fake_save(store: &CacheStore, tokens: &[i32], payload: usize) -> (String, u64) {
    let temp = store.temp_name();
    let mut bytes = slot_file::encode_header(tokens);
    bytes.extend(std::iter::repeat_n(0u8, payload));
    fs::write(store.dir().join(&temp), &bytes).unwrap();
    (temp, bytes.len() as u64)
}

#[test]
fn commit_checks_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let store = CacheStore::open(dir.path()).unwrap();
    let f = fp("m.gguf");
    let (t1, n1) = fake_save(&store, &[1, 2, 3], 10);
    let m1 = store.commit(&t1, &new_save(&f, 3, n1)).unwrap();
    let (t2, n2) = fake_save(&store, &[1, 2, 3, 4], 10);
    let m2 = store.commit(&t2, &new_save(&f, 4, n2)).unwrap();
    assert_ne!(
        m1.file, m2.file,
        "same second: the next free second is used"
    );
    assert_eq!(m2.created, m1.created + 1);
    assert!(dir.path().join(&m1.file).exists() && dir.path().join(meta_name(&m1.file)).exists());
    assert_eq!(store.tokens(&m2.file).unwrap().as_slice(), &[1, 2, 3, 4]);
    assert_eq!(m1.character, "Алиса");

    // Failed checks leave no final file and no temporary one.
    let before: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let (t, n) = fake_save(&store, &[1, 2], 0);
    assert!(
        store.commit(&t, &new_save(&f, 2, n + 1)).is_err(),
        "size mismatch"
    );
    let (t, n) = fake_save(&store, &[1, 2], 0);
    assert!(
        store.commit(&t, &new_save(&f, 0, n)).is_err(),
        "nothing saved"
    );
    let (t, n) = fake_save(&store, &[1, 2], 0);
    assert!(
        store.commit(&t, &new_save(&f, 3, n)).is_err(),
        "header disagrees"
    );
    assert!(store.commit("missing.bin", &new_save(&f, 3, 10)).is_err());
    let strict = CacheStore::open(dir.path())
        .unwrap()
        .with_min_bytes(1 << 20);
    let (t, n) = fake_save(&strict, &[1, 2], 0);
    assert!(
        strict.commit(&t, &new_save(&f, 2, n)).is_err(),
        "under the minimum"
    );
    let after: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(before.len(), after.len(), "{after:?}");
    assert_eq!(store.list().len(), 2);
}

#[test]
fn index_rebuilds_from_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let f = fp("m.gguf");
    let kept;
    {
        let store = CacheStore::open(dir.path()).unwrap();
        let (t, n) = fake_save(&store, &[1, 2, 3], 5);
        kept = store.commit(&t, &new_save(&f, 3, n)).unwrap();
        let (t, n) = fake_save(&store, &[1, 9], 5);
        let gone = store.commit(&t, &new_save(&f, 2, n)).unwrap();
        fs::remove_file(dir.path().join(&gone.file)).unwrap(); // deleted from outside
        fake_save(&store, &[7], 0); // an interrupted save
    }
    // A file the seed extension wrote, and something that is not a save.
    fs::write(
        dir.path().join("chat1_20240115143022_character_Alice.bin"),
        slot_file::encode_header(&[1, 4, 4]),
    )
    .unwrap();
    fs::write(dir.path().join("notes.txt"), b"x").unwrap();
    let store = CacheStore::open(dir.path()).unwrap();
    let list = store.list();
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(store.get(&kept.file).unwrap(), kept);
    let legacy = store
        .get("chat1_20240115143022_character_Alice.bin")
        .unwrap();
    assert_eq!(
        (legacy.kind, legacy.n_tokens, legacy.fingerprint.clone()),
        (SaveKind::Legacy, 3, None)
    );
    assert_eq!(legacy.created, parse_stamp("20240115143022").unwrap());
    let names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with(TEMP_PREFIX)),
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| n.ends_with(META_SUFFIX)).count(),
        1,
        "orphaned sidecar removed: {names:?}"
    );
}

#[test]
fn candidates_respect_fingerprint_and_prefer_this_chat() {
    let dir = tempfile::tempdir().unwrap();
    let store = CacheStore::open(dir.path()).unwrap();
    let (m1, m2) = (fp("one.gguf"), fp("two.gguf"));
    assert_ne!(m1.id, m2.id);
    let save = |chat: &'static str, f: &Fingerprint| {
        let (t, n) = fake_save(&store, &[1, 2, 3], 1);
        store
            .commit(
                &t,
                &NewSave {
                    chat,
                    character: "A",
                    tag: None,
                    kind: SaveKind::Eviction,
                    fingerprint: Some(f),
                    n_saved: 3,
                    n_written: n,
                },
            )
            .unwrap()
    };
    let other_chat = save("other", &m1);
    let other_model = save("this", &m2);
    assert_eq!(
        store.candidates("this", "A", &m1.id),
        vec![other_chat.clone()],
        "falls back to any chat"
    );
    let this_chat = save("this", &m1);
    assert_eq!(store.candidates("this", "A", &m1.id), vec![this_chat]);
    assert_eq!(
        store.candidates("this", "A", &m2.id),
        vec![other_model.clone()]
    );
    assert!(store.candidates("this", "B", &m1.id).is_empty());
    // Files under another fingerprint stay listed.
    assert!(store.list().contains(&other_model));
}

#[test]
fn delete_refuses_anything_outside_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store = CacheStore::open(dir.path()).unwrap();
    let outside = tempfile::NamedTempFile::new().unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(outside.path(), dir.path().join("link.bin")).unwrap();
    for bad in [
        "../x.bin",
        "/etc/passwd",
        "a/b.bin",
        "..bin",
        "x.txt",
        ".kvgate-tmp-1.bin",
        "link.bin",
    ] {
        assert!(
            matches!(store.delete(bad), Err(StoreError::BadName(_))),
            "{bad}"
        );
    }
    assert!(outside.path().exists());
    assert!(matches!(
        store.delete("none.bin"),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn open_refuses_missing_or_unwritable_dirs() {
    let e = CacheStore::open(Path::new("/nonexistent/kvgate")).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/kvgate"), "{e}");
    let f = tempfile::NamedTempFile::new().unwrap();
    assert!(CacheStore::open(f.path())
        .unwrap_err()
        .to_string()
        .contains("not a directory"));
}

#[test]
fn fingerprint_changes_with_the_model() {
    let a = fp("a.gguf");
    assert_eq!(a, fp("a.gguf"));
    assert_eq!(a.model, "a.gguf");
    let mut other_ctx = Fingerprint::from_upstream(
        &serde_json::json!({"model_path": "/models/a.gguf", "default_generation_settings": {"n_ctx": 2048}}),
        &serde_json::json!({"data": [{"meta": {"n_params": 1000, "size": 4000, "n_vocab": 260}}]}),
    );
    assert_ne!(a.id, other_ctx.id);
    other_ctx.n_ctx_slot = 4096;
    assert_ne!(a.id, fp("b.gguf").id);
}

#[test]
fn rescans_racing_saves_and_deletes_keep_the_index_and_the_directory_in_step() {
    let dir = tempfile::tempdir().unwrap();
    let store = CacheStore::open(dir.path()).unwrap();
    let f = fp("m.gguf");
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                store.rescan().unwrap();
                // Let the saver in (std's mutex is not fair).
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        });
        let saved = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for i in 0..90 {
                let (t, n) = fake_save(&store, &[1, 2, 3], 5);
                let m = store.commit(&t, &new_save(&f, 3, n)).unwrap();
                if i % 3 == 0 {
                    store.delete(&m.file).unwrap();
                }
            }
        }));
        stop.store(true, Ordering::Relaxed);
        saved.unwrap();
    });
    // Every save in the directory is indexed with its sidecar (none taken for
    // an orphan mid-commit), and nothing deleted came back.
    let mut on_disk: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_cache_file_name(n))
        .collect();
    on_disk.sort();
    let mut indexed: Vec<String> = store.list().into_iter().map(|m| m.file).collect();
    indexed.sort();
    assert_eq!(indexed, on_disk);
    assert_eq!(on_disk.len(), 60);
    for file in &on_disk {
        assert!(
            dir.path().join(meta_name(file)).exists(),
            "{file} lost its sidecar"
        );
    }
}
