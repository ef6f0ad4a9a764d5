//! Keys: the front port's optional clients file (as in the NewAge seed:
//! `[[client]]` with `id`, `key`, `trusted`) and constant-time comparison of
//! presented keys, shared with the admin key check.

use std::path::Path;

use hyper::header::{HeaderMap, AUTHORIZATION};
use serde::Deserialize;

/// One client of the front port.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Client {
    /// Name used in chat-switch tracking, events and metrics.
    pub id: String,
    /// The key it presents.
    pub key: String,
    /// Only trusted clients are served.
    #[serde(default)]
    pub trusted: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientsFile {
    #[serde(default)]
    client: Vec<Client>,
}

/// The clients file, loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Clients {
    list: Vec<Client>,
}

/// Why a clients file can't be used.
#[derive(Debug, thiserror::Error)]
pub enum ClientsError {
    /// Unreadable.
    #[error("clients file {path}: {source}")]
    Read {
        /// Its path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not valid TOML, unknown keys, or bad entries.
    #[error("clients file {path}: {message}")]
    Invalid {
        /// Its path.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// Why a request's key was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No key presented.
    Missing,
    /// A key nobody has.
    Unknown,
    /// A known client that is not trusted.
    Untrusted,
}

impl Clients {
    /// Parses a clients document.
    pub fn from_toml_str(path: &str, text: &str) -> Result<Clients, ClientsError> {
        let invalid = |message: String| ClientsError::Invalid {
            path: path.to_string(),
            message,
        };
        let f: ClientsFile = toml::from_str(text)
            .map_err(|e| invalid(e.to_string().lines().next().unwrap_or("").to_string()))?;
        for (i, c) in f.client.iter().enumerate() {
            if c.id.trim().is_empty() || c.key.trim().is_empty() {
                return Err(invalid(format!(
                    "client #{} needs a non-empty id and key",
                    i + 1
                )));
            }
        }
        for (i, a) in f.client.iter().enumerate() {
            if f.client[..i].iter().any(|b| b.key == a.key || b.id == a.id) {
                return Err(invalid(format!(
                    "client {:?}: ids and keys must be unique",
                    a.id
                )));
            }
        }
        Ok(Clients { list: f.client })
    }

    /// Loads a clients file.
    pub fn load(path: &Path) -> Result<Clients, ClientsError> {
        let text = std::fs::read_to_string(path).map_err(|source| ClientsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml_str(&path.display().to_string(), &text)
    }

    /// The trusted client presenting a key in `headers`.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<&Client, Refusal> {
        let key = presented_key(headers, "x-api-key").ok_or(Refusal::Missing)?;
        // Compare against every key so timing says nothing about which.
        let mut found = None;
        for c in &self.list {
            if constant_time_eq(c.key.as_bytes(), key.as_bytes()) {
                found = Some(c);
            }
        }
        match found {
            Some(c) if c.trusted => Ok(c),
            Some(_) => Err(Refusal::Untrusted),
            None => Err(Refusal::Unknown),
        }
    }
}

/// The key in `Authorization: Bearer …`, else in the header `other`.
pub fn presented_key<'a>(headers: &'a HeaderMap, other: &str) -> Option<&'a str> {
    let bearer = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    bearer
        .or_else(|| {
            headers
                .get(other)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        })
        .filter(|k| !k.is_empty())
}

/// Equality whose time depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    const FILE: &str = "[[client]]\nid = \"st\"\nkey = \"k1\"\ntrusted = true\n\n[[client]]\nid = \"guest\"\nkey = \"k2\"\n";

    #[test]
    fn authenticates_trusted_keys_only() {
        let c = Clients::from_toml_str("c.toml", FILE).unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(c.authenticate(&h), Err(Refusal::Missing));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer k1"));
        assert_eq!(c.authenticate(&h).unwrap().id, "st");
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer k2"));
        assert_eq!(c.authenticate(&h), Err(Refusal::Untrusted));
        h.remove(AUTHORIZATION);
        h.insert("x-api-key", HeaderValue::from_static("nope"));
        assert_eq!(c.authenticate(&h), Err(Refusal::Unknown));
        h.insert("x-api-key", HeaderValue::from_static("k1"));
        assert_eq!(c.authenticate(&h).unwrap().id, "st");
    }

    #[test]
    fn bad_files_are_refused() {
        assert!(Clients::from_toml_str("c", "[[client]]\nid = \"a\"\n").is_err());
        assert!(
            Clients::from_toml_str("c", "[[client]]\nid = \"a\"\nkey = \"k\"\nrole = \"x\"\n")
                .is_err()
        );
        assert!(Clients::from_toml_str(
            "c",
            "[[client]]\nid = \"a\"\nkey = \"k\"\n[[client]]\nid = \"b\"\nkey = \"k\"\n"
        )
        .is_err());
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
