//! The accept loop both ports share: HTTP/1.1 connections served by hyper,
//! each watched for graceful shutdown and for its [`ConnLimits`]. When
//! `shutdown` resolves the listener closes, in-flight exchanges may finish
//! within `grace`, and the rest are cut.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::http::body::ProxyBody;
use crate::http::conn::{expired, Activity, ConnLimits, Watched};

/// Serves `handler` on `listener` until `shutdown`, then drains for `grace`.
pub async fn serve<H, Fut>(
    name: &'static str,
    listener: TcpListener,
    handler: H,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let handler = Arc::new(handler);
    let graceful = GracefulShutdown::new();
    // At the cap the loop stops accepting: newcomers wait in the kernel's
    // backlog (not accepted and dropped unanswered) until a connection ends.
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off
                        // rather than spin.
                        warn!(port = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let activity = Activity::new();
                let h = Arc::clone(&handler);
                let seen = Arc::clone(&activity);
                let svc = service_fn(move |req| {
                    let h = Arc::clone(&h);
                    let in_flight = seen.begin();
                    async move { Ok::<_, Infallible>(in_flight.hold(h(req, peer).await)) }
                });
                let io = TokioIo::new(Watched::new(stream, Arc::clone(&activity)));
                // Header names go out as llama-server wrote them
                // (`Process-Start-Time-Unix`): passthrough is byte-exact.
                let conn = http1::Builder::new()
                    .keep_alive(true)
                    .preserve_header_case(true)
                    .serve_connection(io, svc);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _permit = permit;
                    tokio::select! {
                        ended = conn => if let Err(e) = ended {
                            debug!(port = name, %peer, error = %e, "connection ended with an error");
                        },
                        why = expired(&activity, &limits) => {
                            debug!(port = name, %peer, reason = ?why, "closing a stalled connection");
                        }
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => debug!(port = name, "all connections drained"),
        _ = tokio::time::sleep(grace) => warn!(port = name, grace_s = grace.as_secs_f64(), "connections still open after the grace period; closing them"),
    }
}
