//! One front-port request in: who sent it (and whether they may), then the
//! path it takes: a completion, a client's own slot action, or passthrough.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response};

use crate::app::App;
use crate::http::body::ProxyBody;
use crate::identity::Api;
use crate::llama::slot_route::{routed_path, SlotRoute};
use crate::observe::metrics;

use super::client::Client;
use super::completion::completion;
use super::failure::Failure;
use super::passthrough::passthrough;
use super::slot_action::{slot_action, slot_route_of};
use super::slots_view::{is_slots_listing, own_slots};

/// Which completion API a path is, if kvgate intercepts it: every route
/// on which llama-server generates in a slot chosen by `id_slot`. `path` is
/// the path llama-server routes on ([`routed_path`]). Infill, Anthropic
/// messages and OpenAI responses are leased like the others; kvgate infers
/// no character from them (they run as anonymous tenants).
pub fn completion_api(method: &Method, path: &str) -> Option<Api> {
    if method != Method::POST {
        return None;
    }
    match path {
        "/completion" | "/completions" | "/v1/completions" | "/infill" => Some(Api::Text),
        "/chat/completions"
        | "/v1/chat/completions"
        | "/v1/messages"
        | "/v1/responses"
        | "/responses" => Some(Api::Chat),
        _ => None,
    }
}

/// Serves one front-port request from `peer`.
pub async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    let route = metrics::route_label(req.uri().path());
    let resp = route_request(&app, req, peer)
        .await
        .unwrap_or_else(|f| f.into_api_error().into_response());
    app.shared.metrics.request(route, resp.status().as_u16());
    resp
}

async fn route_request(
    app: &Arc<App>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<ProxyBody>, Failure> {
    let client = Client::identify(app.clients.as_ref(), req.headers(), peer)?;
    // Routed as llama-server routes it: after percent-decoding.
    let path = routed_path(req.uri().path());
    if let Some(api) = completion_api(req.method(), &path) {
        return completion(app, req, api, &client).await;
    }
    let upstream = app.default_upstream().ok_or_else(Failure::no_upstream)?;
    client.credentials_for(&upstream, req.headers_mut());
    if let (Some(tag), true) = (client.tag(), is_slots_listing(req.method(), &path)) {
        return own_slots(&upstream, req, tag).await;
    }
    match slot_route_of(&req) {
        SlotRoute::Action { id, verb } => slot_action(&upstream, req, id, verb, &client).await,
        SlotRoute::Ambiguous(why) => Err(Failure::Client(why.into())),
        // llama-server refuses these itself, touching no slot.
        SlotRoute::Refused | SlotRoute::NotSlotAction => Ok(passthrough(&upstream, req).await),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intercepted_paths() {
        for p in ["/completion", "/completions", "/v1/completions"] {
            assert_eq!(completion_api(&Method::POST, p), Some(Api::Text));
        }
        for p in ["/chat/completions", "/v1/chat/completions"] {
            assert_eq!(completion_api(&Method::POST, p), Some(Api::Chat));
        }
        assert_eq!(completion_api(&Method::POST, "/infill"), Some(Api::Text));
        for p in ["/v1/messages", "/v1/responses", "/responses"] {
            assert_eq!(completion_api(&Method::POST, p), Some(Api::Chat));
        }
        assert_eq!(
            completion_api(&Method::POST, "/v1/messages/count_tokens"),
            None
        );
        assert_eq!(completion_api(&Method::GET, "/completion"), None);
        assert_eq!(completion_api(&Method::POST, "/tokenize"), None);
        assert_eq!(
            completion_api(&Method::POST, "/v1/chat/completions/control"),
            None
        );
    }
}
