//! The cache effect, measured: scripted traffic replayed three ways against
//! a REAL llama-server in one run:
//!
//! - (a) straight to llama-server `-np 2` with its default RAM prompt cache;
//! - (b) straight to llama-server `-np 2 --cache-ram 0`;
//! - (c) through kvgate (in-process, with a save directory) in front of
//!   llama-server `-np 2` configured as in (a).
//!
//! The traffic, one table per mode (`KVGATE_BENCH_MODES`, default all):
//!
//! - `swap`: a SillyTavern group chat of 6 characters in the default "swap
//!   character cards" mode: each speaker's prompt starts with its own card,
//!   then the shared history, then `\nName:`;
//! - `shared`: the same chat with joined cards and a story string that does
//!   not name the speaker first, so every speaker's prompt is one shared
//!   prefix plus `\nName:`;
//! - `solo`: a 1:1 chat, the user and one character taking turns;
//! - `anonymous`: three conversations of a client that names nobody, behind
//!   one long system prompt.
//!
//! Every way replays byte-identical prompts (the replies appended to the
//! history are scripted, not the model's random output). llama-server is
//! restarted before turn `RESTART_AT`; that turn's time to first token is
//! reported separately. `KVGATE_BENCH_GAP_MS` waits that long before each
//! turn (a user reading and typing), which leaves kvgate idle time. The
//! model is a random-weight llama GGUF written by `kvgate::demo::tiny_model`,
//! large enough that prompt processing dominates.
//!
//! Run: `cargo bench --bench group_chat` (builds the pinned llama-server on
//! first use, like the tests; `LLAMA_SERVER=/path` overrides;
//! `KVGATE_BENCH_TURNS=N` shortens the script).
//!
//! # Last result
//! See the README's Performance section (machine, date, table).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

#[allow(dead_code)]
#[path = "../tests/support/llama.rs"]
mod llama;
#[allow(dead_code)]
#[path = "../tests/support/st_chat.rs"]
mod st_chat;

use llama::{LlamaOpts, LlamaServer};
use st_chat::GroupChat;

/// Characters in the chat.
const CHARACTERS: usize = 6;
/// llama-server slots.
const SLOTS: u32 = 2;
/// Turns by default.
const TURNS: usize = 40;
/// Tokens generated per turn (SillyTavern's recorded requests ask for 100).
const N_PREDICT: u32 = 100;
/// Prompt budget in bytes (= tokens for the byte-level model). Large enough
/// that SillyTavern never trims history in this script: prompts grow from
/// about 2 k to about 4 k tokens, append-only, as in a chat's early life.
/// (Once a chat fills the context, SillyTavern drops the oldest lines every
/// turn and only the card prefix stays reusable, for any cache.)
const CTX_CHARS: usize = 8192;

/// The model: about 25 M parameters, random weights, byte-level vocabulary.
fn model_spec() -> kvgate::demo::tiny_model::TinyModelSpec {
    kvgate::demo::tiny_model::TinyModelSpec {
        n_embd: 512,
        n_layer: 8,
        n_head: 8,
        n_ff: 1536,
        n_ctx_train: 8192,
        seed: 7,
    }
}

/// What traffic a run replays (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Swap,
    Shared,
    Solo,
    Anonymous,
}

impl Mode {
    const ALL: [Mode; 4] = [Mode::Swap, Mode::Shared, Mode::Solo, Mode::Anonymous];

    fn name(self) -> &'static str {
        match self {
            Mode::Swap => "swap",
            Mode::Shared => "shared",
            Mode::Solo => "solo",
            Mode::Anonymous => "anonymous",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Mode::Swap => "group of 6, \"swap character cards\" (SillyTavern's default)",
            Mode::Shared => "group of 6 whose speakers share one prefix (joined cards, story string not naming the speaker first)",
            Mode::Solo => "1:1 chat",
            Mode::Anonymous => "3 conversations naming nobody behind one system prompt",
        }
    }

    /// The modes `KVGATE_BENCH_MODES` (comma-separated) asks for; all by
    /// default.
    fn chosen() -> Vec<Mode> {
        match std::env::var("KVGATE_BENCH_MODES") {
            Ok(list) => list
                .split(',')
                .map(|m| {
                    Mode::ALL
                        .into_iter()
                        .find(|x| x.name() == m.trim())
                        .unwrap_or_else(|| {
                            panic!("unknown mode {m:?} (swap, shared, solo, anonymous)")
                        })
                })
                .collect(),
            Err(_) => Mode::ALL.to_vec(),
        }
    }
}

/// One turn of the script.
#[derive(Clone)]
struct Turn {
    speaker: String,
    body: Value,
}

/// The scripted traffic of `mode`.
fn script(mode: Mode, turns: usize) -> Vec<Turn> {
    match mode {
        Mode::Swap | Mode::Shared => group_script(mode == Mode::Shared, turns),
        Mode::Solo => solo_script(turns),
        Mode::Anonymous => anonymous_script(turns),
    }
}

/// The next pseudo-random pick in `0..n` other than `last`.
fn pick(state: &mut u64, n: usize, last: usize) -> usize {
    loop {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let k = (*state % n as u64) as usize;
        if k != last || n == 1 {
            return k;
        }
    }
}

/// A 1:1 chat: each turn the user says something and the character answers.
fn solo_script(turns: usize) -> Vec<Turn> {
    let mut chat = GroupChat::demo(1);
    chat.ctx_chars = CTX_CHARS;
    let name = chat.names()[0].clone();
    (0..turns)
        .map(|t| {
            chat.push("User", &format!("Tell me about bell {t}, and the boats."));
            let mut body = chat.body_for(&name, true, N_PREDICT);
            body["seed"] = Value::from(1);
            chat.push(
                &name,
                &format!("*{name} nods.* Bell {t}: the boats are in."),
            );
            Turn {
                speaker: name.clone(),
                body,
            }
        })
        .collect()
}

/// Three conversations behind one long system prompt, in no named format:
/// kvgate sees no character.
fn anonymous_script(turns: usize) -> Vec<Turn> {
    let system = "You are the harbour office's assistant. You answer questions about tides, \
                  moorings, fees and the weather, precisely and briefly. "
        .repeat(24);
    let mut conversations = vec![String::new(); 3];
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut last = usize::MAX;
    (0..turns)
        .map(|t| {
            let k = pick(&mut state, conversations.len(), last);
            last = k;
            conversations[k].push_str(&format!(
                "### Question\nWhat about mooring {t} for boat {k}?\n"
            ));
            let body = serde_json::json!({
                "prompt": format!("{system}\n{}### Response\n", conversations[k]),
                "stop": ["\n### Question"],
                "stream": true,
                "n_predict": N_PREDICT,
                "cache_prompt": true,
                "seed": 1,
            });
            conversations[k].push_str(&format!("### Response\nMooring {t} is free until noon.\n"));
            Turn {
                speaker: format!("conv{k}"),
                body,
            }
        })
        .collect()
}

/// The scripted group chat, in SillyTavern's natural order: rounds of a
/// user message, then the members it activates, each once: the one it
/// mentions (every other round) first, then one or two others (their
/// talkativeness, drawn pseudo-randomly). Fixed replies are appended to the
/// shared history.
fn group_script(join: bool, turns: usize) -> Vec<Turn> {
    let mut chat = GroupChat::demo(CHARACTERS);
    chat.ctx_chars = CTX_CHARS;
    chat.join = join;
    let names = chat.names();
    // Short replies: about 50 tokens a turn, like a terse roleplay.
    let line = |i: usize, who: &str| format!("*{who} nods.* Bell {i}: the boats are in.");
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(turns);
    let mut round = 0;
    while out.len() < turns {
        let mut speakers: Vec<usize> = Vec::new();
        let mentioned = (round % 2 == 0).then(|| pick(&mut state, names.len(), usize::MAX));
        let message = match mentioned {
            Some(m) => format!("{}, what do you make of bell {round}?", names[m]),
            None => format!("And bell {round}, anyone?"),
        };
        speakers.extend(mentioned);
        let others = 1 + pick(&mut state, 2, usize::MAX);
        while speakers.len() < mentioned.map_or(0, |_| 1) + others {
            let k = pick(&mut state, names.len(), usize::MAX);
            if !speakers.contains(&k) {
                speakers.push(k);
            }
        }
        chat.push("User", &message);
        for k in speakers {
            if out.len() == turns {
                break;
            }
            let speaker = names[k].clone();
            let mut body = chat.body_for(&speaker, true, N_PREDICT);
            body["seed"] = Value::from(1);
            out.push(Turn {
                speaker: speaker.clone(),
                body,
            });
            chat.push(&speaker, &line(out.len(), &speaker));
        }
        round += 1;
    }
    out
}

/// What one turn measured.
#[derive(Clone, Debug, Default)]
struct Sample {
    ttft: Duration,
    total: Duration,
    prompt_n: u64,
    cache_n: u64,
    prompt_tokens: u64,
    /// llama-server's own time reading the prompt (`timings.prompt_ms`):
    /// TTFT less this is waiting (in kvgate's queue, behind a save or a
    /// restore on llama-server's main loop) and transfer.
    prompt_ms: f64,
    /// Where kvgate took the cache from (`X-Kvgate-Cache`), through kvgate.
    cache_from: String,
}

async fn run_turn(url: &str, body: &Value) -> Sample {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = hyper::Request::post(format!("{url}/completion"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let started = Instant::now();
    let resp = client
        .request(req)
        .await
        .expect("llama-server or kvgate answers");
    assert_eq!(resp.status(), 200, "turn failed");
    let cache_from = resp
        .headers()
        .get("x-kvgate-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut body = resp.into_body();
    let mut ttft = None;
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("stream");
        if let Ok(data) = frame.into_data() {
            if ttft.is_none() && data.windows(5).any(|w| w == b"data:") {
                ttft = Some(started.elapsed());
            }
            buf.extend_from_slice(&data);
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let last: Value = text
        .split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .last()
        .expect("a final event");
    let n = |p: &str| last.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    Sample {
        ttft: ttft.unwrap_or_else(|| started.elapsed()),
        total: started.elapsed(),
        prompt_n: n("/timings/prompt_n"),
        cache_n: n("/timings/cache_n"),
        prompt_tokens: n("/tokens_evaluated"),
        prompt_ms: last
            .pointer("/timings/prompt_ms")
            .and_then(Value::as_f64)
            .unwrap_or(0.0),
        cache_from,
    }
}

/// A way to replay the chat.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    RamCache,
    NoCache,
    Kvgate,
}

impl Way {
    fn label(self) -> &'static str {
        match self {
            Way::RamCache => "(a) llama-server, RAM cache",
            Way::NoCache => "(b) llama-server, --cache-ram 0",
            Way::Kvgate => "(c) through kvgate",
        }
    }
}

struct Outcome {
    samples: Vec<Sample>,
    after_restart: Sample,
    /// What kvgate did by itself (way (c) only).
    work: Option<String>,
}

async fn replay(way: Way, script: &[Turn], restart_at: usize, gap: Duration) -> Option<Outcome> {
    let extra = match way {
        Way::NoCache => vec!["--cache-ram".to_string(), "0".to_string()],
        _ => Vec::new(),
    };
    let mut llama = LlamaServer::start(LlamaOpts {
        slots: SLOTS,
        // Room for the longest prompt (CTX_CHARS bytes = tokens) and its reply.
        ctx_per_slot: (CTX_CHARS as u32) + 512,
        extra_args: extra,
        model: Some(model_path()),
        ..LlamaOpts::default()
    })
    .await?;
    let gateway = if way == Way::Kvgate {
        let cfg = kvgate::config::Config {
            upstreams: vec![kvgate::config::parse_upstream(&llama.base_url).expect("url")],
            health_interval: Duration::from_millis(200),
            save_dir: Some(llama.save_dir.clone()),
            log: "warn".into(),
            ..kvgate::config::Config::default()
        };
        Some(start_kvgate(cfg).await)
    } else {
        None
    };
    let url = gateway
        .as_ref()
        .map(|g| g.0.clone())
        .unwrap_or_else(|| llama.base_url.clone());
    let mut samples = Vec::new();
    let mut after_restart = Sample::default();
    for (i, turn) in script.iter().enumerate() {
        tokio::time::sleep(gap).await;
        if i == restart_at {
            llama.restart().await;
            if let Some((_, app, _)) = &gateway {
                // kvgate notices within a poll or two.
                let noticed = wait_until("kvgate to notice the restart", || {
                    !app.pool.snapshot().iter().any(|s| s.live)
                })
                .await;
                if !noticed {
                    eprintln!("  warning: the turn after the restart may not measure a cold start");
                }
            }
        }
        let s = run_turn(&url, &turn.body).await;
        eprintln!(
            "  {:<32} turn {i:>2} {:<6} prompt {:>5} evaluated {:>5} reused {:>5} ttft {:>8.1} ms (reading {:>7.1} ms) {}",
            way.label(),
            turn.speaker,
            s.prompt_tokens,
            s.prompt_n,
            s.cache_n,
            s.ttft.as_secs_f64() * 1000.0,
            s.prompt_ms,
            s.cache_from,
        );
        if i == restart_at {
            after_restart = s.clone();
        }
        samples.push(s);
    }
    let mut work = None;
    if let Some((_, app, stop)) = gateway {
        let m = &app.shared.metrics;
        let g = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let restores = g(&m.restores).max(1);
        let saves = ["autosave", "eviction", "chat-switch", "shutdown", "idle"]
            .iter()
            .map(|k| m.saves_of(k))
            .sum::<u64>()
            .max(1);
        eprintln!(
            "  kvgate: {} restores, {:.1} ms each; {} saves ({} eviction/save-behind, {} idle), {:.1} ms each, {:.1} MB each",
            g(&m.restores),
            g(&m.restore_micros) as f64 / 1000.0 / restores as f64,
            saves,
            m.saves_of("eviction"),
            m.saves_of("idle"),
            g(&m.save_micros) as f64 / 1000.0 / saves as f64,
            g(&m.save_bytes) as f64 / 1e6 / saves as f64,
        );
        let line = format!(
            "kvgate's own work: {} restores from disk, {} from llama-server's RAM ({} misses); \
             {} prefills ahead reading {} tokens ({} gave way to a turn); next speaker guessed right {} times, wrong {} times",
            g(&m.restores),
            g(&m.ram_hits),
            g(&m.ram_misses),
            g(&m.ahead_prefills),
            g(&m.ahead_tokens),
            g(&m.ahead_yielded),
            g(&m.predictions_hit),
            g(&m.predictions_missed),
        );
        eprintln!("  {line}");
        work = Some(line);
        let _ = stop.send(());
    }
    Some(Outcome {
        samples,
        after_restart,
        work,
    })
}

type Running = (
    String,
    std::sync::Arc<kvgate::upstream::Upstream>,
    tokio::sync::oneshot::Sender<()>,
);

async fn start_kvgate(cfg: kvgate::config::Config) -> Running {
    let gw = kvgate::Gateway::new(cfg).expect("gateway");
    let front = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", front.local_addr().expect("addr"));
    let app = gw.upstream().expect("kvgate has an upstream");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gw.serve(front, admin, async {
        let _ = rx.await;
    }));
    // Saves are keyed by the model fingerprint: wait for the monitor to read
    // it, or the first turns would run without autosave.
    let ready = wait_until("kvgate to read the model", || {
        !app.pool.is_empty() && app.fingerprint.get().is_some()
    })
    .await;
    assert!(ready, "kvgate never saw llama-server's model");
    (url, app, tx)
}

/// Polls `done` for up to ten seconds; says on stderr when it gave up.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        if Instant::now() >= deadline {
            eprintln!("  gave up waiting for {what}");
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

fn model_path() -> std::path::PathBuf {
    let spec = model_spec();
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "kvgate-bench-e{}-l{}-f{}-s{}.gguf",
        spec.n_embd, spec.n_layer, spec.n_ff, spec.seed
    ));
    if !path.exists() {
        kvgate::demo::tiny_model::write_tiny_model(&path, &spec).expect("model");
    }
    path
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let turns = std::env::var("KVGATE_BENCH_TURNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(TURNS)
        .max(4);
    let gap = Duration::from_millis(
        std::env::var("KVGATE_BENCH_GAP_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let restart_from = turns * 3 / 4;
    let modes = Mode::chosen();
    if std::env::var_os("KVGATE_BENCH_DRY").is_some() {
        for mode in modes {
            for (i, t) in script(mode, turns).iter().enumerate() {
                println!(
                    "{:<9} turn {i:>2} {:<6} prompt {} bytes",
                    mode.name(),
                    t.speaker,
                    t.body["prompt"].as_str().map_or(0, str::len)
                );
            }
        }
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        for mode in modes {
            if !bench_mode(mode, turns, restart_from, gap).await {
                return;
            }
        }
    });
}

/// Replays one mode's script the three ways and prints its table; false
/// when llama-server is not available.
async fn bench_mode(mode: Mode, turns: usize, restart_from: usize, gap: Duration) -> bool {
    let script = script(mode, turns);
    // llama-server restarts before the first turn from `restart_from` on
    // whose speaker has spoken before: a restart can only be survived by
    // what was there to save.
    let restart_at = (restart_from..script.len())
        .find(|&i| script[..i].iter().any(|t| t.speaker == script[i].speaker))
        .unwrap_or(restart_from);
    let sizes: Vec<u64> = script
        .iter()
        .map(|t| {
            t.body["prompt"]
                .as_str()
                .map(|p| p.len() as u64)
                .unwrap_or(0)
        })
        .collect();
    eprintln!(
        "group_chat [{}]: {}; {SLOTS} slots, {turns} turns, prompts {}–{} bytes (≈ tokens), \
         {} ms between turns, llama-server restarted before turn {restart_at}; model {} M parameters",
        mode.name(),
        mode.describe(),
        sizes.iter().min().unwrap_or(&0),
        sizes.iter().max().unwrap_or(&0),
        gap.as_millis(),
        model_spec().n_params() / 1_000_000
    );
    let mut results: HashMap<&'static str, Outcome> = HashMap::new();
    let only_kvgate = std::env::var_os("KVGATE_BENCH_ONLY_KVGATE").is_some();
    for way in [Way::RamCache, Way::NoCache, Way::Kvgate] {
        if only_kvgate && way != Way::Kvgate {
            continue;
        }
        match replay(way, &script, restart_at, gap).await {
            Some(o) => {
                results.insert(way.label(), o);
            }
            None => {
                eprintln!("llama-server is not available (set LLAMA_SERVER or run scripts/build-llama-server.sh)");
                return false;
            }
        }
    }
    if only_kvgate {
        return true;
    }
    println!();
    println!("mode `{}`: {}", mode.name(), mode.describe());
    println!();
    println!(
        "| way | median TTFT ms | p90 TTFT ms | median turn ms | prompt tokens evaluated | reused (cache_n) | TTFT after restart ms |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut medians = HashMap::new();
    let mut p90s = HashMap::new();
    let mut restarts = HashMap::new();
    for way in [Way::RamCache, Way::NoCache, Way::Kvgate] {
        let o = &results[way.label()];
        // The restarted turn is reported on its own, not in the medians;
        // the first turns of every character are cold in every way and
        // stay in.
        let warm = |f: fn(&Sample) -> Duration| -> Vec<Duration> {
            o.samples
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != restart_at)
                .map(|(_, s)| f(s))
                .collect()
        };
        let med = percentile(warm(|s| s.ttft), 0.5);
        let p90 = percentile(warm(|s| s.ttft), 0.9);
        let turn = percentile(warm(|s| s.total), 0.5);
        let evaluated: u64 = o.samples.iter().map(|s| s.prompt_n).sum();
        let reused: u64 = o.samples.iter().map(|s| s.cache_n).sum();
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {} | {} | {:.1} |",
            way.label(),
            ms(med),
            ms(p90),
            ms(turn),
            evaluated,
            reused,
            ms(o.after_restart.ttft)
        );
        medians.insert(way.label(), med);
        p90s.insert(way.label(), p90);
        restarts.insert(way.label(), o.after_restart.ttft);
    }
    let (a, b, c) = (
        Way::RamCache.label(),
        Way::NoCache.label(),
        Way::Kvgate.label(),
    );
    let ratio = |m: &HashMap<&str, Duration>, x: &str| m[x].as_secs_f64() / m[c].as_secs_f64();
    println!();
    println!(
        "TTFT (a)/(c): median {:.2}×, p90 {:.2}× (goal ≥ 0.97×); (b)/(c): median {:.1}×; \
         first turn after a restart (a)/(c): {:.1}× (goal ≥ 15×)",
        ratio(&medians, a),
        ratio(&p90s, a),
        ratio(&medians, b),
        ratio(&restarts, a),
    );
    if let Some(work) = &results[c].work {
        println!("{work}");
    }
    println!();
    true
}
