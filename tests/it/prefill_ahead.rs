//! Prefill ahead gives way: a turn that starts while kvgate is reading
//! ahead for the next speaker goes first (the fake llama-server paces the
//! read so that the turn arrives in the middle of it).

use std::time::Duration;

use crate::support::kvgate::{poll_until, spawn_post, turn_through, Saving};
use crate::support::st_chat::GroupChat;

#[tokio::test]
async fn a_turn_that_starts_meanwhile_goes_first() {
    let s = Saving::start(3, |f| f, |c| c.cache.prefill_ahead = true).await;
    let mut chat = GroupChat::demo(3);
    let names = chat.names();
    let (a, b, c) = (names[0].clone(), names[1].clone(), names[2].clone());
    // A first round: each of the three has a slot and a last prompt.
    chat.push("User", &format!("{a}, {b}, {c}: good evening!"));
    for n in [&a, &b, &c] {
        turn_through(&s.kv.url, &mut chat, n).await;
        s.kv.wait_idle().await;
    }
    // The user names the last speaker, then the first: while the former
    // answers, kvgate reads ahead for the latter, slowly.
    chat.push("User", &format!("{c}, and you {a}?"));
    s.fake.set_event_delay(Duration::from_millis(1500));
    let url = format!("{}/completion", s.kv.url);
    let carol = spawn_post(&url, chat.body_for(&c, true, 2));
    poll_until(
        "the prefill ahead to start",
        Duration::from_secs(10),
        || !s.fake.calls_to("/tokenize").is_empty(),
    )
    .await;
    // Another member's turn starts in its own slot: the read ahead gives
    // way at once instead of sharing llama-server with it.
    let bob = spawn_post(&url, chat.body_for(&b, true, 2));
    poll_until(
        "the prefill ahead to give way",
        Duration::from_secs(5),
        || {
            s.kv.upstream
                .shared
                .metrics
                .ahead_yielded
                .load(std::sync::atomic::Ordering::Relaxed)
                == 1
        },
    )
    .await;
    s.fake.set_event_delay(Duration::ZERO);
    assert_eq!(carol.await.unwrap().0, 200);
    assert_eq!(bob.await.unwrap().0, 200);
    s.kv.wait_idle().await;
    let m = &s.kv.upstream.shared.metrics;
    assert_eq!(
        m.ahead_prefills.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "it did not finish"
    );
}
