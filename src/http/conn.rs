//! What one client connection may hold: a request head must arrive whole
//! within the header-read timeout (counted from its first byte), a
//! keep-alive connection may sit idle between requests for the idle timeout,
//! and each port serves at most so many connections at once.
//!
//! hyper's own header timeout also starts while a keep-alive connection
//! waits, so it can't tell "idle" from "slow": kvgate watches each
//! connection itself. A request in flight (its handler running, or its
//! response body still being sent) is never idle: a long, quiet SSE stream
//! is not cut; only the time between requests counts.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::http::body::ProxyBody;

/// The bounds for one port's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Longest time from a request head's first byte to its last.
    pub header_read_timeout: Duration,
    /// Longest silence on a connection with no request in flight.
    pub idle_timeout: Duration,
    /// Connections served at once; beyond it the port stops accepting (the
    /// kernel's backlog holds newcomers) until one closes.
    pub max_connections: usize,
}

/// Why a connection was closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    /// A request head took too long.
    HeaderRead,
    /// Nothing happened for too long between requests.
    Idle,
}

/// One connection's activity, shared by its IO, its service and its watch.
#[derive(Debug)]
pub struct Activity {
    state: Mutex<State>,
    /// Wakes the watch when its deadline moved (a head began, a request
    /// ended).
    changed: Notify,
}

#[derive(Debug)]
struct State {
    /// Requests whose response is not fully sent yet.
    in_flight: usize,
    /// When the connection last became idle (accepted, or a response ended).
    idle_since: Instant,
    /// When the first byte of the next request head arrived, while idle.
    head_started: Option<Instant>,
}

impl Activity {
    /// A connection accepted now.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            state: Mutex::new(State {
                in_flight: 0,
                idle_since: Instant::now(),
                head_started: None,
            }),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a few plain fields, valid after any panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes arrived: if the connection was idle, a request head has begun.
    fn read_some(&self) {
        let mut s = self.lock();
        if s.in_flight == 0 && s.head_started.is_none() {
            s.head_started = Some(Instant::now());
            drop(s);
            self.changed.notify_one();
        }
    }

    /// A request's head is in: it is in flight until the returned guard (held
    /// by its response body) drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        let mut s = self.lock();
        s.in_flight += 1;
        s.head_started = None;
        InFlight(Arc::clone(self))
    }

    /// When the connection expires if nothing changes, and why; `None`
    /// while a request is in flight.
    fn deadline(&self, limits: &ConnLimits) -> Option<(Instant, Expired)> {
        let s = self.lock();
        match (s.in_flight, s.head_started) {
            (0, Some(t)) => Some((t + limits.header_read_timeout, Expired::HeaderRead)),
            (0, None) => Some((s.idle_since + limits.idle_timeout, Expired::Idle)),
            _ => None,
        }
    }
}

/// Resolves when the connection has been idle, or slow with a request
/// head, for too long. Dropping the connection then cuts nothing: no
/// request is in flight.
pub async fn expired(activity: &Activity, limits: &ConnLimits) -> Expired {
    loop {
        // A change notified before `notified()` is polled is kept as a
        // permit (notify_one), so none is missed between the two steps.
        match activity.deadline(limits) {
            Some((at, why)) if at <= Instant::now() => return why,
            Some((at, _)) => tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = activity.changed.notified() => {}
            },
            // In flight: nothing expires until the request ends.
            None => activity.changed.notified().await,
        }
    }
}

/// A request in flight; its drop makes the connection idle (when it was the
/// last one).
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        if s.in_flight == 0 {
            s.idle_since = Instant::now();
            drop(s);
            self.0.changed.notify_one();
        }
    }
}

impl InFlight {
    /// `resp` with this guard riding in its body: the request stays in
    /// flight until hyper has sent (and dropped) the whole body.
    pub fn hold(self, resp: Response<ProxyBody>) -> Response<ProxyBody> {
        resp.map(|body| {
            body.map_frame(move |frame| {
                let _in_flight = &self;
                frame
            })
            .boxed()
        })
    }
}

pin_project_lite::pin_project! {
    /// An IO that tells its [`Activity`] when bytes arrive.
    #[derive(Debug)]
    pub struct Watched<S> {
        #[pin]
        io: S,
        activity: Arc<Activity>,
    }
}

impl<S> Watched<S> {
    /// Wraps `io`.
    pub fn new(io: S, activity: Arc<Activity>) -> Watched<S> {
        Watched { io, activity }
    }
}

impl<S: AsyncRead> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.io.poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.read_some();
        }
        r
    }
}

impl<S: AsyncWrite> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ConnLimits = ConnLimits {
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_connections: 1,
    };

    #[tokio::test(start_paused = true)]
    async fn idle_then_head_then_in_flight() {
        let a = Activity::new();
        let t0 = Instant::now();
        assert_eq!(
            a.deadline(&LIMITS),
            Some((t0 + LIMITS.idle_timeout, Expired::Idle))
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        a.read_some();
        let head = Instant::now();
        assert_eq!(
            a.deadline(&LIMITS),
            Some((head + LIMITS.header_read_timeout, Expired::HeaderRead))
        );
        let guard = a.begin();
        assert_eq!(a.deadline(&LIMITS), None, "in flight is never idle");
        a.read_some();
        assert_eq!(a.deadline(&LIMITS), None, "a body's bytes start no head");
        tokio::time::advance(Duration::from_secs(600)).await;
        drop(guard);
        let end = Instant::now();
        assert_eq!(
            a.deadline(&LIMITS),
            Some((end + LIMITS.idle_timeout, Expired::Idle))
        );
        assert_eq!(expired(&a, &LIMITS).await, Expired::Idle);
        assert_eq!(Instant::now(), end + LIMITS.idle_timeout);
    }
}
