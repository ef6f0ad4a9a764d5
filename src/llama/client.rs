//! The connection to llama-server: a pooled HTTP/1 client, request
//! forwarding (URI rewrite, hop-by-hop header removal), and typed calls for
//! what kvgate asks itself (`/props`, `/slots`, slot save/restore/erase).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::Value;

use crate::http::body::{empty, full, ProxyBody};

/// What llama-server reports of reading a prompt (its `timings`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    /// Prompt tokens taken from the slot's cache.
    pub cache_n: Option<u64>,
    /// Prompt tokens read.
    pub prompt_n: Option<u64>,
}

/// Why a call to llama-server failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection, or the connection broke.
    #[error("llama-server at {url} is unreachable: {source}")]
    Unreachable {
        /// Where we tried.
        url: String,
        /// The transport error.
        source: hyper_util::client::legacy::Error,
    },
    /// A completion's own connection failed: `connect` when it could not be
    /// opened (nothing reached llama-server), else it broke before the
    /// response headers.
    #[error("llama-server at {url} is unreachable: {message}")]
    Connection {
        /// Where we tried.
        url: String,
        /// What failed.
        message: String,
        /// Whether it failed while connecting.
        connect: bool,
    },
    /// No answer in time.
    #[error("llama-server did not answer {what} within {secs:.0} s")]
    Timeout {
        /// The request.
        what: String,
        /// The limit.
        secs: f64,
    },
    /// It answered with an error status.
    #[error("llama-server answered {status} to {what}: {message}")]
    Status {
        /// The request.
        what: String,
        /// Its status.
        status: StatusCode,
        /// Its error message (llama.cpp's `error.message` when present).
        message: String,
    },
    /// The body broke off or was not the JSON expected.
    #[error("llama-server's answer to {what} was unusable: {message}")]
    Body {
        /// The request.
        what: String,
        /// What was wrong.
        message: String,
    },
}

impl UpstreamError {
    /// True when llama-server could not be reached at all (down, restarting).
    pub fn is_connect(&self) -> bool {
        match self {
            UpstreamError::Unreachable { source, .. } => source.is_connect(),
            UpstreamError::Connection { connect, .. } => *connect,
            _ => false,
        }
    }
}

/// A slot action llama-server performs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotAction {
    /// Write the slot's cache to a file.
    Save,
    /// Load a file into the slot.
    Restore,
    /// Clear the slot.
    Erase,
}

impl SlotAction {
    /// The `?action=` value.
    pub fn as_str(self) -> &'static str {
        match self {
            SlotAction::Save => "save",
            SlotAction::Restore => "restore",
            SlotAction::Erase => "erase",
        }
    }
}

/// llama-server's answer to a slot action (fields present per action).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct SlotActionReply {
    /// Tokens written (save).
    #[serde(default)]
    pub n_saved: Option<u64>,
    /// Bytes written (save).
    #[serde(default)]
    pub n_written: Option<u64>,
    /// Tokens loaded (restore).
    #[serde(default)]
    pub n_restored: Option<u64>,
    /// Bytes read (restore).
    #[serde(default)]
    pub n_read: Option<u64>,
    /// Tokens cleared (erase).
    #[serde(default)]
    pub n_erased: Option<u64>,
}

/// One entry of `GET /slots`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct SlotInfo {
    /// Slot id.
    pub id: usize,
    /// Context size of the slot.
    #[serde(default)]
    pub n_ctx: u64,
    /// Whether a task runs on it.
    #[serde(default)]
    pub is_processing: bool,
    /// Last task id (absent before the first task); task ids restart at 0
    /// when llama-server restarts.
    #[serde(default)]
    pub id_task: Option<i64>,
    /// Tokens cached now.
    #[serde(default)]
    pub n_prompt_tokens: Option<u64>,
}

/// The pooled client for one llama-server.
#[derive(Clone, Debug)]
pub struct LlamaClient {
    base: Uri,
    client: Client<HttpConnector, ProxyBody>,
    timeout: Duration,
    /// `Authorization: Bearer` kvgate sends on its own calls (llama-server's
    /// `--api-key`), and instead of the client's when clients are managed.
    api_key: Option<HeaderValue>,
}

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for h in named {
        headers.remove(h);
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
}

// === impl LlamaClient ===

impl LlamaClient {
    /// A client for the llama-server at `base`. `timeout` bounds the wait for
    /// response headers (llama-server sends them once the prompt is processed).
    pub fn new(base: Uri, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            // llama-server (cpp-httplib) closes idle keep-alive connections
            // after 5 s; drop ours first so a request never lands on one it
            // is closing.
            .pool_idle_timeout(Duration::from_secs(3))
            .pool_max_idle_per_host(64)
            // Keep the case of llama-server's header names for the client.
            .http1_preserve_header_case(true)
            .build(connector);
        LlamaClient {
            base,
            client,
            timeout,
            api_key: None,
        }
    }

    /// Uses `key` for llama-server's `--api-key`.
    pub fn with_api_key(mut self, key: Option<String>) -> Self {
        self.api_key = key.and_then(|k| HeaderValue::from_str(&format!("Bearer {k}")).ok());
        self
    }

    /// Replaces the client's credentials with kvgate's own upstream key (or
    /// none): used when kvgate manages the front port's clients itself.
    pub fn substitute_credentials(&self, headers: &mut HeaderMap) {
        headers.remove(hyper::header::AUTHORIZATION);
        headers.remove("x-api-key");
        if let Some(k) = &self.api_key {
            headers.insert(hyper::header::AUTHORIZATION, k.clone());
        }
    }

    /// The base URL.
    pub fn base(&self) -> &Uri {
        &self.base
    }

    /// The upstream URI for a client's path and query.
    pub fn uri_for(&self, path_and_query: &str) -> Uri {
        let prefix = self.base.path().trim_end_matches('/');
        let mut parts = self.base.clone().into_parts();
        let pq = format!("{prefix}{path_and_query}");
        parts.path_and_query = Some(
            pq.parse()
                .unwrap_or_else(|_| "/".parse().expect("constant")),
        );
        Uri::from_parts(parts).unwrap_or_else(|_| self.base.clone())
    }

    /// Sends a client's request on to llama-server: same method, path, query,
    /// headers (minus hop-by-hop; `Host` names the upstream) and body. The
    /// response's body is relayed as it arrives.
    pub async fn forward(
        &self,
        parts: hyper::http::request::Parts,
        body: ProxyBody,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let what = format!("{} {}", parts.method, pq);
        let req = self.outgoing(parts.method, self.uri_for(pq), parts.headers, body);
        self.send(req, &what).await
    }

    /// A client's request as kvgate sends it on: hop-by-hop headers go, and
    /// `Host` names the upstream.
    fn outgoing(
        &self,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: ProxyBody,
    ) -> Request<ProxyBody> {
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        strip_hop_by_hop(req.headers_mut());
        if let Some(auth) = self.base.authority() {
            if let Ok(v) = HeaderValue::from_str(auth.as_str()) {
                req.headers_mut().insert(HOST, v);
            }
        }
        req
    }

    async fn send(
        &self,
        req: Request<ProxyBody>,
        what: &str,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let url = req.uri().to_string();
        match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(source)) => Err(UpstreamError::Unreachable { url, source }),
            Err(_) => Err(UpstreamError::Timeout {
                what: what.to_string(),
                secs: self.timeout.as_secs_f64(),
            }),
        }
    }

    /// Has llama-server read `prompt` (a string or token ids) into `slot`,
    /// with a one-token completion (a preload, a prefill ahead); returns how
    /// much of the prompt it took from the slot's cache and how much it
    /// read, or why it failed.
    pub async fn evaluate(
        &self,
        slot: usize,
        prompt: impl Into<Value>,
        limit: Duration,
    ) -> Result<Reading, String> {
        let prompt: Value = prompt.into();
        let body = serde_json::json!({
            "prompt": prompt,
            "n_predict": 1,
            "id_slot": slot,
            "cache_prompt": true,
            "stream": false,
        });
        let (status, answer) = self
            .call_json(Method::POST, "/completion", Some(&body), limit)
            .await
            .map_err(|e| e.to_string())?;
        if !status.is_success() {
            let msg = answer
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("error");
            return Err(format!("llama-server answered {status}: {msg}"));
        }
        let n = |key: &str| answer.pointer(key).and_then(Value::as_u64);
        Ok(Reading {
            cache_n: n("/timings/cache_n"),
            prompt_n: n("/timings/prompt_n"),
        })
    }

    /// A request kvgate makes itself; returns status and JSON (Null if the
    /// body is empty or not JSON).
    pub async fn call_json(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<(StatusCode, Value), UpstreamError> {
        let what = format!("{method} {path_and_query}");
        let mut req = Request::new(match body {
            Some(v) => full(Bytes::from(v.to_string())),
            None => empty(),
        });
        *req.method_mut() = method;
        *req.uri_mut() = self.uri_for(path_and_query);
        if body.is_some() {
            req.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        if let Some(k) = &self.api_key {
            req.headers_mut()
                .insert(hyper::header::AUTHORIZATION, k.clone());
        }
        let fut = async {
            let resp = self.send(req, &what).await?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| UpstreamError::Body {
                    what: what.clone(),
                    message: e.to_string(),
                })?
                .to_bytes();
            let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            Ok((status, json))
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::Timeout {
                what,
                secs: timeout.as_secs_f64(),
            }),
        }
    }

    /// `GET path`, expecting 200 and JSON.
    pub async fn get_json(&self, path: &str, timeout: Duration) -> Result<Value, UpstreamError> {
        let (status, v) = self.call_json(Method::GET, path, None, timeout).await?;
        if status != StatusCode::OK {
            return Err(status_error(path, status, &v));
        }
        Ok(v)
    }

    /// `GET /slots`.
    pub async fn slots(&self, timeout: Duration) -> Result<Vec<SlotInfo>, UpstreamError> {
        let v = self.get_json("/slots", timeout).await?;
        serde_json::from_value(v).map_err(|e| UpstreamError::Body {
            what: "GET /slots".into(),
            message: e.to_string(),
        })
    }

    /// `POST /slots/{id}?action=…`. Blocks while the slot is busy (llama-server
    /// defers the action), so callers hold the slot's lease.
    pub async fn slot_action(
        &self,
        slot: usize,
        action: SlotAction,
        filename: Option<&str>,
        timeout: Duration,
    ) -> Result<SlotActionReply, UpstreamError> {
        let path = format!("/slots/{slot}?action={}", action.as_str());
        let body = filename.map(|f| serde_json::json!({ "filename": f }));
        let (status, v) = self
            .call_json(Method::POST, &path, body.as_ref(), timeout)
            .await?;
        if status != StatusCode::OK {
            return Err(status_error(&path, status, &v));
        }
        serde_json::from_value(v).map_err(|e| UpstreamError::Body {
            what: path,
            message: e.to_string(),
        })
    }

    /// `POST /tokenize` with `add_special` (as `/completion` tokenizes).
    pub async fn tokenize(
        &self,
        content: &str,
        timeout: Duration,
    ) -> Result<Vec<i32>, UpstreamError> {
        let body =
            serde_json::json!({ "content": content, "add_special": true, "parse_special": true });
        let (status, v) = self
            .call_json(Method::POST, "/tokenize", Some(&body), timeout)
            .await?;
        if status != StatusCode::OK {
            return Err(status_error("/tokenize", status, &v));
        }
        v.get("tokens")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_i64)
                    .filter_map(|t| i32::try_from(t).ok())
                    .collect()
            })
            .ok_or_else(|| UpstreamError::Body {
                what: "/tokenize".into(),
                message: "no tokens array".into(),
            })
    }
}

fn status_error(what: &str, status: StatusCode, v: &Value) -> UpstreamError {
    let message = v
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| {
            let s = v.to_string();
            s.chars().take(200).collect()
        });
    UpstreamError::Status {
        what: what.to_string(),
        status,
        message,
    }
}

// === completions: their own connection, driven by the response body ===

/// The body of a completion's response. It also drives the completion's own
/// HTTP/1 connection, so data never crosses tasks on its way from
/// llama-server to the client, and it hands on everything already received
/// as one frame (up to [`COALESCE`] bytes) without ever waiting for more: a
/// token that arrives alone still goes out alone, at once.
pub struct Driven {
    conn: OwnConn,
    body: Incoming,
    stash: Option<Option<Result<hyper::body::Frame<Bytes>, crate::http::body::BoxError>>>,
}

impl std::fmt::Debug for Driven {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driven").finish_non_exhaustive()
    }
}

/// Most bytes handed on in one frame.
pub const COALESCE: usize = 64 * 1024;

/// A completion's own HTTP/1 connection, driven by whoever polls it (the
/// request, then the response body) until it is done.
struct OwnConn {
    conn: std::pin::Pin<
        Box<
            hyper::client::conn::http1::Connection<
                hyper_util::rt::TokioIo<tokio::net::TcpStream>,
                ProxyBody,
            >,
        >,
    >,
    done: bool,
}

impl OwnConn {
    fn poll(&mut self, cx: &mut std::task::Context<'_>) {
        if !self.done && std::future::Future::poll(self.conn.as_mut(), cx).is_ready() {
            self.done = true;
        }
    }
}

/// Data received but not handed on yet: the first chunk as is (the common
/// case: no copy), more chunks appended to one buffer.
#[derive(Default)]
struct Gathered {
    first: Option<Bytes>,
    more: Option<bytes::BytesMut>,
}

impl Gathered {
    fn push(&mut self, d: Bytes) {
        match (&mut self.more, self.first.take()) {
            (Some(m), _) => m.extend_from_slice(&d),
            (None, Some(f)) => {
                let mut m = bytes::BytesMut::with_capacity(f.len() + d.len() + 4096);
                m.extend_from_slice(&f);
                m.extend_from_slice(&d);
                self.more = Some(m);
            }
            (None, None) => self.first = Some(d),
        }
    }

    fn len(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.more.as_ref().map_or(0, |m| m.len())
    }

    /// The data gathered, as one frame, if any.
    fn take(&mut self) -> Option<hyper::body::Frame<Bytes>> {
        let data = self
            .more
            .take()
            .map(|m| m.freeze())
            .or_else(|| self.first.take())?;
        Some(hyper::body::Frame::data(data))
    }
}

impl hyper::body::Body for Driven {
    type Data = Bytes;
    type Error = crate::http::body::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        if let Some(s) = this.stash.take() {
            return Poll::Ready(s);
        }
        let mut gathered = Gathered::default();
        // Gather what is already here, never waiting for more; anything
        // that is not data (trailers, the end, an error) goes out after it.
        let next = loop {
            this.conn.poll(cx);
            match std::pin::Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(d) => {
                        gathered.push(d);
                        if gathered.len() >= COALESCE {
                            break None;
                        }
                    }
                    Err(frame) => break Some(Some(Ok(frame))),
                },
                Poll::Ready(Some(Err(e))) => break Some(Some(Err(e.into()))),
                Poll::Ready(None) => break Some(None),
                Poll::Pending => break None,
            }
        };
        match (gathered.take(), next) {
            (Some(data), next) => {
                this.stash = next;
                Poll::Ready(Some(Ok(data)))
            }
            (None, Some(next)) => Poll::Ready(next),
            (None, None) => Poll::Pending,
        }
    }
}

impl LlamaClient {
    /// Sends a completion on a connection of its own (`Connection: close`),
    /// which its response body drives. A fresh connection because
    /// llama-server closes the connection after a streamed response although
    /// it announced keep-alive, and a pooled connection it is closing would
    /// fail the next request; the body drives it so relaying costs no
    /// cross-task hop per event.
    pub async fn forward_completion(
        &self,
        parts: hyper::http::request::Parts,
        body: ProxyBody,
    ) -> Result<Response<Driven>, UpstreamError> {
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string();
        let what = format!("{} {}", parts.method, pq);
        let authority = self
            .base
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let target = self.uri_for(&pq);
        let fail = |m: String, connect: bool| UpstreamError::Connection {
            url: target.to_string(),
            message: m,
            connect,
        };
        // Origin-form on a direct connection.
        let origin = Uri::from(
            target
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/")),
        );
        let mut req = self.outgoing(parts.method, origin, parts.headers, body);
        req.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        let fut = async {
            let tcp = tokio::net::TcpStream::connect(authority.as_str())
                .await
                .map_err(|e| fail(e.to_string(), true))?;
            let _ = tcp.set_nodelay(true);
            let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
                .preserve_header_case(true)
                .handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| fail(e.to_string(), true))?;
            let mut conn = OwnConn {
                conn: Box::pin(conn),
                done: false,
            };
            let send = sender.send_request(req);
            tokio::pin!(send);
            let resp = std::future::poll_fn(|cx| {
                conn.poll(cx);
                std::future::Future::poll(send.as_mut(), cx)
            })
            .await
            .map_err(|e| fail(e.to_string(), false))?;
            let (parts, body) = resp.into_parts();
            Ok(Response::from_parts(
                parts,
                Driven {
                    conn,
                    body,
                    stash: None,
                },
            ))
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::Timeout {
                what,
                secs: self.timeout.as_secs_f64(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_rewrite_keeps_path_and_query_and_prefix() {
        let u = LlamaClient::new(
            Uri::from_static("http://127.0.0.1:9/"),
            Duration::from_secs(1),
        );
        assert_eq!(
            u.uri_for("/slots?x=1").to_string(),
            "http://127.0.0.1:9/slots?x=1"
        );
        let u = LlamaClient::new(Uri::from_static("http://h:9/llama"), Duration::from_secs(1));
        assert_eq!(
            u.uri_for("/v1/models").to_string(),
            "http://h:9/llama/v1/models"
        );
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("authorization", HeaderValue::from_static("Bearer k"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("authorization"));
    }
}
