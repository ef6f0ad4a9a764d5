//! What the fake sends, byte for byte: the fixed values it reports, the
//! deterministic content of generated events ([`expected_content`]), the
//! `/stream-raw` bytes, and the JSON of completion chunks and final objects
//! in the native and OpenAI formats, framed as SSE `data:` events.

use bytes::Bytes;
use serde_json::{json, Value};

use super::completion::{CompletionKind, Generated, Task};
use super::detokenize;

/// `build_info` reported by default in /props.
pub const BUILD_INFO: &str = "b11434-fake";

/// Default `model_path`.
pub const MODEL_PATH: &str = "/models/fake.gguf";

/// `created` in every OpenAI-style object (fixed so bodies are comparable).
pub const CREATED: u64 = 1_700_000_000;

/// Content of generated event `i` (0-based).
pub fn event_text(i: usize) -> String {
    format!(" tok{i}")
}

/// Full generated content of a completion with `n` events.
pub fn expected_content(n: usize) -> String {
    (0..n).map(event_text).collect()
}

/// The prompt text the fake builds from OpenAI chat `messages` (ChatML).
pub fn chat_prompt(messages: &Value) -> String {
    let mut s = String::new();
    for m in messages.as_array().into_iter().flatten() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let content = match m.get("content") {
            Some(Value::String(c)) => c.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
            _ => String::new(),
        };
        s.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
    }
    s.push_str("<|im_start|>assistant\n");
    s
}

/// Chunk `i` of `GET /stream-raw`: ASCII text plus bytes that are not UTF-8.
pub fn raw_chunk(i: usize) -> Bytes {
    let mut v = format!("chunk{i}:").into_bytes();
    v.extend_from_slice(&[0xff, 0xfe, 0x00, 0xc3, (i % 256) as u8, b'\n']);
    Bytes::from(v)
}

/// Everything `GET /stream-raw?chunks=n` sends.
pub fn raw_stream(n: usize) -> Bytes {
    let mut v = Vec::new();
    for i in 0..n {
        v.extend_from_slice(&raw_chunk(i));
    }
    Bytes::from(v)
}

pub(super) fn sse(v: &Value) -> String {
    format!("data: {}\n\n", serde_json::to_string(v).expect("json"))
}

fn stop_type(task: &Task, gen: &Generated) -> &'static str {
    if gen.truncated_by_ctx || (task.n_predict >= 0 && gen.n_decoded as i64 >= task.n_predict) {
        "limit"
    } else {
        "eos"
    }
}

fn finish_reason(task: &Task, gen: &Generated) -> &'static str {
    if stop_type(task, gen) == "limit" {
        "length"
    } else {
        "stop"
    }
}

/// Deterministic timings: 0.5 ms per prompt token, 10 ms per generated one.
fn timings(task: &Task, n_decoded: usize) -> Value {
    let prompt_ms = task.prompt_n as f64 * 0.5;
    let predicted_ms = n_decoded as f64 * 10.0;
    let per = |ms: f64, n: usize| if n == 0 { 0.0 } else { ms / n as f64 };
    let tps = |ms: f64, n: usize| if ms == 0.0 { 0.0 } else { 1e3 / ms * n as f64 };
    json!({
        "cache_n": task.cache_n,
        "prompt_n": task.prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": per(prompt_ms, task.prompt_n),
        "prompt_per_second": tps(prompt_ms, task.prompt_n),
        "predicted_n": n_decoded,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": per(predicted_ms, n_decoded),
        "predicted_per_second": tps(predicted_ms, n_decoded),
    })
}

fn cmpl_id(task: &Task) -> String {
    format!("chatcmpl-fake{:08}", task.id)
}

fn oai_base(task: &Task, object: &str) -> Value {
    json!({
        "created": CREATED,
        "id": cmpl_id(task),
        "model": task.model,
        "system_fingerprint": BUILD_INFO,
        "object": object,
    })
}

fn with(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
    base
}

/// The SSE text of token event `i`.
pub(super) fn chunk_sse(task: &Task, i: usize, text: &str, toks: &[i32]) -> String {
    match task.kind {
        CompletionKind::Native => sse(&json!({
            "index": 0,
            "content": text,
            "tokens": toks,
            "stop": false,
            "id_slot": -1,
            "tokens_predicted": i + 1,
            "tokens_evaluated": task.prompt.len(),
        })),
        CompletionKind::OaiText => sse(&with(
            oai_base(task, "text_completion"),
            json!({ "choices": [{ "text": text, "index": 0, "logprobs": null, "finish_reason": null }] }),
        )),
        CompletionKind::OaiChat => {
            let delta = |d: Value| {
                with(
                    oai_base(task, "chat.completion.chunk"),
                    json!({ "choices": [{ "finish_reason": null, "index": 0, "delta": d }] }),
                )
            };
            let mut s = String::new();
            if i == 0 {
                s.push_str(&sse(&delta(
                    json!({ "role": "assistant", "content": null }),
                )));
            }
            s.push_str(&sse(&delta(json!({ "content": text }))));
            s
        }
    }
}

fn usage(task: &Task, gen: &Generated) -> Value {
    json!({
        "completion_tokens": gen.n_decoded,
        "prompt_tokens": task.prompt.len(),
        "total_tokens": gen.n_decoded + task.prompt.len(),
        "prompt_tokens_details": { "cached_tokens": task.cache_n },
    })
}

/// The final object (non-stream reply, or the last SSE event(s) — an array
/// means several events).
pub(super) fn final_json(task: &Task, gen: &Generated) -> Value {
    let (content, tokens) = if task.stream {
        (String::new(), Vec::new())
    } else {
        (
            gen.content.clone(),
            if task.return_tokens {
                gen.tokens.clone()
            } else {
                Vec::new()
            },
        )
    };
    let tokens_cached = task.prompt.len() + gen.tokens.len();
    match task.kind {
        CompletionKind::Native => json!({
            "index": 0,
            "content": content,
            "tokens": tokens,
            "id_slot": task.slot,
            "stop": true,
            "model": task.model,
            "tokens_predicted": gen.n_decoded,
            "tokens_evaluated": task.prompt.len(),
            "generation_settings": { "n_predict": task.n_predict, "stream": task.stream, "seed": 4294967295u32,
                                     "temperature": 0.8 },
            "prompt": detokenize(&task.prompt),
            "has_new_line": false,
            "truncated": false,
            "stop_type": stop_type(task, gen),
            "stopping_word": "",
            "tokens_cached": tokens_cached,
            "timings": timings(task, gen.n_decoded),
        }),
        CompletionKind::OaiText => {
            let mut v = with(
                oai_base(task, "text_completion"),
                json!({
                    "choices": [{ "text": content, "index": 0, "logprobs": null,
                                  "finish_reason": finish_reason(task, gen) }],
                    "timings": timings(task, gen.n_decoded),
                }),
            );
            v["usage"] = usage(task, gen);
            v
        }
        CompletionKind::OaiChat if task.stream => {
            let mut events = vec![with(
                oai_base(task, "chat.completion.chunk"),
                json!({ "choices": [{ "finish_reason": finish_reason(task, gen), "index": 0, "delta": {} }] }),
            )];
            if task.include_usage {
                events.push(with(
                    oai_base(task, "chat.completion.chunk"),
                    json!({ "choices": [], "usage": usage(task, gen) }),
                ));
            }
            if let Some(last) = events.last_mut() {
                last["timings"] = timings(task, gen.n_decoded);
            }
            Value::Array(events)
        }
        CompletionKind::OaiChat => with(
            oai_base(task, "chat.completion"),
            json!({
                "choices": [{ "finish_reason": finish_reason(task, gen), "index": 0,
                              "message": { "role": "assistant", "content": content } }],
                "usage": usage(task, gen),
                "timings": timings(task, gen.n_decoded),
            }),
        ),
    }
}
