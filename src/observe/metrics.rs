//! Counters and histograms, rendered in the Prometheus text format on the
//! admin port. Updates are atomics or a short map lock, never an `.await`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

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

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

const TTFT_BOUNDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
const WAIT_BOUNDS: &[f64] = &[0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0];

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

// === impl Metrics ===

impl Metrics {
    /// Counts a front-port response.
    pub fn request(&self, route: &'static str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((route, status)).or_default() += 1;
    }

    /// Counts a completion of a client. The label set is bounded: past 256
    /// clients the rest count as `other`.
    pub fn client_completion(&self, client: &str) {
        let mut m = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let key = if m.contains_key(client) || m.len() < 256 {
            client
        } else {
            "other"
        };
        *m.entry(key.to_string()).or_default() += 1;
    }

    /// Counts a kept save.
    pub fn saved(&self, kind: &'static str, bytes: u64, took: Duration) {
        *self
            .saves
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_default() += 1;
        add(&self.save_bytes, bytes);
        add_time(&self.save_micros, took);
    }

    /// Saves of one kind so far.
    pub fn saves_of(&self, kind: &str) -> u64 {
        self.saves
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(kind)
            .copied()
            .unwrap_or(0)
    }

    /// The Prometheus text exposition.
    pub fn render(&self, gauges: Gauges) -> String {
        let mut out = String::new();
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let _ = writeln!(
            out,
            "# HELP kvgate_requests_total Front-port responses by route and status."
        );
        let _ = writeln!(out, "# TYPE kvgate_requests_total counter");
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "kvgate_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP kvgate_client_completions_total Completions by client."
        );
        let _ = writeln!(out, "# TYPE kvgate_client_completions_total counter");
        for (client, n) in self
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let label = client
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = writeln!(
                out,
                "kvgate_client_completions_total{{client=\"{label}\"}} {n}"
            );
        }
        self.ttft.render(
            &mut out,
            "kvgate_ttft_seconds",
            "Time to the first byte of a completion's answer.",
        );
        self.queue_wait.render(
            &mut out,
            "kvgate_queue_wait_seconds",
            "Time completions waited for a slot.",
        );
        let _ = writeln!(out, "# HELP kvgate_saves_total Saves kept, by kind.");
        let _ = writeln!(out, "# TYPE kvgate_saves_total counter");
        for (kind, n) in self.saves.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "kvgate_saves_total{{kind=\"{kind}\"}} {n}");
        }
        counter(
            &mut out,
            "kvgate_save_failures_total",
            "Saves that failed or were rejected.",
            g(&self.save_failures),
        );
        counter(
            &mut out,
            "kvgate_save_bytes_total",
            "Bytes of saves kept.",
            g(&self.save_bytes),
        );
        let _ = writeln!(
            out,
            "# HELP kvgate_save_seconds_total Time spent saving.\n# TYPE kvgate_save_seconds_total counter\nkvgate_save_seconds_total {}",
            g(&self.save_micros) as f64 / 1e6
        );
        counter(
            &mut out,
            "kvgate_restores_total",
            "Restores that loaded a save.",
            g(&self.restores),
        );
        counter(
            &mut out,
            "kvgate_restore_failures_total",
            "Restores that failed.",
            g(&self.restore_failures),
        );
        let _ = writeln!(
            out,
            "# HELP kvgate_restore_seconds_total Time spent restoring.\n# TYPE kvgate_restore_seconds_total counter\nkvgate_restore_seconds_total {}",
            g(&self.restore_micros) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "# HELP kvgate_prompt_tokens_total Prompt tokens reused from the cache or evaluated."
        );
        let _ = writeln!(out, "# TYPE kvgate_prompt_tokens_total counter");
        let _ = writeln!(
            out,
            "kvgate_prompt_tokens_total{{source=\"cache\"}} {}",
            g(&self.prompt_cached)
        );
        let _ = writeln!(
            out,
            "kvgate_prompt_tokens_total{{source=\"evaluated\"}} {}",
            g(&self.prompt_evaluated)
        );
        counter(
            &mut out,
            "kvgate_resident_hits_total",
            "Completions whose cache was live in the slot.",
            g(&self.resident_hits),
        );
        counter(
            &mut out,
            "kvgate_evictions_total",
            "Slots taken from one tenant for another.",
            g(&self.evictions),
        );
        counter(
            &mut out,
            "kvgate_queue_rejections_total",
            "Completions refused for want of a slot.",
            g(&self.queue_rejections),
        );
        counter(
            &mut out,
            "kvgate_upstream_errors_total",
            "Failed exchanges with llama-server.",
            g(&self.upstream_errors),
        );
        counter(
            &mut out,
            "kvgate_upstream_restarts_total",
            "llama-server restarts detected.",
            g(&self.upstream_restarts),
        );
        counter(
            &mut out,
            "kvgate_events_dropped_total",
            "Events slow monitors missed.",
            g(&self.events_dropped),
        );
        let _ = writeln!(
            out,
            "# HELP kvgate_slots Slots by state, and queued requests."
        );
        let _ = writeln!(out, "# TYPE kvgate_slots gauge");
        for (state, v) in [
            ("busy", gauges.busy),
            ("owned", gauges.owned),
            ("free", gauges.free),
            ("queued", gauges.queued),
        ] {
            let _ = writeln!(out, "kvgate_slots{{state=\"{state}\"}} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP kvgate_upstream_up Whether a llama-server answers (any upstream).\n# TYPE kvgate_upstream_up gauge\nkvgate_upstream_up {}",
            u8::from(gauges.upstreams_up > 0)
        );
        let _ = writeln!(
            out,
            "# HELP kvgate_upstreams Upstreams by state.\n# TYPE kvgate_upstreams gauge\nkvgate_upstreams{{state=\"up\"}} {}\nkvgate_upstreams{{state=\"down\"}} {}",
            gauges.upstreams_up,
            gauges.upstreams.saturating_sub(gauges.upstreams_up)
        );
        out
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
        h.render(&mut s, "x", "help");
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
}
