//! Relays a completion's response body frame by frame, untouched, while
//! watching it: the final chunk's `timings` / `id_slot` / `tokens_cached`, an
//! error event, and how the stream ended (completed, client gone, upstream
//! broke). The end is reported once over a oneshot, so the task holding the
//! slot's lease can save and release after the client has its last byte.
//!
//! The scanner only parses `data:` lines that can matter (they mention
//! `"timings"`, `"stop":true`, `"error"` or `"finish_reason"`), so relaying a
//! token chunk costs a substring search, not a JSON parse.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use serde_json::Value;
use tokio::sync::{oneshot, Notify};
use tokio::time::Sleep;

use crate::http::body::BoxError;
use crate::http::error::ApiError;

/// Longest SSE line kept for inspection; longer lines are relayed but not
/// parsed (llama-server's final chunk holds the whole prompt, so be generous).
const MAX_LINE: usize = 64 * 1024 * 1024;

/// Largest non-SSE (plain JSON) body buffered for inspection.
const MAX_JSON: usize = 64 * 1024 * 1024;

/// What the watched body saw.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    /// What kvgate reads of the final result (SSE final chunk, or the whole
    /// JSON body).
    pub final_chunk: Option<Watched>,
    /// The `error` member of an `{"error": …}` event or body.
    pub error: Option<Value>,
    /// Bytes relayed.
    pub bytes: u64,
    /// `data:` events seen.
    pub events: u64,
    /// When the first byte of the body arrived.
    pub first_byte: Option<Instant>,
}

impl Summary {
    /// `timings.cache_n` of the final chunk.
    pub fn cache_n(&self) -> Option<u64> {
        self.timing("cache_n")
    }

    /// `timings.prompt_n` of the final chunk.
    pub fn prompt_n(&self) -> Option<u64> {
        self.timing("prompt_n")
    }

    fn timing(&self, key: &str) -> Option<u64> {
        self.final_chunk
            .as_ref()?
            .timings
            .as_ref()?
            .get(key)?
            .as_u64()
    }

    /// `id_slot` of the final chunk.
    pub fn id_slot(&self) -> Option<i64> {
        self.final_chunk.as_ref()?.id_slot.as_ref()?.as_i64()
    }
}

/// The members of an event kvgate looks at. The rest (the final chunk
/// carries the whole prompt and the generation settings) is skipped while
/// parsing, never copied. Each member is a [`Value`], so an odd type in one
/// of them does not hide the others.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
pub struct Watched {
    #[serde(default)]
    pub error: Option<Value>,
    #[serde(default)]
    pub timings: Option<Value>,
    #[serde(default)]
    pub stop: Option<Value>,
    #[serde(default)]
    pub id_slot: Option<Value>,
}

/// How the relayed body ended.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEnd {
    /// The upstream finished and the client received everything.
    Complete(Summary),
    /// The client went away before the end.
    ClientGone(Summary),
    /// The upstream body broke off.
    UpstreamError(String, Summary),
}

impl StreamEnd {
    /// The summary, however it ended.
    pub fn summary(&self) -> &Summary {
        match self {
            StreamEnd::Complete(s) | StreamEnd::ClientGone(s) | StreamEnd::UpstreamError(_, s) => s,
        }
    }
}

/// Incremental scanner over the body bytes.
#[derive(Debug, Default)]
struct Scanner {
    sse: bool,
    line: Vec<u8>,
    overflow: bool,
    summary: Summary,
}

impl Scanner {
    fn feed(&mut self, chunk: &[u8]) {
        if self.summary.first_byte.is_none() && !chunk.is_empty() {
            self.summary.first_byte = Some(Instant::now());
        }
        self.summary.bytes += chunk.len() as u64;
        if !self.sse {
            if self.line.len() + chunk.len() <= MAX_JSON {
                self.line.extend_from_slice(chunk);
            } else {
                self.overflow = true;
            }
            return;
        }
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            if !self.overflow {
                if self.line.is_empty() {
                    // Fast path: the whole line is in this chunk; no copy.
                    self.line_done(&rest[..i]);
                } else {
                    self.line.extend_from_slice(&rest[..i]);
                    let line = std::mem::take(&mut self.line);
                    self.line_done(&line);
                    self.line = line;
                }
            }
            self.line.clear();
            self.overflow = false;
            rest = &rest[i + 1..];
        }
        if !self.overflow {
            if self.line.len() + rest.len() > MAX_LINE {
                self.overflow = true;
                self.line.clear();
            } else {
                self.line.extend_from_slice(rest);
            }
        }
    }

    fn line_done(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        self.summary.events += 1;
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if !interesting(data) {
            return;
        }
        if let Ok(v) = serde_json::from_slice::<Watched>(data) {
            self.observe(v);
        }
    }

    fn observe(&mut self, mut v: Watched) {
        if let Some(error) = v.error.take() {
            self.summary.error = Some(error);
        } else if v.timings.is_some()
            || v.stop.as_ref().and_then(Value::as_bool) == Some(true)
            || v.id_slot
                .as_ref()
                .and_then(Value::as_i64)
                .is_some_and(|s| s >= 0)
        {
            self.summary.final_chunk = Some(v);
        }
    }

    fn finish(&mut self) -> Summary {
        if self.sse {
            if !self.line.is_empty() && !self.overflow {
                let line = std::mem::take(&mut self.line);
                self.line_done(&line);
            }
        } else if !self.overflow && !self.line.is_empty() {
            if let Ok(v) = serde_json::from_slice::<Watched>(&self.line) {
                self.observe(v);
            }
        }
        self.line.clear();
        std::mem::take(&mut self.summary)
    }
}

fn interesting(data: &[u8]) -> bool {
    const NEEDLES: [&[u8]; 4] = [
        b"\"timings\"",
        b"\"stop\":true",
        b"\"error\"",
        b"\"finish_reason\":\"",
    ];
    // Every needle starts with a quote: test only at quotes.
    data.iter()
        .enumerate()
        .any(|(i, &b)| b == b'"' && NEEDLES.iter().any(|n| data[i..].starts_with(n)))
}

pin_project! {
    /// A body relayed as is, reporting its end on a oneshot.
    pub struct Observed<B> {
        #[pin]
        inner: B,
        scanner: Scanner,
        tx: Option<oneshot::Sender<StreamEnd>>,
        // Bound on silence between two frames (None: no bound).
        idle: Option<Duration>,
        // Armed once; re-armed only when it fires early (a frame came since),
        // so a streaming reply costs no timer work per event.
        #[pin]
        idle_timer: Option<Sleep>,
        last_frame: tokio::time::Instant,
        // Set once the relayed body is over (after a closing error event).
        done: bool,
        // Notified at the first data frame: the prompt is processed.
        first_byte_notify: Vec<Arc<Notify>>,
    }

    impl<B> PinnedDrop for Observed<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(tx) = this.tx.take() {
                let _ = tx.send(StreamEnd::ClientGone(this.scanner.finish()));
            }
        }
    }
}

impl<B> std::fmt::Debug for Observed<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observed").finish_non_exhaustive()
    }
}

impl<B> Observed<B> {
    /// Wraps `inner`; `sse` selects event-stream scanning (else the body is
    /// one JSON document). The receiver gets exactly one [`StreamEnd`].
    pub fn new(inner: B, sse: bool) -> (Self, oneshot::Receiver<StreamEnd>) {
        Self::with_idle_timeout(inner, sse, None)
    }

    /// As [`Observed::new`], ending the stream when the upstream stays silent
    /// for longer than `idle`.
    pub fn with_idle_timeout(
        inner: B,
        sse: bool,
        idle: Option<Duration>,
    ) -> (Self, oneshot::Receiver<StreamEnd>) {
        let (tx, rx) = oneshot::channel();
        (
            Observed {
                inner,
                scanner: Scanner {
                    sse,
                    ..Scanner::default()
                },
                tx: Some(tx),
                idle,
                idle_timer: None,
                last_frame: tokio::time::Instant::now(),
                done: false,
                first_byte_notify: Vec::new(),
            },
            rx,
        )
    }

    /// Notifies `notify` once, when the first data frame passes (for a
    /// completion: the prompt is processed and the first token is out).
    pub fn notify_on_first_byte(&mut self, notify: Arc<Notify>) {
        self.first_byte_notify.push(notify);
    }
}

/// The closing event of a stream llama-server broke off, in llama.cpp's
/// own mid-stream error shape, so clients show the message and stop cleanly.
fn error_event(message: &str) -> Bytes {
    let v = ApiError::bad_gateway(message).to_json();
    Bytes::from(format!("data: {v}\n\n"))
}

impl<B> Body for Observed<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        let polled = this.inner.as_mut().poll_frame(cx);
        let failure = match polled {
            Poll::Pending => {
                let Some(idle) = *this.idle else {
                    return Poll::Pending;
                };
                loop {
                    let deadline = *this.last_frame + idle;
                    if this.idle_timer.is_none() {
                        this.idle_timer
                            .set(Some(tokio::time::sleep_until(deadline)));
                    }
                    let mut timer = this.idle_timer.as_mut().as_pin_mut().expect("set above");
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    // Frames came since the timer was armed: silence starts
                    // at the last one.
                    timer.reset(deadline);
                }
                format!(
                    "llama-server sent nothing for {:.1} s; kvgate ended the stream",
                    idle.as_secs_f64()
                )
            }
            Poll::Ready(Some(Ok(frame))) => {
                if this.idle.is_some() {
                    *this.last_frame = tokio::time::Instant::now();
                }
                if let Some(data) = frame.data_ref() {
                    this.scanner.feed(data);
                    for n in std::mem::take(this.first_byte_notify) {
                        n.notify_one();
                    }
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => {
                let e: BoxError = e.into();
                format!("llama-server broke off the stream: {e}")
            }
            Poll::Ready(None) => {
                if let Some(tx) = this.tx.take() {
                    let _ = tx.send(StreamEnd::Complete(this.scanner.finish()));
                }
                return Poll::Ready(None);
            }
        };
        if let Some(tx) = this.tx.take() {
            let _ = tx.send(StreamEnd::UpstreamError(
                failure.clone(),
                this.scanner.finish(),
            ));
        }
        if this.scanner.sse {
            // An event stream can end cleanly with an error event; the
            // client keeps everything it got and sees why it stopped.
            *this.done = true;
            Poll::Ready(Some(Ok(Frame::data(error_event(&failure)))))
        } else {
            // A plain body can only be cut: the client sees an incomplete
            // response rather than a truncated document it might trust.
            Poll::Ready(Some(Err(failure.into())))
        }
    }

    fn is_end_stream(&self) -> bool {
        // Never claim the end early: the end must be observed in poll_frame
        // so it is reported as Complete, not as a client disconnect.
        false
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::collections::VecDeque;

    /// A body that yields the given chunks, one frame each, then ends, or
    /// fails with `error` when there is one.
    struct Chunks {
        chunks: VecDeque<Bytes>,
        error: Option<&'static str>,
    }

    impl Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            let next = match self.chunks.pop_front() {
                Some(b) => Some(Ok(Frame::data(b))),
                None => self.error.map(|e| Err(e.into())),
            };
            Poll::Ready(next)
        }
    }

    fn body_of(chunks: Vec<&'static [u8]>) -> Chunks {
        Chunks {
            chunks: chunks.into_iter().map(Bytes::from_static).collect(),
            error: None,
        }
    }

    fn broken(chunks: Vec<&'static [u8]>) -> Chunks {
        Chunks {
            error: Some("connection reset"),
            ..body_of(chunks)
        }
    }

    #[tokio::test]
    async fn relays_bytes_and_finds_final_chunk_split_across_frames() {
        let chunks: Vec<&'static [u8]> = vec![
            b"data: {\"content\":\"Hi\",\"stop\":false,\"id_slot\":-1}\n\nda",
            b"ta: {\"content\":\"\",\"stop\":true,\"id_slot\":1,\"timings\":{\"cache_n\":7,\"pro",
            b"mpt_n\":3}}\n\n",
        ];
        let expected: Vec<u8> = chunks.concat();
        let (obs, rx) = Observed::new(body_of(chunks), true);
        let got = obs.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], &expected[..]);
        let StreamEnd::Complete(s) = rx.await.unwrap() else {
            panic!("not complete")
        };
        assert_eq!(s.events, 2);
        assert_eq!(s.cache_n(), Some(7));
        assert_eq!(s.prompt_n(), Some(3));
        assert_eq!(s.id_slot(), Some(1));
    }

    #[tokio::test]
    async fn the_final_chunk_is_read_past_its_prompt_and_odd_members() {
        let last = format!(
            "data: {{\"content\":\"\",\"prompt\":\"{}\",\"stop\":true,\"id_slot\":\"one\",\"timings\":{{\"cache_n\":5}}}}\n\n",
            "x".repeat(100_000)
        );
        let body = Chunks {
            chunks: VecDeque::from([Bytes::from(last)]),
            error: None,
        };
        let (obs, rx) = Observed::new(body, true);
        obs.collect().await.unwrap();
        let StreamEnd::Complete(s) = rx.await.unwrap() else {
            panic!("not complete")
        };
        assert_eq!(s.cache_n(), Some(5));
        assert_eq!(s.id_slot(), None, "a string id_slot is not a slot");
        assert!(s.error.is_none());
    }

    #[tokio::test]
    async fn error_event_and_plain_json() {
        let (obs, rx) = Observed::new(
            body_of(vec![
                b"data: {\"error\":{\"code\":500,\"message\":\"x\"}}\n\n",
            ]),
            true,
        );
        obs.collect().await.unwrap();
        assert!(rx.await.unwrap().summary().error.is_some());
        let (obs, rx) = Observed::new(
            body_of(vec![
                b"{\"content\":\"a\",\"id_slot\":0,",
                b"\"timings\":{\"cache_n\":2}}",
            ]),
            false,
        );
        obs.collect().await.unwrap();
        assert_eq!(rx.await.unwrap().summary().cache_n(), Some(2));
    }

    #[tokio::test]
    async fn a_broken_event_stream_ends_cleanly_with_an_error_event() {
        let first: &'static [u8] = b"data: {\"content\":\"a\"}\n\n";
        let (obs, rx) = Observed::new(broken(vec![first]), true);
        let got = obs.collect().await.expect("a clean end").to_bytes();
        assert!(got.starts_with(first));
        let tail = String::from_utf8_lossy(&got[first.len()..]).into_owned();
        assert!(tail.starts_with("data: {\"error\""), "{tail}");
        assert!(tail.contains("connection reset"), "{tail}");
        assert!(matches!(rx.await.unwrap(), StreamEnd::UpstreamError(..)));
        // A plain JSON body can't be completed: it is cut.
        let (obs, rx) = Observed::new(broken(vec![]), false);
        assert!(obs.collect().await.is_err());
        assert!(matches!(rx.await.unwrap(), StreamEnd::UpstreamError(..)));
    }

    /// A body that never yields.
    struct Silent;

    impl Body for Silent {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_stream_ends_after_the_idle_timeout() {
        let (obs, rx) = Observed::with_idle_timeout(Silent, true, Some(Duration::from_secs(30)));
        let got = obs.collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&got).contains("sent nothing for 30.0 s"));
        assert!(matches!(rx.await.unwrap(), StreamEnd::UpstreamError(..)));
    }

    /// `n` frames, one every `gap`, then the end.
    struct Trickle {
        gap: Duration,
        next: Pin<Box<tokio::time::Sleep>>,
        left: usize,
    }

    impl Body for Trickle {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            if self.next.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.left -= 1;
            let at = tokio::time::Instant::now() + self.gap;
            self.next.as_mut().reset(at);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"data: {}\n\n")))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn frames_keep_a_slow_stream_alive_past_the_idle_timeout() {
        let gap = Duration::from_secs(20);
        let body = Trickle {
            gap,
            next: Box::pin(tokio::time::sleep(gap)),
            left: 4,
        };
        let (obs, rx) = Observed::with_idle_timeout(body, true, Some(Duration::from_secs(30)));
        let got = obs.collect().await.unwrap().to_bytes();
        assert_eq!(
            &got[..],
            b"data: {}\n\n".repeat(4).as_slice(),
            "80 s in all, never 30 s silent"
        );
        assert!(matches!(rx.await.unwrap(), StreamEnd::Complete(_)));
    }

    #[tokio::test]
    async fn dropped_early_is_client_gone() {
        let (obs, rx) = Observed::new(body_of(vec![b"data: {}\n\n", b"data: {}\n\n"]), true);
        let mut obs = Box::pin(obs);
        let _ = obs.frame().await;
        drop(obs);
        assert!(matches!(rx.await.unwrap(), StreamEnd::ClientGone(_)));
    }
}
