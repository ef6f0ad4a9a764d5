//! The recorded calls: every HTTP request the fake received, and views of
//! them (completion bodies, slot actions).

use std::time::Instant;

use bytes::Bytes;
use serde_json::Value;

use super::completion::CompletionKind;
use super::http::query_param;
use super::state::lock;
use super::FakeHandle;

/// One HTTP request the fake received.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Header names are lower case, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// When the request head arrived.
    pub at: Instant,
}

impl Call {
    /// The value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// Whether this is a completion call (native or OpenAI-style).
    pub fn is_completion(&self) -> bool {
        self.method == "POST" && CompletionKind::for_path(&self.path).is_some()
    }
}

impl FakeHandle {
    /// Every request received, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.shared.calls).clone()
    }
    /// Calls whose path is `path`.
    pub fn calls_to(&self, path: &str) -> Vec<Call> {
        lock(&self.shared.calls)
            .iter()
            .filter(|c| c.path == path)
            .cloned()
            .collect()
    }
    pub fn clear_calls(&self) {
        lock(&self.shared.calls).clear();
    }
    /// JSON bodies of completion calls (all completion routes), in order.
    pub fn completions(&self) -> Vec<Value> {
        lock(&self.shared.calls)
            .iter()
            .filter(|c| c.is_completion())
            .filter_map(Call::json)
            .collect()
    }
    /// `(slot, action, filename)` of every `POST /slots/{id}` call, in order.
    pub fn slot_actions(&self) -> Vec<(usize, String, Option<String>)> {
        let calls = lock(&self.shared.calls);
        let mut out = Vec::new();
        for c in calls.iter().filter(|c| c.method == "POST") {
            let Some(id) = c
                .path
                .strip_prefix("/slots/")
                .and_then(|s| s.parse::<usize>().ok())
            else {
                continue;
            };
            let action = query_param(c.query.as_deref(), "action").unwrap_or_default();
            let filename = c.json().and_then(|v| {
                v.get("filename")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            });
            out.push((id, action, filename));
        }
        out
    }
}
