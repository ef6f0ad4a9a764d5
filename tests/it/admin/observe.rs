//! Watching kvgate: the `/events` stream of a scripted group chat,
//! `restored_from`, the slot released after a turn's autosave, a stalled
//! monitor that holds nothing up, failed saves and
//! restores as events and metrics, and `/metrics` as Prometheus text (read
//! with `support::prometheus`, whose checks are tested here too).

use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::support::kvgate::{EventTap, Saving};
use crate::support::prometheus::parse_exposition;

use super::{say, setup, slot_of, CHAT, ROSTER};

/// A 3-character group chat on 2 slots: the third evicts the first, the
/// first comes back, evicts the second and is restored.
const SCRIPT: [(&str, &str); 4] = [
    ("Alice", "User: Hello!"),
    ("Bob", "User: Hello!"),
    ("Carol", "User: Hello!"),
    ("Alice", "User: Hello!\nBob: Hi.\nCarol: Hey."),
];

async fn run_script(s: &Saving) -> Vec<(usize, hyper::HeaderMap, Vec<Value>)> {
    let mut out = Vec::new();
    for (who, history) in SCRIPT {
        let (_, h, events) = say(s, who, history).await;
        out.push((slot_of(&h), h, events));
    }
    out
}

#[tokio::test]
async fn events_follow_a_scripted_group_chat_in_order() {
    let s = setup(2, |_| {}).await;
    let tap = EventTap::open(&s.kv).await;
    let turns = run_script(&s).await;
    tap.until("generation_finished", SCRIPT.len()).await;
    // The monitor also sees llama-server go and come back.
    s.fake.kill().await;
    tap.until("upstream_down", 1).await;
    s.fake.start_again().await;
    let events = tap.until("upstream_up", 1).await;
    assert!(events.iter().all(|e| e["type"].is_string()), "{events:#?}");

    const TURN_TYPES: [&str; 6] = [
        "slot_assigned",
        "evicted",
        "saved",
        "restored",
        "generation_started",
        "generation_finished",
    ];
    // A turn runs from its slot_assigned to the next one; its events are
    // those of its slot (save-behind may save *other* idle slots meanwhile).
    let mut per_turn: Vec<Vec<(usize, &Value)>> = Vec::new();
    for (at, e) in events
        .iter()
        .enumerate()
        .filter(|(_, e)| TURN_TYPES.contains(&e["type"].as_str().unwrap()))
    {
        if e["type"] == "slot_assigned" {
            per_turn.push(Vec::new());
        }
        if let Some(t) = per_turn.last_mut() {
            t.push((at, e));
        }
    }
    assert_eq!(per_turn.len(), SCRIPT.len(), "{events:#?}");
    let plain = ["slot_assigned", "generation_started", "generation_finished"].as_slice();
    let evicting = [
        "slot_assigned",
        "evicted",
        "saved",
        "generation_started",
        "generation_finished",
    ]
    .as_slice();
    let restoring = [
        "slot_assigned",
        "evicted",
        "saved",
        "restored",
        "generation_started",
        "generation_finished",
    ]
    .as_slice();
    // The evicted slot was already saved behind the previous generation.
    let restoring_clean = [
        "slot_assigned",
        "evicted",
        "restored",
        "generation_started",
        "generation_finished",
    ]
    .as_slice();
    let evicted = [None, None, Some("Alice"), Some("Bob")];
    for i in 0..SCRIPT.len() {
        let (slot, h, stream) = &turns[i];
        let mine: Vec<(usize, &Value)> = per_turn[i]
            .iter()
            .copied()
            .filter(|(_, e)| {
                e.get("slot")
                    .is_none_or(|x| x.as_u64() == Some(*slot as u64))
            })
            .collect();
        let got: Vec<&str> = mine
            .iter()
            .map(|(_, e)| e["type"].as_str().unwrap())
            .collect();
        let ok = match i {
            0 | 1 => got == plain,
            2 => got == evicting,
            _ => got == restoring || got == restoring_clean,
        };
        assert!(
            ok,
            "turn {i} ({}): {got:?}\n{:#?}",
            SCRIPT[i].0, per_turn[i]
        );
        for (_, e) in &mine {
            let ty = e["type"].as_str().unwrap();
            let who = if ty == "saved" || ty == "evicted" {
                evicted[i]
            } else {
                Some(SCRIPT[i].0)
            };
            assert_eq!(e["character"].as_str(), who, "turn {i} {ty}: {e}");
        }
        let fin = mine.last().unwrap().1;
        let timings = &stream.last().unwrap()["timings"];
        for k in ["cache_n", "prompt_n"] {
            assert_eq!(
                fin[k], timings[k],
                "turn {i}: {k} as llama-server reported: {fin}"
            );
        }
        assert!(fin["ttft_ms"].is_number(), "{fin}");
        // What kvgate read of the turn, in the event and the headers alike.
        let started = mine
            .iter()
            .find(|(_, e)| e["type"] == "generation_started")
            .unwrap()
            .1;
        let header = |k: &str| h[k].to_str().unwrap().to_string();
        assert_eq!(started["kind"], "normal", "{started}");
        assert_eq!(started["source"], "inferred", "{started}");
        assert_eq!(started["chat"], CHAT, "{started}");
        assert_eq!(started["cache"], header("x-kvgate-cache"), "{started}");
        assert_eq!(header("x-kvgate-kind"), "normal");
        assert_eq!(header("x-kvgate-identity"), "inferred");
        assert_eq!(header("x-kvgate-chat"), CHAT);
        if let Some((_, restored)) = mine.iter().find(|(_, e)| e["type"] == "restored") {
            // Where the save came from, for a client's "restored from" toast.
            assert_eq!(restored["saved_chat"], CHAT, "{restored}");
            assert!(
                restored["saved_at"]
                    .as_u64()
                    .is_some_and(|t| t > 1_700_000_000),
                "{restored}"
            );
            assert!(restored["save_kind"].is_string(), "{restored}");
            assert_eq!(started["cache"], "disk", "{started}");
        }
        if let Some(who) = evicted[i] {
            // The evicted character's cache went to disk before the slot
            // was overwritten: in this turn, or behind an earlier one.
            let (restored_at, first_gen) = (
                mine.iter()
                    .find(|(_, e)| e["type"] == "restored")
                    .map(|(at, _)| *at),
                mine.iter()
                    .find(|(_, e)| e["type"] == "generation_started")
                    .map(|(at, _)| *at)
                    .unwrap(),
            );
            let overwritten_at = restored_at.unwrap_or(first_gen);
            let saved_at = events
                .iter()
                .position(|e| {
                    e["type"] == "saved"
                        && e["character"] == who
                        && e["slot"].as_u64() == Some(*slot as u64)
                })
                .unwrap_or_else(|| panic!("{who} never saved: {events:#?}"));
            assert!(
                saved_at < overwritten_at,
                "{who} saved too late: {events:#?}"
            );
        }
        if i == 3 {
            let restored = mine
                .iter()
                .find(|(_, e)| e["type"] == "restored")
                .unwrap()
                .1;
            assert_eq!(
                restored["file"].as_str(),
                h["x-kvgate-restored"].to_str().ok(),
                "{restored}"
            );
            assert!(fin["cache_n"].as_u64().unwrap() > 10, "{fin}");
        }
    }
}

#[tokio::test]
async fn restored_from_names_the_file_a_slot_came_from() {
    let s = setup(2, |_| {}).await;
    let turns = run_script(&s).await;
    let (slot, h, _) = &turns[3];
    let file = h["x-kvgate-restored"].to_str().unwrap();
    let sl = s.kv.admin_slots().await;
    assert_eq!(sl[*slot]["character"], "Alice");
    assert_eq!(sl[*slot]["restored_from"], file, "{sl:?}");
    assert_eq!(sl[*slot]["usage"], 1, "{sl:?}");
}

#[tokio::test]
async fn a_turns_slot_is_released_after_its_autosave_and_said_so() {
    let s = setup(1, |c| c.cache.save_every = 1).await;
    let tap = EventTap::open(&s.kv).await;
    say(&s, "Alice", "User: Hello!").await;
    let events = tap.until("slot_released", 1).await;
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .filter(|t| *t != "queue")
        .collect();
    // The autosave holds the slot after the generation has finished.
    assert_eq!(
        types,
        [
            "slot_assigned",
            "generation_started",
            "generation_finished",
            "saved",
            "slot_released"
        ],
        "{events:#?}"
    );
    let released = events.last().unwrap();
    assert_eq!(
        (&released["slot"], &released["chat"], &released["character"]),
        (&0.into(), &CHAT.into(), &"Alice".into()),
        "{released}"
    );
    // When it is told, the slot is free for the next request.
    let sl = s.kv.admin_slots().await;
    assert_eq!(sl[0]["busy"], false, "{sl:?}");
}

/// Turns of the stalled-monitor test. Overflowing every buffer between the
/// event bus and a monitor that never reads takes more than 7000 events
/// (the kernel alone absorbed 1.4 MB in a trial), too slow for this suite;
/// so this checks that a stalled monitor costs the proxy nothing and
/// another monitor nothing, not that drops are counted.
const STALL_TURNS: usize = 100;

#[tokio::test]
async fn a_stalled_event_monitor_never_holds_up_the_proxy_or_other_monitors() {
    let s = setup(2, |_| {}).await;
    let dropped = |text: &str| -> f64 {
        parse_exposition(text)
            .family_samples("kvgate_events_dropped_total")
            .iter()
            .map(|x| x.value)
            .sum()
    };
    assert_eq!(
        dropped(&s.kv.metrics_text().await),
        0.0,
        "nobody dropped yet"
    );
    // A monitor that never reads, with a tiny receive window.
    let addr =
        s.kv.admin_url
            .strip_prefix("http://")
            .unwrap()
            .parse()
            .unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(1024).unwrap();
    let mut stalled = sock.connect(addr).await.unwrap();
    stalled
        .write_all(b"GET /events HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    // Its subscription is in place once the response head is out; from
    // then on it reads nothing.
    let mut head = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut stalled, &mut head)
        .await
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 200", "the stalled monitor was served");
    // A monitor that keeps up still sees everything.
    let tap = EventTap::open(&s.kv).await;
    // A proxy held up by the stalled monitor would hang: each turn gets a
    // generous bound (how fast turns are is the benches' business).
    for i in 0..STALL_TURNS {
        tokio::time::timeout(
            Duration::from_secs(10),
            say(&s, ROSTER[i % 3], &format!("User: {i}")),
        )
        .await
        .unwrap_or_else(|_| panic!("turn {i} hung behind a stalled monitor"));
    }
    // Whatever the stalled monitor missed is counted in a family that
    // exists.
    assert!(
        !parse_exposition(&s.kv.metrics_text().await)
            .family_samples("kvgate_events_dropped_total")
            .is_empty(),
        "kvgate_events_dropped_total is exported"
    );
    tap.until("generation_finished", STALL_TURNS).await;
    let finished = tap.of("generation_finished").len();
    assert_eq!(
        finished, STALL_TURNS,
        "the live monitor missed or repeated events"
    );
    drop(stalled);
}

#[tokio::test]
async fn failed_saves_and_restores_show_up_as_events_and_metrics() {
    let s = setup(1, |c| c.cache.save_every = 1).await;
    let tap = EventTap::open(&s.kv).await;
    say(&s, "Alice", "User: a").await; // autosaved
    say(&s, "Bob", "User: a").await; // evicts Alice (already saved)
    s.fake.fail_next_restore();
    let (_, h, _) = say(&s, "Alice", "User: a\nBob: b").await;
    assert!(h.get("x-kvgate-restored").is_none());
    s.fake.fail_next_save(500);
    say(&s, "Alice", "User: a\nBob: b\nUser: c").await; // its autosave fails
                                                        // The restore failed first, then the save.
    let events = tap.until("save_failed", 1).await;
    for ty in ["restore_failed", "save_failed"] {
        let e = events
            .iter()
            .find(|e| e["type"] == ty)
            .unwrap_or_else(|| panic!("no {ty} before the save_failed: {events:#?}"));
        assert_eq!(e["character"], "Alice", "{e}");
    }
    let e = parse_exposition(&s.kv.metrics_text().await);
    let total = |name: &str| -> f64 { e.family_samples(name).iter().map(|x| x.value).sum() };
    assert_eq!(total("kvgate_restore_failures_total"), 1.0);
    assert_eq!(total("kvgate_save_failures_total"), 1.0);
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text() {
    let s = setup(2, |_| {}).await;
    run_script(&s).await;
    let text = s.kv.metrics_text().await;
    let e = parse_exposition(&text);
    let fam = |name: &str| e.family_samples(name);
    let sum = |name: &str, label: Option<(&str, &str)>| -> f64 {
        e.samples
            .iter()
            .filter(|x| x.name == name)
            .filter(|x| label.is_none_or(|(k, v)| x.labels.get(k).map(String::as_str) == Some(v)))
            .map(|x| x.value)
            .sum()
    };
    for name in [
        "kvgate_requests_total",
        "kvgate_ttft_seconds",
        "kvgate_saves_total",
        "kvgate_save_failures_total",
        "kvgate_save_bytes_total",
        "kvgate_save_seconds_total",
        "kvgate_restores_total",
        "kvgate_restore_failures_total",
        "kvgate_restore_seconds_total",
        "kvgate_prompt_tokens_total",
        "kvgate_slots",
        "kvgate_queue_wait_seconds",
        "kvgate_events_dropped_total",
        "kvgate_upstream_up",
    ] {
        assert!(!fam(name).is_empty(), "{name} missing:\n{text}");
    }
    for name in ["kvgate_ttft_seconds", "kvgate_queue_wait_seconds"] {
        assert_eq!(e.type_of(name), Some("histogram"), "{name}:\n{text}");
    }
    for x in &e.samples {
        if x.name.starts_with("kvgate_") && e.type_of(&x.name) == Some("counter") {
            assert!(x.value >= 0.0 && x.value.is_finite(), "{x:?}");
        }
    }
    // Labels as documented, values from the script.
    for x in fam("kvgate_requests_total") {
        assert!(
            x.labels.contains_key("route") && x.labels.contains_key("status"),
            "{x:?}"
        );
    }
    assert!(
        sum("kvgate_requests_total", Some(("status", "200"))) >= SCRIPT.len() as f64,
        "{text}"
    );
    assert!(
        sum("kvgate_ttft_seconds_count", None) >= SCRIPT.len() as f64,
        "{text}"
    );
    assert!(
        sum("kvgate_saves_total", Some(("kind", "eviction"))) >= 2.0,
        "{text}"
    );
    assert!(sum("kvgate_save_bytes_total", None) > 0.0, "{text}");
    assert!(sum("kvgate_restores_total", None) >= 1.0, "{text}");
    assert_eq!(sum("kvgate_restore_failures_total", None), 0.0, "{text}");
    assert!(
        sum("kvgate_prompt_tokens_total", Some(("source", "cache"))) > 0.0,
        "{text}"
    );
    assert!(
        sum("kvgate_prompt_tokens_total", Some(("source", "evaluated"))) > 0.0,
        "{text}"
    );
    for x in fam("kvgate_slots") {
        assert!(x.labels.contains_key("state"), "{x:?}");
    }
    assert_eq!(sum("kvgate_upstream_up", None), 1.0, "{text}");
}

#[test]
fn the_metrics_parser_rejects_what_it_should() {
    let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\"} 3\n\
              # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.3\nh_count 2\n";
    let e = parse_exposition(ok);
    assert_eq!(e.samples.len(), 5);
    assert_eq!(e.samples[0].labels["y"], "q\"");
    for bad in [
        "a{x=1} 3\n",
        "a{x=\"1\" 3\n",
        "a 3 4 5\n",
        "1a 3\n",
        "a nope\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
        "# TYPE a gauge\n# TYPE a gauge\na 1\n",
        "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\na 2\n",
        "# HELP kvgate_x X.\nkvgate_x 1\n",
    ] {
        let r = std::panic::catch_unwind(|| parse_exposition(bad));
        assert!(r.is_err(), "accepted {bad:?}");
    }
}

/// A clear and a deletion made through the admin API are events too, so
/// every other open dashboard or extension refreshes.
#[tokio::test]
async fn clearing_slots_and_deleting_a_file_are_events() {
    let s = setup(2, |_| {}).await;
    let tap = EventTap::open(&s.kv).await;
    say(&s, "Alice", "User: Hello!").await;
    let (status, v) = super::admin(&s.kv, "POST", "/save", Some(serde_json::json!({}))).await;
    assert_eq!(status, 200, "{v}");
    let file = v["saved"][0]["file"].as_str().expect("a save").to_string();
    let (status, v) =
        super::admin(&s.kv, "POST", "/slots/clear", Some(serde_json::json!({}))).await;
    assert_eq!(status, 200, "{v}");
    let cleared = tap.wait_for("slots_cleared", 1).await;
    assert_eq!(cleared[0]["slots"], v["cleared"], "{cleared:?}");
    assert_eq!(
        cleared[0]["upstream"],
        s.kv.upstream.name.as_str(),
        "{cleared:?}"
    );
    let (status, v) = super::admin(&s.kv, "DELETE", &format!("/files/{file}"), None).await;
    assert_eq!(status, 200, "{v}");
    let deleted = tap.wait_for("file_deleted", 1).await;
    assert_eq!(deleted[0]["file"], file.as_str(), "{deleted:?}");
}
