//! Counters and histograms, rendered in the Prometheus text format on the
//! admin port. Updates are atomics or a short map lock, never an `.await`.

use std::collections::BTreeMap;
use std::fmt::{Display, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::sync::Unpoisoned;

/// A histogram with fixed upper bounds (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// A histogram over `bounds` (ascending).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes the family: cumulative buckets, then `+Inf`, sum and count.
    fn render(&self, out: &mut String, family: &Family) {
        family.header(out);
        let name = family.name;
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += load(c);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = load(&self.count);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", seconds(&self.sum_micros));
        let _ = writeln!(out, "{name}_count {count}");
    }
}

const TTFT_BOUNDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
const WAIT_BOUNDS: &[f64] = &[0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0];

/// The `# TYPE` of a metric family.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    /// The word the `# TYPE` line uses.
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family: what its `# HELP` and `# TYPE` lines say.
#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
}

impl Family {
    /// A counter family.
    const fn counter(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind: Kind::Counter,
        }
    }

    /// A gauge family.
    const fn gauge(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind: Kind::Gauge,
        }
    }

    /// A histogram family.
    const fn histogram(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind: Kind::Histogram,
        }
    }

    /// Writes the `# HELP` and `# TYPE` lines.
    fn header(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind.as_str());
    }

    /// Writes one sample line, `name{k="v",...} value` (no braces when
    /// there are no labels).
    fn sample(&self, out: &mut String, labels: &[(&str, &str)], value: impl Display) {
        out.push_str(self.name);
        if !labels.is_empty() {
            out.push('{');
            for (i, (key, v)) in labels.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{key}=\"{}\"", escape_label(v));
            }
            out.push('}');
        }
        let _ = writeln!(out, " {value}");
    }

    /// Writes the family with its one unlabelled sample.
    fn single(&self, out: &mut String, value: impl Display) {
        self.header(out);
        self.sample(out, &[], value);
    }

    /// Writes the family with one sample per `(label value, value)`, all
    /// under the one label `key`.
    fn by_label<L: AsRef<str>, V: Display>(
        &self,
        out: &mut String,
        key: &str,
        samples: impl IntoIterator<Item = (L, V)>,
    ) {
        self.header(out);
        for (label, value) in samples {
            self.sample(out, &[(key, label.as_ref())], value);
        }
    }
}

// The families, in the order `/metrics` shows them.
const REQUESTS: Family = Family::counter(
    "kvgate_requests_total",
    "Front-port responses by route and status.",
);
const CLIENT_COMPLETIONS: Family =
    Family::counter("kvgate_client_completions_total", "Completions by client.");
const TTFT: Family = Family::histogram(
    "kvgate_ttft_seconds",
    "Time to the first byte of a completion's answer.",
);
const QUEUE_WAIT: Family = Family::histogram(
    "kvgate_queue_wait_seconds",
    "Time completions waited for a slot.",
);
const SAVES: Family = Family::counter("kvgate_saves_total", "Saves kept, by kind.");
const SAVE_FAILURES: Family = Family::counter(
    "kvgate_save_failures_total",
    "Saves that failed or were rejected.",
);
const SAVE_BYTES: Family = Family::counter("kvgate_save_bytes_total", "Bytes of saves kept.");
const SAVE_SECONDS: Family = Family::counter("kvgate_save_seconds_total", "Time spent saving.");
const RESTORES: Family = Family::counter("kvgate_restores_total", "Restores that loaded a save.");
const RESTORE_FAILURES: Family =
    Family::counter("kvgate_restore_failures_total", "Restores that failed.");
const RESTORE_SECONDS: Family =
    Family::counter("kvgate_restore_seconds_total", "Time spent restoring.");
const PROMPT_TOKENS: Family = Family::counter(
    "kvgate_prompt_tokens_total",
    "Prompt tokens reused from the cache or evaluated.",
);
const RESIDENT_HITS: Family = Family::counter(
    "kvgate_resident_hits_total",
    "Completions whose cache was live in the slot.",
);
const RAM_LOADS: Family = Family::counter(
    "kvgate_ram_cache_loads_total",
    "Completions sent to llama-server's RAM prompt cache instead of a disk restore.",
);
const AHEAD_PREFILLS: Family = Family::counter(
    "kvgate_prefill_ahead_total",
    "Next speakers whose cache was extended while another character generated.",
);
const AHEAD_YIELDED: Family = Family::counter(
    "kvgate_prefill_ahead_yielded_total",
    "Prefills ahead cut short because a turn started.",
);
const AHEAD_TOKENS: Family = Family::counter(
    "kvgate_prefill_ahead_tokens_total",
    "Prompt tokens read ahead for next speakers.",
);
const PREDICTIONS: Family = Family::counter(
    "kvgate_next_speaker_predictions_total",
    "Guesses at a group chat's next speaker, by whether that character spoke next.",
);
const EVICTIONS: Family = Family::counter(
    "kvgate_evictions_total",
    "Slots taken from one tenant for another.",
);
const QUEUE_REJECTIONS: Family = Family::counter(
    "kvgate_queue_rejections_total",
    "Completions refused for want of a slot.",
);
const UPSTREAM_ERRORS: Family = Family::counter(
    "kvgate_upstream_errors_total",
    "Failed exchanges with llama-server.",
);
const UPSTREAM_RESTARTS: Family = Family::counter(
    "kvgate_upstream_restarts_total",
    "llama-server restarts detected.",
);
const EVENTS_DROPPED: Family = Family::counter(
    "kvgate_events_dropped_total",
    "Events slow monitors missed.",
);
const SLOTS: Family = Family::gauge("kvgate_slots", "Slots by state, and queued requests.");
const UPSTREAM_UP: Family = Family::gauge(
    "kvgate_upstream_up",
    "Whether a llama-server answers (any upstream).",
);
const UPSTREAMS: Family = Family::gauge("kvgate_upstreams", "Upstreams by state.");

/// A label value escaped as the text format requires (backslash, quote,
/// newline). Client ids come from outside, so they may hold any of these.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A counter's current value.
fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// A microsecond counter in seconds, as Prometheus wants time.
fn seconds(micros: &AtomicU64) -> f64 {
    load(micros) as f64 / 1e6
}

/// Every number kvgate exports.
#[derive(Debug)]
pub struct Metrics {
    /// Front-port responses by (route, status).
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Completions by client (clients-file id, or a hashed key / address).
    clients: Mutex<BTreeMap<String, u64>>,
    /// Time to first byte of a completion's body.
    pub ttft: Histogram,
    /// Time completions waited for a slot.
    pub queue_wait: Histogram,
    /// Saves by kind.
    saves: Mutex<BTreeMap<&'static str, u64>>,
    /// Failed or rejected saves.
    pub save_failures: AtomicU64,
    /// Bytes of kept saves.
    pub save_bytes: AtomicU64,
    /// Time spent saving (µs).
    pub save_micros: AtomicU64,
    /// Restores that loaded a file.
    pub restores: AtomicU64,
    /// Restores that failed.
    pub restore_failures: AtomicU64,
    /// Time spent restoring (µs).
    pub restore_micros: AtomicU64,
    /// Prompt tokens llama-server reused (`cache_n`).
    pub prompt_cached: AtomicU64,
    /// Prompt tokens llama-server evaluated (`prompt_n`).
    pub prompt_evaluated: AtomicU64,
    /// Completions that found their cache live in the slot.
    pub resident_hits: AtomicU64,
    /// Completions whose cache came back from llama-server's RAM cache.
    pub ram_hits: AtomicU64,
    /// Completions sent to the RAM cache that found nothing there.
    pub ram_misses: AtomicU64,
    /// Prefills ahead done.
    pub ahead_prefills: AtomicU64,
    /// Prompt tokens they read.
    pub ahead_tokens: AtomicU64,
    /// Prefills ahead that gave way to a turn.
    pub ahead_yielded: AtomicU64,
    /// Next-speaker guesses that came true.
    pub predictions_hit: AtomicU64,
    /// Next-speaker guesses that did not.
    pub predictions_missed: AtomicU64,
    /// Slots taken from one tenant for another.
    pub evictions: AtomicU64,
    /// Requests refused because no slot could be had.
    pub queue_rejections: AtomicU64,
    /// Upstream errors (unreachable, timeout, broken stream).
    pub upstream_errors: AtomicU64,
    /// Upstream restarts detected.
    pub upstream_restarts: AtomicU64,
    /// Events a slow monitor missed.
    pub events_dropped: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        let z = || AtomicU64::new(0);
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            clients: Mutex::new(BTreeMap::new()),
            ttft: Histogram::new(TTFT_BOUNDS),
            queue_wait: Histogram::new(WAIT_BOUNDS),
            saves: Mutex::new(BTreeMap::new()),
            save_failures: z(),
            save_bytes: z(),
            save_micros: z(),
            restores: z(),
            restore_failures: z(),
            restore_micros: z(),
            prompt_cached: z(),
            prompt_evaluated: z(),
            resident_hits: z(),
            ram_hits: z(),
            ram_misses: z(),
            ahead_prefills: z(),
            ahead_tokens: z(),
            ahead_yielded: z(),
            predictions_hit: z(),
            predictions_missed: z(),
            evictions: z(),
            queue_rejections: z(),
            upstream_errors: z(),
            upstream_restarts: z(),
            events_dropped: z(),
        }
    }
}

/// The route label of a front-port path: known llama-server endpoints by
/// name, everything else `other`, so clients can't blow up the label set.
pub fn route_label(path: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "/completion",
        "/completions",
        "/v1/completions",
        "/chat/completions",
        "/v1/chat/completions",
        "/tokenize",
        "/detokenize",
        "/apply-template",
        "/props",
        "/slots",
        "/health",
        "/v1/health",
        "/models",
        "/v1/models",
        "/metrics",
        "/infill",
        "/embedding",
        "/embeddings",
        "/v1/embeddings",
        "/rerank",
    ];
    if path.starts_with("/slots/") {
        return "/slots/{id}";
    }
    KNOWN
        .iter()
        .find(|k| **k == path)
        .copied()
        .unwrap_or("other")
}

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Adds a duration in microseconds.
pub fn add_time(c: &AtomicU64, d: Duration) {
    add(c, u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
}

/// What the gauges show, sampled from kvgate's state when `/metrics` is read.
#[derive(Debug, Default, Clone, Copy)]
pub struct Gauges {
    /// Upstreams kvgate serves through.
    pub upstreams: u64,
    /// Those that answered their monitor's last poll.
    pub upstreams_up: u64,
    /// Slots with a request or save in flight.
    pub busy: u64,
    /// Idle slots holding a character's or anonymous cache.
    pub owned: u64,
    /// Idle slots nobody owns.
    pub free: u64,
    /// Requests waiting for a slot.
    pub queued: u64,
}

impl std::ops::AddAssign for Gauges {
    /// Sums two upstreams' gauges.
    fn add_assign(&mut self, o: Gauges) {
        self.upstreams += o.upstreams;
        self.upstreams_up += o.upstreams_up;
        self.busy += o.busy;
        self.owned += o.owned;
        self.free += o.free;
        self.queued += o.queued;
    }
}

impl Gauges {
    /// Writes the slot and upstream gauges.
    fn render(self, out: &mut String) {
        SLOTS.by_label(
            out,
            "state",
            [
                ("busy", self.busy),
                ("owned", self.owned),
                ("free", self.free),
                ("queued", self.queued),
            ],
        );
        UPSTREAM_UP.single(out, u8::from(self.upstreams_up > 0));
        let down = self.upstreams.saturating_sub(self.upstreams_up);
        UPSTREAMS.by_label(out, "state", [("up", self.upstreams_up), ("down", down)]);
    }
}

// === impl Metrics ===

impl Metrics {
    /// Counts a front-port response.
    pub fn request(&self, route: &'static str, status: u16) {
        let mut m = self.requests.lock_unpoisoned();
        *m.entry((route, status)).or_default() += 1;
    }

    /// Counts a completion of a client. The label set is bounded: past 256
    /// clients the rest count as `other`.
    pub fn client_completion(&self, client: &str) {
        let mut m = self.clients.lock_unpoisoned();
        let key = if m.contains_key(client) || m.len() < 256 {
            client
        } else {
            "other"
        };
        *m.entry(key.to_string()).or_default() += 1;
    }

    /// Counts a kept save.
    pub fn saved(&self, kind: &'static str, bytes: u64, took: Duration) {
        *self.saves.lock_unpoisoned().entry(kind).or_default() += 1;
        add(&self.save_bytes, bytes);
        add_time(&self.save_micros, took);
    }

    /// Saves of one kind so far.
    pub fn saves_of(&self, kind: &str) -> u64 {
        self.saves.lock_unpoisoned().get(kind).copied().unwrap_or(0)
    }

    /// The Prometheus text exposition.
    pub fn render(&self, gauges: Gauges) -> String {
        let mut text = String::new();
        let out = &mut text;
        self.render_requests(out);
        CLIENT_COMPLETIONS.by_label(out, "client", self.clients.lock_unpoisoned().iter());
        self.ttft.render(out, &TTFT);
        self.queue_wait.render(out, &QUEUE_WAIT);
        SAVES.by_label(
            out,
            "kind",
            self.saves.lock_unpoisoned().iter().map(|(k, n)| (*k, *n)),
        );
        SAVE_FAILURES.single(out, load(&self.save_failures));
        SAVE_BYTES.single(out, load(&self.save_bytes));
        SAVE_SECONDS.single(out, seconds(&self.save_micros));
        RESTORES.single(out, load(&self.restores));
        RESTORE_FAILURES.single(out, load(&self.restore_failures));
        RESTORE_SECONDS.single(out, seconds(&self.restore_micros));
        PROMPT_TOKENS.by_label(
            out,
            "source",
            [
                ("cache", load(&self.prompt_cached)),
                ("evaluated", load(&self.prompt_evaluated)),
            ],
        );
        RESIDENT_HITS.single(out, load(&self.resident_hits));
        RAM_LOADS.by_label(
            out,
            "result",
            [
                ("hit", load(&self.ram_hits)),
                ("miss", load(&self.ram_misses)),
            ],
        );
        AHEAD_PREFILLS.single(out, load(&self.ahead_prefills));
        AHEAD_TOKENS.single(out, load(&self.ahead_tokens));
        AHEAD_YIELDED.single(out, load(&self.ahead_yielded));
        PREDICTIONS.by_label(
            out,
            "result",
            [
                ("hit", load(&self.predictions_hit)),
                ("miss", load(&self.predictions_missed)),
            ],
        );
        EVICTIONS.single(out, load(&self.evictions));
        QUEUE_REJECTIONS.single(out, load(&self.queue_rejections));
        UPSTREAM_ERRORS.single(out, load(&self.upstream_errors));
        UPSTREAM_RESTARTS.single(out, load(&self.upstream_restarts));
        EVENTS_DROPPED.single(out, load(&self.events_dropped));
        gauges.render(out);
        text
    }

    /// Writes responses by route and status, the one two-label family.
    fn render_requests(&self, out: &mut String) {
        REQUESTS.header(out);
        for ((route, status), n) in self.requests.lock_unpoisoned().iter() {
            REQUESTS.sample(out, &[("route", route), ("status", &status.to_string())], n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(5));
        let mut s = String::new();
        h.render(&mut s, &Family::histogram("x", "help"));
        assert!(s.contains("x_bucket{le=\"0.1\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"1\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3\n"), "{s}");
        assert!(s.contains("x_count 3\n"));
    }

    #[test]
    fn routes_have_bounded_labels() {
        assert_eq!(route_label("/completion"), "/completion");
        assert_eq!(route_label("/slots/3"), "/slots/{id}");
        assert_eq!(route_label("/random/junk"), "other");
    }

    #[test]
    fn render_names_every_family() {
        let m = Metrics::default();
        m.request("/completion", 200);
        m.saved("autosave", 10, Duration::from_millis(5));
        let s = m.render(Gauges::default());
        for name in [
            "kvgate_requests_total{route=\"/completion\",status=\"200\"} 1",
            "kvgate_saves_total{kind=\"autosave\"} 1",
            "kvgate_ttft_seconds_count 0",
            "kvgate_slots{state=\"free\"} 0",
        ] {
            assert!(s.contains(name), "{name} missing in\n{s}");
        }
    }

    /// What [`busy_metrics`] renders with the gauges of `render_golden_text`,
    /// captured from the hand-written renderer the table-driven one
    /// replaced: any byte of difference is a change scrapers would see.
    const GOLDEN: &str = r##"# HELP kvgate_requests_total Front-port responses by route and status.
# TYPE kvgate_requests_total counter
kvgate_requests_total{route="/completion",status="200"} 2
kvgate_requests_total{route="/slots/{id}",status="503"} 1
kvgate_requests_total{route="other",status="404"} 1
# HELP kvgate_client_completions_total Completions by client.
# TYPE kvgate_client_completions_total counter
kvgate_client_completions_total{client="alice"} 2
kvgate_client_completions_total{client="we\\ird \"name\"\nline"} 1
# HELP kvgate_ttft_seconds Time to the first byte of a completion's answer.
# TYPE kvgate_ttft_seconds histogram
kvgate_ttft_seconds_bucket{le="0.01"} 1
kvgate_ttft_seconds_bucket{le="0.025"} 1
kvgate_ttft_seconds_bucket{le="0.05"} 1
kvgate_ttft_seconds_bucket{le="0.1"} 1
kvgate_ttft_seconds_bucket{le="0.25"} 1
kvgate_ttft_seconds_bucket{le="0.5"} 2
kvgate_ttft_seconds_bucket{le="1"} 2
kvgate_ttft_seconds_bucket{le="2.5"} 2
kvgate_ttft_seconds_bucket{le="5"} 2
kvgate_ttft_seconds_bucket{le="10"} 2
kvgate_ttft_seconds_bucket{le="30"} 2
kvgate_ttft_seconds_bucket{le="60"} 2
kvgate_ttft_seconds_bucket{le="120"} 2
kvgate_ttft_seconds_bucket{le="+Inf"} 3
kvgate_ttft_seconds_sum 200.307
kvgate_ttft_seconds_count 3
# HELP kvgate_queue_wait_seconds Time completions waited for a slot.
# TYPE kvgate_queue_wait_seconds histogram
kvgate_queue_wait_seconds_bucket{le="0.001"} 0
kvgate_queue_wait_seconds_bucket{le="0.01"} 1
kvgate_queue_wait_seconds_bucket{le="0.1"} 1
kvgate_queue_wait_seconds_bucket{le="0.5"} 1
kvgate_queue_wait_seconds_bucket{le="1"} 1
kvgate_queue_wait_seconds_bucket{le="5"} 1
kvgate_queue_wait_seconds_bucket{le="10"} 1
kvgate_queue_wait_seconds_bucket{le="30"} 1
kvgate_queue_wait_seconds_bucket{le="60"} 1
kvgate_queue_wait_seconds_bucket{le="300"} 1
kvgate_queue_wait_seconds_bucket{le="+Inf"} 1
kvgate_queue_wait_seconds_sum 0.0015
kvgate_queue_wait_seconds_count 1
# HELP kvgate_saves_total Saves kept, by kind.
# TYPE kvgate_saves_total counter
kvgate_saves_total{kind="autosave"} 2
kvgate_saves_total{kind="manual"} 1
# HELP kvgate_save_failures_total Saves that failed or were rejected.
# TYPE kvgate_save_failures_total counter
kvgate_save_failures_total 2
# HELP kvgate_save_bytes_total Bytes of saves kept.
# TYPE kvgate_save_bytes_total counter
kvgate_save_bytes_total 1032
# HELP kvgate_save_seconds_total Time spent saving.
# TYPE kvgate_save_seconds_total counter
kvgate_save_seconds_total 1.500253
# HELP kvgate_restores_total Restores that loaded a save.
# TYPE kvgate_restores_total counter
kvgate_restores_total 1
# HELP kvgate_restore_failures_total Restores that failed.
# TYPE kvgate_restore_failures_total counter
kvgate_restore_failures_total 3
# HELP kvgate_restore_seconds_total Time spent restoring.
# TYPE kvgate_restore_seconds_total counter
kvgate_restore_seconds_total 0.125
# HELP kvgate_prompt_tokens_total Prompt tokens reused from the cache or evaluated.
# TYPE kvgate_prompt_tokens_total counter
kvgate_prompt_tokens_total{source="cache"} 900
kvgate_prompt_tokens_total{source="evaluated"} 100
# HELP kvgate_resident_hits_total Completions whose cache was live in the slot.
# TYPE kvgate_resident_hits_total counter
kvgate_resident_hits_total 4
# HELP kvgate_ram_cache_loads_total Completions sent to llama-server's RAM prompt cache instead of a disk restore.
# TYPE kvgate_ram_cache_loads_total counter
kvgate_ram_cache_loads_total{result="hit"} 10
kvgate_ram_cache_loads_total{result="miss"} 11
# HELP kvgate_prefill_ahead_total Next speakers whose cache was extended while another character generated.
# TYPE kvgate_prefill_ahead_total counter
kvgate_prefill_ahead_total 12
# HELP kvgate_prefill_ahead_tokens_total Prompt tokens read ahead for next speakers.
# TYPE kvgate_prefill_ahead_tokens_total counter
kvgate_prefill_ahead_tokens_total 13
# HELP kvgate_prefill_ahead_yielded_total Prefills ahead cut short because a turn started.
# TYPE kvgate_prefill_ahead_yielded_total counter
kvgate_prefill_ahead_yielded_total 16
# HELP kvgate_next_speaker_predictions_total Guesses at a group chat's next speaker, by whether that character spoke next.
# TYPE kvgate_next_speaker_predictions_total counter
kvgate_next_speaker_predictions_total{result="hit"} 14
kvgate_next_speaker_predictions_total{result="miss"} 15
# HELP kvgate_evictions_total Slots taken from one tenant for another.
# TYPE kvgate_evictions_total counter
kvgate_evictions_total 5
# HELP kvgate_queue_rejections_total Completions refused for want of a slot.
# TYPE kvgate_queue_rejections_total counter
kvgate_queue_rejections_total 6
# HELP kvgate_upstream_errors_total Failed exchanges with llama-server.
# TYPE kvgate_upstream_errors_total counter
kvgate_upstream_errors_total 7
# HELP kvgate_upstream_restarts_total llama-server restarts detected.
# TYPE kvgate_upstream_restarts_total counter
kvgate_upstream_restarts_total 8
# HELP kvgate_events_dropped_total Events slow monitors missed.
# TYPE kvgate_events_dropped_total counter
kvgate_events_dropped_total 9
# HELP kvgate_slots Slots by state, and queued requests.
# TYPE kvgate_slots gauge
kvgate_slots{state="busy"} 1
kvgate_slots{state="owned"} 2
kvgate_slots{state="free"} 3
kvgate_slots{state="queued"} 4
# HELP kvgate_upstream_up Whether a llama-server answers (any upstream).
# TYPE kvgate_upstream_up gauge
kvgate_upstream_up 1
# HELP kvgate_upstreams Upstreams by state.
# TYPE kvgate_upstreams gauge
kvgate_upstreams{state="up"} 2
kvgate_upstreams{state="down"} 1
"##;

    /// A Metrics with something in every family, so the golden text below
    /// covers labels, escaping, histograms and float formatting.
    fn busy_metrics() -> Metrics {
        let m = Metrics::default();
        m.request("/completion", 200);
        m.request("/completion", 200);
        m.request("/slots/{id}", 503);
        m.request("other", 404);
        m.client_completion("alice");
        m.client_completion("we\\ird \"name\"\nline");
        m.client_completion("alice");
        m.ttft.observe(Duration::from_millis(7));
        m.ttft.observe(Duration::from_millis(300));
        m.ttft.observe(Duration::from_secs(200));
        m.queue_wait.observe(Duration::from_micros(1500));
        m.saved("autosave", 1024, Duration::from_millis(1500));
        m.saved("manual", 7, Duration::from_micros(250));
        m.saved("autosave", 1, Duration::from_micros(3));
        add(&m.save_failures, 2);
        inc(&m.restores);
        add(&m.restore_failures, 3);
        add_time(&m.restore_micros, Duration::from_millis(125));
        add(&m.prompt_cached, 900);
        add(&m.prompt_evaluated, 100);
        add(&m.resident_hits, 4);
        add(&m.ram_hits, 10);
        add(&m.ram_misses, 11);
        add(&m.ahead_prefills, 12);
        add(&m.ahead_tokens, 13);
        add(&m.ahead_yielded, 16);
        add(&m.predictions_hit, 14);
        add(&m.predictions_missed, 15);
        add(&m.evictions, 5);
        add(&m.queue_rejections, 6);
        add(&m.upstream_errors, 7);
        add(&m.upstream_restarts, 8);
        add(&m.events_dropped, 9);
        m
    }

    #[test]
    fn render_golden_text() {
        let gauges = Gauges {
            upstreams: 3,
            upstreams_up: 2,
            busy: 1,
            owned: 2,
            free: 3,
            queued: 4,
        };
        assert_eq!(busy_metrics().render(gauges), GOLDEN);
    }
}
