//! Who is a completion for? Resolves a request's chat, character and
//! generation kind from the explicit channel (headers or a `kvgate` body
//! object) or, failing that, from the active [`Policy`]'s inference rules.
//!
//! Pure: takes the parsed body and header values, returns an [`Identity`].
//! The one piece of history it needs (the tenant's previous prompt: to tell a
//! swipe from a new message, and whether kvgate has seen a name speak in a
//! chat before) is passed in by the caller.
//!
//! Text completion is read off the `\nName:` tail and the stop strings;
//! chat completion off the client's own prompt templates, which the policy
//! lists (`[chat]`; read back by [`crate::policy::template`]), and the `name`
//! of user and assistant messages.
//!
//! # What inferred chat keys can and cannot tell apart
//! SillyTavern sends no chat id. The inferred chat key is the sorted roster:
//! the speaker plus every `\nName:` stop string (the user and the other group
//! members); over chat completion, the members the group's first line lists
//! plus the user. It is the same for every speaker of one group chat, in "swap
//! character cards" mode too, and it does not depend on the history, which
//! SillyTavern trims from the front once the context is full. It cannot tell
//! apart two chats with the same roster (two 1:1 chats with Alice under the
//! same persona share a key): those share a slot and their saves, and the
//! persistence layer picks among saves by the longest common token prefix with
//! the new prompt, so the right chat's save still wins. A persona rename or a
//! member joining a group changes the key (a new chat, as far as kvgate knows).
//!
//! # Bounds
//! A request body is client input of up to `--max-body-bytes`: inference
//! reads at most [`MAX_ROSTER`] distinct names (further ones are ignored),
//! each at most [`MAX_INFERRED_NAME_BYTES`] long and free of control
//! characters (others are ignored), with sets rather than list scans, so its
//! cost is linear in the body. A chat key or character name longer than
//! [`MAX_KEY_BYTES`] is replaced by its [`cap_key`] form, so logs, events,
//! sidecars and kvgate's memory hold short keys whatever the client sends.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::Value;

use crate::hash::{fnv1a64, Fnv1a64};
use crate::policy::template::{Filled, Template};
use crate::policy::{ChatRules, Policy, TextRules};
use crate::tenant::{Kind, Tenant, UnknownKind};

/// Which API shape the body has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// `prompt` (`/completion`, `/completions`, `/v1/completions`).
    Text,
    /// `messages` (`/chat/completions`, `/v1/chat/completions`).
    Chat,
}

/// A malformed explicit identity: the client asked for something precise and
/// gets a 400 rather than a silent guess.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// `kind` is not one of the known kinds.
    #[error("unknown generation kind {0:?} (expected normal, regenerate, swipe, continue, quiet or impersonate)")]
    BadKind(String),
    /// The `kvgate` body member is not an object of strings.
    #[error("the \"kvgate\" body member must be an object with string fields chat, character, kind ({0})")]
    BadObject(&'static str),
    /// An explicit name that is empty or contains control characters.
    #[error("invalid {0} name: it must be 1 to 1000 characters without control characters")]
    BadName(&'static str),
}

impl From<UnknownKind> for IdentityError {
    fn from(e: UnknownKind) -> IdentityError {
        IdentityError::BadKind(e.0)
    }
}

/// Identity the client stated itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Explicit {
    /// Chat id.
    pub chat: Option<String>,
    /// Character name.
    pub character: Option<String>,
    /// Generation kind.
    pub kind: Option<Kind>,
}

impl Explicit {
    /// Reads `X-Kvgate-Chat`, `X-Kvgate-Character`, `X-Kvgate-Kind` through
    /// `get` (a case-insensitive header lookup returning UTF-8 values).
    pub fn from_headers<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<Self, IdentityError> {
        Ok(Explicit {
            chat: get("x-kvgate-chat")
                .map(|s| check_name("chat", s))
                .transpose()?,
            character: get("x-kvgate-character")
                .map(|s| check_name("character", s))
                .transpose()?,
            kind: get("x-kvgate-kind").map(str::parse).transpose()?,
        })
    }

    /// Removes the top-level `kvgate` member from `body` (it must never reach
    /// llama-server) and returns what it said. Absent member: all `None`.
    pub fn take_from_body(body: &mut Value) -> Result<Self, IdentityError> {
        let Some(obj) = body.as_object_mut() else {
            return Ok(Explicit::default());
        };
        let Some(v) = obj.remove("kvgate") else {
            return Ok(Explicit::default());
        };
        let Value::Object(m) = v else {
            return Err(IdentityError::BadObject("not an object"));
        };
        let field = |k: &'static str| -> Result<Option<String>, IdentityError> {
            match m.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(IdentityError::BadObject("a field is not a string")),
            }
        };
        Ok(Explicit {
            chat: field("chat")?.map(|s| check_name("chat", &s)).transpose()?,
            character: field("character")?
                .map(|s| check_name("character", &s))
                .transpose()?,
            kind: field("kind")?.as_deref().map(str::parse).transpose()?,
        })
    }

    /// Fields of `self` win; `other` fills the gaps (headers over body).
    pub fn or(self, other: Explicit) -> Explicit {
        Explicit {
            chat: self.chat.or(other.chat),
            character: self.character.or(other.character),
            kind: self.kind.or(other.kind),
        }
    }
}

fn check_name(what: &'static str, s: &str) -> Result<String, IdentityError> {
    let t = s.trim();
    if t.is_empty() || t.chars().count() > 1000 || t.chars().any(char::is_control) {
        return Err(IdentityError::BadName(what));
    }
    Ok(t.to_string())
}

/// Most distinct names inference takes from one request (the roster:
/// message names, stop names); further ones are ignored. A group chat has a
/// handful; thousands are not a chat but a flood.
pub const MAX_ROSTER: usize = 64;

/// Longest name (bytes) inference takes from messages or the `chat_fields`
/// and `character_fields`; longer ones are ignored, not cut (a cut name could
/// pass for another).
pub const MAX_INFERRED_NAME_BYTES: usize = 128;

/// Longest chat key or character name (bytes) kvgate keeps as is; longer
/// ones become [`cap_key`]'s short, stable form.
pub const MAX_KEY_BYTES: usize = 200;

/// `key` if it is at most [`MAX_KEY_BYTES`] long, else its first bytes (cut
/// at a character boundary), `~`, and 32 hex digits of two independent
/// 64-bit hashes of the whole key: stable across runs, still readable, and
/// never longer than [`MAX_KEY_BYTES`]. Distinct long keys keep distinct
/// forms unless 128 hash bits collide (FNV is no defence against a client
/// crafting a collision, but such a client can name any chat it likes).
pub fn cap_key(key: &str) -> String {
    if key.len() <= MAX_KEY_BYTES {
        return key.to_string();
    }
    let mut salted = Fnv1a64::default();
    salted.update(b"kvgate-key\0");
    salted.update(key.as_bytes());
    let suffix = format!("~{:016x}{:016x}", fnv1a64(key.as_bytes()), salted.finish());
    let mut cut = MAX_KEY_BYTES - suffix.len();
    while !key.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &key[..cut])
}

/// Distinct names in first-seen order, at most [`MAX_ROSTER`] of them.
#[derive(Debug, Default)]
struct Names {
    list: Vec<String>,
    seen: HashSet<String>,
}

impl Names {
    /// Adds `name` unless it is known or the roster is full; true if it is
    /// (now) in the roster.
    fn add(&mut self, name: &str) -> bool {
        if self.seen.contains(name) {
            return true;
        }
        if self.list.len() >= MAX_ROSTER {
            return false;
        }
        self.seen.insert(name.to_string());
        self.list.push(name.to_string());
        true
    }
}

/// Where the identity came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Headers or the `kvgate` body object named the character.
    Explicit,
    /// The policy read it off the request.
    Inferred,
    /// Nobody could tell: an anonymous tenant.
    Anonymous,
}

impl Source {
    /// The name events and the `X-Kvgate-Identity` header use.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Explicit => "explicit",
            Source::Inferred => "inferred",
            Source::Anonymous => "anonymous",
        }
    }
}

/// The resolved identity of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Slot owner the request runs as.
    pub tenant: Tenant,
    /// Generation kind.
    pub kind: Kind,
    /// Where the character came from.
    pub source: Source,
    /// The user's name, when the prompt shows it.
    pub user: Option<String>,
    /// Everyone in the chat (sorted, deduplicated), when known.
    pub roster: Vec<String>,
    /// Fingerprint of the prompt's text ([`Identity::content`]), for swipe
    /// detection.
    pub prompt_hash: u64,
    /// The prompt's text ([`content::prompt_text`]): kvgate places
    /// requests by content too (`slots::content`).
    pub content: Arc<str>,
}

/// What the prompt alone says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Reading {
    character: Option<String>,
    /// The character was read off an ordinary `Name: text` line (a
    /// continue), weak evidence: a card's `Scenario:` line reads the same.
    /// Such a name counts only when kvgate already knows it as a speaker of
    /// that chat.
    needs_known_speaker: bool,
    /// The roster came from a line listing the members, the speaker among
    /// them: it is complete as it is.
    roster_names_speaker: bool,
    kind: Option<Kind>,
    user: Option<String>,
    roster: Vec<String>,
    chat: Option<String>,
}

/// Resolves the identity of a completion request. `explicit` must already
/// have been taken out of `body`. `previous_prompt` returns the prompt hash of
/// the tenant's last request, if kvgate remembers one (so it also tells which
/// characters kvgate has seen speak in a chat).
pub fn resolve(
    api: Api,
    body: &Value,
    explicit: &Explicit,
    policy: &Policy,
    previous_prompt: impl Fn(&Tenant) -> Option<u64>,
) -> Identity {
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let (mut reading, anon_basis) = read_body(api, body, stream, policy);
    // The prompt's text is built once: placement compares it, and its hash
    // tells a swipe (the same prompt again) from a new message.
    let content: Arc<str> = Arc::from(content::prompt_text(body));
    let prompt_hash = fnv1a64(content.as_bytes());
    let (character, mut source) = match (&explicit.character, &reading.character) {
        (Some(c), _) => (Some(c.as_str()), Source::Explicit),
        (None, Some(c)) => (Some(c.as_str()), Source::Inferred),
        (None, None) => (None, Source::Anonymous),
    };
    let speaker = character.filter(|_| !reading.roster_names_speaker);
    let mut roster = roster_with(&reading.roster, speaker);
    let mut tenant = character.map(|name| character_tenant(name, &roster, explicit, &reading));
    let weak = source == Source::Inferred && reading.needs_known_speaker;
    if weak
        && tenant
            .as_ref()
            .is_some_and(|t| previous_prompt(t).is_none())
    {
        // A name read off an ordinary line that kvgate has never seen speak
        // in this chat, such as a card's "Scenario: …" at the end of a
        // prompt whose history SillyTavern dropped: nobody's turn rather
        // than a character named "Scenario".
        (source, tenant) = (Source::Anonymous, None);
        roster = roster_with(&reading.roster, None);
        reading.kind = None;
    }
    let tenant = tenant.unwrap_or_else(|| Tenant::Anonymous {
        key: anonymous_key(&anon_basis, policy.anonymous.prefix_chars),
    });
    let kind = explicit.kind.unwrap_or_else(|| {
        let quiet =
            !stream && matches!(source, Source::Anonymous) && policy.text.non_stream_is_quiet;
        let k = reading
            .kind
            .unwrap_or(if quiet { Kind::Quiet } else { Kind::Normal });
        // The same prompt again for the same tenant is a swipe (or a
        // regenerate: on the wire the two are identical).
        if k == Kind::Normal && previous_prompt(&tenant) == Some(prompt_hash) {
            Kind::Swipe
        } else {
            k
        }
    });

    Identity {
        tenant,
        kind,
        source,
        user: reading.user,
        roster,
        prompt_hash,
        content,
    }
}

/// The roster with the speaker in it, sorted and deduplicated.
fn roster_with(roster: &[String], character: Option<&str>) -> Vec<String> {
    let mut roster = roster.to_vec();
    if let Some(c) = character {
        if !roster.iter().any(|n| n == c) {
            roster.push(c.to_string());
        }
    }
    roster.sort();
    roster.dedup();
    roster
}

/// A named character's tenant: the explicit chat, else the chat the body
/// names, else the roster's key.
fn character_tenant(
    name: &str,
    roster: &[String],
    explicit: &Explicit,
    reading: &Reading,
) -> Tenant {
    let chat = explicit
        .chat
        .clone()
        .or(reading.chat.clone())
        .unwrap_or_else(|| roster_key(roster));
    Tenant::Character {
        chat: cap_key(&chat),
        name: cap_key(name),
    }
}

/// What the body says by its shape: the policy's reading of the prompt (or
/// messages), and the text an anonymous tenant's key is taken from.
fn read_body(api: Api, body: &Value, stream: bool, policy: &Policy) -> (Reading, String) {
    match api {
        Api::Text => {
            let prompt = body.get("prompt");
            match prompt.and_then(Value::as_str) {
                Some(p) => (
                    read_text(p, &stop_strings(body), stream, &policy.text),
                    prefix(p, policy.anonymous.prefix_chars),
                ),
                None => (Reading::default(), value_prefix(prompt, policy)),
            }
        }
        Api::Chat => {
            let messages = body.get("messages");
            (
                read_chat(body, policy, stream),
                chat_prefix(messages, policy.anonymous.prefix_chars),
            )
        }
    }
}

/// The chat key derived from a roster (before [`cap_key`]).
pub fn roster_key(roster: &[String]) -> String {
    if roster.is_empty() {
        "default".to_string()
    } else {
        roster.join("+")
    }
}

fn anonymous_key(basis: &str, prefix_chars: usize) -> String {
    if prefix_chars == 0 {
        "anonymous".to_string()
    } else {
        format!("anon-{:016x}", fnv1a64(basis.as_bytes()))
    }
}

fn prefix(s: &str, chars: usize) -> String {
    s.chars().take(chars).collect()
}

fn value_prefix(v: Option<&Value>, policy: &Policy) -> String {
    v.map(|v| prefix(&v.to_string(), policy.anonymous.prefix_chars))
        .unwrap_or_default()
}

fn chat_prefix(messages: Option<&Value>, chars: usize) -> String {
    let mut out = String::new();
    // Counted as it grows: recounting the whole prefix per message would be
    // quadratic in a long list of short messages.
    let mut count = 0;
    if let Some(list) = messages.and_then(Value::as_array) {
        for m in list {
            if count >= chars {
                break;
            }
            if let Some(c) = m.get("content").and_then(Value::as_str) {
                let part = prefix(c, chars - count);
                count += part.chars().count() + 1;
                out.push_str(&part);
                out.push('\n');
            }
        }
    }
    prefix(&out, chars)
}

/// `stop`, or SillyTavern's `stopping_strings` when `stop` is absent.
fn stop_strings(body: &Value) -> Vec<String> {
    let v = body.get("stop").or_else(|| body.get("stopping_strings"));
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

fn valid_name<'a>(candidate: &'a str, rules: &TextRules) -> Option<&'a str> {
    let n = candidate.chars().count();
    if n == 0
        || n > rules.max_name_chars
        || candidate.contains(':')
        || candidate.trim() != candidate
        || candidate.chars().any(char::is_control)
        || rules
            .ignore_name_prefixes
            .iter()
            .any(|p| !p.is_empty() && candidate.starts_with(p.as_str()))
    {
        return None;
    }
    Some(candidate)
}

/// The `Name` of a `\nName:` stop string.
fn stop_name<'a>(stop: &'a str, rules: &TextRules) -> Option<&'a str> {
    let inner = stop.strip_prefix('\n')?.strip_suffix(':')?;
    valid_name(inner, rules)
}

/// The speaker named at the very end of the prompt: `\nName:` (trailing
/// spaces allowed), or `Name:` right after an instruct output sequence.
fn speaker_tail<'a>(prompt: &'a str, rules: &TextRules) -> Option<&'a str> {
    let body = prompt.trim_end_matches([' ', '\t']).strip_suffix(':')?;
    let (line_start, line) = match body.rfind('\n') {
        Some(i) => (i + 1, &body[i + 1..]),
        None => (0, body),
    };
    if line_start > 0 {
        if let Some(name) = valid_name(line, rules) {
            return Some(name);
        }
    }
    rules.output_sequences.iter().find_map(|seq| {
        let at = line.rfind(seq.as_str())?;
        valid_name(line[at + seq.len()..].trim_start(), rules)
    })
}

fn read_text(prompt: &str, stops: &[String], stream: bool, rules: &TextRules) -> Reading {
    let mut names = Names::default();
    if rules.stop_names {
        for n in stops.iter().filter_map(|s| stop_name(s, rules)) {
            if !names.add(n) {
                break;
            }
        }
    }
    let Names {
        list: stop_names,
        seen: stop_set,
    } = names;
    let tail = if rules.speaker_tail {
        speaker_tail(prompt, rules)
    } else {
        None
    };
    let mut r = Reading {
        roster: stop_names.clone(),
        ..Reading::default()
    };
    match tail {
        Some(t) if !stop_set.contains(t) => {
            r.roster.push(t.to_string());
            r.character = Some(t.to_string());
            r.user = stop_names.first().cloned();
            r.kind = Some(Kind::Normal);
        }
        Some(t) => {
            // The tail is a stop name: the model speaks as the user. The
            // character whose card wrote the prompt is the first other stop.
            r.user = Some(t.to_string());
            r.character = stop_names.iter().find(|s| *s != t).cloned();
            r.kind = Some(Kind::Impersonate);
        }
        None => {
            let continued = if rules.detect_continue && !stop_names.is_empty() {
                continued_speaker(prompt, rules, stream).filter(|(n, _)| !stop_set.contains(*n))
            } else {
                None
            };
            if let Some((name, doubled)) = continued {
                r.character = Some(name.to_string());
                r.needs_known_speaker = !doubled;
                r.user = stop_names.first().cloned();
                r.kind = Some(Kind::Continue);
            } else if !stream && rules.non_stream_is_quiet {
                r.kind = Some(Kind::Quiet);
            }
        }
    }
    r
}

/// How far back a continue's speaker line is searched (a message being
/// continued may span lines).
const CONTINUE_SCAN_LINES: usize = 64;

/// The speaker of the message a continue extends: SillyTavern 1.18 writes
/// `\nBob:Bob: text…` (the forced name glued to the message's own), 1.12
/// `\nBob: text…`. The text may span lines, so the nearest line that starts
/// with `Name:` decides.
///
/// A non-streaming request is only taken as a continue when the evidence is
/// strong (the doubled form, or the speaker line is the last line): a quiet
/// prompt appended after the chat would otherwise pass for a continue.
/// Returns the name and whether it came in the doubled form.
fn continued_speaker<'a>(
    prompt: &'a str,
    rules: &TextRules,
    stream: bool,
) -> Option<(&'a str, bool)> {
    for (i, line) in prompt.rsplit('\n').take(CONTINUE_SCAN_LINES).enumerate() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if let Some(name) = valid_name(name, rules) {
            let doubled = rest.strip_prefix(name).is_some_and(|r| r.starts_with(':'));
            if doubled || rest.is_empty() || rest.starts_with(' ') {
                return (stream || doubled || i == 0).then_some((name, doubled));
            }
        }
    }
    None
}

/// A name inference may take from a chat body: not empty, not too long, no
/// control characters.
fn usable_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_INFERRED_NAME_BYTES && !s.chars().any(char::is_control)
}

fn read_chat(body: &Value, policy: &Policy, stream: bool) -> Reading {
    let rules = &policy.chat;
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut r = read_chat_names(body, messages, rules);
    read_chat_templates(messages, rules, &mut r);
    if r.kind.is_none() && !stream && rules.non_stream_is_quiet {
        r.kind = Some(Kind::Quiet);
    }
    r
}

/// What OpenAI-style fields say: `name`s of messages (the roster, the user),
/// the policy's `character_fields` / `chat_fields`, and the name of a final
/// assistant message (a prefill being continued).
fn read_chat_names(body: &Value, messages: &[Value], rules: &ChatRules) -> Reading {
    let string_field = |names: &[String]| {
        names.iter().find_map(|f| {
            body.get(f)
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|s| usable_name(s))
                .map(str::to_string)
        })
    };
    let mut r = Reading {
        chat: string_field(&rules.chat_fields),
        ..Reading::default()
    };
    let mut names = Names::default();
    for m in messages {
        let role = m.get("role").and_then(Value::as_str);
        // Only those who speak in the chat: SillyTavern names its example
        // dialogue's system messages `example_user` / `example_assistant`.
        if !matches!(role, Some("user" | "assistant")) {
            continue;
        }
        if let Some(n) = name_of(m) {
            // A name beyond the roster's bound is not the user's either:
            // the user is someone the chat key counts.
            if names.add(n) && role == Some("user") {
                r.user = Some(n.to_string());
            }
        }
    }
    r.roster = names.list;
    r.character = string_field(&rules.character_fields);
    if r.character.is_none() && rules.assistant_name {
        // A final assistant message is the turn being generated (a prefill
        // or a continue); its name is the speaker.
        if let Some(last) = messages.last() {
            if last.get("role").and_then(Value::as_str) == Some("assistant") {
                r.character = name_of(last).map(str::to_string);
                if r.character.is_some() {
                    r.kind = Some(Kind::Continue);
                }
            }
        }
    }
    r
}

fn name_of(m: &Value) -> Option<&str> {
    m.get("name")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| usable_name(s))
}

/// The text of a message: its `content` string, or its text parts joined.
fn message_text(m: &Value) -> Option<std::borrow::Cow<'_, str>> {
    match m.get("content")? {
        Value::String(s) => Some(s.as_str().into()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n")
                .into(),
        ),
        _ => None,
    }
}

/// Where the templates are looked for: the messages before the chat's
/// history begins (the main prompt, the card, examples, the group's first
/// line), at most [`TEMPLATE_LEADING_MESSAGES`] of them, and the last
/// [`TEMPLATE_TRAILING_MESSAGES`] (the nudges). The history between holds
/// only what characters wrote, however long it grows.
const TEMPLATE_LEADING_MESSAGES: usize = 64;
/// See [`TEMPLATE_LEADING_MESSAGES`].
const TEMPLATE_TRAILING_MESSAGES: usize = 8;

/// What the client's own prompt templates say (SillyTavern's group nudge,
/// main prompt, new-group-chat line, impersonation and continue prompts):
/// the speaker, the user, the members, the kind. Fills only what the names
/// left open.
fn read_chat_templates(messages: &[Value], rules: &ChatRules, r: &mut Reading) {
    let t = &rules.templates;
    if t.speaker.is_empty()
        && t.roster.is_empty()
        && t.impersonate.is_empty()
        && t.continued.is_empty()
    {
        return;
    }
    // The messages before the history and the last few, last first (a
    // nudge at the end wins).
    let n = messages.len();
    let history_starts = messages
        .iter()
        .take(TEMPLATE_LEADING_MESSAGES)
        .position(|m| {
            matches!(
                m.get("role").and_then(Value::as_str),
                Some("user" | "assistant")
            )
        })
        .unwrap_or(TEMPLATE_LEADING_MESSAGES);
    let near: Vec<std::borrow::Cow<'_, str>> = messages
        .iter()
        .enumerate()
        .rev()
        .filter(|(i, _)| *i + TEMPLATE_TRAILING_MESSAGES >= n || *i < history_starts)
        .filter_map(|(_, m)| message_text(m))
        .collect();
    let first_fill = |templates: &[Template]| {
        templates
            .iter()
            .find_map(|t| near.iter().find_map(|text| t.find(text)))
    };
    if let Some(f) = first_fill(&t.impersonate) {
        r.kind = Some(Kind::Impersonate);
        r.user = f.user.filter(|u| usable_name(u)).or(r.user.take());
    } else if r.kind.is_none() && first_fill(&t.continued).is_some() {
        r.kind = Some(Kind::Continue);
    }
    // The speaker from the first template that names one (the nudge), the
    // user from the first that names one (the main prompt).
    let fills: Vec<Filled> = t
        .speaker
        .iter()
        .filter_map(|t| near.iter().find_map(|text| t.find(text)))
        .collect();
    if r.character.is_none() {
        r.character = fills
            .iter()
            .find_map(|f| f.char.clone().filter(|c| usable_name(c)));
    }
    if r.user.is_none() {
        r.user = fills
            .iter()
            .find_map(|f| f.user.clone().filter(|u| usable_name(u)));
    }
    if let Some(group) = first_fill(&t.roster).and_then(|f| f.group) {
        // The members SillyTavern lists for every speaker of the group, so
        // the chat key does not change as members first speak.
        let mut names = Names::default();
        for name in group.split(rules.roster_separator.as_str()).map(str::trim) {
            if usable_name(name) && !names.add(name) {
                break;
            }
        }
        // The line names the speaker even when its name holds the separator
        // ("Smith, John" splits in two, alike for every speaker): adding it
        // whole as well would give that one speaker a chat key of its own.
        r.roster_names_speaker = r.character.as_deref().is_some_and(|c| group.contains(c));
        if let Some(u) = &r.user {
            names.add(u);
        }
        r.roster = names.list;
    } else if let Some(u) = &r.user {
        if !r.roster.contains(u) {
            r.roster.push(u.clone());
        }
    }
}

pub mod content;
pub mod next_speaker;

#[cfg(test)]
mod tests;
