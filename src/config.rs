//! Configuration: command-line flags, their environment variables, and an
//! optional TOML file, merged in that order of precedence (flag > env > file >
//! default), then validated. A bad value yields one [`ConfigError`] line naming
//! it; `main` exits with code 64 (EX_USAGE).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use hyper::http::uri::Authority;
use hyper::Uri;
use serde::Deserialize;

use crate::http::conn::ConnLimits;

/// Command-line interface. Every flag has an environment variable.
#[derive(Debug, Clone, Default, Parser)]
#[command(name = "kvgate", version, about = "Persistent, per-character KV cache for llama.cpp's llama-server", long_about = None)]
pub struct Cli {
    /// Front port that clients (SillyTavern) use instead of llama-server;
    /// several addresses separated by commas serve the same port (as
    /// llama-server's `--host 127.0.0.1,::1`).
    #[arg(long, env = "KVGATE_LISTEN", value_name = "ADDR[,ADDR…]")]
    pub listen: Option<String>,
    /// llama-server's base URL; repeat the flag (or separate URLs with
    /// commas) for several upstreams.
    #[arg(
        long,
        env = "KVGATE_UPSTREAM",
        value_name = "URL",
        value_delimiter = ','
    )]
    pub upstream: Vec<String>,
    /// Admin side port.
    #[arg(long, env = "KVGATE_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// llama-server's --slot-save-path (also KV_SAVE_DIR, as the seed plugin).
    #[arg(long, env = "KVGATE_SAVE_DIR", value_name = "DIR")]
    pub save_dir: Option<PathBuf>,
    /// Identity policy: a built-in name (sillytavern, generic) or a TOML file.
    #[arg(long, env = "KVGATE_POLICY", value_name = "NAME|FILE")]
    pub policy: Option<String>,
    /// TOML configuration file (keys as the long flags, with underscores).
    #[arg(long, env = "KVGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Largest completion body kvgate reads (bytes).
    #[arg(long, env = "KVGATE_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<u64>,
    /// Completion bodies held in memory at once, all requests together
    /// (bytes); a body that doesn't fit gets 503.
    #[arg(long, env = "KVGATE_MAX_BODY_BYTES_IN_FLIGHT", value_name = "BYTES")]
    pub max_body_bytes_in_flight: Option<u64>,
    /// Longest time a request head may take, from its first byte (seconds,
    /// both ports).
    #[arg(long, env = "KVGATE_HEADER_READ_TIMEOUT", value_name = "SECS")]
    pub header_read_timeout: Option<f64>,
    /// Longest idle time of a keep-alive connection between requests
    /// (seconds, both ports; a response still streaming is not idle).
    #[arg(long, env = "KVGATE_IDLE_TIMEOUT", value_name = "SECS")]
    pub idle_timeout: Option<f64>,
    /// Front-port connections served at once; more wait to be accepted.
    #[arg(long, env = "KVGATE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Admin-port connections served at once; more wait to be accepted.
    #[arg(long, env = "KVGATE_ADMIN_MAX_CONNECTIONS", value_name = "N")]
    pub admin_max_connections: Option<usize>,
    /// How many requests may wait for a slot before 503.
    #[arg(long, env = "KVGATE_MAX_QUEUE", value_name = "N")]
    pub max_queue: Option<usize>,
    /// How many of one client's requests may wait for a slot, with a clients
    /// file (default: a quarter of --max-queue, at least 1).
    #[arg(long, env = "KVGATE_MAX_QUEUE_PER_CLIENT", value_name = "N")]
    pub max_queue_per_client: Option<usize>,
    /// Longest wait for a slot before 503 (seconds).
    #[arg(long, env = "KVGATE_QUEUE_TIMEOUT", value_name = "SECS")]
    pub queue_timeout: Option<f64>,
    /// Longest wait for llama-server's response headers (it sends them once the
    /// prompt is processed), in seconds.
    #[arg(long, env = "KVGATE_UPSTREAM_TIMEOUT", value_name = "SECS")]
    pub upstream_timeout: Option<f64>,
    /// Rely on llama-server's RAM prompt cache (`--cache-ram`, on by default
    /// there) to bring back a character whose slot another one took, instead
    /// of restoring it from disk. kvgate stops relying on it by itself after
    /// a miss, until llama-server restarts.
    #[arg(long, env = "KVGATE_RAM_CACHE", value_name = "BOOL")]
    pub ram_cache: Option<bool>,
    /// Longest silence inside a streamed answer before kvgate ends it with an
    /// error event (seconds).
    #[arg(long, env = "KVGATE_STREAM_IDLE_TIMEOUT", value_name = "SECS")]
    pub stream_idle_timeout: Option<f64>,
    /// How often llama-server's health and slots are polled (seconds).
    #[arg(long, env = "KVGATE_HEALTH_INTERVAL", value_name = "SECS")]
    pub health_interval: Option<f64>,
    /// Autosave after every `save_every` messages (true/false).
    #[arg(long, env = "KVGATE_AUTOSAVE", value_name = "BOOL")]
    pub autosave: Option<bool>,
    /// Messages per character between autosaves.
    #[arg(long, env = "KVGATE_SAVE_EVERY", value_name = "N")]
    pub save_every: Option<u32>,
    /// Autosaves kept per chat and character (tagged saves are never rotated).
    #[arg(long, env = "KVGATE_MAX_FILES", value_name = "N")]
    pub max_files: Option<u32>,
    /// Save and release a client's slots when it moves to another chat.
    #[arg(long, env = "KVGATE_CLEAR_ON_CHAT_CHANGE", value_name = "BOOL")]
    pub clear_on_chat_change: Option<bool>,
    /// Reject saves smaller than this many bytes (0: off).
    #[arg(long, env = "KVGATE_MIN_SAVE_BYTES", value_name = "BYTES")]
    pub min_save_bytes: Option<u64>,
    /// Save characters' unsaved messages once llama-server has been idle
    /// this many seconds (0: off).
    #[arg(long, env = "KVGATE_IDLE_SAVE", value_name = "SECS")]
    pub idle_save: Option<u64>,
    /// While a group chat's character generates, extend the cache of the
    /// character likely to speak next with what was said since it last
    /// spoke.
    #[arg(long, env = "KVGATE_PREFILL_AHEAD", value_name = "BOOL")]
    pub prefill_ahead: Option<bool>,
    /// On shutdown, how long in-flight streams may take to finish (seconds).
    #[arg(long, env = "KVGATE_SHUTDOWN_GRACE", value_name = "SECS")]
    pub shutdown_grace: Option<f64>,
    /// Seconds a group preload may spend on one character.
    #[arg(long, env = "KVGATE_PRELOAD_TIMEOUT", value_name = "SECS")]
    pub preload_timeout: Option<u64>,
    /// Key the admin port requires (`X-Admin-Key` or `Authorization: Bearer`).
    #[arg(
        long,
        env = "KVGATE_ADMIN_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub admin_key: Option<String>,
    /// File holding the admin key (first line).
    #[arg(long, env = "KVGATE_ADMIN_KEY_FILE", value_name = "FILE")]
    pub admin_key_file: Option<PathBuf>,
    /// Another name the admin port answers as (`Host`), besides its bound
    /// address and the loopback names; `NAME` (any port) or `NAME:PORT`.
    /// Repeat the flag (or separate names with commas).
    #[arg(
        long,
        env = "KVGATE_ADMIN_HOST",
        value_name = "NAME[:PORT]",
        value_delimiter = ','
    )]
    pub admin_host: Vec<String>,
    /// A web origin (`scheme://host[:port]`, exact, never `*`) whose pages
    /// may call the admin port (CORS); the port's own origin always may.
    /// Repeat the flag (or separate origins with commas).
    #[arg(
        long,
        env = "KVGATE_ADMIN_CORS_ORIGIN",
        value_name = "ORIGIN",
        value_delimiter = ','
    )]
    pub admin_cors_origin: Vec<String>,
    /// Clients file (TOML `[[client]]` with id, key, trusted): when given,
    /// front-port requests need a known, trusted key.
    #[arg(long, env = "KVGATE_CLIENTS", value_name = "FILE")]
    pub clients: Option<PathBuf>,
    /// Key kvgate sends to llama-server (its `--api-key`).
    #[arg(
        long,
        env = "KVGATE_UPSTREAM_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub upstream_api_key: Option<String>,
    /// Run llama-server with this GGUF model (kvgate supervises it; any
    /// --upstream is used beside it).
    #[arg(long, env = "KVGATE_MODEL", value_name = "PATH.gguf")]
    pub model: Option<PathBuf>,
    /// Slots of the supervised llama-server (`-np`).
    #[arg(long, env = "KVGATE_SLOTS", value_name = "N")]
    pub slots: Option<u32>,
    /// Context per slot of the supervised llama-server.
    #[arg(long, env = "KVGATE_CTX", value_name = "TOKENS")]
    pub ctx: Option<u32>,
    /// The llama-server binary for --model and the instances API (else
    /// LLAMA_SERVER, PATH, or the build cached by
    /// scripts/build-llama-server.sh).
    #[arg(long, env = "LLAMA_SERVER", value_name = "PATH")]
    pub llama_server: Option<PathBuf>,
    /// Log filter (tracing's EnvFilter syntax), e.g. `info,kvgate=debug`.
    #[arg(long, env = "KVGATE_LOG", value_name = "FILTER")]
    pub log: Option<String>,
    /// Extra llama-server arguments, after `--`.
    #[arg(last = true, value_name = "LLAMA-SERVER ARGS")]
    pub llama_args: Vec<String>,
}

/// The same settings as a TOML file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    listen: Option<String>,
    upstream: Option<OneOrMany>,
    admin_listen: Option<String>,
    save_dir: Option<PathBuf>,
    policy: Option<String>,
    max_body_bytes: Option<u64>,
    max_body_bytes_in_flight: Option<u64>,
    header_read_timeout: Option<f64>,
    idle_timeout: Option<f64>,
    max_connections: Option<usize>,
    admin_max_connections: Option<usize>,
    max_queue: Option<usize>,
    max_queue_per_client: Option<usize>,
    queue_timeout: Option<f64>,
    upstream_timeout: Option<f64>,
    ram_cache: Option<bool>,
    stream_idle_timeout: Option<f64>,
    health_interval: Option<f64>,
    autosave: Option<bool>,
    save_every: Option<u32>,
    max_files: Option<u32>,
    clear_on_chat_change: Option<bool>,
    min_save_bytes: Option<u64>,
    idle_save: Option<u64>,
    prefill_ahead: Option<bool>,
    shutdown_grace: Option<f64>,
    preload_timeout: Option<u64>,
    admin_key: Option<String>,
    admin_key_file: Option<PathBuf>,
    admin_host: Option<OneOrMany>,
    admin_cors_origin: Option<OneOrMany>,
    clients: Option<PathBuf>,
    upstream_api_key: Option<String>,
    llama_server: Option<PathBuf>,
    log: Option<String>,
}

/// Where llama-server is expected when no upstream is configured.
pub const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:8081";

/// Cache policy knobs the seed extension exposed, plus kvgate's own.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSettings {
    /// Autosave enabled.
    pub autosave: bool,
    /// Messages between autosaves.
    pub save_every: u32,
    /// Autosaves kept per (chat, character).
    pub max_files: u32,
    /// Save and release a client's slots on a chat switch.
    pub clear_on_chat_change: bool,
    /// Saves below this size are treated as failed (0 = off).
    pub min_save_bytes: u64,
    /// Seconds a preload may spend on one character.
    pub preload_timeout_s: u64,
    /// Seconds llama-server must be idle before kvgate saves the slots
    /// with unsaved messages (0: off).
    pub idle_save_s: u64,
    /// Extend the predicted next speaker's cache while another character
    /// generates (`fleet::ahead`).
    pub prefill_ahead: bool,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            autosave: true,
            save_every: 5,
            max_files: 10,
            clear_on_chat_change: true,
            min_save_bytes: 0,
            preload_timeout_s: 20 * 60,
            idle_save_s: 2,
            prefill_ahead: true,
        }
    }
}

/// A TOML value that may be one string or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The validated configuration kvgate runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Front port address.
    pub listen: SocketAddr,
    /// Further addresses of the front port (`--listen a,b`: `b` here).
    pub also_listen: Vec<SocketAddr>,
    /// llama-server base URLs (scheme, authority, optional path prefix),
    /// each an upstream with its own slot table. Empty when `--model` is the
    /// only upstream.
    pub upstreams: Vec<Uri>,
    /// Admin port address.
    pub admin_listen: SocketAddr,
    /// Where slot files live (llama-server's --slot-save-path).
    pub save_dir: Option<PathBuf>,
    /// Identity policy name or path.
    pub policy: String,
    /// Body limit for intercepted completions.
    pub max_body_bytes: u64,
    /// Bytes of completion bodies held at once, all requests together.
    pub max_body_bytes_in_flight: u64,
    /// Longest time a request head may take, from its first byte.
    pub header_read_timeout: Duration,
    /// Longest idle time of a connection between requests.
    pub idle_timeout: Duration,
    /// Front-port connections served at once.
    pub max_connections: usize,
    /// Admin-port connections served at once.
    pub admin_max_connections: usize,
    /// Wait-queue bound.
    pub max_queue: usize,
    /// Wait-queue bound per client of the clients file.
    pub max_queue_per_client: usize,
    /// Wait-queue timeout.
    pub queue_timeout: Duration,
    /// Upstream response-header timeout.
    pub upstream_timeout: Duration,
    /// Whether to rely on llama-server's RAM prompt cache.
    pub ram_cache: bool,
    /// Longest silence inside a streamed answer.
    pub stream_idle_timeout: Duration,
    /// Upstream polling interval.
    pub health_interval: Duration,
    /// Cache policy knobs.
    pub cache: CacheSettings,
    /// Drain bound at shutdown.
    pub shutdown_grace: Duration,
    /// Admin key, when the admin port requires one (trimmed, never empty).
    pub admin_key: Option<String>,
    /// Extra `Host` names the admin port answers (`name` or `name:port`,
    /// lowercase).
    pub admin_hosts: Vec<String>,
    /// Origins whose pages may call the admin port (normalized as browsers
    /// send them).
    pub admin_cors_origins: Vec<String>,
    /// Front-port clients file.
    pub clients: Option<PathBuf>,
    /// Key kvgate sends to llama-server.
    pub upstream_api_key: Option<String>,
    /// llama-server to supervise (`--model`), beside any `upstreams`.
    pub supervised: Option<Supervised>,
    /// The llama-server binary for `--model` and the instances API, when
    /// given explicitly.
    pub llama_server: Option<PathBuf>,
    /// Log filter.
    pub log: String,
}

/// The llama-server kvgate runs itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Supervised {
    /// The GGUF model.
    pub model: PathBuf,
    /// Slots (`-np`).
    pub slots: u32,
    /// Context per slot.
    pub ctx: u32,
    /// Extra arguments.
    pub args: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".parse().expect("constant address"),
            also_listen: Vec::new(),
            upstreams: vec![Uri::from_static(DEFAULT_UPSTREAM)],
            admin_listen: "127.0.0.1:8090".parse().expect("constant address"),
            save_dir: None,
            policy: "sillytavern".into(),
            max_body_bytes: 64 * 1024 * 1024,
            max_body_bytes_in_flight: 256 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            max_connections: 512,
            admin_max_connections: 64,
            max_queue: 64,
            max_queue_per_client: 16,
            queue_timeout: Duration::from_secs(300),
            upstream_timeout: Duration::from_secs(600),
            ram_cache: true,
            health_interval: Duration::from_secs(2),
            stream_idle_timeout: Duration::from_secs(300),
            cache: CacheSettings::default(),
            shutdown_grace: Duration::from_secs(30),
            admin_key: None,
            admin_hosts: Vec::new(),
            admin_cors_origins: Vec::new(),
            clients: None,
            upstream_api_key: None,
            supervised: None,
            llama_server: None,
            log: "info".into(),
        }
    }
}

/// A setting that can't be used; the message names it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value failed to parse or is out of range.
    #[error("invalid {name} {value:?}: {reason}")]
    Invalid {
        /// Flag / key name.
        name: &'static str,
        /// The offending value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// The config file can't be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown keys.
    #[error("config file {path}: {message}")]
    Parse {
        /// Its path.
        path: PathBuf,
        /// The parser's complaint (first line).
        message: String,
    },
}

fn invalid(name: &'static str, value: impl ToString, reason: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        name,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// A duration flag: a positive number of seconds, else `default`.
fn secs(name: &'static str, v: Option<f64>, default: Duration) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(Duration::from_secs_f64(s)),
        Some(s) => Err(invalid(name, s, "must be a positive number of seconds")),
    }
}

/// An address flag: `IP:PORT`, else `default`.
fn addr(
    name: &'static str,
    v: Option<String>,
    default: SocketAddr,
) -> Result<SocketAddr, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => s
            .parse()
            .map_err(|_| invalid(name, &s, "expected IP:PORT, e.g. 127.0.0.1:8080")),
    }
}

/// One address or several separated by commas: the first and the rest.
fn addrs(
    name: &'static str,
    v: Option<String>,
    default: SocketAddr,
) -> Result<(SocketAddr, Vec<SocketAddr>), ConfigError> {
    let Some(s) = v else {
        return Ok((default, Vec::new()));
    };
    let mut all = Vec::new();
    for part in s.split(',').map(str::trim) {
        let a = addr(name, Some(part.to_string()), default)?;
        if all.contains(&a) {
            return Err(invalid(name, &s, "an address given twice"));
        }
        all.push(a);
    }
    let first = all.remove(0);
    Ok((first, all))
}

/// The llama-server `--model` asks kvgate to run, checked.
fn supervised(cli: &Cli) -> Result<Option<Supervised>, ConfigError> {
    let Some(m) = &cli.model else {
        return Ok(None);
    };
    if !m.is_file() {
        return Err(invalid("--model", m.display(), "no such model file"));
    }
    let s = Supervised {
        model: m.clone(),
        slots: cli.slots.unwrap_or(2),
        ctx: cli.ctx.unwrap_or(4096),
        args: cli.llama_args.clone(),
    };
    if s.slots == 0 || s.slots > 256 {
        return Err(invalid("--slots", s.slots, "must be 1..=256"));
    }
    if s.ctx < 256 {
        return Err(invalid("--ctx", s.ctx, "must be at least 256 tokens"));
    }
    Ok(Some(s))
}

/// The upstreams the flags (else the file) name; `None` for the default
/// when none is named and there is no `--model` (kvgate then expects
/// llama-server at its usual place; `--model` alone is an upstream of its
/// own).
fn upstreams(
    flags: &[String],
    file: &Option<OneOrMany>,
    supervised: bool,
) -> Result<Option<Vec<Uri>>, ConfigError> {
    let urls: Vec<String> = match (flags, file) {
        ([_, ..], _) => flags.to_vec(),
        ([], None) => Vec::new(),
        ([], Some(OneOrMany::One(u))) => vec![u.clone()],
        ([], Some(OneOrMany::Many(us))) => us.clone(),
    };
    let parsed = urls
        .iter()
        .map(|u| parse_upstream(u.trim()))
        .collect::<Result<Vec<Uri>, _>>()?;
    Ok(if parsed.is_empty() && !supervised {
        None
    } else {
        Some(parsed)
    })
}

/// A list setting: the flags' values, else the file's.
fn list(flags: Vec<String>, file: Option<OneOrMany>) -> Vec<String> {
    match (flags.is_empty(), file) {
        (false, _) | (true, None) => flags,
        (true, Some(OneOrMany::One(v))) => vec![v],
        (true, Some(OneOrMany::Many(vs))) => vs,
    }
}

/// `--admin-host` values: `name` or `name:port`, lowercase.
fn admin_hosts(values: Vec<String>) -> Result<Vec<String>, ConfigError> {
    values
        .iter()
        .map(|raw| match split_host(raw.trim()) {
            Some((name, Some(port))) => Ok(format!("{name}:{port}")),
            Some((name, None)) => Ok(name),
            None => Err(invalid(
                "--admin-host",
                raw,
                "expected a host name with an optional port, e.g. kvgate.lan or kvgate.lan:8090",
            )),
        })
        .collect()
}

/// `--admin-cors-origin` values, as browsers send origins.
fn cors_origins(values: Vec<String>) -> Result<Vec<String>, ConfigError> {
    values
        .iter()
        .map(|raw| {
            normalize_origin(raw).ok_or_else(|| {
                invalid(
                    "--admin-cors-origin",
                    raw,
                    "expected an exact origin, scheme://host[:port] (no path, no *), \
                     e.g. http://192.168.1.20:8000",
                )
            })
        })
        .collect()
}

/// The admin key from a flag, the environment or the file, trimmed: a key
/// with stray spaces could never match, since presented keys are trimmed.
fn trimmed_key(key: String) -> Result<String, ConfigError> {
    let key = key.trim();
    if key.is_empty() {
        return Err(invalid("--admin-key", "", "must not be empty"));
    }
    Ok(key.to_string())
}

/// A host and optional port from `Host` or `--admin-host` (`name`,
/// `name:port`, `[v6]:port`), the name lowercase; `None` when malformed.
pub(crate) fn split_host(raw: &str) -> Option<(String, Option<u16>)> {
    // `Authority` also takes `user@host`, which is no Host.
    if raw.is_empty() || raw.contains(['@', '/', '*']) {
        return None;
    }
    let a: Authority = raw.parse().ok()?;
    Some((a.host().to_ascii_lowercase(), a.port_u16()))
}

/// An `--admin-cors-origin` value as browsers serialize origins:
/// `scheme://host[:port]`, lowercase, without a default port; `None` when it
/// is not one (a path, a query, `*`, `null`).
pub(crate) fn normalize_origin(raw: &str) -> Option<String> {
    let trimmed = raw.trim().trim_end_matches('/');
    let (scheme, rest) = trimmed.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let (host, port) = split_host(rest)?;
    Some(match port {
        Some(p) if p != default_port => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// The cache settings: flag, else file, else default, each.
fn cache_settings(cli: &Cli, file: &FileConfig, d: &CacheSettings) -> CacheSettings {
    CacheSettings {
        autosave: cli.autosave.or(file.autosave).unwrap_or(d.autosave),
        save_every: cli.save_every.or(file.save_every).unwrap_or(d.save_every),
        max_files: cli.max_files.or(file.max_files).unwrap_or(d.max_files),
        clear_on_chat_change: cli
            .clear_on_chat_change
            .or(file.clear_on_chat_change)
            .unwrap_or(d.clear_on_chat_change),
        min_save_bytes: cli
            .min_save_bytes
            .or(file.min_save_bytes)
            .unwrap_or(d.min_save_bytes),
        preload_timeout_s: cli
            .preload_timeout
            .or(file.preload_timeout)
            .unwrap_or(d.preload_timeout_s),
        idle_save_s: cli.idle_save.or(file.idle_save).unwrap_or(d.idle_save_s),
        prefill_ahead: cli
            .prefill_ahead
            .or(file.prefill_ahead)
            .unwrap_or(d.prefill_ahead),
    }
}

// === impl Config ===

impl Config {
    /// Merges flags (with their env vars, as clap read them), `KV_SAVE_DIR`
    /// (`kv_save_dir`), the config file, and defaults; then validates.
    pub fn from_cli(cli: Cli, kv_save_dir: Option<PathBuf>) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let d = Config::default();
        let supervised = supervised(&cli)?;
        let upstreams = upstreams(&cli.upstream, &file.upstream, supervised.is_some())?;
        let cache = cache_settings(&cli, &file, &d.cache);
        let admin_key = match (
            cli.admin_key.or(file.admin_key),
            cli.admin_key_file.or(file.admin_key_file),
        ) {
            (Some(k), _) => Some(k),
            (None, Some(path)) => Some(read_key_file(&path)?),
            (None, None) => None,
        };
        let max_queue = cli.max_queue.or(file.max_queue).unwrap_or(d.max_queue);
        let (listen, also_listen) = addrs("--listen", cli.listen.or(file.listen), d.listen)?;
        let max_body_bytes = cli
            .max_body_bytes
            .or(file.max_body_bytes)
            .unwrap_or(d.max_body_bytes);
        let cfg = Config {
            listen,
            also_listen,
            upstreams: upstreams.unwrap_or(d.upstreams),
            admin_listen: addr(
                "--admin-listen",
                cli.admin_listen.or(file.admin_listen),
                d.admin_listen,
            )?,
            save_dir: cli.save_dir.or(kv_save_dir).or(file.save_dir),
            policy: cli.policy.or(file.policy).unwrap_or(d.policy),
            max_body_bytes,
            max_body_bytes_in_flight: cli
                .max_body_bytes_in_flight
                .or(file.max_body_bytes_in_flight)
                // Unset, it grows with a larger --max-body-bytes (which
                // would otherwise never fit).
                .unwrap_or(d.max_body_bytes_in_flight.max(max_body_bytes)),
            header_read_timeout: secs(
                "--header-read-timeout",
                cli.header_read_timeout.or(file.header_read_timeout),
                d.header_read_timeout,
            )?,
            idle_timeout: secs(
                "--idle-timeout",
                cli.idle_timeout.or(file.idle_timeout),
                d.idle_timeout,
            )?,
            max_connections: cli
                .max_connections
                .or(file.max_connections)
                .unwrap_or(d.max_connections),
            admin_max_connections: cli
                .admin_max_connections
                .or(file.admin_max_connections)
                .unwrap_or(d.admin_max_connections),
            max_queue,
            max_queue_per_client: cli
                .max_queue_per_client
                .or(file.max_queue_per_client)
                .unwrap_or((max_queue / 4).max(1)),
            queue_timeout: secs(
                "--queue-timeout",
                cli.queue_timeout.or(file.queue_timeout),
                d.queue_timeout,
            )?,
            upstream_timeout: secs(
                "--upstream-timeout",
                cli.upstream_timeout.or(file.upstream_timeout),
                d.upstream_timeout,
            )?,
            ram_cache: cli.ram_cache.or(file.ram_cache).unwrap_or(d.ram_cache),
            stream_idle_timeout: secs(
                "--stream-idle-timeout",
                cli.stream_idle_timeout.or(file.stream_idle_timeout),
                d.stream_idle_timeout,
            )?,
            health_interval: secs(
                "--health-interval",
                cli.health_interval.or(file.health_interval),
                d.health_interval,
            )?,
            cache,
            shutdown_grace: secs(
                "--shutdown-grace",
                cli.shutdown_grace.or(file.shutdown_grace),
                d.shutdown_grace,
            )?,
            admin_key,
            admin_hosts: admin_hosts(list(cli.admin_host, file.admin_host))?,
            admin_cors_origins: cors_origins(list(cli.admin_cors_origin, file.admin_cors_origin))?,
            clients: cli.clients.or(file.clients),
            upstream_api_key: cli.upstream_api_key.or(file.upstream_api_key),
            supervised,
            llama_server: cli.llama_server.or(file.llama_server),
            log: cli.log.or(file.log).unwrap_or(d.log),
        };
        cfg.validate()
    }

    /// Range checks that parsing can't express.
    pub fn validate(mut self) -> Result<Config, ConfigError> {
        if self.max_body_bytes < 1024 {
            return Err(invalid(
                "--max-body-bytes",
                self.max_body_bytes,
                "must be at least 1024",
            ));
        }
        if self.max_body_bytes_in_flight < self.max_body_bytes {
            // Else a body within --max-body-bytes could never be admitted.
            return Err(invalid(
                "--max-body-bytes-in-flight",
                self.max_body_bytes_in_flight,
                "must be at least --max-body-bytes",
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid("--max-connections", 0, "must be at least 1"));
        }
        if self.admin_max_connections == 0 {
            return Err(invalid("--admin-max-connections", 0, "must be at least 1"));
        }
        if self.max_queue_per_client == 0 {
            // Else no known client could ever wait for a slot.
            return Err(invalid("--max-queue-per-client", 0, "must be at least 1"));
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            if self.upstreams[..i].contains(u) {
                // One llama-server counted twice would have each slot
                // handed out twice.
                return Err(invalid("--upstream", u, "given twice"));
            }
        }
        if self.cache.save_every == 0 {
            return Err(invalid("--save-every", 0, "must be at least 1"));
        }
        if self.cache.max_files == 0 {
            return Err(invalid("--max-files", 0, "must be at least 1"));
        }
        if let Some(dir) = &self.save_dir {
            if dir.as_os_str().is_empty() {
                return Err(invalid("--save-dir", "", "must not be empty"));
            }
        }
        if self.cache.preload_timeout_s == 0 {
            return Err(invalid("--preload-timeout", 0, "must be at least 1 second"));
        }
        // Here rather than where the flag is read, so that a key an
        // embedder sets is trimmed too.
        self.admin_key = self.admin_key.map(trimmed_key).transpose()?;
        if self.admin_key.is_none() && !self.admin_listen.ip().is_loopback() {
            return Err(invalid(
                "--admin-listen",
                self.admin_listen,
                "a non-loopback admin port needs an admin key (--admin-key or --admin-key-file)",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log).is_err() {
            return Err(invalid("--log", &self.log, "not a valid log filter"));
        }
        Ok(self)
    }
}

/// The warning for a front port others can reach while no clients file
/// says who may use it: there, any client is trusted with every
/// character's cache and the slot actions.
pub fn open_front_warning(cfg: &Config) -> Option<String> {
    let open = std::iter::once(&cfg.listen)
        .chain(&cfg.also_listen)
        .find(|a| !a.ip().is_loopback());
    let (Some(open), None) = (open, &cfg.clients) else {
        return None;
    };
    Some(format!(
        "the front port {} is reachable from the network and no --clients file is given: \
         any client on the network can use every character's cache and the slot actions \
         (give --clients, or listen on 127.0.0.1)",
        open
    ))
}

impl Config {
    /// The connection bounds of the front port.
    pub fn front_limits(&self) -> ConnLimits {
        ConnLimits {
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections,
        }
    }

    /// The connection bounds of the admin port.
    pub fn admin_limits(&self) -> ConnLimits {
        ConnLimits {
            max_connections: self.admin_max_connections,
            ..self.front_limits()
        }
    }
}

impl FileConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e
                .to_string()
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
                + &e.to_string()
                    .lines()
                    .last()
                    .map(|l| format!(" ({})", l.trim()))
                    .unwrap_or_default(),
        })
    }
}

/// Reads a key file: its first line, trimmed.
fn read_key_file(path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid("--admin-key-file", path.display(), e))?;
    let key = text.lines().next().unwrap_or("").trim().to_string();
    if key.is_empty() {
        return Err(invalid(
            "--admin-key-file",
            path.display(),
            "the file holds no key",
        ));
    }
    Ok(key)
}

/// Parses an upstream base URL: http only (llama-server speaks plain HTTP),
/// with an authority, optionally a path prefix; a trailing `/` is dropped.
pub fn parse_upstream(s: &str) -> Result<Uri, ConfigError> {
    let trimmed = s.trim().trim_end_matches('/');
    let uri: Uri = trimmed
        .parse()
        .map_err(|e| invalid("--upstream", s, format!("not a URL ({e})")))?;
    if uri.scheme_str() != Some("http") {
        return Err(invalid(
            "--upstream",
            s,
            "must start with http:// (llama-server speaks plain HTTP)",
        ));
    }
    if uri.authority().is_none() {
        return Err(invalid(
            "--upstream",
            s,
            "needs a host, e.g. http://127.0.0.1:8081",
        ));
    }
    if uri.query().is_some() {
        return Err(invalid("--upstream", s, "must not have a query"));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut v = vec!["kvgate"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap()
    }

    #[test]
    fn defaults() {
        let c = Config::from_cli(Cli::default(), None).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.upstreams[0].to_string(), "http://127.0.0.1:8081/");
        assert_eq!(c.cache, CacheSettings::default());
        assert_eq!(c.max_body_bytes, 64 << 20);
    }

    #[test]
    fn flags_override_file_and_kv_save_dir_fills_in() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k.toml");
        std::fs::write(
            &f,
            "listen = \"127.0.0.1:9000\"\nsave_every = 3\nupstream = \"http://10.0.0.1:1/\"\n",
        )
        .unwrap();
        let c = Config::from_cli(
            cli(&[
                "--config",
                f.to_str().unwrap(),
                "--upstream",
                "http://127.0.0.1:7000/",
            ]),
            Some("/tmp/kv".into()),
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.cache.save_every, 3);
        assert_eq!(c.upstreams.len(), 1);
        assert_eq!(
            c.upstreams[0].authority().unwrap().as_str(),
            "127.0.0.1:7000"
        );
        assert_eq!(c.save_dir.as_deref(), Some(Path::new("/tmp/kv")));
    }

    #[test]
    fn supervised_llama_server_flags() {
        let model = tempfile::NamedTempFile::new().unwrap();
        let m = model.path().to_str().unwrap();
        let c =
            Config::from_cli(cli(&["--model", m, "--slots", "3", "--", "-t", "2"]), None).unwrap();
        let s = c.supervised.unwrap();
        assert_eq!(
            (s.slots, s.ctx, s.args.clone()),
            (3, 4096, vec!["-t".to_string(), "2".to_string()])
        );
        // --model alone is the only upstream; with --upstream, both are.
        assert!(c.upstreams.is_empty());
        let c = Config::from_cli(
            cli(&["--model", m, "--upstream", "http://127.0.0.1:1"]),
            None,
        )
        .unwrap();
        assert_eq!(c.upstreams.len(), 1);
        let e = Config::from_cli(cli(&["--model", "/nonexistent.gguf"]), None).unwrap_err();
        assert!(e.to_string().contains("no such model"), "{e}");
        let e = Config::from_cli(cli(&["--model", m, "--slots", "0"]), None).unwrap_err();
        assert!(e.to_string().contains("--slots"), "{e}");
    }

    #[test]
    fn upstreams_repeat_in_flags_and_files() {
        let c = Config::from_cli(
            cli(&[
                "--upstream",
                "http://127.0.0.1:1",
                "--upstream",
                "http://127.0.0.1:2,http://127.0.0.1:3/p/",
            ]),
            None,
        )
        .unwrap();
        let got: Vec<String> = c.upstreams.iter().map(|u| u.to_string()).collect();
        assert_eq!(
            got,
            [
                "http://127.0.0.1:1/",
                "http://127.0.0.1:2/",
                "http://127.0.0.1:3/p"
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k.toml");
        std::fs::write(
            &f,
            "upstream = [\"http://127.0.0.1:5\", \"http://127.0.0.1:6\"]\n",
        )
        .unwrap();
        let c = Config::from_cli(cli(&["--config", f.to_str().unwrap()]), None).unwrap();
        assert_eq!(c.upstreams.len(), 2);
        std::fs::write(&f, "upstream = \"http://127.0.0.1:5\"\n").unwrap();
        let c = Config::from_cli(cli(&["--config", f.to_str().unwrap()]), None).unwrap();
        assert_eq!(c.upstreams.len(), 1);
        let c = Config::from_cli(cli(&[]), None).unwrap();
        assert_eq!(c.upstreams[0].to_string(), "http://127.0.0.1:8081/");
        let e = Config::from_cli(
            cli(&["--upstream", "http://127.0.0.1:1,http://127.0.0.1:1/"]),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("given twice"), "{e}");
    }

    #[test]
    fn bad_values_name_themselves() {
        let e = Config::from_cli(cli(&["--listen", "nope"]), None).unwrap_err();
        assert!(e.to_string().contains("--listen"), "{e}");
        let e = Config::from_cli(cli(&["--upstream", "https://x"]), None).unwrap_err();
        assert!(e.to_string().contains("--upstream"), "{e}");
        let e = Config::from_cli(cli(&["--queue-timeout=-1"]), None).unwrap_err();
        assert!(e.to_string().contains("--queue-timeout"), "{e}");
        let e = Config::from_cli(cli(&["--save-every", "0"]), None).unwrap_err();
        assert!(e.to_string().contains("--save-every"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k.toml");
        std::fs::write(&f, "lisen = \"x\"\n").unwrap();
        let e = Config::from_cli(cli(&["--config", f.to_str().unwrap()]), None).unwrap_err();
        assert!(e.to_string().contains("lisen"), "{e}");
    }

    #[test]
    fn admin_hosts_and_cors_origins_repeat_and_normalize() {
        let c = Config::from_cli(
            cli(&[
                "--admin-host",
                "KV.lan",
                "--admin-host",
                "box.lan:9000,[::2]:8090",
                "--admin-cors-origin",
                "http://192.168.1.20:8000/",
                "--admin-cors-origin",
                "HTTPS://st.example:443",
            ]),
            None,
        )
        .unwrap();
        assert_eq!(c.admin_hosts, ["kv.lan", "box.lan:9000", "[::2]:8090"]);
        assert_eq!(
            c.admin_cors_origins,
            ["http://192.168.1.20:8000", "https://st.example"]
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k.toml");
        std::fs::write(
            &f,
            "admin_host = \"kv.lan\"\nadmin_cors_origin = [\"http://a:1\", \"http://b:2\"]\n",
        )
        .unwrap();
        let c = Config::from_cli(cli(&["--config", f.to_str().unwrap()]), None).unwrap();
        assert_eq!(c.admin_hosts, ["kv.lan"]);
        assert_eq!(c.admin_cors_origins, ["http://a:1", "http://b:2"]);
        for (flag, bad) in [
            ("--admin-cors-origin", "*"),
            ("--admin-cors-origin", "null"),
            ("--admin-cors-origin", "st.example"),
            ("--admin-cors-origin", "http://st.example/app"),
            ("--admin-host", "*"),
            ("--admin-host", "http://kv.lan"),
            ("--admin-host", "u@kv.lan"),
        ] {
            let e = Config::from_cli(cli(&[flag, bad]), None).unwrap_err();
            assert!(e.to_string().contains(flag), "{flag} {bad}: {e}");
        }
    }

    #[test]
    fn admin_key_is_trimmed_and_never_empty() {
        let c = Config::from_cli(cli(&["--admin-key", "  s3cret \t"]), None).unwrap();
        assert_eq!(c.admin_key.as_deref(), Some("s3cret"));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k.toml");
        std::fs::write(&f, "admin_key = \" s3cret \"\n").unwrap();
        let c = Config::from_cli(cli(&["--config", f.to_str().unwrap()]), None).unwrap();
        assert_eq!(c.admin_key.as_deref(), Some("s3cret"));
        for blank in ["", "   "] {
            let e = Config::from_cli(cli(&["--admin-key", blank]), None).unwrap_err();
            assert!(e.to_string().contains("--admin-key"), "{e}");
        }
        // An embedder's key is held to the same rule.
        let cfg = Config {
            admin_key: Some(" k ".into()),
            ..Config::default()
        };
        assert_eq!(cfg.validate().unwrap().admin_key.as_deref(), Some("k"));
    }

    #[test]
    fn an_open_front_port_without_clients_is_warned_about() {
        let open = Config::from_cli(cli(&["--listen", "0.0.0.0:8080"]), None).unwrap();
        let w = open_front_warning(&open).expect("a warning");
        assert!(w.contains("any client on the network"), "{w}");
        assert!(w.contains("--clients"), "{w}");
        let lan = Config::from_cli(cli(&["--listen", "192.168.1.5:8080"]), None).unwrap();
        assert!(open_front_warning(&lan).is_some());
        let local = Config::from_cli(cli(&["--listen", "127.0.0.1:8080"]), None).unwrap();
        assert_eq!(open_front_warning(&local), None);
        let v6 = Config::from_cli(cli(&["--listen", "[::1]:8080"]), None).unwrap();
        assert_eq!(open_front_warning(&v6), None);
        let with_clients = Config {
            clients: Some("clients.toml".into()),
            ..open
        };
        assert_eq!(open_front_warning(&with_clients), None);
    }

    #[test]
    fn connection_and_body_bounds() {
        let c = Config::from_cli(Cli::default(), None).unwrap();
        assert_eq!(c.header_read_timeout, Duration::from_secs(30));
        assert_eq!(c.idle_timeout, Duration::from_secs(120));
        assert_eq!((c.max_connections, c.admin_max_connections), (512, 64));
        assert_eq!(c.max_body_bytes_in_flight, 256 << 20);
        let c = Config::from_cli(
            cli(&[
                "--header-read-timeout",
                "2.5",
                "--idle-timeout",
                "7",
                "--max-connections",
                "9",
                "--admin-max-connections",
                "3",
                "--max-body-bytes-in-flight",
                "100000000",
            ]),
            None,
        )
        .unwrap();
        assert_eq!(
            c.front_limits().header_read_timeout,
            Duration::from_millis(2500)
        );
        assert_eq!(c.front_limits().idle_timeout, Duration::from_secs(7));
        assert_eq!(c.front_limits().max_connections, 9);
        assert_eq!(c.admin_limits().max_connections, 3);
        assert_eq!(c.max_body_bytes_in_flight, 100_000_000);
        // A larger body limit raises the default budget with it...
        let c = Config::from_cli(cli(&["--max-body-bytes", "500000000"]), None).unwrap();
        assert_eq!(c.max_body_bytes_in_flight, 500_000_000);
        // ...but a budget set below it is refused.
        for bad in [
            &["--max-body-bytes-in-flight", "1000000"][..],
            &["--max-connections", "0"],
            &["--admin-max-connections", "0"],
            &["--idle-timeout", "0"],
            &["--header-read-timeout=-1"],
        ] {
            let e = Config::from_cli(cli(bad), None).unwrap_err();
            let flag = bad[0].split('=').next().unwrap_or_default();
            assert!(e.to_string().contains(flag), "{e}");
        }
    }
}
