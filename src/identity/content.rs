//! The text a request's prompt is made of, for placing requests by content
//! as llama-server places them: by the longest common prefix of a new
//! prompt with what each slot holds (`get_available_slot`).
//!
//! llama-server compares token lists; kvgate compares the text the tokens
//! come from, which shares its prefixes: two prompts whose texts agree on
//! their first N bytes agree on (about) the tokens of those bytes, whatever
//! the template or tokenizer. Chat-shaped bodies are compared as their
//! compact JSON, in the order their parts reach the template (system, then
//! messages), so a conversation that grows by a message shares its whole
//! history with its previous turn.

use std::fmt::Write;

use serde_json::Value;

/// The body's prompt-bearing fields, in the order llama-server reads them
/// into the prompt: system text and instructions (Anthropic `system`,
/// OpenAI Responses `instructions`), tools, infill's extra context and
/// prefix/suffix, the conversation (`messages`, `input`), then `prompt`.
const PROMPT_FIELDS: [&str; 8] = [
    "system",
    "instructions",
    "tools",
    "input_extra",
    "input_prefix",
    "input_suffix",
    "messages",
    "input",
];

/// The prompt text of a completion body of any of llama-server's
/// generation routes: strings as they are, anything else as compact JSON,
/// one field after another.
pub fn prompt_text(body: &Value) -> String {
    let mut out = String::new();
    for (i, key) in PROMPT_FIELDS.iter().copied().chain(["prompt"]).enumerate() {
        let Some(v) = body.get(key).filter(|v| !v.is_null()) else {
            continue;
        };
        // Each present field starts with a control character naming it, so
        // that `{"system":"ab"}` and `{"input_prefix":"ab"}` differ, much as
        // their template or special tokens would.
        out.push(char::from(b'\x01' + i as u8));
        match v {
            Value::String(s) => out.push_str(s),
            // Display writes compact JSON, straight into the text.
            other => write!(out, "{other}").expect("writing to a String cannot fail"),
        }
    }
    out
}

/// llama-server's similarity of a slot to a prompt: the common prefix's
/// share of the prompt (0 when either is empty).
pub fn similarity(held: &str, prompt: &str) -> f32 {
    if prompt.is_empty() {
        return 0.0;
    }
    common_prefix_len(held.as_bytes(), prompt.as_bytes()) as f32 / prompt.len() as f32
}

/// Length of the common prefix of two byte strings.
pub fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
    // Compared a block at a time: prompts run to megabytes.
    const BLOCK: usize = 64;
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + BLOCK <= n && a[i..i + BLOCK] == b[i..i + BLOCK] {
        i += BLOCK;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_prompts_are_their_text() {
        let a = prompt_text(&json!({"prompt": "Hello there", "n_predict": 4}));
        let b = prompt_text(&json!({"prompt": "Hello world"}));
        assert!(a.contains("Hello there"));
        assert_eq!(
            common_prefix_len(a.as_bytes(), b.as_bytes()),
            a.find("Hello").unwrap() + "Hello ".len()
        );
    }

    #[test]
    fn a_growing_chat_shares_its_history() {
        let one = json!({"messages": [{"role": "user", "content": "hi"}]});
        let two = json!({"messages": [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you"}]});
        let (a, b) = (prompt_text(&one), prompt_text(&two));
        // Everything up to the end of the first message is common.
        let first = format!("[{}", one["messages"][0]);
        assert!(
            common_prefix_len(a.as_bytes(), b.as_bytes()) >= a.find(&first).unwrap() + first.len()
        );
        assert!(similarity(&a, &b) > 0.1, "past llama-server's threshold");
    }

    #[test]
    fn fields_do_not_alias() {
        let a = prompt_text(&json!({"system": "ab", "messages": []}));
        let b = prompt_text(&json!({"input_prefix": "ab", "messages": []}));
        assert_ne!(a, b);
    }

    #[test]
    fn similarity_is_the_prompts_share() {
        assert_eq!(similarity("abcd", ""), 0.0);
        assert_eq!(similarity("", "abcd"), 0.0);
        assert_eq!(similarity("abXX", "abcd"), 0.5);
        assert_eq!(similarity("abcdefgh", "abcd"), 1.0);
        let long = "x".repeat(1000);
        assert_eq!(common_prefix_len(long.as_bytes(), long.as_bytes()), 1000);
        let mut other = long.clone().into_bytes();
        other[777] = b'y';
        assert_eq!(common_prefix_len(long.as_bytes(), &other), 777);
    }
}
