//! The SSE relay: `kvgate::http::sse::Observed` over arbitrary bytes in arbitrary
//! chunkings must hand the client exactly the bytes it got, in order, and
//! report the end exactly once and truthfully.
//!
//! Input: byte 0 = flags (bit 0: event stream, else plain JSON; bit 1: the
//! upstream breaks off after its last chunk; bit 2: the client goes away
//! early), byte 1 = chunking seed, the rest = the body. Chunk sizes (0..=64,
//! so empty frames too) come from a small generator seeded by byte 1.
#![no_main]

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame};
use kvgate::http::sse::{Observed, StreamEnd};
use libfuzzer_sys::fuzz_target;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Yields its chunks, then ends or fails.
struct Upstream {
    chunks: VecDeque<Bytes>,
    broken: bool,
}

impl Body for Upstream {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(match self.chunks.pop_front() {
            Some(b) => Some(Ok(Frame::data(b))),
            None if self.broken => Some(Err("connection reset by fuzzer".into())),
            None => None,
        })
    }
}

fn chunk(body: &[u8], seed: u8) -> VecDeque<Bytes> {
    let mut out = VecDeque::new();
    let mut x = u32::from(seed) | 1;
    let mut at = 0;
    while at < body.len() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let n = (x % 65) as usize;
        let end = (at + n).min(body.len());
        out.push_back(Bytes::copy_from_slice(&body[at..end]));
        at = end;
    }
    out
}

/// `data:` lines, as the relay counts them (a last line without `\n` too).
fn data_lines(body: &[u8]) -> u64 {
    body.split(|&b| b == b'\n')
        .filter(|l| l.starts_with(b"data:"))
        .count() as u64
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (flags, seed, body) = (data[0], data[1], &data[2..]);
    let sse = flags & 1 != 0;
    let broken = flags & 2 != 0;
    let leave_early = flags & 4 != 0;
    let chunks = chunk(body, seed);
    let n_chunks = chunks.len();
    let (observed, mut end) = Observed::new(Upstream { chunks, broken }, sse);
    let mut observed = Box::pin(observed);
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    let mut frames = 0usize;
    let mut failed = false;
    loop {
        if leave_early && frames == n_chunks / 2 {
            break;
        }
        match observed.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(f))) => {
                frames += 1;
                if let Ok(d) = f.into_data() {
                    out.extend_from_slice(&d);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                failed = true;
                break;
            }
            Poll::Ready(None) => break,
            Poll::Pending => panic!("a ready upstream never makes the relay wait"),
        }
    }
    if leave_early {
        assert!(out.len() <= body.len());
        assert_eq!(&out[..], &body[..out.len()], "relayed bytes differ");
        drop(observed);
        match end.try_recv() {
            Ok(StreamEnd::ClientGone(s)) => assert_eq!(s.bytes, out.len() as u64),
            other => panic!("client gone early reported as {other:?}"),
        }
        return;
    }
    // A finished body stays finished.
    if !failed {
        assert!(matches!(
            observed.as_mut().poll_frame(&mut cx),
            Poll::Ready(None)
        ));
    }
    let report = end
        .try_recv()
        .expect("the end is reported before the last frame");
    assert!(end.try_recv().is_err(), "the end is reported once");
    drop(observed);
    assert_eq!(report.summary().bytes, body.len() as u64);
    if sse {
        assert_eq!(report.summary().events, data_lines(body), "events counted");
    }
    match (broken, sse) {
        (false, _) => {
            assert!(!failed);
            assert_eq!(out, body, "bytes out differ from bytes in");
            assert!(matches!(report, StreamEnd::Complete(_)), "{report:?}");
        }
        (true, true) => {
            // Everything, then one closing error event, then a clean end.
            assert!(!failed, "an event stream must end cleanly");
            assert!(out.starts_with(body), "relayed bytes differ");
            let tail = std::str::from_utf8(&out[body.len()..]).expect("error event is UTF-8");
            let json = tail
                .strip_prefix("data: ")
                .and_then(|t| t.strip_suffix("\n\n"))
                .expect("one data event");
            let v: serde_json::Value = serde_json::from_str(json).expect("error event is JSON");
            assert_eq!(v["error"]["type"], "server_error");
            assert!(matches!(report, StreamEnd::UpstreamError(..)), "{report:?}");
        }
        (true, false) => {
            // A plain body is cut, never completed with made-up bytes.
            assert!(failed);
            assert_eq!(out, body);
            assert!(matches!(report, StreamEnd::UpstreamError(..)), "{report:?}");
        }
    }
});
