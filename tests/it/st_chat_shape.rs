//! The scripted SillyTavern chat (`support::st_chat`) produces bodies shaped
//! like the recorded SillyTavern 1.18.0 ones, and kvgate's identity inference
//! names the right speaker for every one of them, with one chat key per chat.

use std::collections::BTreeSet;

use kvgate::identity::{resolve, roster_key, Api, Explicit, Identity, Source};
use kvgate::policy::Policy;
use kvgate::tenant::Kind;
use kvgate::tenant::Tenant;
use serde_json::Value;

use crate::support::st_chat::{recorded_bodies, template, Character, GroupChat, PER_REQUEST_KEYS};

fn resolve_body(body: &Value, previous: Option<u64>) -> Identity {
    resolve(
        Api::Text,
        body,
        &Explicit::default(),
        &Policy::sillytavern(),
        |_| previous,
    )
}

/// (chat key, character) of a character tenant; panics for anonymous.
fn tenant(id: &Identity) -> (String, String) {
    match &id.tenant {
        Tenant::Character { chat, name } => (chat.clone(), name.clone()),
        Tenant::Anonymous { key } => panic!("expected a character, got anonymous {key}"),
    }
}

/// The sorted roster kvgate should see: every member plus the user.
fn expected_roster(chat: &GroupChat) -> Vec<String> {
    let mut r = chat.names();
    r.push(chat.user.clone());
    r.sort();
    r
}

/// Checks one body: speaker, kind, source, user, roster; returns the chat key.
fn check_turn(chat: &GroupChat, speaker: &str, body: &Value) -> String {
    let id = resolve_body(body, None);
    let (key, name) = tenant(&id);
    let what = format!("{speaker} in a chat of {:?}", chat.names());
    assert_eq!(name, speaker, "{what}");
    assert_eq!(id.kind, Kind::Normal, "{what}");
    assert_eq!(id.source, Source::Inferred, "{what}");
    assert_eq!(id.user.as_deref(), Some(chat.user.as_str()), "{what}");
    assert_eq!(id.roster, expected_roster(chat), "{what}");
    assert_eq!(key, roster_key(&expected_roster(chat)), "{what}");
    key
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .expect("body is an object")
        .keys()
        .cloned()
        .collect()
}

/// A prompt's line structure with the free text blanked out, so a built
/// prompt can be compared with a recorded one whose cards differ.
fn skeleton(prompt: &str, names: &[&str]) -> Vec<String> {
    let lines: Vec<&str> = prompt.split('\n').collect();
    let last = lines.len() - 1;
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            if i == 0 || i == last || *line == "***" {
                return line.to_string();
            }
            for n in names {
                if line.starts_with(&format!("{n}: ")) {
                    return format!("{n}: …");
                }
                if line.starts_with(&format!("{n}'s personality: ")) {
                    return format!("{n}'s personality: …");
                }
            }
            if line.starts_with("Scenario: ") {
                return "Scenario: …".to_string();
            }
            "…".to_string()
        })
        .collect()
}

#[test]
fn bodies_copy_the_recorded_keys_and_sampler_values() {
    let recorded = recorded_bodies();
    assert_eq!(recorded.len(), 17);
    let t = Value::Object(template().clone());
    // Every recorded body has the same keys and the same non-per-request
    // values, so one template stands for all of them.
    for (i, r) in recorded.iter().enumerate() {
        assert_eq!(keys(r), keys(&t), "recorded body {i}");
        for k in keys(r) {
            if !PER_REQUEST_KEYS.contains(&k.as_str()) {
                assert_eq!(r[&k], t[&k], "recorded body {i}, key {k}");
            }
        }
    }

    let chat = GroupChat::demo(3);
    for speaker in ["Alice", "Bob", "Carol"] {
        let body = chat.body_for(speaker, true, 100);
        assert_eq!(keys(&body), keys(&t), "{speaker}");
        assert_eq!(body.as_object().unwrap().len(), 64);
        for k in keys(&body) {
            if !["prompt", "stop", "stopping_strings"].contains(&k.as_str()) {
                assert_eq!(body[&k], t[&k], "{speaker}, key {k}");
            }
        }
        assert_eq!(body["stop"], body["stopping_strings"]);
        assert_eq!(body["prompt"], chat.prompt_for(speaker));
    }

    let body = chat.body_for("Bob", false, 16);
    assert_eq!(body["stream"], false);
    for k in ["n_predict", "max_tokens", "max_new_tokens", "num_predict"] {
        assert_eq!(body[k], 16, "{k}");
    }
}

#[test]
fn group_prompt_and_stops_have_the_recorded_shape() {
    // Recorded request 10: Alice answers the first user message of a group
    // chat of Alice, Bob and Carol (greetings, then the user's line).
    let recorded = &recorded_bodies()[0];
    let mut chat = GroupChat::demo(3);
    chat.push(
        "User",
        "Good evening everyone! Is there a bed for the night?",
    );
    let body = chat.body_for("Alice", true, 100);
    let names = ["Alice", "Bob", "Carol", "User"];
    assert_eq!(body["stop"], recorded["stop"]);
    assert_eq!(body["stopping_strings"], recorded["stopping_strings"]);
    assert_eq!(
        skeleton(body["prompt"].as_str().unwrap(), &names),
        skeleton(recorded["prompt"].as_str().unwrap(), &names)
    );
    // The same for Bob and Carol: their stop lists leave themselves out.
    assert_eq!(
        chat.stop_for("Bob"),
        ["\nUser:", "\nAlice:", "\nCarol:", "\n***"]
    );
    assert_eq!(
        chat.stop_for("Carol"),
        ["\nUser:", "\nAlice:", "\nBob:", "\n***"]
    );
}

#[test]
fn solo_prompt_and_stops_have_the_recorded_shape() {
    // Recorded request 77: a 1:1 chat with Alice, greeting + one user line.
    let recorded = recorded_bodies().pop().unwrap();
    let mut chat = GroupChat::solo(Character::demo(0));
    chat.push("User", "Alice, can I see the glacier charts?");
    let body = chat.body_for("Alice", true, 100);
    assert_eq!(body["stop"], recorded["stop"]);
    assert_eq!(body["stop"], serde_json::json!(["\nUser:", "\n***"]));
    let names = ["Alice", "User"];
    assert_eq!(
        skeleton(body["prompt"].as_str().unwrap(), &names),
        skeleton(recorded["prompt"].as_str().unwrap(), &names)
    );
    let key = check_turn(&chat, "Alice", &body);
    assert_eq!(key, "Alice+User");
}

#[test]
fn every_member_of_every_group_size_is_named_with_one_chat_key() {
    let mut keys_seen = BTreeSet::new();
    for n in 1..=9 {
        let mut chat = GroupChat::demo(n);
        chat.push("User", "Hello all, what is the weather doing?");
        let mut chat_keys = BTreeSet::new();
        for speaker in chat.names() {
            for stream in [true, false] {
                let body = chat.body_for(&speaker, stream, 16);
                chat_keys.insert(check_turn(&chat, &speaker, &body));
            }
        }
        assert_eq!(chat_keys.len(), 1, "{n} members: {chat_keys:?}");
        // Different rosters never share a key.
        assert!(keys_seen.insert(chat_keys.into_iter().next().unwrap()));
    }
}

#[test]
fn swap_cards_prompts_hold_only_the_speakers_card() {
    let chat = GroupChat::demo(4);
    let prompts: Vec<(String, String)> = chat
        .names()
        .into_iter()
        .map(|n| {
            let p = chat.prompt_for(&n);
            (n, p)
        })
        .collect();
    for (name, prompt) in &prompts {
        assert!(prompt.starts_with(&format!(
            "Write {name}'s next reply in a fictional chat between {name} and User.\n"
        )));
        assert!(prompt.ends_with(&format!("\n{name}:")));
        for other in &chat.members {
            let has_card = prompt.contains(&other.description);
            assert_eq!(
                has_card,
                &other.name == name,
                "{name}'s prompt, {}'s card",
                other.name
            );
            // Every member's greeting is shared history.
            assert!(prompt.contains(&format!("\n{}: {}\n", other.name, other.greeting)));
        }
    }
    // Prompts of different speakers share only "Write ".
    for (a, pa) in &prompts {
        for (b, pb) in &prompts {
            if a != b {
                let common = pa
                    .bytes()
                    .zip(pb.bytes())
                    .take_while(|(x, y)| x == y)
                    .count();
                assert_eq!(common, 6, "{a} / {b}");
            }
        }
    }
}

/// A reply the way a model might write it: actions, several lines, times
/// and other colons, a name mid-line.
fn reply(turn: usize, speaker: &str) -> String {
    format!(
        "*{speaker} glances at the clock.* It is {h}:{m:02} and the wind is at {turn} knots.\n\
         Bob said: \"wait\", so we wait. Ratio 3:1, note it down.",
        h = 20 + turn % 4,
        m = (turn * 7) % 60,
    )
}

#[test]
fn a_long_chat_keeps_names_and_key_while_old_lines_are_dropped() {
    let mut chat = GroupChat::demo(3);
    let order = [
        "Alice", "Bob", "Carol", "Carol", "Bob", "Alice", "Bob", "Alice", "Carol",
    ];
    let mut key = None;
    let mut previous: std::collections::HashMap<String, String> = Default::default();
    let mut appended = 0;
    let mut trimmed = 0;
    for turn in 0..60 {
        if turn % 3 == 0 {
            chat.push(
                "User",
                &format!("Question {turn}: Alice, Bob, Carol, what now?"),
            );
        }
        let speaker = order[turn % order.len()];
        let body = chat.body_for(speaker, true, 100);
        let prompt = body["prompt"].as_str().unwrap().to_string();
        assert!(
            prompt.len() <= chat.ctx_chars,
            "turn {turn}: {} bytes",
            prompt.len()
        );
        let k = check_turn(&chat, speaker, &body);
        assert_eq!(key.get_or_insert_with(|| k.clone()), &k, "turn {turn}");
        // Swap cards: the same speaker's prompts grow append-only until the
        // budget is full; after that the oldest lines go and only the card
        // (and what examples still fit) is a common prefix.
        if let Some(prev) = previous.get(speaker) {
            let card = chat.member(speaker).description.as_str();
            if prompt.starts_with(&prev[..prev.len() - speaker.len() - 1]) {
                appended += 1;
            } else {
                trimmed += 1;
                let common = prompt
                    .bytes()
                    .zip(prev.bytes())
                    .take_while(|(a, b)| a == b)
                    .count();
                assert!(common > card.len(), "turn {turn}: common prefix {common}");
            }
        }
        previous.insert(speaker.to_string(), prompt);
        chat.push(speaker, &reply(turn, speaker));
    }
    assert!(
        appended > 0 && trimmed > 0,
        "appended {appended}, trimmed {trimmed}"
    );
    // The greetings are long gone from the window, and so are the examples.
    let p = chat.prompt_for("Alice");
    assert!(!p.contains(&chat.member("Bob").greeting));
    assert!(!p.contains(&chat.member("Alice").examples[0].1));
    let len = chat.history.len();
    assert!(p.contains(&chat.history[len - 1].1));
}

#[test]
fn the_same_body_again_is_a_swipe() {
    let mut chat = GroupChat::demo(3);
    chat.push("User", "Carol, the lights, tell me.");
    let body = chat.body_for("Carol", true, 100);
    let first = resolve_body(&body, None);
    assert_eq!(first.kind, Kind::Normal);
    let again = resolve_body(&body, Some(first.prompt_hash));
    assert_eq!(again.kind, Kind::Swipe);
    assert_eq!(again.tenant, first.tenant);
}
