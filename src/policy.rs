//! Identity policies: which rules infer a request's chat, character and kind,
//! and with which parameters. Policies are TOML files in `policies/`; the
//! built-in ones are compiled in, and `--policy` may also name a file path.
//!
//! Loading is pure (`from_toml_str` + `validate`); unknown keys are errors so a
//! typo in a policy is caught at start, not silently ignored.

use std::path::Path;

use serde::Deserialize;

pub mod template;

use template::Template;

/// The policies shipped in `policies/`, by name.
const BUILTIN: &[(&str, &str)] = &[
    ("sillytavern", include_str!("../policies/sillytavern.toml")),
    ("generic", include_str!("../policies/generic.toml")),
];

/// A complete identity policy.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Name shown in logs.
    pub name: String,
    /// Free text describing the client the policy is for.
    #[serde(default)]
    pub description: String,
    /// Rules for text completions (`/completion`, `/v1/completions`).
    #[serde(default)]
    pub text: TextRules,
    /// Rules for chat completions (`/v1/chat/completions`).
    #[serde(default)]
    pub chat: ChatRules,
    /// How requests without a character are grouped.
    #[serde(default)]
    pub anonymous: AnonymousRules,
}

/// Inference rules for a plain `prompt` string.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TextRules {
    /// Read the speaker from a `\nName:` at the very end of the prompt.
    pub speaker_tail: bool,
    /// Read the roster from `\nName:` stop strings.
    pub stop_names: bool,
    /// Instruct output sequences a speaker name may directly follow on the
    /// last line (e.g. `[/INST]`), in addition to a plain newline.
    pub output_sequences: Vec<String>,
    /// Longest accepted name, in characters.
    pub max_name_chars: usize,
    /// Names starting with one of these are template markup, not people
    /// (e.g. `\n### Instruction:` stop strings).
    pub ignore_name_prefixes: Vec<String>,
    /// Detect a continue: no speaker tail, the last line starts with
    /// `Name:` of a non-stop name.
    pub detect_continue: bool,
    /// Treat a non-streaming request without a speaker tail as quiet.
    pub non_stream_is_quiet: bool,
}

impl Default for TextRules {
    fn default() -> Self {
        TextRules {
            speaker_tail: true,
            stop_names: true,
            output_sequences: Vec::new(),
            max_name_chars: 100,
            ignore_name_prefixes: vec!["#".into(), "<".into(), "[".into()],
            detect_continue: true,
            non_stream_is_quiet: true,
        }
    }
}

/// Inference rules for a `messages` array.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ChatRules {
    /// Use the `name` of a final assistant message (a prefill being continued)
    /// or of the last assistant message as the character.
    pub assistant_name: bool,
    /// Top-level body fields (strings) naming the character, tried in order.
    pub character_fields: Vec<String>,
    /// Top-level body fields (strings) naming the chat, tried in order.
    pub chat_fields: Vec<String>,
    /// Templates whose `{{char}}` is the speaker (and `{{user}}` the user),
    /// tried in order, each from the last message to the first: a group
    /// nudge at the end wins over a main prompt at the start.
    pub speaker_prompts: Vec<String>,
    /// Templates whose `{{group}}` lists the chat's members.
    pub roster_prompts: Vec<String>,
    /// How `{{group}}` separates the members' names.
    pub roster_separator: String,
    /// Templates that mark an impersonation (`{{user}}` is the user).
    pub impersonate_prompts: Vec<String>,
    /// Templates that mark a continue.
    pub continue_prompts: Vec<String>,
    /// A non-streaming request whose kind nothing else tells is quiet.
    pub non_stream_is_quiet: bool,
    /// The templates above, parsed by [`Policy::validate`].
    #[serde(skip)]
    pub templates: ChatTemplates,
}

/// [`ChatRules`]' templates, parsed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatTemplates {
    /// From `speaker_prompts`.
    pub speaker: Vec<Template>,
    /// From `roster_prompts`.
    pub roster: Vec<Template>,
    /// From `impersonate_prompts`.
    pub impersonate: Vec<Template>,
    /// From `continue_prompts`.
    pub continued: Vec<Template>,
}

impl ChatRules {
    fn parse_templates(&mut self) -> Result<(), String> {
        let parse = |list: &[String]| -> Result<Vec<Template>, String> {
            list.iter().map(|t| Template::parse(t)).collect()
        };
        self.templates = ChatTemplates {
            speaker: parse(&self.speaker_prompts)?,
            roster: parse(&self.roster_prompts)?,
            impersonate: parse(&self.impersonate_prompts)?,
            continued: parse(&self.continue_prompts)?,
        };
        Ok(())
    }
}

impl Default for ChatRules {
    fn default() -> Self {
        ChatRules {
            assistant_name: true,
            character_fields: Vec::new(),
            chat_fields: Vec::new(),
            speaker_prompts: Vec::new(),
            roster_prompts: Vec::new(),
            roster_separator: ", ".into(),
            impersonate_prompts: Vec::new(),
            continue_prompts: Vec::new(),
            non_stream_is_quiet: false,
            templates: ChatTemplates::default(),
        }
    }
}

/// Grouping of unattributed requests.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AnonymousRules {
    /// Separate anonymous requests by a fingerprint of the first
    /// `prefix_chars` characters of the prompt (0: one shared anonymous
    /// tenant). Keeps unrelated unnamed conversations from trashing each
    /// other's cache.
    pub prefix_chars: usize,
}

impl Default for AnonymousRules {
    fn default() -> Self {
        AnonymousRules { prefix_chars: 256 }
    }
}

/// A policy that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Not a built-in name and not a readable file.
    #[error("policy {0:?} is neither a built-in policy ({1}) nor a readable file")]
    NotFound(String, String),
    /// The TOML is malformed or has unknown keys.
    #[error("policy {name}: {source}")]
    Parse {
        /// Policy name or path.
        name: String,
        /// The parser's complaint.
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("policy {0}: {1}")]
    Invalid(String, String),
}

// === impl Policy ===

impl Policy {
    /// Parses and validates a policy document.
    pub fn from_toml_str(name: &str, text: &str) -> Result<Self, PolicyError> {
        let p: Policy = toml::from_str(text).map_err(|source| PolicyError::Parse {
            name: name.to_string(),
            source,
        })?;
        p.validate()
    }

    /// Checks ranges that serde can't.
    pub fn validate(mut self) -> Result<Self, PolicyError> {
        if self.text.max_name_chars == 0 || self.text.max_name_chars > 1000 {
            return Err(PolicyError::Invalid(
                self.name,
                "text.max_name_chars must be 1..=1000".into(),
            ));
        }
        if self.chat.roster_separator.is_empty() {
            return Err(PolicyError::Invalid(
                self.name,
                "chat.roster_separator must not be empty".into(),
            ));
        }
        if let Err(e) = self.chat.parse_templates() {
            return Err(PolicyError::Invalid(self.name, format!("chat: {e}")));
        }
        Ok(self)
    }

    /// A built-in policy by name, or a policy file by path.
    pub fn load(name_or_path: &str) -> Result<Self, PolicyError> {
        if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return Self::from_toml_str(name_or_path, text);
        }
        let path = Path::new(name_or_path);
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_toml_str(name_or_path, &text),
            Err(_) => Err(PolicyError::NotFound(
                name_or_path.to_string(),
                Self::builtin_names().join(", "),
            )),
        }
    }

    /// Names of the compiled-in policies.
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(n, _)| *n).collect()
    }

    /// The default policy (SillyTavern).
    pub fn sillytavern() -> Self {
        Self::load("sillytavern").expect("the built-in sillytavern policy is valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_load() {
        for name in Policy::builtin_names() {
            let p = Policy::load(name).unwrap();
            assert_eq!(p.name, name);
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err =
            Policy::from_toml_str("t", "name = \"t\"\n[text]\nspeaker_tial = true\n").unwrap_err();
        assert!(err.to_string().contains("speaker_tial"), "{err}");
    }

    #[test]
    fn missing_policy_names_builtins() {
        let err = Policy::load("/nonexistent/policy.toml").unwrap_err();
        assert!(err.to_string().contains("sillytavern"), "{err}");
    }
}
