//! Who a slot's cache belongs to ([`Tenant`]) and what kind of generation a
//! request is ([`Kind`]): the two words the identity resolver, the slot
//! table and the cache layer share. Pure data, no I/O.

use std::fmt;
use std::str::FromStr;

/// Who a slot's KV cache belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tenant {
    /// A character in a chat: its cache is worth keeping and saving.
    Character {
        /// Chat key (explicit, or inferred from the roster).
        chat: String,
        /// Character name exactly as the client spelled it.
        name: String,
    },
    /// A request kvgate could not attribute. The key separates unrelated
    /// anonymous conversations (a prompt-prefix fingerprint); anonymous caches
    /// are never counted, saved or restored.
    Anonymous {
        /// Grouping key for anonymous requests.
        key: String,
    },
}

impl Tenant {
    /// The character's name, if this is a character.
    pub fn character(&self) -> Option<&str> {
        match self {
            Tenant::Character { name, .. } => Some(name),
            Tenant::Anonymous { .. } => None,
        }
    }

    /// The chat key, if this is a character.
    pub fn chat(&self) -> Option<&str> {
        match self {
            Tenant::Character { chat, .. } => Some(chat),
            Tenant::Anonymous { .. } => None,
        }
    }

    /// Whether this tenant's cache is persisted and counted.
    pub fn is_character(&self) -> bool {
        matches!(self, Tenant::Character { .. })
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tenant::Character { chat, name } => write!(f, "{name} @ {chat}"),
            Tenant::Anonymous { key } => write!(f, "anonymous {key}"),
        }
    }
}

/// The kind of generation, as SillyTavern names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A new message.
    Normal,
    /// The last message generated again.
    Regenerate,
    /// Another alternative for the last message (same prompt as before).
    Swipe,
    /// The last message extended.
    Continue,
    /// A background prompt (summary, image prompt, …).
    Quiet,
    /// The model writes the user's message.
    Impersonate,
}

impl Kind {
    /// The lowercase wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Normal => "normal",
            Kind::Regenerate => "regenerate",
            Kind::Swipe => "swipe",
            Kind::Continue => "continue",
            Kind::Quiet => "quiet",
            Kind::Impersonate => "impersonate",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "normal" | "group_chat" => Kind::Normal,
            "regenerate" => Kind::Regenerate,
            "swipe" => Kind::Swipe,
            "continue" => Kind::Continue,
            "quiet" => Kind::Quiet,
            "impersonate" => Kind::Impersonate,
            _ => return Err(UnknownKind(s.to_string())),
        })
    }
}

/// A generation kind kvgate does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown generation kind {0:?} (expected normal, regenerate, swipe, continue, quiet or impersonate)")]
pub struct UnknownKind(pub String);
