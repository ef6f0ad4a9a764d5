//! `kvgate demo`: shows on a fresh machine, with one command, what kvgate is
//! for, and checks that it works.
//!
//! It writes a small random-weight model ([`tiny_model`]), serves
//! kvgate in-process running llama-server with 2 slots as `kvgate --model`
//! does (instance `main`, see [`crate::instances`]), and replays a scripted SillyTavern group chat of
//! 3 characters through kvgate's front port. With more characters than
//! slots, slots change hands: a character coming back is loaded from
//! llama-server's RAM prompt cache, or brought into a slot ahead of its
//! turn (prefill ahead). Before the last round llama-server restarts, and
//! every character comes back from disk. Each turn prints the
//! speaker, the slot, where its cache came from (the file restored),
//! llama-server's `cache_n` / `prompt_n`, the time to first token and the
//! saves made during the turn; the end prints the shutdown saves and a
//! summary.
//!
//! The demo is also a self-check: it fails unless at least one restore was
//! reused by llama-server (`cache_n > 0`). Nothing is left running on any
//! path: kvgate's shutdown saves, then stops llama-server, and the working directory is removed unless
//! `--keep` names one.

pub mod tiny_model;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::app::App;
use crate::config::Config;
use crate::http::percent::percent_decode;
use crate::http::sse::{Observed, StreamEnd};
use crate::instances::records::MAIN_ID as MAIN;
use crate::instances::spec::InstanceSpec;
use crate::instances::{supervisor, InstanceError, Instances};
use crate::proxy::{H_CACHE, H_CHARACTER, H_RESTORED, H_SLOT};
use crate::store::index::CacheStore;
use crate::store::meta::{SaveKind, SaveMeta};
use crate::upstream::Upstream;
use crate::Gateway;

use tiny_model::{write_tiny_model, TinyModelSpec};

/// llama-server's slots: fewer than the characters, so slots change hands.
const SLOTS: u32 = 2;
/// Context per slot; the longest demo prompt is about 2,300 tokens.
const CTX_PER_SLOT: u32 = 4096;
/// Tokens per reply. The model writes gibberish, so a few are enough to show
/// a complete streamed answer.
const N_PREDICT: u32 = 16;
/// How long llama-server and kvgate get to be ready to serve.
const READY_LIMIT: Duration = Duration::from_secs(30);
/// Upper bound for one turn (request, stream, the saves after it).
const TURN_LIMIT: Duration = Duration::from_secs(120);

/// `kvgate demo`'s command line.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "kvgate demo",
    bin_name = "kvgate demo",
    about = "Replays a scripted SillyTavern group chat (3 characters, 2 slots) through kvgate \
             against a real llama-server running a tiny generated model, and prints per turn \
             the slot, the file restored, cache_n, prompt_n, the time to first token and the \
             saves. Exits 1 unless a restore from disk was reused (cache_n > 0).",
    long_about = None
)]
pub struct DemoCli {
    /// The llama-server binary (else LLAMA_SERVER, PATH, or the build
    /// cached by scripts/build-llama-server.sh).
    // Not clap's `env`: an empty LLAMA_SERVER means unset, as in
    // scripts/build-llama-server.sh, where clap would call it a missing value.
    #[arg(long, value_name = "PATH")]
    pub llama_server: Option<PathBuf>,
    /// Write the model and the saves to DIR (created if missing) and keep
    /// them, instead of a temporary directory removed at the end. A second
    /// run with the same DIR starts from the first run's saves.
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
    /// Only write the demo's tiny random-weight model to PATH (whole or not
    /// at all) and exit: tests and scripts use it as a model that loads
    /// fast. Runs no llama-server.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["llama_server", "keep"])]
    pub write_model: Option<PathBuf>,
    /// Log filter for stderr (tracing's EnvFilter syntax); `info` shows
    /// kvgate's and llama-server's logs.
    #[arg(
        long,
        env = "KVGATE_LOG",
        value_name = "FILTER",
        default_value = "warn"
    )]
    pub log: String,
}

impl DemoCli {
    /// What [`run`] needs of the command line.
    pub fn options(&self) -> Options {
        let from_env = std::env::var_os("LLAMA_SERVER").filter(|v| !v.is_empty());
        Options {
            llama_server: self.llama_server.clone().or(from_env.map(PathBuf::from)),
            keep: self.keep.clone(),
        }
    }
}

/// How to run the demo.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The llama-server binary; found like `--model`'s when `None`.
    pub llama_server: Option<PathBuf>,
    /// Directory to keep the files in; a temporary one when `None`.
    pub keep: Option<PathBuf>,
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// No llama-server binary.
    #[error("llama-server not found{0}: run scripts/build-llama-server.sh (scripts/demo.sh does it for you), or pass --llama-server PATH or set LLAMA_SERVER")]
    NoLlamaServer(String),
    /// llama-server did not start.
    #[error("{0}")]
    LlamaServer(String),
    /// A file or directory could not be written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// kvgate could not be set up or did not become ready.
    #[error("kvgate: {0}")]
    Kvgate(String),
    /// A turn of the chat failed.
    #[error("turn {turn} ({speaker}): {reason}")]
    Turn {
        /// 1-based turn number.
        turn: usize,
        /// Who was to speak.
        speaker: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The self-check: no turn reused a cache restored from disk.
    #[error("no turn reused a cache restored from disk (a restore with cache_n > 0): kvgate's persistence is not working here")]
    NoRestore,
}

/// One turn as the demo saw it.
#[derive(Debug, Clone)]
pub struct TurnReport {
    /// 1-based turn number.
    pub turn: usize,
    /// The speaker.
    pub character: &'static str,
    /// The slot kvgate used (`X-Kvgate-Slot`).
    pub slot: usize,
    /// The file restored before the generation (`X-Kvgate-Restored`).
    pub restored: Option<String>,
    /// Where the cache came from (`X-Kvgate-Cache`: `resident`, `ram`,
    /// `disk`, `none`).
    pub cache: Option<String>,
    /// Prompt tokens llama-server took from the slot's cache.
    pub cache_n: u64,
    /// Prompt tokens llama-server had to read.
    pub prompt_n: u64,
    /// From sending the request to the first streamed event.
    pub first_token: Duration,
    /// Saves that appeared while the turn ran (and its autosave, if any).
    pub saved: Vec<SaveMeta>,
}

/// What the demo did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Every turn, in order.
    pub turns: Vec<TurnReport>,
    /// The saves kvgate made when it shut down.
    pub shutdown_saves: Vec<SaveMeta>,
    /// Where the files were kept (`--keep`).
    pub kept: Option<PathBuf>,
}

// === impl Summary ===

impl Summary {
    /// Turns that restored a file which llama-server then reused.
    pub fn reused_restores(&self) -> impl Iterator<Item = &TurnReport> {
        self.turns
            .iter()
            .filter(|t| t.restored.is_some() && t.cache_n > 0)
    }
}

/// Runs the demo, printing to stdout.
///
/// Dropping the future (Ctrl-C in `main`) leaves llama-server to
/// `kill_on_drop`, which fires when the runtime is dropped.
pub async fn run(opts: Options) -> Result<Summary, DemoError> {
    run_with(opts, &mut std::io::stdout()).await
}

/// Writes the demo's tiny model to `path`, through a temporary file beside
/// it renamed into place, so a reader never sees half a model.
pub fn write_model(path: &Path) -> Result<(), DemoError> {
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".{}.tmp", std::process::id()));
    let temp = PathBuf::from(temp);
    let written =
        write_tiny_model(&temp, &model_spec()).and_then(|()| std::fs::rename(&temp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written.map_err(io(format!("writing {}", path.display())))
}

/// [`run`], printing to `out`.
pub async fn run_with(opts: Options, out: &mut (dyn Write + Send)) -> Result<Summary, DemoError> {
    let binary = find_llama_server(opts.llama_server.as_deref())?;
    let work = Workdir::create(opts.keep.as_deref())?;
    let model = work.path.join("demo-model.gguf");
    let saves = work.path.join("slots");
    std::fs::create_dir_all(&saves).map_err(io(format!("creating {}", saves.display())))?;
    let spec = model_spec();
    let (path, s) = (model.clone(), spec.clone());
    tokio::task::spawn_blocking(move || write_tiny_model(&path, &s))
        .await
        .map_err(|e| DemoError::Io {
            what: "writing the model".into(),
            source: std::io::Error::other(e.to_string()),
        })?
        .map_err(io(format!("writing {}", model.display())))?;

    say(
        out,
        format_args!(
            "kvgate demo: a SillyTavern group chat of {} characters ({}) on {SLOTS} llama-server slots\n\
             model: random weights, {} parameters: it writes gibberish, but its prompts and KV caches are real\n\
             llama-server: {}\n\
             files: {}{}\n",
            CAST.len(),
            CAST.map(|c| c.name).join(", "),
            spec.n_params(),
            binary.display(),
            work.path.display(),
            if work.keep { "" } else { " (removed at the end)" },
        ),
    );
    // kvgate as `kvgate --model` runs it: llama-server is instance `main`,
    // stopped by kvgate's shutdown after its last saves.
    let cfg = Config {
        upstreams: Vec::new(),
        save_dir: Some(saves),
        llama_server: Some(binary),
        ..Config::default()
    };
    let gw = Gateway::new(cfg).map_err(|e| DemoError::Kvgate(e.to_string()))?;
    if let Err(e) = gw.instances().start_main(instance_spec(model)).await {
        gw.instances().shutdown().await;
        return Err(DemoError::LlamaServer(e.to_string()));
    }
    let mut summary = serve_and_play(gw, out).await?;
    summary.kept = work.keep.then(|| work.path.clone());
    print_summary(out, &summary);
    if summary.reused_restores().next().is_none() {
        return Err(DemoError::NoRestore);
    }
    Ok(summary)
}

/// The binary: the explicit one must exist; otherwise as `--model` finds it.
fn find_llama_server(explicit: Option<&Path>) -> Result<PathBuf, DemoError> {
    if let Some(p) = explicit.filter(|p| !p.is_file()) {
        return Err(DemoError::NoLlamaServer(format!(
            " at {} (not a file)",
            p.display()
        )));
    }
    supervisor::find_binary(explicit).map_err(|_| DemoError::NoLlamaServer(String::new()))
}

/// The model: bigger than the test model, so that reading a prompt takes
/// visible time and the first-token column shows what a reused cache saves
/// (2.8M weights, 11 MB), yet written in a moment.
fn model_spec() -> TinyModelSpec {
    TinyModelSpec {
        n_embd: 256,
        n_layer: 4,
        n_head: 4,
        n_ff: 512,
        ..TinyModelSpec::default()
    }
}

/// The llama-server kvgate runs for the demo.
fn instance_spec(model: PathBuf) -> InstanceSpec {
    InstanceSpec {
        model,
        slots: SLOTS,
        ctx: CTX_PER_SLOT,
        port: None,
        // Warm-up only delays the start; the demo measures its own turns.
        args: vec!["--no-warmup".into()],
    }
}

/// Serves kvgate, plays the chat, shuts kvgate down (whatever the chat's
/// outcome: that saves, then stops llama-server) and collects its shutdown
/// saves.
async fn serve_and_play(gw: Gateway, out: &mut (dyn Write + Send)) -> Result<Summary, DemoError> {
    let bind = || async {
        TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| DemoError::Kvgate(format!("cannot bind 127.0.0.1:0: {e}")))
    };
    let (front, admin) = (bind().await?, bind().await?);
    let front_url = match front.local_addr() {
        Ok(a) => format!("http://{a}"),
        Err(e) => return Err(DemoError::Kvgate(e.to_string())),
    };
    // One upstream: instance `main`.
    let upstream = gw
        .upstream()
        .ok_or_else(|| DemoError::Kvgate("no upstream".into()))?;
    let store = upstream
        .shared
        .store
        .clone()
        .ok_or_else(|| DemoError::Kvgate("no save directory".into()))?;
    let restart = Restart {
        app: Arc::clone(gw.app()),
        instances: Arc::clone(gw.instances()),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(gw.serve(front, admin, async {
        let _ = stopped.await;
    }));

    let mut seen = HashSet::new();
    let played = play(upstream, &restart, &front_url, &store, &mut seen, out).await;
    let _ = stop.send(());
    if let Err(e) = served.await {
        return Err(DemoError::Kvgate(format!("its server task failed: {e}")));
    }
    let turns = played?;
    let shutdown_saves = new_saves(&store, &mut seen);
    Ok(Summary {
        turns,
        shutdown_saves,
        kept: None,
    })
}

/// Waits until kvgate knows llama-server's slots and model (saves are keyed
/// by it), then plays every turn and prints it.
async fn play(
    mut upstream: Arc<Upstream>,
    restart: &Restart,
    url: &str,
    store: &CacheStore,
    seen: &mut HashSet<String>,
    out: &mut (dyn Write + Send),
) -> Result<Vec<TurnReport>, DemoError> {
    wait_until_ready(&upstream).await?;
    // Saves of an earlier run in a --keep directory are not this run's.
    new_saves(store, seen);
    print_table_head(out);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut chat = Chat::opened();
    let mut turns = Vec::new();
    for (round, (user_line, replies)) in ROUNDS.iter().enumerate() {
        if round + 1 == ROUNDS.len() {
            upstream = restart.llama_server(out).await?;
            let saved = new_saves(store, seen);
            print_saves(out, &saved);
        }
        chat.push("User", user_line);
        for (card, reply) in CAST.iter().zip(replies) {
            let turn = turns.len() + 1;
            let answer = play_turn(&client, &upstream, url, &chat, card, turn).await?;
            let report = TurnReport {
                turn,
                character: card.name,
                slot: answer.slot,
                restored: answer.restored,
                cache: answer.cache,
                cache_n: answer.cache_n,
                prompt_n: answer.prompt_n,
                first_token: answer.first_token,
                saved: new_saves(store, seen),
            };
            print_turn(out, &report);
            turns.push(report);
            // The model's reply is gibberish: the chat goes on with the
            // script's, as if the user had edited it.
            chat.push(card.name, reply);
        }
        if round + 1 < ROUNDS.len() {
            say(out, format_args!("\n"));
        }
    }
    Ok(turns)
}

/// What the demo needs to restart llama-server (instance `main`).
struct Restart {
    app: Arc<App>,
    instances: Arc<Instances>,
}

impl Restart {
    /// Stops instance `main` (kvgate saves its slots first) and starts it
    /// again: every cache in llama-server, in its slots and in its RAM, is
    /// gone, so each character comes back from disk. Returns the new
    /// upstream once kvgate knows it.
    async fn llama_server(&self, out: &mut (dyn Write + Send)) -> Result<Arc<Upstream>, DemoError> {
        say(
            out,
            format_args!(
                "\nllama-server restarts (instance main is stopped, with its saves, and started): \
                 its slots and its RAM cache are empty, so each character comes back from disk (on its turn, or ahead of it).\n"
            ),
        );
        let failed = |e: InstanceError| DemoError::LlamaServer(e.to_string());
        self.instances.stop(MAIN).await.map_err(failed)?;
        self.instances.start(MAIN).await.map_err(failed)?;
        let upstream = self
            .app
            .upstream(MAIN)
            .ok_or_else(|| DemoError::Kvgate("instance main did not come back".into()))?;
        wait_until_ready(&upstream).await?;
        Ok(upstream)
    }
}

/// Polls until kvgate has learned llama-server's slots and model, or
/// [`READY_LIMIT`] has passed.
async fn wait_until_ready(upstream: &Upstream) -> Result<(), DemoError> {
    let deadline = Instant::now() + READY_LIMIT;
    while upstream.pool.is_empty() || upstream.fingerprint.get().is_none() {
        if Instant::now() > deadline {
            return Err(DemoError::Kvgate(format!(
                "did not learn llama-server's slots and model within {} s",
                READY_LIMIT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Prints what the columns mean, then the head of the turn table.
fn print_table_head(out: &mut (dyn Write + Send)) {
    say(
        out,
        format_args!(
            "\ncache_n: prompt tokens llama-server took from the slot's KV cache; prompt_n: the ones it had to read.\n\
             Indented: the saves kvgate made during the turn.\n\
             cache came from: the slot (it stayed there, or kvgate brought it in and read the new messages while the previous speaker answered), llama-server's RAM cache (another character had taken the slot), or a file restored from disk.\n\
             \n{:>4}  {:<7} {:>4}  {:>7}  {:>8}  {:>9}  cache came from\n",
            "turn", "speaker", "slot", "cache_n", "prompt_n", "1st token"
        ),
    );
}

/// Sends `card`'s request for the chat so far and waits for the stream and
/// the saves it set off; fails unless kvgate took it for `card`.
async fn play_turn(
    client: &Client<HttpConnector, Full<Bytes>>,
    upstream: &Upstream,
    url: &str,
    chat: &Chat,
    card: &Card,
    turn: usize,
) -> Result<Answer, DemoError> {
    let fail = |reason: String| DemoError::Turn {
        turn,
        speaker: card.name,
        reason,
    };
    let body = chat.body_for(card);
    let answer = tokio::time::timeout(TURN_LIMIT, async {
        let answer = complete(client, url, &body).await?;
        // Its after-effects (autosave, background saves) belong
        // to this turn.
        upstream.shared.tasks.wait_idle().await;
        Ok::<_, String>(answer)
    })
    .await
    .map_err(|_| fail(format!("not finished within {} s", TURN_LIMIT.as_secs())))?
    .map_err(fail)?;
    // The point of the demo: kvgate must have recognised the speaker
    // from the SillyTavern-shaped prompt alone.
    if answer.character.as_deref() != Some(card.name) {
        return Err(fail(format!(
            "kvgate took the request for {}, not {}",
            answer.character.as_deref().unwrap_or("no character"),
            card.name
        )));
    }
    Ok(answer)
}

/// What one streamed completion through kvgate showed.
#[derive(Debug)]
struct Answer {
    slot: usize,
    character: Option<String>,
    restored: Option<String>,
    cache: Option<String>,
    cache_n: u64,
    prompt_n: u64,
    first_token: Duration,
}

/// POSTs `body` to kvgate's `/completion` and reads the stream to its end.
async fn complete(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    body: &Value,
) -> Result<Answer, String> {
    let req = Request::post(format!("{url}/completion"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("kvgate did not answer: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        // An error body is small JSON (kvgate's or llama-server's); a part
        // of it is enough for the message.
        let body = resp.into_body().collect().await.map(|b| b.to_bytes());
        let text = body
            .as_deref()
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        return Err(format!("HTTP {status}: {:.300}", text.trim()));
    }
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(percent_decode)
    };
    let slot = header(H_SLOT).and_then(|s| s.parse().ok());
    let character = header(H_CHARACTER);
    let restored = header(H_RESTORED);
    let cache = header(H_CACHE);
    // kvgate's own stream observer reads the final chunk's timings.
    let (body, end) = Observed::new(resp.into_body(), true);
    {
        let mut body = std::pin::pin!(body);
        while let Some(frame) = body.frame().await {
            frame.map_err(|e| format!("the stream broke: {e}"))?;
        }
    }
    let summary = match end.await {
        Ok(StreamEnd::Complete(s)) => s,
        Ok(StreamEnd::UpstreamError(e, _)) => return Err(format!("the stream broke: {e}")),
        Ok(StreamEnd::ClientGone(_)) | Err(_) => {
            return Err("the stream was not read to its end".into())
        }
    };
    if let Some(err) = &summary.error {
        return Err(format!("llama-server: {err}"));
    }
    let slot = slot.ok_or("no X-Kvgate-Slot header")?;
    Ok(Answer {
        slot,
        character,
        restored,
        cache,
        cache_n: summary
            .cache_n()
            .ok_or("no timings.cache_n in the final chunk")?,
        prompt_n: summary
            .prompt_n()
            .ok_or("no timings.prompt_n in the final chunk")?,
        first_token: summary.first_byte.map_or_else(
            || started.elapsed(),
            |t| t.saturating_duration_since(started),
        ),
    })
}

/// Saves in kvgate's index not in `seen`, oldest first; adds them to `seen`.
fn new_saves(store: &CacheStore, seen: &mut HashSet<String>) -> Vec<SaveMeta> {
    let mut fresh: Vec<SaveMeta> = store
        .list()
        .into_iter()
        .filter(|m| !seen.contains(&m.file))
        .collect();
    fresh.sort_by(|a, b| a.created.cmp(&b.created).then(a.file.cmp(&b.file)));
    seen.extend(fresh.iter().map(|m| m.file.clone()));
    fresh
}

fn print_turn(out: &mut (dyn Write + Send), t: &TurnReport) {
    say(
        out,
        format_args!(
            "{:>4}  {:<7} {:>4}  {:>7}  {:>8}  {:>6} ms  {}\n",
            t.turn,
            t.character,
            t.slot,
            t.cache_n,
            t.prompt_n,
            t.first_token.as_millis(),
            came_from(t),
        ),
    );
    print_saves(out, &t.saved);
}

/// The last column of a turn: where its cache came from.
fn came_from(t: &TurnReport) -> &str {
    match (t.restored.as_deref(), t.cache.as_deref()) {
        (Some(file), _) => file,
        (None, Some("resident")) => "the slot",
        (None, Some("ram")) => "llama-server's RAM",
        _ => "-",
    }
}

fn print_saves(out: &mut (dyn Write + Send), saves: &[SaveMeta]) {
    for m in saves {
        say(
            out,
            format_args!(
                "{:>10} {:<7} {:<10} {:>5} tokens  {}\n",
                "saved",
                m.character,
                m.kind.as_str(),
                m.n_tokens,
                m.file
            ),
        );
    }
}

/// Prints the shutdown saves, the restore statistics, the save counts and
/// where the files went.
fn print_summary(out: &mut (dyn Write + Send), s: &Summary) {
    print_shutdown_saves(out, &s.shutdown_saves);
    print_restore_stats(out, s);
    print_save_counts(out, s);
    match &s.kept {
        Some(dir) => say(
            out,
            format_args!("llama-server stopped; files kept in {}\n", dir.display()),
        ),
        None => say(
            out,
            format_args!("llama-server stopped; temporary files removed.\n"),
        ),
    }
}

/// Prints the saves kvgate made as it shut down, or that there were none.
fn print_shutdown_saves(out: &mut (dyn Write + Send), saves: &[SaveMeta]) {
    say(out, format_args!("\nkvgate shut down:\n"));
    if saves.is_empty() {
        say(
            out,
            format_args!("{:>10} nothing: no slot had unsaved messages\n", "saved"),
        );
    }
    print_saves(out, saves);
}

/// Prints what restores saved: cache use after a restore and, when there
/// are both kinds of turn, first-token times against cold first turns.
fn print_restore_stats(out: &mut (dyn Write + Send), s: &Summary) {
    let reused: Vec<&TurnReport> = s.reused_restores().collect();
    let cold = cold_turns(s);
    say(
        out,
        format_args!(
            "\nsummary: {} of {} turns restored a character's cache from disk; after a restore \
             llama-server took {} prompt tokens from the cache (mean cache_n) and read {} (mean prompt_n).\n",
            reused.len(),
            s.turns.len(),
            mean_of(&reused, |t| t.cache_n),
            mean_of(&reused, |t| t.prompt_n),
        ),
    );
    if !reused.is_empty() && !cold.is_empty() {
        say(
            out,
            format_args!(
                "first token: {} ms on average after a restore, {} ms on a first turn without one (mean prompt_n {}).\n",
                mean_of(&reused, |t| millis(t.first_token)),
                mean_of(&cold, |t| millis(t.first_token)),
                mean_of(&cold, |t| t.prompt_n),
            ),
        );
    }
}

/// A character's first turns without a restore: they have no cache of
/// their own (cache_n counts at most the few tokens all prompts share).
fn cold_turns(s: &Summary) -> Vec<&TurnReport> {
    s.turns
        .iter()
        .enumerate()
        .filter(|(i, t)| {
            t.restored.is_none() && !s.turns[..*i].iter().any(|p| p.character == t.character)
        })
        .map(|(_, t)| t)
        .collect()
}

/// The integer mean of `f` over `turns`; 0 for none.
fn mean_of(turns: &[&TurnReport], f: fn(&TurnReport) -> u64) -> u64 {
    if turns.is_empty() {
        0
    } else {
        turns.iter().map(|t| f(t)).sum::<u64>() / turns.len() as u64
    }
}

/// Prints how many saves the whole run made, by kind.
fn print_save_counts(out: &mut (dyn Write + Send), s: &Summary) {
    let all: Vec<&SaveMeta> = s
        .turns
        .iter()
        .flat_map(|t| &t.saved)
        .chain(&s.shutdown_saves)
        .collect();
    let count = |k: SaveKind| all.iter().filter(|m| m.kind == k).count();
    say(
        out,
        format_args!(
            "saves: {} ({} before or ahead of an eviction, {} autosaves, {} at shutdown).\n",
            all.len(),
            count(SaveKind::Eviction),
            count(SaveKind::Autosave),
            count(SaveKind::Shutdown),
        ),
    );
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Writes to the demo's output; a closed stdout (`| head`) must not stop
/// the demo halfway with llama-server running, so errors are ignored.
fn say(out: &mut (dyn Write + Send), args: std::fmt::Arguments<'_>) {
    let _ = out.write_fmt(args);
    let _ = out.flush();
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> DemoError {
    move |source| DemoError::Io { what, source }
}

/// The directory holding the model and the saves: `--keep DIR`, or a fresh
/// temporary one that is removed when this is dropped (on every path out of
/// [`run_with`], after llama-server has been stopped).
#[derive(Debug)]
struct Workdir {
    path: PathBuf,
    keep: bool,
}

// === impl Workdir ===

impl Workdir {
    fn create(keep: Option<&Path>) -> Result<Workdir, DemoError> {
        if let Some(dir) = keep {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
            return Ok(Workdir {
                path: dir.to_path_buf(),
                keep: true,
            });
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("kvgate-demo-{}-{nanos:08x}", std::process::id()));
        // create_dir (not _all) fails on an existing path: never adopt, and
        // later delete, a directory someone else made.
        std::fs::create_dir(&path).map_err(io(format!("creating {}", path.display())))?;
        Ok(Workdir { path, keep: false })
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A character card, as SillyTavern puts it at the top of its prompt.
#[derive(Debug, Clone, Copy)]
struct Card {
    name: &'static str,
    description: &'static str,
    personality: &'static str,
    /// One example exchange: (the user's line, the character's line).
    example: (&'static str, &'static str),
    greeting: &'static str,
}

/// The group, in member order (which is also the turn order).
const CAST: [Card; 3] = [
    Card {
        name: "Mira",
        description: "Mira Castell is the captain of the cargo airship Kestrel, a \
            forty-year-old former mail pilot with a scar across one eyebrow and a brass \
            compass she never puts down. She flies by the stars when the instruments fail, \
            keeps a strict log, and trusts her crew with her life, though she would never \
            say so out loud. She is working off a debt to a shipping guild in Port Anselm.",
        personality: "decisive, dry humor, stubborn, protective, calm under pressure",
        example: (
            "Will we make it over the ridge?",
            "We'll make it. *She taps the compass.* The ridge has never met a pilot this \
             stubborn.",
        ),
        greeting: "*Mira glances up from the chart table.* You're the passenger? Good. \
            Stow your bag, hold the rail, and don't touch anything that hisses.",
    },
    Card {
        name: "Tobin",
        description: "Tobin Reyes is the Kestrel's cook and quartermaster, a round, cheerful \
            man of fifty who ran a harbor tavern until it burned down. He keeps the galley \
            spotless, knows a story for every port, and feeds anyone who looks sad. He plays \
            cards badly and loses cheerfully, and he has a soft spot for stray cats.",
        personality: "warm, talkative, generous, superstitious, a terrible liar",
        example: (
            "What's for dinner?",
            "Fish stew, the Port Anselm way. *He winks.* The secret is not asking what \
             kind of fish.",
        ),
        greeting: "*Tobin pushes a steaming mug across the galley counter.* Drink that \
            first, questions after. Nobody boards my ship hungry.",
    },
    Card {
        name: "Wren",
        description: "Wren Adair is the Kestrel's engineer, a wiry twenty-three-year-old \
            with grease on her goggles and a toolbelt heavier than she is. She talks to the \
            engines as if they were horses, rebuilt the port propeller from scrap, and \
            distrusts anyone who calls the ship 'it'. She reads engineering manuals for fun \
            and secretly writes poetry.",
        personality: "sharp, impatient, inventive, loyal, shy about her poems",
        example: (
            "Is that noise normal?",
            "That's her breathing. *Wren pats a pipe.* When she stops making noise, then \
             you worry.",
        ),
        greeting: "*Wren slides down a ladder from the engine deck, wiping her hands.* \
            Don't lean on the blue pipe. Or the red one. Just stand in the middle.",
    },
];

/// The user's line opening each round, and each member's scripted reply in
/// that round (in member order).
const ROUNDS: [(&str, [&str; 3]); 3] = [
    (
        "Thanks for taking me aboard. How long until we reach Port Anselm?",
        [
            "Two days if the wind holds, three if it doesn't. *Mira rolls up the chart.* \
             Get some sleep while you can.",
            "Long enough for you to try all my soups! *Tobin laughs.* Tonight it's \
             barley and smoked ham.",
            "Depends on whether the starboard engine behaves. *Wren frowns at a gauge.* \
             She's been sulking since the last storm.",
        ],
    ),
    (
        "There's a storm ahead. Should we be worried?",
        [
            "Worried, no. Careful, yes. *Mira takes the wheel.* Everyone clip in, we're \
             going under it.",
            "I'll tie down the pots. *Tobin crosses himself twice.* Storms always come \
             for the soup first.",
            "I'll keep the engines warm. *Wren pulls her goggles down.* If I shout, \
             pull the red lever, not the blue one.",
        ],
    ),
    (
        "We made it through! What now?",
        [
            "Now we log it. *Mira writes in the logbook.* Storm, passed, nobody lost. \
             My favorite kind of entry.",
            "Now we eat, obviously. *Tobin is already ladling stew.* Surviving is \
             hungry work.",
            "Now I fix everything the storm rattled loose. *Wren sighs happily.* Best \
             part of the job.",
        ],
    ),
];

/// The chat so far, and the requests SillyTavern 1.18 makes from it: Text
/// Completion (llama.cpp type), the default context template, a group chat
/// in "swap character cards" mode, streaming.
#[derive(Debug, Default)]
struct Chat {
    /// "Name: text" lines, oldest first.
    history: String,
}

// === impl Chat ===

impl Chat {
    /// A group chat opened as SillyTavern opens one: every member's greeting,
    /// in member order.
    fn opened() -> Chat {
        let mut chat = Chat::default();
        for c in CAST {
            chat.push(c.name, c.greeting);
        }
        chat
    }

    fn push(&mut self, speaker: &str, text: &str) {
        self.history.push_str(&format!("{speaker}: {text}\n"));
    }

    /// Only the speaker's card is in its prompt (swap mode); the chat
    /// history is everyone's; the prompt ends with `\nName:`, which is how
    /// kvgate's SillyTavern policy knows the speaker.
    fn prompt_for(&self, c: &Card) -> String {
        let n = c.name;
        format!(
            "Write {n}'s next reply in a fictional chat between {n} and User.\n\
             {}\n\
             {n}'s personality: {}\n\
             Scenario: A night crossing of the Greyspine mountains aboard the airship Kestrel. \
             User is a passenger who boarded at the last minute.\n\
             ***\n\
             User: {}\n\
             {n}: {}\n\
             ***\n\
             {}{n}:",
            c.description, c.personality, c.example.0, c.example.1, self.history
        )
    }

    /// The stop strings: the user and every other member (which is how
    /// kvgate knows the roster, hence the chat), then the chat separator.
    fn stop_for(c: &Card) -> Vec<String> {
        std::iter::once("\nUser:".to_string())
            .chain(
                CAST.iter()
                    .filter(|o| o.name != c.name)
                    .map(|o| format!("\n{}:", o.name)),
            )
            .chain(std::iter::once("\n***".to_string()))
            .collect()
    }

    /// The `/completion` body: a representative part of SillyTavern's 64
    /// keys, in its several dialects (`n_predict` / `max_tokens` /
    /// `max_new_tokens`, `stop` / `stopping_strings`).
    fn body_for(&self, c: &Card) -> Value {
        let stop = Self::stop_for(c);
        json!({
            "prompt": self.prompt_for(c),
            "max_new_tokens": N_PREDICT,
            "max_tokens": N_PREDICT,
            "temperature": 1,
            "top_p": 0.95,
            "min_p": 0.01,
            "repetition_penalty": 1.1,
            "add_bos_token": true,
            "stopping_strings": stop,
            "stop": stop,
            "truncation_length": CTX_PER_SLOT,
            "skip_special_tokens": true,
            "api_type": "llamacpp",
            "repeat_penalty": 1.1,
            "n_predict": N_PREDICT,
            "num_ctx": CTX_PER_SLOT,
            "cache_prompt": true,
            "stream": true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_shaped_like_sillytavern_group_prompts() {
        let mut chat = Chat::opened();
        chat.push("User", ROUNDS[0].0);
        let tobin = &CAST[1];
        let p = chat.prompt_for(tobin);
        assert!(p.starts_with("Write Tobin's next reply"), "{p}");
        assert!(
            p.ends_with(
                "\nUser: Thanks for taking me aboard. How long until we reach Port Anselm?\nTobin:"
            ),
            "{p}"
        );
        // Only the speaker's card.
        assert!(!p.contains(CAST[0].description) && !p.contains(CAST[2].description));
        assert!(p.is_ascii(), "one token per byte in the demo model");
        assert_eq!(
            Chat::stop_for(tobin),
            ["\nUser:", "\nMira:", "\nWren:", "\n***"]
        );
        let body = chat.body_for(tobin);
        assert_eq!(body["stream"], true);
        assert_eq!(body["stop"], body["stopping_strings"]);
    }

    #[test]
    fn the_longest_prompt_fits_a_slot() {
        let mut chat = Chat::opened();
        for (user, replies) in ROUNDS {
            chat.push("User", user);
            for r in replies {
                chat.push("Someone", r);
            }
        }
        let longest = CAST.iter().map(|c| chat.prompt_for(c).len()).max();
        // One token per byte, plus BOS and the reply.
        assert!(longest.is_some_and(|n| n + 1 + N_PREDICT as usize <= CTX_PER_SLOT as usize));
    }

    #[test]
    fn summary_counts_only_restores_that_were_reused() {
        let turn = |restored: Option<&str>, cache_n| TurnReport {
            turn: 1,
            character: "Mira",
            slot: 0,
            restored: restored.map(String::from),
            cache: None,
            cache_n,
            prompt_n: 10,
            first_token: Duration::from_millis(1),
            saved: Vec::new(),
        };
        let s = Summary {
            turns: vec![
                turn(None, 50),
                turn(Some("f.bin"), 0),
                turn(Some("g.bin"), 7),
            ],
            ..Summary::default()
        };
        let reused: Vec<_> = s.reused_restores().map(|t| t.cache_n).collect();
        assert_eq!(reused, [7]);
    }

    #[test]
    fn a_temporary_workdir_goes_away_and_a_kept_one_stays() {
        let tmp = Workdir::create(None).unwrap();
        let path = tmp.path.clone();
        assert!(path.is_dir());
        drop(tmp);
        assert!(!path.exists());

        let keep = std::env::temp_dir().join(format!("kvgate-demo-keep-{}", std::process::id()));
        drop(Workdir::create(Some(&keep)).unwrap());
        assert!(keep.is_dir());
        let _ = std::fs::remove_dir_all(&keep);
    }
}
