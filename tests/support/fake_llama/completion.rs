//! Completions on every route (native, OpenAI text and chat): waiting for
//! the slot, prompt caching, paced and gated generation, streaming, and
//! dying mid-stream.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::http::{error_resp, error_resp_with, json_ok, parse_json, sse_headers, Resp, Sender};
use super::state::{lock, ActiveGuard, Shared, SlotGuard, TaskInfo};
use super::tokenizer::tokens_of;
use super::wire::{chunk_sse, final_json, sse};
use super::{chat_prompt, event_text, tokenize};

/// Which completion route, which decides the response format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CompletionKind {
    /// /completion, /completions: native llama.cpp objects, no [DONE].
    Native,
    /// /v1/completions: OpenAI `text_completion`, ends with [DONE].
    OaiText,
    /// /chat/completions, /v1/chat/completions: `chat.completion(.chunk)`.
    OaiChat,
}

impl CompletionKind {
    pub(super) fn for_path(path: &str) -> Option<Self> {
        match path {
            "/completion" | "/completions" => Some(Self::Native),
            "/v1/completions" => Some(Self::OaiText),
            "/chat/completions" | "/v1/chat/completions" => Some(Self::OaiChat),
            _ => None,
        }
    }
}

/// A parsed completion request plus what happened on its slot.
#[derive(Debug)]
pub(super) struct Task {
    pub(super) kind: CompletionKind,
    pub(super) id: u64,
    pub(super) slot: usize,
    pub(super) prompt: Vec<i32>,
    pub(super) stream: bool,
    pub(super) n_predict: i64,
    n_events: usize,
    pub(super) include_usage: bool,
    pub(super) return_tokens: bool,
    pub(super) cache_n: usize,
    pub(super) prompt_n: usize,
    pub(super) model: String,
    die_after: Option<usize>,
}

#[derive(Debug, Default)]
pub(super) struct Generated {
    pub(super) content: String,
    pub(super) tokens: Vec<i32>,
    pub(super) n_decoded: usize,
    pub(super) truncated_by_ctx: bool,
}

/// Why generation ended early.
#[derive(Debug)]
enum Stop {
    /// The client went away.
    Cancelled,
    /// `die_mid_stream_after` fired.
    Died,
}

fn int_field(v: &Value, keys: &[&str]) -> Option<i64> {
    keys.iter().find_map(|k| v.get(*k).and_then(Value::as_i64))
}

pub(super) async fn completion(
    shared: Arc<Shared>,
    kind: CompletionKind,
    body: &[u8],
    active: ActiveGuard,
) -> Result<Resp, io::Error> {
    let v = match parse_json(body) {
        Ok(v) => v,
        Err(r) => return Ok(*r),
    };
    let prompt = if kind == CompletionKind::OaiChat {
        let Some(messages) = v.get("messages").filter(|m| m.is_array()) else {
            return Ok(error_resp(
                400,
                "'messages' is required and must be an array",
            ));
        };
        tokenize(&chat_prompt(messages), true)
    } else {
        let Some(p) = v.get("prompt") else {
            return Ok(error_resp(
                400,
                "[json.exception.out_of_range.403] key 'prompt' not found",
            ));
        };
        // A single-element array of prompts is one prompt; the fake does not
        // support several.
        let p = match p {
            Value::Array(a) if a.len() == 1 && !a[0].is_number() => &a[0],
            p => p,
        };
        match tokens_of(p, p.is_string()) {
            Some(t) => t,
            None => {
                return Ok(error_resp(
                    400,
                    "the fake llama-server supports one string or token-array prompt",
                ))
            }
        }
    };
    let knobs = shared.knobs();
    let n_predict =
        int_field(&v, &["n_predict", "max_tokens", "max_completion_tokens"]).unwrap_or(-1);
    let n_events = if n_predict < 0 {
        knobs.events
    } else {
        knobs.events.min(n_predict as usize)
    };
    let id_slot = v.get("id_slot").and_then(Value::as_i64).unwrap_or(-1);
    let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let cache_prompt = v
        .get("cache_prompt")
        .and_then(Value::as_bool)
        .unwrap_or(true);

    let process = shared.process();
    let task_id = process.new_task_id();
    let wanted = if id_slot < 0 {
        None
    } else {
        Some(id_slot as usize % shared.n_slots)
    };

    // Wait for the slot: nothing is sent until the task starts.
    let guard = process.acquire(wanted).await;
    let slot = guard.slot;
    if prompt.len() >= shared.n_ctx {
        return Ok(error_resp_with(
            400,
            "exceed_context_size_error",
            format!(
                "request ({} tokens) exceeds the available context size ({} tokens), try increasing it",
                prompt.len(),
                shared.n_ctx
            ),
            Some(json!({ "n_prompt_tokens": prompt.len(), "n_ctx": shared.n_ctx })),
        ));
    }

    // Prompt caching: reuse the common prefix, but always evaluate at least
    // the last prompt token.
    let cache_n = {
        let mut st = guard.state();
        let lcp = st
            .tokens
            .iter()
            .zip(&prompt)
            .take_while(|(a, b)| a == b)
            .count();
        let cache_n = if cache_prompt {
            lcp.min(prompt.len().saturating_sub(1))
        } else {
            0
        };
        st.tokens = prompt.clone();
        st.last_task = Some(TaskInfo {
            id_task: task_id,
            n_prompt_processed: prompt.len() - cache_n,
            n_prompt_cache: cache_n,
            n_decoded: 0,
            n_predict,
            stream,
            done: false,
        });
        cache_n
    };
    process
        .prompt_tokens_total
        .fetch_add((prompt.len() - cache_n) as u64, Ordering::SeqCst);
    process
        .cached_tokens_total
        .fetch_add(cache_n as u64, Ordering::SeqCst);

    let die_after = lock(&shared.knobs).die_after.take();
    let task = Task {
        kind,
        id: task_id,
        slot,
        prompt_n: prompt.len() - cache_n,
        prompt,
        stream,
        n_predict,
        n_events,
        include_usage: v
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        return_tokens: v
            .get("return_tokens")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        cache_n,
        model: shared.model_name(),
        die_after,
    };

    let first_byte_delay = lock(&shared.knobs).first_byte_delay;
    tokio::time::sleep(first_byte_delay).await;

    if stream {
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let _active = active;
            let _ = generate(&shared, &guard, &task, Some(&tx)).await;
            drop(guard);
        });
        return Ok(sse_headers(rx));
    }

    match generate(&shared, &guard, &task, None).await {
        Ok(gen) => Ok(json_ok(&final_json(&task, &gen))),
        Err(_) => Err(io::Error::other("fake llama-server: died mid-generation")),
    }
}

/// Waits between events: `event_delay`, then a gate permit in gate mode.
async fn pace(shared: &Shared, tx: Option<&Sender>) -> Result<(), Stop> {
    let closed = async {
        match tx {
            Some(tx) => tx.closed().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(closed);
    let delay = lock(&shared.knobs).event_delay;
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = &mut closed => return Err(Stop::Cancelled),
    }
    loop {
        let changed = shared.knobs_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if !lock(&shared.knobs).gate {
            return Ok(());
        }
        tokio::select! {
            permit = shared.gate.acquire() => {
                permit.expect("gate semaphore").forget();
                return Ok(());
            }
            _ = &mut changed => {}
            _ = &mut closed => return Err(Stop::Cancelled),
        }
    }
}

async fn send(tx: Option<&Sender>, data: String) -> Result<(), Stop> {
    match tx {
        Some(tx) => tx
            .send(Ok(Bytes::from(data)))
            .await
            .map_err(|_| Stop::Cancelled),
        None => Ok(()),
    }
}

/// Runs the generation on the held slot. With `tx`, streams SSE events.
async fn generate(
    shared: &Shared,
    guard: &SlotGuard,
    task: &Task,
    tx: Option<&Sender>,
) -> Result<Generated, Stop> {
    let mut gen = Generated::default();
    for i in 0..task.n_events {
        if i > 0 {
            pace(shared, tx).await?;
        }
        if task.die_after == Some(i) {
            return Err(die(tx).await);
        }
        let text = event_text(i);
        let toks = tokenize(&text, false);
        {
            let mut st = guard.state();
            if st.tokens.len() + toks.len() > shared.n_ctx {
                gen.truncated_by_ctx = true;
                break;
            }
            st.tokens.extend_from_slice(&toks);
            if let Some(t) = st.last_task.as_mut() {
                t.n_decoded = i + 1;
            }
        }
        guard
            .process
            .predicted_tokens_total
            .fetch_add(1, Ordering::SeqCst);
        gen.content.push_str(&text);
        gen.tokens.extend_from_slice(&toks);
        gen.n_decoded = i + 1;
        if task.stream {
            send(tx, chunk_sse(task, i, &text, &toks)).await?;
        }
    }
    if task.n_events > 0 {
        pace(shared, tx).await?;
    }
    // `die_mid_stream_after(n)` with exactly n events sent: lose the final chunk.
    if task.die_after == Some(gen.n_decoded) {
        return Err(die(tx).await);
    }
    if task.stream {
        let mut out = String::new();
        match final_json(task, &gen) {
            Value::Array(items) => items.iter().for_each(|v| out.push_str(&sse(v))),
            v => out.push_str(&sse(&v)),
        }
        if task.kind != CompletionKind::Native {
            out.push_str("data: [DONE]\n\n");
        }
        send(tx, out).await?;
    }
    Ok(gen)
}

async fn die(tx: Option<&Sender>) -> Stop {
    if let Some(tx) = tx {
        let _ = tx
            .send(Err(io::Error::other("fake llama-server: die mid stream")))
            .await;
    }
    Stop::Died
}
