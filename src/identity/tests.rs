//! Identity tests on real SillyTavern bodies (1.18.0 and 1.19.0 recordings
//! in `tests/fixtures/`) and on hand-built bodies in the shapes SillyTavern's
//! code produces for cases the recording lacks (instruct, quiet, chat
//! completion, 1.12's continue).

use serde_json::{json, Value};

use super::*;

const RECORDING: &str = include_str!("../../tests/fixtures/st-1.18.0-completions.jsonl");

/// The recorded `/completion` bodies by sequence number.
fn recorded(seq: u64) -> Value {
    RECORDING
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("fixture line is JSON"))
        .find(|v| v["seq"] == seq)
        .map(|v| v["body"].clone())
        .unwrap_or_else(|| panic!("no recorded request {seq}"))
}

fn st() -> Policy {
    Policy::sillytavern()
}

fn resolve_text(body: &Value) -> Identity {
    resolve(Api::Text, body, &Explicit::default(), &st(), |_| None)
}

fn character(id: &Identity) -> (&str, &str) {
    match &id.tenant {
        Tenant::Character { chat, name } => (chat.as_str(), name.as_str()),
        Tenant::Anonymous { key } => panic!("expected a character, got anonymous {key}"),
    }
}

const GROUP: &str = "Alice+Bob+Carol+User";

#[test]
fn recorded_group_turns_name_the_speaker_and_share_one_chat_key() {
    // (seq, speaker) for every normal group turn of the recording.
    let turns = [
        (10, "Alice"),
        (16, "Bob"),
        (22, "Carol"),
        (26, "Carol"),
        (29, "Bob"),
        (32, "Alice"),
        (36, "Bob"),
        (39, "Alice"),
        (42, "Carol"),
        (46, "Alice"),
        (49, "Carol"),
        (52, "Bob"),
        (55, "Bob"),
    ];
    for (seq, speaker) in turns {
        let id = resolve_text(&recorded(seq));
        assert_eq!(character(&id), (GROUP, speaker), "request {seq}");
        assert_eq!(id.kind, Kind::Normal, "request {seq}");
        assert_eq!(id.source, Source::Inferred);
        assert_eq!(id.user.as_deref(), Some("User"));
        assert_eq!(id.roster, ["Alice", "Bob", "Carol", "User"]);
    }
}

#[test]
fn recorded_swipe_is_the_same_prompt_again() {
    let first = resolve_text(&recorded(55));
    let swipe = recorded(56);
    assert_eq!(
        swipe["prompt"],
        recorded(55)["prompt"],
        "the recording's swipe"
    );
    let id = resolve(Api::Text, &swipe, &Explicit::default(), &st(), |t| {
        (t == &first.tenant).then_some(first.prompt_hash)
    });
    assert_eq!(character(&id), (GROUP, "Bob"));
    assert_eq!(id.kind, Kind::Swipe);
    // Another character's memory does not make it a swipe.
    let other = resolve(Api::Text, &swipe, &Explicit::default(), &st(), |_| Some(1));
    assert_eq!(other.kind, Kind::Normal);
}

#[test]
fn recorded_continue_is_bobs_despite_a_multiline_message() {
    let body = recorded(60);
    let prompt = body["prompt"].as_str().unwrap();
    assert!(prompt.contains("\nBob:Bob: "), "1.18's doubled name");
    assert!(!prompt.ends_with(':'));
    let id = resolve_text(&body);
    assert_eq!(character(&id), (GROUP, "Bob"));
    assert_eq!(id.kind, Kind::Continue);
}

#[test]
fn recorded_impersonation_runs_as_the_card_owner() {
    let id = resolve_text(&recorded(64));
    assert_eq!(id.kind, Kind::Impersonate);
    assert_eq!(
        character(&id),
        (GROUP, "Bob"),
        "Bob's card wrote the prompt"
    );
    assert_eq!(id.user.as_deref(), Some("User"));
}

#[test]
fn recorded_solo_chat_has_its_own_key() {
    let id = resolve_text(&recorded(77));
    assert_eq!(character(&id), ("Alice+User", "Alice"));
    assert_eq!(id.kind, Kind::Normal);
}

#[test]
fn group_key_survives_history_trimming_and_speaker_changes() {
    // Turn 1 and turn 10 of Alice: by turn 10 SillyTavern has dropped old
    // history lines, so the prompts differ after the card; the key does not.
    let a1 = resolve_text(&recorded(10));
    let a10 = resolve_text(&recorded(46));
    let p1 = recorded(10)["prompt"].as_str().unwrap().to_string();
    let p10 = recorded(46)["prompt"].as_str().unwrap().to_string();
    assert!(!p10.starts_with(&p1), "history was trimmed");
    assert_eq!(a1.tenant, a10.tenant);
    assert_ne!(a1.prompt_hash, a10.prompt_hash);
}

fn body(prompt: &str, stop: &[&str], stream: bool) -> Value {
    json!({"prompt": prompt, "stop": stop, "stopping_strings": stop, "stream": stream, "n_predict": 100})
}

#[test]
fn instruct_chatml_with_names_always() {
    let b = body(
        "<|im_start|>system\nYou are Alice.<|im_end|>\n<|im_start|>user\nUser: Hi<|im_end|>\n<|im_start|>assistant\nAlice:",
        &["\nUser:", "<|im_end|>", "\n<|im_start|>user"],
        true,
    );
    let id = resolve_text(&b);
    assert_eq!(character(&id), ("Alice+User", "Alice"));
}

#[test]
fn instruct_name_after_output_sequence_on_the_same_line() {
    let b = body(
        "[INST] User: Hello there [/INST] Alice:",
        &["\nUser:", "[INST]"],
        true,
    );
    let id = resolve_text(&b);
    assert_eq!(character(&id), ("Alice+User", "Alice"));
    let b = body(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant Bob:",
        &["\nUser:"],
        true,
    );
    assert_eq!(character(&resolve_text(&b)).1, "Bob");
}

#[test]
fn markup_stop_strings_are_not_names() {
    let b = body(
        "### Instruction:\nUser: hi\n### Response:\nAlice:",
        &["\n### Instruction:", "\nUser:", "\n<|eot_id|>:"],
        true,
    );
    let id = resolve_text(&b);
    assert_eq!(id.roster, ["Alice", "User"]);
}

#[test]
fn instruct_one_on_one_without_a_name_is_anonymous_by_prefix() {
    // names_behavior "force" in a 1:1 chat: the prompt ends at the output
    // sequence, no name.
    // The key fingerprints the first 256 characters: card-sized system
    // prompts are longer than that.
    let card = "Alice Marlowe keeps the Lantern and Quill. ".repeat(8);
    let p1 = &format!("<|im_start|>system\nWrite Alice's next reply. {card}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    let id1 = resolve_text(&body(p1, &["\nUser:"], true));
    let id2 = resolve_text(&body(
        &format!("{p1}Hello!<|im_end|>\n<|im_start|>user\nMore<|im_end|>\n<|im_start|>assistant\n"),
        &["\nUser:"],
        true,
    ));
    assert!(matches!(id1.tenant, Tenant::Anonymous { .. }));
    assert_eq!(id1.tenant, id2.tenant, "same conversation, same prefix key");
    assert_eq!(id1.source, Source::Anonymous);
    assert_eq!(id1.kind, Kind::Normal);
    let other = resolve_text(&body(
        "<|im_start|>system\nWrite Bob's next reply.<|im_end|>\n<|im_start|>assistant\n",
        &["\nUser:"],
        true,
    ));
    assert_ne!(id1.tenant, other.tenant);
}

#[test]
fn quiet_prompt_is_non_streaming_without_a_tail() {
    let b = json!({
        "prompt": "Alice: Hello\nUser: Hi\n[Pause your roleplay. Summarize the most important facts so far.]\n",
        "stop": ["\nUser:"],
    });
    let id = resolve_text(&b);
    assert_eq!(id.kind, Kind::Quiet);
    assert!(matches!(id.tenant, Tenant::Anonymous { .. }));
}

#[test]
fn continue_in_sillytavern_1_12_form() {
    let b = body(
        "Alice: Hello\nUser: Hi\nAlice: Well, I was thinking",
        &["\nUser:"],
        true,
    );
    // Alice has spoken in this chat before: kvgate knows her.
    let alice = Tenant::Character {
        chat: "Alice+User".into(),
        name: "Alice".into(),
    };
    let id = resolve(Api::Text, &b, &Explicit::default(), &st(), |t| {
        (t == &alice).then_some(1)
    });
    assert_eq!(character(&id), ("Alice+User", "Alice"));
    assert_eq!(id.kind, Kind::Continue);
    // A name kvgate has never seen speak is not taken from a plain line.
    let id = resolve_text(&b);
    assert!(matches!(id.tenant, Tenant::Anonymous { .. }), "{id:?}");
    // Non-streaming, a multi-line message, no doubled name: not enough
    // evidence, so it is a quiet prompt.
    let b = body(
        "Alice: Hello\nUser: Hi\nAlice: Well,\nI was thinking",
        &["\nUser:"],
        false,
    );
    assert_eq!(resolve_text(&b).kind, Kind::Quiet);
}

/// Seen with the real SillyTavern 1.18.0 in "join character cards" mode with
/// a context smaller than the cards: every history line and the speaker tag
/// were dropped, and the prompt ended with a card's `Scenario:` line and the
/// chat separator. That is nobody's continue, and no character is named
/// "Scenario".
#[test]
fn a_card_line_at_the_end_of_a_trimmed_prompt_names_no_speaker() {
    let prompt = "Write Bob's next reply in a fictional chat between Alice, Bob, Carol and User.\n\
                  Alice is a cartographer.\nBob is a smith.\nCarol is a bard.\n\
                  Scenario: a tavern by the sea, late at night\n***";
    let b = body(prompt, &["\nUser:", "\nAlice:", "\nCarol:"], true);
    let id = resolve_text(&b);
    assert!(matches!(id.tenant, Tenant::Anonymous { .. }), "{id:?}");
    assert_eq!(id.kind, Kind::Normal);
    assert_eq!(id.source, Source::Anonymous);
    // The doubled form SillyTavern 1.18 writes for a continue is evidence
    // enough on its own.
    let b = body("User: Hi\nAlice:Alice: Well, I was", &["\nUser:"], true);
    let id = resolve_text(&b);
    assert_eq!(character(&id), ("Alice+User", "Alice"));
    assert_eq!(id.kind, Kind::Continue);
}

#[test]
fn user_line_last_is_not_a_continue() {
    let b = body("Alice: Hello\nUser: Hi there", &["\nUser:"], true);
    let id = resolve_text(&b);
    assert!(matches!(id.tenant, Tenant::Anonymous { .. }));
    assert_eq!(id.kind, Kind::Normal);
}

#[test]
fn explicit_headers_win_and_chat_defaults_to_roster() {
    let b = recorded(10);
    let headers = [("x-kvgate-character", "Zed"), ("x-kvgate-kind", "swipe")];
    let ex =
        Explicit::from_headers(|k| headers.iter().find(|(h, _)| *h == k).map(|(_, v)| *v)).unwrap();
    let id = resolve(Api::Text, &b, &ex, &st(), |_| None);
    assert_eq!(character(&id), ("Alice+Bob+Carol+User+Zed", "Zed"));
    assert_eq!(id.kind, Kind::Swipe);
    assert_eq!(id.source, Source::Explicit);
}

#[test]
fn explicit_body_object_is_removed_and_validated() {
    let mut b = json!({"prompt": "hi", "kvgate": {"chat": "chat-7", "character": "Алиса", "kind": "impersonate"}});
    let ex = Explicit::take_from_body(&mut b).unwrap();
    assert!(b.get("kvgate").is_none(), "stripped before forwarding");
    let id = resolve(Api::Text, &b, &ex, &st(), |_| None);
    assert_eq!(character(&id), ("chat-7", "Алиса"));
    assert_eq!(id.kind, Kind::Impersonate);

    for bad in [
        json!({"kvgate": "Alice"}),
        json!({"kvgate": {"character": 3}}),
        json!({"kvgate": {"kind": "dance"}}),
        json!({"kvgate": {"character": "a\u{0}b"}}),
    ] {
        let mut b = bad.clone();
        assert!(Explicit::take_from_body(&mut b).is_err(), "{bad}");
    }
    // Headers over body.
    let h = Explicit {
        character: Some("H".into()),
        ..Explicit::default()
    };
    let merged = h.or(Explicit {
        character: Some("B".into()),
        chat: Some("c".into()),
        kind: None,
    });
    assert_eq!(merged.character.as_deref(), Some("H"));
    assert_eq!(merged.chat.as_deref(), Some("c"));
}

#[test]
fn chat_completion_prefill_names_the_speaker() {
    let b = json!({
        "messages": [
            {"role": "system", "content": "Write Bob's next reply."},
            {"role": "user", "name": "User", "content": "Hi all"},
            {"role": "assistant", "name": "Alice", "content": "Hello!"},
            {"role": "assistant", "name": "Bob", "content": "Well"}
        ],
        "stream": true
    });
    let id = resolve(Api::Chat, &b, &Explicit::default(), &st(), |_| None);
    assert_eq!(character(&id), ("Alice+Bob+User", "Bob"));
    assert_eq!(id.kind, Kind::Continue);
    assert_eq!(id.user.as_deref(), Some("User"));
}

/// A Chat Completion body as SillyTavern 1.19 builds it with its default
/// prompts (`public/scripts/openai.js`, the Default preset): the main prompt
/// naming the speaker, the card, the new-chat line (listing the members in a
/// group), the history with names in the content ("Default" names behaviour
/// in a group), then the nudges at the end.
fn st_chat_body(speaker: &str, group: bool, tail: &[&str], stream: bool) -> Value {
    let mut messages = vec![
        json!({"role": "system", "content": format!(
            "Write {speaker}'s next reply in a fictional chat between {speaker} and User.")}),
        json!({"role": "system", "content": format!("{speaker} is a character.")}),
        json!({"role": "system", "content": if group {
            "[Start a new group chat. Group members: Alice, Bob, Carol]"
        } else {
            "[Start a new Chat]"
        }}),
        json!({"role": "assistant", "content": if group { "Alice: Hello!" } else { "Hello!" }}),
        json!({"role": "user", "content": "Hi all"}),
    ];
    messages.extend(tail.iter().map(|t| json!({"role": "system", "content": t})));
    json!({"messages": messages, "stream": stream, "model": "x"})
}

#[test]
fn chat_completion_speaker_roster_and_kind_come_from_sillytavern_prompts() {
    let nudge = |c: &str| format!("[Write the next reply only as {c}.]");
    let resolve_chat = |b: &Value| resolve(Api::Chat, b, &Explicit::default(), &st(), |_| None);
    // Every member of a group gets the text-completion key of the group.
    for speaker in ["Alice", "Bob", "Carol"] {
        let id = resolve_chat(&st_chat_body(speaker, true, &[&nudge(speaker)], true));
        assert_eq!(character(&id), (GROUP, speaker));
        assert_eq!(id.kind, Kind::Normal);
        assert_eq!(id.source, Source::Inferred);
        assert_eq!(id.user.as_deref(), Some("User"));
    }
    // The nudge at the end wins over a main prompt naming someone else.
    let b = st_chat_body("Alice", true, &[&nudge("Carol")], true);
    assert_eq!(character(&resolve_chat(&b)).1, "Carol");
    // A 1:1 chat.
    let id = resolve_chat(&st_chat_body("Alice", false, &[], true));
    assert_eq!(character(&id), ("Alice+User", "Alice"));
    assert_eq!(id.kind, Kind::Normal);
    // Impersonate (no group nudge) and continue.
    let imp = "[Write your next reply from the point of view of User, using the chat history \
               so far as a guideline for the writing style of User. Don't write as Bob or system. \
               Don't describe actions of Bob.]";
    let id = resolve_chat(&st_chat_body("Bob", true, &[imp], true));
    assert_eq!(character(&id), (GROUP, "Bob"));
    assert_eq!(id.kind, Kind::Impersonate);
    let cont = "[Continue your last message without repeating its original content.]";
    let id = resolve_chat(&st_chat_body("Bob", true, &[&nudge("Bob"), cont], true));
    assert_eq!(character(&id), (GROUP, "Bob"));
    assert_eq!(id.kind, Kind::Continue);
    // Not streaming is SillyTavern's Chat Completion default: still a turn.
    let id = resolve_chat(&st_chat_body("Bob", true, &[&nudge("Bob")], false));
    assert_eq!(character(&id), (GROUP, "Bob"));
    assert_eq!(id.kind, Kind::Normal);
    // The same body again is a swipe.
    let b = st_chat_body("Bob", true, &[&nudge("Bob")], true);
    let first = resolve_chat(&b);
    let again = resolve(Api::Chat, &b, &Explicit::default(), &st(), |_| {
        Some(first.prompt_hash)
    });
    assert_eq!(again.kind, Kind::Swipe);
}

const RECORDING_CHAT: &str = include_str!("../../tests/fixtures/st-1.19.0-chat-completions.jsonl");

/// Replays a recording through `resolve` as kvgate does, remembering each
/// tenant's last prompt (so a swipe is the same prompt again): (seq, label,
/// identity) per request.
fn replay(recording: &str, api: Api) -> Vec<(u64, String, Identity)> {
    let mut last: std::collections::HashMap<Tenant, u64> = Default::default();
    recording
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("fixture line is JSON"))
        .map(|v| {
            let id = resolve(api, &v["body"], &Explicit::default(), &st(), |t| {
                last.get(t).copied()
            });
            last.insert(id.tenant.clone(), id.prompt_hash);
            (
                v["seq"].as_u64().unwrap(),
                v["label"].as_str().unwrap_or_default().to_string(),
                id,
            )
        })
        .collect()
}

/// Replays `recording` and checks each request's (seq, chat, character,
/// kind), all inferred, with the user named.
fn assert_replay(recording: &str, api: Api, expected: &[(u64, &str, &str, Kind)]) {
    let got = replay(recording, api);
    assert_eq!(got.len(), expected.len());
    for ((seq, label, id), (want_seq, chat, name, kind)) in got.iter().zip(expected) {
        assert_eq!(seq, want_seq);
        assert_eq!(character(id), (*chat, *name), "request {seq} ({label})");
        assert_eq!(id.kind, *kind, "request {seq} ({label})");
        assert_eq!(id.source, Source::Inferred, "request {seq} ({label})");
        assert_eq!(id.user.as_deref(), Some("User"), "request {seq} ({label})");
    }
}

/// The Chat Completion (Custom source) traffic of the real SillyTavern
/// 1.19.0 with its default prompts, recorded by the UI tests (`tests/ui/`),
/// which checked each generation's speaker against SillyTavern's own chat.
#[test]
fn recorded_chat_completion_turns_of_sillytavern_1_19_are_named() {
    use Kind::*;
    let expected = [
        (2, GROUP, "Alice", Normal),
        (3, GROUP, "Bob", Normal),
        (4, GROUP, "Carol", Normal),
        (5, GROUP, "Carol", Normal),
        (6, GROUP, "Alice", Normal),
        (7, GROUP, "Bob", Normal),
        (8, GROUP, "Bob", Normal),
        (9, GROUP, "Carol", Normal),
        (10, GROUP, "Alice", Normal),
        (11, GROUP, "Bob", Normal),
        (12, GROUP, "Bob", Swipe),
        (13, GROUP, "Bob", Continue),
        (14, GROUP, "Alice", Impersonate),
        (15, "Alice+User", "Alice", Normal),
    ];
    assert_replay(RECORDING_CHAT, Api::Chat, &expected);
}

const RECORDING_TEXT_1_19: &str =
    include_str!("../../tests/fixtures/st-1.19.0-text-completions.jsonl");

/// The Text Completion (llama.cpp) traffic of the real SillyTavern 1.19.0,
/// recorded by the UI tests: the same chat as the Chat Completion recording,
/// and the same chat keys.
#[test]
fn recorded_text_completion_turns_of_sillytavern_1_19_are_named() {
    use Kind::*;
    let expected = [
        (9, GROUP, "Alice", Normal),
        (14, GROUP, "Bob", Normal),
        (19, GROUP, "Carol", Normal),
        (23, GROUP, "Carol", Normal),
        (26, GROUP, "Alice", Normal),
        (29, GROUP, "Bob", Normal),
        (33, GROUP, "Bob", Normal),
        (36, GROUP, "Carol", Normal),
        (39, GROUP, "Alice", Normal),
        (42, GROUP, "Bob", Normal),
        (43, GROUP, "Bob", Swipe),
        (47, GROUP, "Bob", Continue),
        // A group's impersonation uses a random member's card: Carol's here
        // (the prompt starts "Write Carol's next reply").
        (51, GROUP, "Carol", Impersonate),
        (63, "Alice+User", "Alice", Normal),
    ];
    assert_replay(RECORDING_TEXT_1_19, Api::Text, &expected);
}

/// The group's first line sits after the persona, the cards and every
/// example block, and before a history of any length: it is found there, so
/// every member keeps the group's key, also one whose name holds the
/// separator.
#[test]
fn chat_completion_roster_is_found_after_long_preambles_and_kept_whole() {
    let group = "[Start a new group chat. Group members: Alice, Smith, John, Bob]";
    let body = |speaker: &str| {
        let mut messages = vec![json!({"role": "system", "content": format!(
            "Write {speaker}'s next reply in a fictional chat between {speaker} and User.")})];
        messages.extend(
            (0..20).map(|i| json!({"role": "system", "content": format!("Example line {i}.")})),
        );
        messages.push(json!({"role": "system", "content": group}));
        for i in 0..40 {
            messages.push(json!({"role": "user", "content": format!("message {i}")}));
            messages.push(json!({"role": "assistant", "content": format!("Bob: reply {i}")}));
        }
        messages.push(json!({"role": "system", "content": format!("[Write the next reply only as {speaker}.]")}));
        json!({"messages": messages, "stream": false})
    };
    // "Smith, John" reads as two names on the line, alike for every speaker.
    let key = "Alice+Bob+John+Smith+User";
    for speaker in ["Alice", "Smith, John", "Bob"] {
        let id = resolve(
            Api::Chat,
            &body(speaker),
            &Explicit::default(),
            &st(),
            |_| None,
        );
        assert_eq!(character(&id), (key, speaker));
        assert_eq!(id.kind, Kind::Normal);
    }
}

#[test]
fn chat_completion_prompts_are_not_read_by_the_generic_policy() {
    let b = st_chat_body("Bob", true, &["[Write the next reply only as Bob.]"], true);
    let generic = Policy::load("generic").unwrap();
    let id = resolve(Api::Chat, &b, &Explicit::default(), &generic, |_| None);
    assert!(matches!(id.tenant, Tenant::Anonymous { .. }), "{id:?}");
}

#[test]
fn chat_completion_without_names_is_anonymous_by_prefix_and_policy_fields_work() {
    let b = json!({
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hi"}
        ],
        "user": "session-42"
    });
    let id = resolve(Api::Chat, &b, &Explicit::default(), &st(), |_| None);
    assert!(matches!(id.tenant, Tenant::Anonymous { .. }));
    assert_eq!(id.kind, Kind::Quiet, "non-streaming and anonymous");
    let generic = Policy::load("generic").unwrap();
    let mut with_char = generic.clone();
    with_char.chat.character_fields = vec!["character".into()];
    let mut b2 = b.clone();
    b2["character"] = json!("Alice");
    let id = resolve(Api::Chat, &b2, &Explicit::default(), &with_char, |_| None);
    assert_eq!(character(&id), ("session-42", "Alice"));
}

#[test]
fn generic_policy_does_not_read_sillytavern_tails() {
    let generic = Policy::load("generic").unwrap();
    let id = resolve(
        Api::Text,
        &recorded(10),
        &Explicit::default(),
        &generic,
        |_| None,
    );
    assert!(matches!(id.tenant, Tenant::Anonymous { .. }));
}

#[test]
fn odd_prompts_never_panic() {
    let cases = [
        json!({"prompt": ""}),
        json!({"prompt": ":"}),
        json!({"prompt": "\n:"}),
        json!({"prompt": "\n\n\n"}),
        json!({"prompt": [1, 2, 3]}),
        json!({"prompt": {"prompt_string": "x"}}),
        json!({"prompt": "x", "stop": 5}),
        json!({"prompt": "x\n🦀:", "stop": ["\n🦀:", "\n", ":", "\n:"]}),
        json!({"messages": "nope"}),
        json!([1, 2]),
        json!(null),
    ];
    for c in cases {
        let _ = resolve(Api::Text, &c, &Explicit::default(), &st(), |_| None);
        let _ = resolve(Api::Chat, &c, &Explicit::default(), &st(), |_| None);
    }
    let long = format!("x\n{}:", "N".repeat(10_000));
    let id = resolve_text(&json!({"prompt": long, "stream": true}));
    assert!(
        matches!(id.tenant, Tenant::Anonymous { .. }),
        "over max_name_chars"
    );
}

#[test]
fn kinds_parse() {
    assert_eq!("Swipe".parse::<Kind>().unwrap(), Kind::Swipe);
    assert_eq!("group_chat".parse::<Kind>().unwrap(), Kind::Normal);
    assert!("x".parse::<Kind>().is_err());
}

#[test]
fn a_structured_prompt_hashes_as_its_compact_json_text() {
    let messages = json!([
        {"role": "system", "content": "card \"quoted\" ünïcode"},
        {"role": "user", "name": "User", "content": "hi\nthere"},
    ]);
    let body = json!({"messages": messages});
    let id = resolve(Api::Chat, &body, &Explicit::default(), &st(), |_| None);
    assert_eq!(id.prompt_hash, fnv1a64(id.content.as_bytes()));
    assert!(id.content.contains(&messages.to_string()), "{}", id.content);
    let text = resolve_text(&json!({"prompt": "text"}));
    assert_eq!(text.prompt_hash, fnv1a64(text.content.as_bytes()));
    assert!(text.content.ends_with("text"));
}

/// A chat body with `n` distinct message names (the flood from issue 15).
fn flood_of_names(n: usize) -> Value {
    let mut messages: Vec<Value> = (0..n)
        .map(|i| json!({"role": "user", "name": format!("n{i:06}"), "content": "x"}))
        .collect();
    messages.push(json!({"role": "assistant", "name": "Bob", "content": ""}));
    json!({"messages": messages, "stream": true})
}

#[test]
fn eighty_thousand_names_take_linear_time_and_a_bounded_roster() {
    let body = flood_of_names(80_000);
    let t = std::time::Instant::now();
    let id = resolve(Api::Chat, &body, &Explicit::default(), &st(), |_| None);
    let took = t.elapsed();
    // The quadratic scan took seconds in release; linear is milliseconds
    // even in a debug build.
    assert!(took < std::time::Duration::from_secs(1), "took {took:?}");
    // The first MAX_ROSTER names count, plus the speaker; the rest are
    // ignored, so the key stays the same as more names pile up.
    assert_eq!(id.roster.len(), MAX_ROSTER + 1);
    assert_eq!(id.roster[0], "Bob");
    assert!(id.roster.contains(&"n000063".to_string()));
    assert!(!id.roster.contains(&"n000064".to_string()));
    assert_eq!(
        id.user.as_deref(),
        Some("n000063"),
        "the last user in the roster"
    );
    let Tenant::Character { chat, name } = &id.tenant else {
        panic!("expected a character, got {:?}", id.tenant);
    };
    assert_eq!(name, "Bob");
    assert!(
        chat.len() <= MAX_KEY_BYTES,
        "chat key of {} bytes",
        chat.len()
    );
    let again = resolve(
        Api::Chat,
        &flood_of_names(1_000),
        &Explicit::default(),
        &st(),
        |_| None,
    );
    assert_eq!(
        again.tenant, id.tenant,
        "names past the bound change nothing"
    );
}

#[test]
fn stop_name_floods_are_bounded_too() {
    let stops: Vec<String> = (0..80_000).map(|i| format!("\nU{i:06}:")).collect();
    let prompt = "story\nBob:";
    let body = json!({"prompt": prompt, "stop": stops, "stream": true});
    let t = std::time::Instant::now();
    let id = resolve_text(&body);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(id.roster.len(), MAX_ROSTER + 1);
    assert_eq!(character(&id).1, "Bob");
    assert!(id.tenant.chat().is_some_and(|c| c.len() <= MAX_KEY_BYTES));
}

#[test]
fn long_or_control_names_are_not_inferred() {
    let long = "L".repeat(MAX_INFERRED_NAME_BYTES + 1);
    for bad in [long.as_str(), "Bo\u{7}b", "Bo\nb"] {
        let body = json!({"messages": [
            {"role": "user", "name": "Ann", "content": "hi"},
            {"role": "assistant", "name": bad, "content": ""},
        ]});
        let id = resolve(Api::Chat, &body, &Explicit::default(), &st(), |_| None);
        assert!(
            !matches!(&id.tenant, Tenant::Character { name, .. } if name == bad),
            "{bad:?} became the character"
        );
        assert!(!id.roster.iter().any(|n| n == bad), "{bad:?} in the roster");
    }
}

#[test]
fn long_keys_are_hashed_stably_and_stay_apart() {
    let a = format!("{}a", "chat".repeat(100));
    let b = format!("{}b", "chat".repeat(100));
    let (ca, cb) = (cap_key(&a), cap_key(&b));
    assert_eq!(cap_key(&a), ca, "stable");
    assert_ne!(ca, cb, "distinct keys keep distinct forms");
    assert!(ca.len() <= MAX_KEY_BYTES && cb.len() <= MAX_KEY_BYTES);
    let (head, hash) = ca.rsplit_once('~').unwrap();
    assert!(a.starts_with(head));
    assert_eq!(hash.len(), 32);
    assert!(hash.bytes().all(|c| c.is_ascii_hexdigit()));
    // Pinned: the form must not change between versions (saves are found
    // by it).
    assert_eq!(
        cap_key(&"x".repeat(300)),
        format!("{}~e78ddf9f1ba85555580de4f672490413", "x".repeat(167))
    );
    assert_eq!(cap_key("short"), "short");
    let edge = "é".repeat(150); // 300 bytes: the cut lands inside a character
    assert!(cap_key(&edge).len() <= MAX_KEY_BYTES);
    // An explicit chat id and character name are capped the same way.
    let explicit = Explicit {
        chat: Some(a.clone()),
        character: Some("C".repeat(900)),
        kind: None,
    };
    let id = resolve(Api::Text, &json!({"prompt": "x"}), &explicit, &st(), |_| {
        None
    });
    assert_eq!(id.tenant.chat(), Some(ca.as_str()));
    assert_eq!(
        id.tenant.character(),
        Some(cap_key(&"C".repeat(900)).as_str())
    );
}

/// Restore ahead's guess at the next speaker, on the recorded group chat:
/// every turn of SillyTavern's own order (natural order, one user message
/// mentioning members) whose next turn is another member's.
#[test]
fn the_next_speaker_is_predicted_within_a_round_of_the_recorded_chat() {
    let turns: Vec<(u64, Identity)> = [10, 16, 22, 26, 29, 32, 36, 39, 42, 46, 49]
        .into_iter()
        .map(|seq| (seq, resolve_text(&recorded(seq))))
        .collect();
    let (mut asked, mut guessed, mut right) = (0, 0, 0);
    for pair in turns.windows(2) {
        let ((seq, now), (_, next)) = (&pair[0], &pair[1]);
        let (speaker, coming) = (character(now).1, character(next).1);
        if speaker == coming {
            continue; // the speaker's own slot: nothing to bring in
        }
        asked += 1;
        let prompt = recorded(*seq)["prompt"].as_str().unwrap().to_string();
        let members: Vec<String> = now
            .roster
            .iter()
            .filter(|m| Some(m.as_str()) != now.user.as_deref())
            .cloned()
            .collect();
        if let Some(p) = next_speaker::predict(&prompt, speaker, &members, now.user.as_deref()) {
            guessed += 1;
            right += usize::from(p.name == coming);
        }
    }
    // The two turns left unguessed end a round: the next speaker depends on
    // the user's next message.
    assert_eq!((asked, guessed, right), (9, 7, 7));
}
