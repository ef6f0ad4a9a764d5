//! The admin port's browser rules: which `Host` it answers, which `Origin`
//! may change things, which bodies it reads, and the CORS headers it sends.
//!
//! The admin port has no key by default (it listens on loopback), so a web
//! page the operator happens to visit must not be able to drive it:
//! - **DNS rebinding**: a page on `attacker.example` whose name is later
//!   pointed at 127.0.0.1 talks to the port "same-origin". Its requests carry
//!   `Host: attacker.example`, so only known names are answered (the bound
//!   address, loopback names, `--admin-host` names); any other is a 403, on
//!   every method.
//! - **Cross-site writes**: a page can send a "simple" POST (a form, or
//!   `fetch` with `mode: "no-cors"`) without a preflight; the browser hides
//!   the answer, but the action happens. Browsers label every cross-origin
//!   non-GET request with `Origin`, so a state-changing request whose
//!   `Origin` is neither the port's own nor an `--admin-cors-origin` is a
//!   403. As a second line (for clients that send no `Origin`), such a
//!   request must label what it carries as `application/json`, a type no
//!   simple request can have: any other `Content-Type`, or a body without
//!   one, is a 415. A bodyless request with no `Content-Type` (`curl -X
//!   POST`) passes: the `Origin` rule already stops browsers sending it.
//! - **Reading**: only origins given with `--admin-cors-origin` (exact
//!   match, never `*`) and the port's own get `Access-Control-Allow-Origin`;
//!   a foreign page's GET is answered but the browser keeps the answer from
//!   it.
//!
//! Everything here is pure: the router hands in the request head and
//! applies the verdict.

use std::net::{IpAddr, SocketAddr};

use hyper::header::{
    HeaderMap, HeaderValue, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_MAX_AGE, ALLOW, CONTENT_TYPE, HOST, ORIGIN, VARY,
};
use hyper::{Method, Response, StatusCode, Version};

use crate::config::{normalize_origin, split_host};
use crate::http::body::{empty, ProxyBody};
use crate::http::error::{ApiError, ErrorType};

/// The methods the admin API uses (a preflight's answer).
const METHODS: &str = "GET, POST, PUT, DELETE, OPTIONS";
/// The request headers a page may send: the body's type and the key in
/// each form the admin port and the SillyTavern extension use.
const HEADERS: &str = "Content-Type, X-Admin-Key, Authorization, X-ST-Admin-Key";
/// How long a browser may reuse a preflight's answer (seconds).
const MAX_AGE: &str = "600";
/// Names that always mean this machine; a page cannot be served under them
/// by someone else, so they are answered on any port (an SSH tunnel or a
/// local reverse proxy changes the port the browser sees).
const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

/// A `Host` name kvgate answers, with the port it must come with (`None`:
/// any port).
#[derive(Clone, Debug, PartialEq, Eq)]
struct HostName {
    name: String,
    port: Option<u16>,
}

/// The admin port's browser rules, fixed at start.
#[derive(Clone, Debug)]
pub(crate) struct BrowserRules {
    /// The address the admin port is bound to (its real port, even when
    /// configured as 0).
    bound: SocketAddr,
    /// `--admin-host` names.
    hosts: Vec<HostName>,
    /// `--admin-cors-origin` origins, lowercase.
    origins: Vec<String>,
}

/// What a request's `Origin` is to the admin port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Cors {
    /// No `Origin`: not a cross-origin browser request.
    Absent,
    /// The port's own origin or an `--admin-cors-origin` one (as sent).
    Allowed(HeaderValue),
    /// Any other origin, `null` included.
    Denied(String),
}

/// Whether a `Content-Type` value is JSON (`application/json`, any
/// parameters).
fn is_json(content_type: &HeaderValue) -> bool {
    content_type
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// Whether `method` may change something (all but GET, HEAD, OPTIONS).
fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

fn forbidden(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, ErrorType::Permission, message)
}

// === impl BrowserRules ===

impl BrowserRules {
    /// The rules for an admin port bound to `bound`, answering the extra
    /// `hosts` (`name` or `name:port`) and the CORS `origins` (already
    /// checked by the configuration; a malformed one is ignored).
    pub(crate) fn new(bound: SocketAddr, hosts: &[String], origins: &[String]) -> BrowserRules {
        BrowserRules {
            bound,
            hosts: hosts
                .iter()
                .filter_map(|h| split_host(h))
                .map(|(name, port)| HostName { name, port })
                .collect(),
            origins: origins.iter().filter_map(|o| normalize_origin(o)).collect(),
        }
    }

    /// The `Host` rule: 400 when HTTP/1.1 comes without one (HTTP/1.0 may
    /// omit it, and a browser never does), 403 when it names anything but
    /// this port. Returns the Host as sent, for the own-origin check.
    pub(crate) fn check_host<'h>(
        &self,
        version: Version,
        headers: &'h HeaderMap,
    ) -> Result<Option<&'h str>, ApiError> {
        let Some(raw) = headers.get(HOST) else {
            if version == Version::HTTP_10 || version == Version::HTTP_09 {
                return Ok(None);
            }
            return Err(ApiError::bad_request("a Host header is required"));
        };
        let host = raw.to_str().ok().filter(|h| self.allows_host(h));
        match host {
            Some(h) => Ok(Some(h)),
            None => Err(forbidden(format!(
                "the admin port does not answer Host {:?}: it answers its bound address {}, \
                 localhost, 127.0.0.1, [::1] and names given with --admin-host \
                 (this stops DNS-rebinding pages)",
                String::from_utf8_lossy(raw.as_bytes()),
                self.bound
            ))),
        }
    }

    /// Whether `host` (a Host header's value) names this port.
    fn allows_host(&self, host: &str) -> bool {
        let Some((name, port)) = split_host(host) else {
            return false;
        };
        if LOOPBACK_NAMES.contains(&name.as_str()) {
            return true;
        }
        // Without a port, the browser meant the scheme's default.
        let port = port.unwrap_or(80);
        if let Ok(ip) = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            // An IP literal is never a rebound name: the page asking is
            // served from this very address. On a wildcard bind any of the
            // machine's addresses may be the one the client used.
            let bound_ip = self.bound.ip();
            if port == self.bound.port() && (ip == bound_ip || bound_ip.is_unspecified()) {
                return true;
            }
        }
        self.hosts
            .iter()
            .any(|h| h.name == name && h.port.map_or(true, |p| p == port))
    }

    /// What the request's `Origin` is, given the `host` it was sent to
    /// (already allowed by [`BrowserRules::check_host`]).
    pub(crate) fn cors(&self, headers: &HeaderMap, host: Option<&str>) -> Cors {
        let Some(origin) = headers.get(ORIGIN) else {
            return Cors::Absent;
        };
        let text = origin.to_str().unwrap_or("").to_ascii_lowercase();
        // The port's own origin: the page kvgate itself would serve on the
        // Host the browser used.
        let own = host.is_some_and(|h| text == format!("http://{}", h.to_ascii_lowercase()));
        if own || self.origins.contains(&text) {
            Cors::Allowed(origin.clone())
        } else {
            Cors::Denied(String::from_utf8_lossy(origin.as_bytes()).into_owned())
        }
    }

    /// The rule for requests that change state: an allowed or absent
    /// `Origin`, and JSON (or nothing at all) in the body. `has_body` is
    /// whether the request announces a body.
    pub(crate) fn check_write(
        &self,
        method: &Method,
        headers: &HeaderMap,
        cors: &Cors,
        has_body: bool,
    ) -> Result<(), ApiError> {
        if !changes_state(method) {
            return Ok(());
        }
        if let Cors::Denied(origin) = cors {
            return Err(forbidden(format!(
                "cross-site request refused: Origin {origin:?} is neither the admin port's own \
                 nor one given with --admin-cors-origin"
            )));
        }
        match headers.get(CONTENT_TYPE) {
            Some(ct) if is_json(ct) => Ok(()),
            None if !has_body => Ok(()),
            other => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorType::InvalidRequest,
                format!(
                    "{method} needs Content-Type: application/json (got {}); \
                     send no body, or a JSON one labelled so \
                     (curl: -H 'Content-Type: application/json')",
                    other.map_or("none".into(), |v| format!(
                        "{:?}",
                        String::from_utf8_lossy(v.as_bytes())
                    ))
                ),
            )),
        }
    }
}

/// The answer to an `OPTIONS` request: a CORS preflight's 204 for an
/// allowed origin, 403 for another, and a plain 204 listing the methods
/// when no browser asks.
pub(crate) fn preflight(cors: &Cors) -> Response<ProxyBody> {
    if let Cors::Denied(origin) = cors {
        let mut resp = forbidden(format!(
            "Origin {origin:?} may not use the admin port (see --admin-cors-origin)"
        ))
        .into_response();
        resp.headers_mut()
            .insert(VARY, HeaderValue::from_static("Origin"));
        return resp;
    }
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    h.insert(ALLOW, HeaderValue::from_static(METHODS));
    if matches!(cors, Cors::Allowed(_)) {
        h.insert(
            ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(METHODS),
        );
        h.insert(
            ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(HEADERS),
        );
        h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(MAX_AGE));
    }
    with_cors(resp, cors)
}

/// `resp` with the CORS headers `cors` calls for: the allowed origin
/// itself (never `*`), and `Vary: Origin` whenever the answer depended on
/// one, so no cache hands one origin's answer to another.
pub(crate) fn with_cors(mut resp: Response<ProxyBody>, cors: &Cors) -> Response<ProxyBody> {
    let h = resp.headers_mut();
    match cors {
        Cors::Absent => {}
        Cors::Allowed(origin) => {
            h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            h.append(VARY, HeaderValue::from_static("Origin"));
        }
        Cors::Denied(_) => {
            h.append(VARY, HeaderValue::from_static("Origin"));
        }
    }
    resp
}

#[cfg(test)]
mod tests;
