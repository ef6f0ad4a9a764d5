//! Knobs: the settings and faults tests change at run time (on the builder
//! or through [`FakeHandle`]): events, pacing, the gate, failing saves and
//! restores, dying mid-stream, hanging, loading, the model, the API key.

use std::time::Duration;

use super::{FakeHandle, MODEL_PATH};

/// Settings tests may change at run time.
#[derive(Debug, Clone)]
pub(super) struct Knobs {
    pub(super) events: usize,
    pub(super) event_delay: Duration,
    pub(super) first_byte_delay: Duration,
    pub(super) gate: bool,
    pub(super) save_delay: Duration,
    pub(super) restore_delay: Duration,
    pub(super) fail_next_save: Option<u16>,
    pub(super) fail_next_restore: bool,
    pub(super) die_after: Option<usize>,
    pub(super) hang: bool,
    pub(super) loading: bool,
    pub(super) sleeping: bool,
    pub(super) model_path: String,
    pub(super) api_key: Option<String>,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            events: 8,
            event_delay: Duration::ZERO,
            first_byte_delay: Duration::ZERO,
            gate: false,
            save_delay: Duration::ZERO,
            restore_delay: Duration::ZERO,
            fail_next_save: None,
            fail_next_restore: false,
            die_after: None,
            hang: false,
            loading: false,
            sleeping: false,
            model_path: MODEL_PATH.to_string(),
            api_key: None,
        }
    }
}

impl FakeHandle {
    pub fn set_events(&self, n: usize) {
        self.knobs().events = n;
    }
    pub fn set_event_delay(&self, d: Duration) {
        self.knobs().event_delay = d;
    }
    pub fn set_first_byte_delay(&self, d: Duration) {
        self.knobs().first_byte_delay = d;
    }
    pub fn set_save_delay(&self, d: Duration) {
        self.knobs().save_delay = d;
    }
    pub fn set_restore_delay(&self, d: Duration) {
        self.knobs().restore_delay = d;
    }
    /// Turns gate mode on or off (turning it off lets waiting events go).
    pub fn set_gate(&self, on: bool) {
        self.knobs().gate = on;
        self.shared.knobs_changed.notify_waiters();
    }
    /// Lets one gated event go (permits accumulate).
    pub fn release_event(&self) {
        self.shared.gate.add_permits(1);
    }
    pub fn release_events(&self, n: usize) {
        self.shared.gate.add_permits(n);
    }
    /// The next save answers `status` with an llama.cpp-style error and
    /// writes nothing (500 is what the real server sends).
    pub fn fail_next_save(&self, status: u16) {
        self.knobs().fail_next_save = Some(status);
    }
    /// The next restore fails like a real failed restore: 400 "Unable to
    /// restore slot: ..." and the slot is cleared.
    pub fn fail_next_restore(&self) {
        self.knobs().fail_next_restore = true;
    }
    /// The next completion aborts its connection after `n` token events
    /// (streaming: after `n` SSE events; non-streaming: without a response).
    /// With `n` equal to the event count, only the final chunk is lost.
    pub fn die_mid_stream_after(&self, n: usize) {
        self.knobs().die_after = Some(n);
    }
    /// From now on, every request is accepted and never answered (until
    /// [`unhang`](Self::unhang)).
    pub fn hang(&self) {
        self.knobs().hang = true;
    }
    pub fn unhang(&self) {
        self.knobs().hang = false;
        self.shared.knobs_changed.notify_waiters();
    }
    /// While loading, every endpoint (also /health) answers 503 "Loading model".
    pub fn set_loading(&self, on: bool) {
        self.knobs().loading = on;
    }
    /// Changes the model reported by /props and /v1/models.
    pub fn set_model_path(&self, p: impl Into<String>) {
        self.knobs().model_path = p.into();
    }
    pub fn set_api_key(&self, key: Option<String>) {
        self.knobs().api_key = key;
    }
    /// `/props` says `is_sleeping` (llama-server's `--sleep-idle-seconds`).
    pub fn set_sleeping(&self, on: bool) {
        self.knobs().sleeping = on;
    }
}
