//! The web dashboard: one page and its scripts, styles and the vendored
//! charting library, built into the binary (`include_bytes!`, so kvgate
//! needs no files, no network and no Node at run time) and served on the
//! admin port at `GET /` and `GET /dashboard/<file>`.
//!
//! The page and its assets are served **without the admin key**: they hold
//! no data, and a browser can't send a header when it opens a URL. Every
//! call the page makes goes to the public admin API with the key in
//! `X-Admin-Key` (the page asks for it once). The browser rules still come
//! first ([`super::browser`]): a page under a DNS-rebound `Host` gets a 403
//! like any other admin request.
//!
//! Only the exact asset paths of [`ASSETS`] are served; any other path under
//! `/dashboard/` is a JSON 404 like the API's. Every answer carries a strict
//! `Content-Security-Policy` (scripts, styles and connections to this port
//! only; no framing), `X-Content-Type-Options: nosniff` and `Cache-Control:
//! no-cache`, so an upgraded kvgate never runs a cached old script.
//!
//! The lookup is pure ([`lookup`]); the router calls it before the key.

use bytes::Bytes;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Response};

use crate::http::body::{full, ProxyBody};
use crate::http::error::ApiError;

/// Where the assets are served.
pub(crate) const PREFIX: &str = "/dashboard/";

/// The page's policy: everything from this port, nothing inline, no
/// frames, no forms posting anywhere. (uPlot styles its elements through
/// the CSSOM, which `style-src 'self'` allows.)
pub(crate) const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self'; \
     style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";
const SVG: &str = "image/svg+xml";

/// One embedded file.
#[derive(Debug)]
pub(crate) struct Asset {
    /// Its path under [`PREFIX`] (`vendor/uPlot.esm.js`).
    pub(crate) name: &'static str,
    /// Its bytes, as in `src/admin/dashboard/web/` when kvgate was built.
    pub(crate) body: &'static [u8],
    /// Its `Content-Type`.
    pub(crate) content_type: &'static str,
}

/// `name => type` for each file of `src/admin/dashboard/web/`.
macro_rules! assets {
    ($($name:literal => $type:expr),* $(,)?) => {
        &[$(Asset {
            name: $name,
            body: include_bytes!(concat!("dashboard/web/", $name)),
            content_type: $type,
        }),*]
    };
}

/// Every file the dashboard serves. `vendor/` holds uPlot 1.6.32 from npm
/// (`npm pack uplot@1.6.32`: `dist/uPlot.esm.js`, sha256 5dd9b328…0eba,
/// and `dist/uPlot.min.css`, df630c6a…a04, unchanged) with its MIT
/// license. A unit test checks that this is every
/// file of `src/admin/dashboard/web/` and that every reference between them
/// resolves here.
pub(crate) static ASSETS: &[Asset] = assets![
    "index.html" => HTML,
    "style.css" => CSS,
    "favicon.svg" => SVG,
    "app.js" => JS,
    "api.js" => JS,
    "events.js" => JS,
    "dom.js" => JS,
    "format.js" => JS,
    "state.js" => JS,
    "live.js" => JS,
    "charts.js" => JS,
    "feed.js" => JS,
    "saves.js" => JS,
    "preload.js" => JS,
    "instances.js" => JS,
    "settings.js" => JS,
    "vendor/uPlot.esm.js" => JS,
    "vendor/uPlot.min.css" => CSS,
    "vendor/uPlot.LICENSE" => TEXT,
];

/// The page `GET /` serves.
const INDEX: &str = "index.html";

/// What the dashboard answers for `method path`: `None` when the path is
/// not the dashboard's (the API's then), a 404 for an unknown file under
/// [`PREFIX`]. Pure.
pub(crate) fn lookup(method: &Method, path: &str) -> Option<Result<&'static Asset, ApiError>> {
    if method != Method::GET && method != Method::HEAD {
        return None;
    }
    let name = if path == "/" {
        INDEX
    } else {
        path.strip_prefix(PREFIX)?
    };
    Some(
        ASSETS
            .iter()
            .find(|a| a.name == name)
            .ok_or_else(|| ApiError::not_found(format!("no dashboard file {path}"))),
    )
}

/// An asset's answer, with its type and the page's security headers.
pub(crate) fn response(asset: &'static Asset) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::from_static(asset.body)));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    resp
}

#[cfg(test)]
mod tests;
