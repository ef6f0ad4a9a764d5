//! The server: the accept loop and the router, which records each call,
//! applies `hang`, `loading` and the API key, and answers the simple
//! endpoints (/health, /props, /v1/models, /slots, /metrics, /tokenize,
//! /detokenize, /stream-raw, an echo for anything else).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::completion::{completion, CompletionKind};
use super::http::{error_resp, full, json_ok, parse_json, query_param, FakeBody, Resp};
use super::slot_actions::post_slot_action;
use super::state::{lock, ActiveGuard, Shared};
use super::tokenizer::{token_piece, tokens_of};
use super::{detokenize, raw_chunk, Call, CREATED, N_VOCAB};

pub(super) async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Accept loop. Owns every connection task, so aborting it closes them all.
pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| handle(shared.clone(), req));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Waits while `hang` is on.
async fn wait_unhung(shared: &Shared) {
    loop {
        let changed = shared.knobs_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if !lock(&shared.knobs).hang {
            return;
        }
        changed.await;
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Resp, io::Error> {
    let at = Instant::now();
    let active = ActiveGuard::new(&shared);
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => return Err(io::Error::other(e)),
    };
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    let call = Call {
        method: parts.method.to_string(),
        path: path.clone(),
        query: query.clone(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.clone(),
        at,
    };
    lock(&shared.calls).push(call);

    wait_unhung(&shared).await;
    let knobs = shared.knobs();

    if knobs.loading {
        return Ok(error_resp(503, "Loading model"));
    }
    if let Some(key) = &knobs.api_key {
        let public = path == "/health" || path == "/v1/health";
        let given = parts
            .headers
            .get("authorization")
            .or_else(|| parts.headers.get("x-api-key"))
            .and_then(|v| v.to_str().ok())
            .map(|v| v.strip_prefix("Bearer ").unwrap_or(v));
        if !public && given != Some(key.as_str()) {
            return Ok(error_resp(401, "Invalid API Key"));
        }
    }

    let method = parts.method.clone();
    let resp = match (&method, path.as_str()) {
        (&Method::GET, "/health" | "/v1/health") => json_ok(&json!({ "status": "ok" })),
        (&Method::GET, "/props") => json_ok(&props_json(&shared)),
        (&Method::GET, "/models" | "/v1/models") => json_ok(&models_json(&shared)),
        (&Method::GET, "/slots") => get_slots(&shared, query.as_deref()),
        (&Method::GET, "/metrics") => metrics(&shared),
        (&Method::POST, "/tokenize") => post_tokenize(&body),
        (&Method::POST, "/detokenize") => post_detokenize(&body),
        (&Method::POST, p) if p.starts_with("/slots/") => {
            post_slot_action(&shared, &p["/slots/".len()..], query.as_deref(), &body).await
        }
        (&Method::POST, p) if CompletionKind::for_path(p).is_some() => {
            let kind = CompletionKind::for_path(p).expect("checked");
            return completion(shared, kind, &body, active).await;
        }
        (&Method::GET, "/stream-raw") => stream_raw(query.as_deref(), active),
        _ => echo(&parts.method, &path, query.as_deref(), &body),
    };
    Ok(resp)
}

fn props_json(shared: &Shared) -> Value {
    let k = shared.knobs();
    json!({
        "default_generation_settings": {
            "params": { "n_predict": -1, "seed": 4294967295u32, "temperature": 0.8, "top_k": 40, "top_p": 0.95,
                        "min_p": 0.05, "stream": true, "cache_prompt": true },
            "n_ctx": shared.n_ctx,
        },
        "total_slots": shared.n_slots,
        "model_alias": shared.model_name(),
        "model_ftype": "Q8_0",
        "model_path": k.model_path,
        "modalities": { "vision": false, "video": false, "audio": false },
        "media_marker": "<__media__>",
        "endpoint_slots": true,
        "endpoint_props": false,
        "endpoint_metrics": true,
        "ui": false,
        "ui_settings": {},
        "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n",
        "chat_template_caps": {},
        "bos_token": "<s>",
        "eos_token": "</s>",
        "build_info": shared.build_info,
        "is_sleeping": k.sleeping,
        "cors_proxy_enabled": false,
    })
}

fn models_json(shared: &Shared) -> Value {
    let name = shared.model_name();
    json!({
        "models": [{
            "name": name, "model": name, "modified_at": "", "size": "", "digest": "", "type": "model",
            "description": "", "tags": [""], "capabilities": ["completion"], "parameters": "",
            "details": { "parent_model": "", "format": "gguf", "family": "", "families": [""],
                         "parameter_size": "", "quantization_level": "" },
        }],
        "object": "list",
        "data": [{
            "id": name,
            "aliases": [],
            "tags": [],
            "object": "model",
            "architecture": { "input_modalities": ["text"], "output_modalities": ["text"] },
            "created": CREATED,
            "owned_by": "llamacpp",
            "meta": {
                "vocab_type": 2,
                "n_vocab": N_VOCAB,
                "n_ctx": shared.n_ctx,
                "n_ctx_train": 8192,
                "n_embd": 256,
                "n_params": 12_345_678u64,
                "size": 13_107_200u64,
                "ftype": "Q8_0",
            },
        }],
    })
}

fn get_slots(shared: &Shared, query: Option<&str>) -> Resp {
    let process = shared.process();
    let mut arr = Vec::new();
    let mut idle = 0;
    for (id, slot) in process.slots.iter().enumerate() {
        let st = lock(&slot.state);
        if !st.processing {
            idle += 1;
        }
        let mut o = json!({ "id": id, "n_ctx": shared.n_ctx, "speculative": false, "is_processing": st.processing });
        if let Some(t) = &st.last_task {
            let n_remain = if t.n_predict < 0 {
                -1
            } else {
                t.n_predict - t.n_decoded as i64
            };
            let extra = json!({
                "id_task": t.id_task,
                "n_prompt_tokens": st.tokens.len(),
                "n_prompt_tokens_processed": t.n_prompt_processed,
                "n_prompt_tokens_cache": t.n_prompt_cache,
                "params": { "n_predict": t.n_predict, "stream": t.stream, "seed": 4294967295u32, "temperature": 0.8 },
                "next_token": [{
                    "has_next_token": !t.done,
                    "has_new_line": false,
                    "n_remain": n_remain,
                    "n_decoded": t.n_decoded,
                }],
            });
            if let (Some(o), Value::Object(extra)) = (o.as_object_mut(), extra) {
                o.extend(extra);
            }
        }
        arr.push(o);
    }
    if query_param(query, "fail_on_no_slot").is_some_and(|v| !v.is_empty()) && idle == 0 {
        return error_resp(503, "no slot available");
    }
    json_ok(&Value::Array(arr))
}

fn metrics(shared: &Shared) -> Resp {
    let p = shared.process();
    let processing = p.slots.iter().filter(|s| lock(&s.state).processing).count();
    let lines = [
        (
            "llamacpp:prompt_tokens_total",
            "counter",
            "Number of prompt tokens processed.",
            p.prompt_tokens_total.load(Ordering::SeqCst),
        ),
        (
            "llamacpp:tokens_predicted_total",
            "counter",
            "Number of generation tokens processed.",
            p.predicted_tokens_total.load(Ordering::SeqCst),
        ),
        (
            "llamacpp:prompt_tokens_cached_total",
            "counter",
            "Number of prompt tokens reused from the cache.",
            p.cached_tokens_total.load(Ordering::SeqCst),
        ),
        (
            "llamacpp:requests_processing",
            "gauge",
            "Number of requests processing.",
            processing as u64,
        ),
        (
            "llamacpp:requests_deferred",
            "gauge",
            "Number of requests deferred.",
            p.deferred.load(Ordering::SeqCst) as u64,
        ),
    ];
    let mut s = String::new();
    for (name, typ, help, v) in lines {
        s.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {typ}\n{name} {v}\n"
        ));
    }
    let mut r = full(StatusCode::OK, "text/plain; version=0.0.4", s);
    r.headers_mut().insert(
        "process-start-time-unix",
        HeaderValue::from_static("1700000000"),
    );
    r
}

fn post_tokenize(body: &[u8]) -> Resp {
    let v = match parse_json(body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let Some(content) = v.get("content") else {
        return json_ok(&json!({ "tokens": [] }));
    };
    let add_special = v
        .get("add_special")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let with_pieces = v
        .get("with_pieces")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let Some(tokens) = tokens_of(content, add_special) else {
        return error_resp(
            400,
            "content must be a string or an array of strings and tokens",
        );
    };
    if with_pieces {
        let pieces: Vec<Value> = tokens
            .iter()
            .map(|&t| {
                let p = token_piece(t);
                let piece = match String::from_utf8(p.clone()) {
                    Ok(s) => json!(s),
                    Err(_) => json!(p),
                };
                json!({ "id": t, "piece": piece })
            })
            .collect();
        return json_ok(&json!({ "tokens": pieces }));
    }
    json_ok(&json!({ "tokens": tokens }))
}

fn post_detokenize(body: &[u8]) -> Resp {
    let v = match parse_json(body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let tokens: Vec<i32> = match v.get("tokens") {
        None => Vec::new(),
        Some(t) => match serde_json::from_value(t.clone()) {
            Ok(t) => t,
            Err(e) => return error_resp(400, format!("[json.exception.type_error] {e}")),
        },
    };
    json_ok(&json!({ "content": detokenize(&tokens) }))
}

fn echo(method: &Method, path: &str, query: Option<&str>, body: &[u8]) -> Resp {
    let v = json!({
        "method": method.as_str(),
        "path": path,
        "query": query,
        "body_len": body.len(),
        "body": String::from_utf8_lossy(body),
    });
    let mut r = json_ok(&v);
    r.headers_mut()
        .insert("x-fake", HeaderValue::from_static("1"));
    r
}

fn stream_raw(query: Option<&str>, active: ActiveGuard) -> Resp {
    let n: usize = query_param(query, "chunks")
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let delay = Duration::from_millis(
        query_param(query, "delay_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let _active = active;
        for i in 0..n {
            if i > 0 {
                tokio::time::sleep(delay).await;
            }
            if tx.send(Ok(raw_chunk(i))).await.is_err() {
                return;
            }
        }
    });
    let mut r = Response::new(FakeBody::Channel(rx));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r.headers_mut()
        .insert("x-fake", HeaderValue::from_static("1"));
    r
}
