//! The live event stream of the admin port (`GET /events`): slot assigned,
//! evicted, restored, saved, generation started and finished, preload
//! progress, upstream up and down. Publishing is a non-blocking broadcast;
//! a monitor that falls behind misses events (counted), it never slows the
//! proxy.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body::{Body, Frame};
use serde_json::{Map, Value};
use tokio::sync::{broadcast, mpsc};

use crate::http::body::BoxError;
use crate::observe::metrics::Metrics;

/// Events buffered per monitor before it starts missing some.
const BUFFER: usize = 1024;
/// Comment sent to idle monitors so intermediaries keep the stream open.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// The broadcast hub.
#[derive(Debug)]
pub struct Events {
    tx: broadcast::Sender<Arc<str>>,
    seq: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Events {
    /// A hub counting misses in `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Events {
        let (tx, _) = broadcast::channel(BUFFER);
        Events {
            tx,
            seq: AtomicU64::new(0),
            metrics,
        }
    }

    /// Publishes `{"type": kind, "seq", "time_ms", …fields()}`. Costs
    /// nothing when nobody listens: `fields` is not even called.
    pub fn emit(&self, kind: &str, fields: impl FnOnce() -> Value) {
        self.publish(kind, None, fields);
    }

    /// [`Events::emit`] for an event about one upstream: it also carries
    /// `"upstream": name` (slot ids are per upstream).
    pub fn emit_for(&self, upstream: &str, kind: &str, fields: impl FnOnce() -> Value) {
        self.publish(kind, Some(upstream), fields);
    }

    fn publish(&self, kind: &str, upstream: Option<&str>, fields: impl FnOnce() -> Value) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        let mut m = Map::new();
        m.insert("type".into(), Value::from(kind));
        m.insert(
            "seq".into(),
            Value::from(self.seq.fetch_add(1, Ordering::Relaxed)),
        );
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        m.insert("time_ms".into(), Value::from(ms));
        if let Value::Object(f) = fields() {
            m.extend(f);
        }
        if let Some(name) = upstream {
            m.insert("upstream".into(), Value::from(name));
        }
        let _ = self.tx.send(Arc::from(Value::Object(m).to_string()));
    }

    /// A response body streaming every event from now on as SSE.
    pub fn subscribe(&self) -> EventBody {
        let mut rx = self.tx.subscribe();
        let (out_tx, out_rx) = mpsc::channel::<Bytes>(16);
        let metrics = Arc::clone(&self.metrics);
        tokio::spawn(async move {
            if out_tx
                .send(Bytes::from_static(b": kvgate events\n\n"))
                .await
                .is_err()
            {
                return;
            }
            loop {
                let next = tokio::time::timeout(KEEPALIVE, rx.recv()).await;
                let chunk = match next {
                    Ok(Ok(ev)) => Bytes::from(format!("data: {ev}\n\n")),
                    Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                        crate::observe::metrics::add(&metrics.events_dropped, n);
                        Bytes::from(format!(": missed {n} events\n\n"))
                    }
                    Ok(Err(broadcast::error::RecvError::Closed)) => return,
                    Err(_) => Bytes::from_static(b": keepalive\n\n"),
                };
                if out_tx.send(chunk).await.is_err() {
                    return; // the monitor went away
                }
            }
        });
        EventBody { rx: out_rx }
    }
}

/// SSE body of one monitor.
#[derive(Debug)]
pub struct EventBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for EventBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn events_arrive_in_order_and_nobody_listening_is_free() {
        let ev = Events::new(Arc::new(Metrics::default()));
        ev.emit("ignored", || panic!("built with nobody listening"));
        let mut body = ev.subscribe();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(first.starts_with(b":"));
        ev.emit("a", || serde_json::json!({"slot": 1}));
        ev.emit("b", || serde_json::json!({}));
        let a = body.frame().await.unwrap().unwrap().into_data().unwrap();
        let b = body.frame().await.unwrap().unwrap().into_data().unwrap();
        let a: Value = serde_json::from_slice(&a[6..]).unwrap();
        let b: Value = serde_json::from_slice(&b[6..]).unwrap();
        assert_eq!(
            (a["type"].as_str(), a["slot"].as_u64()),
            (Some("a"), Some(1))
        );
        assert_eq!(b["type"], "b");
        assert_eq!(a["seq"], 0, "the unheard event took no number");
        assert_eq!(b["seq"], 1);
    }
}
