//! Reaching the registry from any agent: which server answers a request,
//! and carrying it there.
//!
//! Consul's rule, kept here: a client agent (no `-server`) forwards every
//! registry request (KV, catalog, health, session, status, operator) to a
//! server it knows from gossip; on a server, writes and default reads go
//! to the leader (a follower forwards them), `?stale` reads are answered
//! by whichever server gets them, and `?consistent` ones by the leader
//! after it confirms its leadership with a quorum. Requests travel whole
//! over the servers' peer RPC ([`HttpCall`]) and the server that answers
//! runs them through its own HTTP router, so an endpoint is implemented
//! once. Every registry answer carries `X-Consul-KnownLeader` and
//! `X-Consul-LastContact` from the server that produced it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use tower::ServiceExt;

use super::Shared;
use super::wire::text;
use crate::raft;
use crate::server::{HttpAnswer, HttpCall, HttpHandler, RpcPool, Server};

/// Marks (as a request extension) a request a server forwarded to its
/// leader: answer it here, whatever the role (no third hop, no loops).
#[derive(Clone, Copy)]
struct LastHop;
/// The largest request body forwarded (a 512 KiB KV value, a transaction
/// or a catalog registration fit easily).
const MAX_BODY: usize = 4 << 20;
/// Consul's text when no leader is known.
pub const NO_LEADER: &str = "No cluster leader";
/// Consul's text for a `?dc=` it cannot reach.
pub const NO_PATH: &str = "No path to datacenter";

/// What can go wrong reaching a server.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Gossip knows no live server.
    #[error("No known Consul servers")]
    NoServers,
    /// No leader is known.
    #[error("No cluster leader")]
    NoLeader,
    /// The chosen server did not answer.
    #[error("rpc error making call: {0}")]
    Rpc(String),
}

/// Where this agent's registry requests go.
pub struct Forwarder {
    /// The agent: its node name (`near=_agent`, a session's default
    /// node), datacenter and the gossip view of the servers.
    shared: Arc<Shared>,
    /// The server this agent runs, if it is one.
    server: Option<Arc<Server>>,
    pool: Arc<RpcPool>,
    /// A client agent sticks to the server that answered last.
    preferred: Mutex<Option<SocketAddr>>,
}

impl Forwarder {
    /// A forwarder for the agent `shared`, running `server` if any.
    pub fn new(shared: Arc<Shared>, server: Option<Arc<Server>>) -> Arc<Forwarder> {
        let pool = server
            .as_ref()
            .map(|s| s.pool().clone())
            .unwrap_or_default();
        Arc::new(Forwarder {
            shared,
            server,
            pool,
            preferred: Mutex::new(None),
        })
    }

    /// Live servers gossip knows (their RPC addresses), the preferred one
    /// first.
    pub fn servers(&self) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = {
            let g = self.shared.gossip.lock().expect("not poisoned");
            g.membership_iter()
                .filter(|(_, st)| *st != foca::State::Down)
                .filter_map(|(id, _)| id.rpc_addr())
                .collect()
        };
        v.sort();
        if let Some(p) = *self.preferred.lock().expect("not poisoned")
            && let Some(i) = v.iter().position(|a| *a == p)
        {
            v.swap(0, i);
        }
        v
    }

    /// Commits `req` through the registry: the local server, or a server
    /// gossip knows.
    pub async fn write(&self, req: raft::Request) -> Result<raft::Response, ForwardError> {
        if let Some(s) = &self.server {
            return s.write(req).await.map_err(|e| match e {
                crate::server::ServerError::NoLeader => ForwardError::NoLeader,
                e => ForwardError::Rpc(e.to_string()),
            });
        }
        let servers = self.servers();
        if servers.is_empty() {
            return Err(ForwardError::NoServers);
        }
        let mut last = ForwardError::NoServers;
        for addr in servers {
            match self.pool.write(addr, &req).await {
                Ok(r) => {
                    *self.preferred.lock().expect("not poisoned") = Some(addr);
                    return Ok(r);
                }
                // Not applied: the next server may take it.
                Err(crate::server::WriteError::NotApplied(e)) => last = ForwardError::Rpc(e),
                // Perhaps applied: not sent again.
                Err(crate::server::WriteError::Unknown(e)) => return Err(ForwardError::Rpc(e)),
            }
        }
        Err(last)
    }

    /// The agent this forwarder serves.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Carries `req` to a server of its own datacenter (client agents),
    /// the last one that answered first, the next on a refused
    /// connection.
    pub async fn to_servers(&self, req: Request) -> Response {
        let call = match call_of(Some(&self.shared.node), req, false).await {
            Ok(c) => c,
            Err(r) => return r,
        };
        let servers = self.servers();
        if servers.is_empty() {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &ForwardError::NoServers.to_string(),
            );
        }
        match self.first_answer(&servers, &call).await {
            Ok((addr, r)) => {
                *self.preferred.lock().expect("not poisoned") = Some(addr);
                r
            }
            Err(r) => r,
        }
    }

    /// Sends `call` to each of `servers` in turn until one takes it: only
    /// a server that refused the connection (never got the request) is
    /// safe to pass over, since a write may have been applied.
    async fn first_answer(
        &self,
        servers: &[SocketAddr],
        call: &HttpCall,
    ) -> Result<(SocketAddr, Response), Response> {
        let mut last = String::new();
        for &addr in servers {
            match self.send(addr, call).await {
                Ok(r) => return Ok((addr, r)),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => last = e.to_string(),
                Err(e) => return Err(rpc_error(&e.to_string())),
            }
        }
        Err(rpc_error(&last))
    }

    /// Carries `req` to datacenter `dc`: from a client agent, to a server
    /// of its own (which carries it on); from a server, to the nearest
    /// live server of `dc` the WAN pool knows, the next on a refused
    /// connection. `near=_agent` is dropped: this agent is not in `dc`,
    /// and Consul does not sort across datacenters.
    pub async fn to_datacenter(&self, dc: &str, req: Request) -> Response {
        if self.server.is_none() {
            return self.to_servers(req).await;
        }
        let servers = super::federation::servers_of(&self.shared, dc);
        if servers.is_empty() {
            return super::federation::no_path();
        }
        let mut call = match call_of(None, req, false).await {
            Ok(c) => c,
            Err(r) => return r,
        };
        call.headers
            .push((super::federation::CROSSED_HEADER.to_string(), b"1".to_vec()));
        match self.first_answer(&servers, &call).await {
            Ok((_, r)) | Err(r) => r,
        }
    }

    /// Sends a request to the server at `addr` and turns its answer into a
    /// response.
    async fn send(&self, addr: SocketAddr, call: &HttpCall) -> std::io::Result<Response> {
        // A blocking query may hold the call for its whole wait (at most
        // 10 minutes plus jitter).
        let ttl = if call.uri.contains("index=") {
            Duration::from_secs(11 * 60)
        } else {
            Duration::from_secs(30)
        };
        let a = self.pool.http(addr, call, ttl).await?;
        Ok(response_of(a))
    }
}

/// The registry paths (everything that needs a server).
pub fn is_registry(path: &str) -> bool {
    [
        "/v1/kv/",
        "/v1/catalog/",
        "/v1/health/",
        "/v1/session/",
        "/v1/status/",
        "/v1/operator/",
        "/v1/query",
        "/v1/internal/",
    ]
    .iter()
    .any(|p| path.starts_with(p))
        || path == "/v1/kv"
}

fn query_params(uri: &axum::http::Uri) -> HashMap<String, String> {
    uri.query()
        .map(|q| {
            q.split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k.to_string(), v.to_string())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Builds the forwarded form of `req`, with what only this agent knows
/// filled in: `near=_agent` becomes this node (`node`; `None`: another
/// datacenter's, where this node is not, so the parameter is dropped),
/// and a session created without a `Node` is this node's (as Consul's
/// agent does before its RPC). A client's request may take a second hop
/// (the server it reaches sends it on to the leader); a server's to the
/// leader is the last.
async fn call_of(node: Option<&str>, req: Request, last_hop: bool) -> Result<HttpCall, Response> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| text(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large"))?;
    let mut uri = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| parts.uri.path().to_string());
    if let Some((path, q)) = uri.split_once('?') {
        let q: Vec<String> = q
            .split('&')
            .filter_map(|kv| match (kv, node) {
                ("near=_agent", Some(node)) => Some(format!("near={node}")),
                ("near=_agent", None) => None,
                _ => Some(kv.to_string()),
            })
            .collect();
        uri = format!("{path}?{}", q.join("&"));
    }
    let mut body = body.to_vec();
    if parts.uri.path() == "/v1/session/create" {
        let parsed = if body.iter().all(|b| b.is_ascii_whitespace()) {
            Some(serde_json::Map::new())
        } else {
            match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(serde_json::Value::Object(m)) => Some(m),
                // Left as it is: the server gives Consul's decode error.
                _ => None,
            }
        };
        if let Some(mut m) = parsed
            && let Some(node) = node
            && !m.keys().any(|k| k.eq_ignore_ascii_case("node"))
        {
            m.insert("Node".into(), serde_json::Value::String(node.to_string()));
            body = serde_json::to_vec(&m).unwrap_or(body);
        }
    }
    let mut headers: Vec<(String, Vec<u8>)> = parts
        .headers
        .iter()
        .filter(|(k, _)| *k != axum::http::header::CONTENT_LENGTH)
        .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
        .collect();
    // The caller's address, for a prepared query's `Near: "_ip"` (the
    // first hop's; a proxy in front may have set it already).
    if !parts.headers.contains_key("x-forwarded-for")
        && let Some(axum::extract::ConnectInfo(peer)) = parts
            .extensions
            .get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        headers.push(("x-forwarded-for".into(), peer.ip().to_string().into_bytes()));
    }
    // The agent that took the request, for a prepared query's
    // `Near: "_agent"` (the first hop's, kept on the next); not carried to
    // another datacenter, where that agent is not.
    if node.is_none() {
        headers.retain(|(k, _)| !k.eq_ignore_ascii_case(super::query_api::AGENT_HEADER));
    }
    if let Some(node) = node
        && !parts.headers.contains_key(super::query_api::AGENT_HEADER)
    {
        headers.push((
            super::query_api::AGENT_HEADER.to_string(),
            node.as_bytes().to_vec(),
        ));
    }
    Ok(HttpCall {
        method: parts.method.as_str().to_string(),
        uri,
        headers,
        body,
        last_hop,
    })
}

fn response_of(a: HttpAnswer) -> Response {
    let mut r = Response::new(Body::from(a.body));
    *r.status_mut() = StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (k, v) in a.headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(&v),
        ) && k != axum::http::header::CONTENT_LENGTH
            && k != axum::http::header::TRANSFER_ENCODING
        {
            r.headers_mut().append(k, v);
        }
    }
    r
}

/// What a server runs forwarded requests through: its own router.
pub fn handler(router: axum::Router) -> HttpHandler {
    Arc::new(move |call: HttpCall| {
        let router = router.clone();
        Box::pin(async move {
            let mut b = axum::http::Request::builder()
                .method(call.method.as_str())
                .uri(call.uri.as_str());
            for (k, v) in &call.headers {
                b = b.header(k.as_str(), v.as_slice());
            }
            if call.last_hop {
                b = b.extension(LastHop);
            }
            let Ok(req) = b.body(Body::from(call.body)) else {
                return HttpAnswer {
                    status: 400,
                    headers: Vec::new(),
                    body: b"malformed forwarded request".to_vec(),
                };
            };
            let resp = match router.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            let (parts, body) = resp.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX)
                .await
                .map(|b| b.to_vec())
                .unwrap_or_default();
            HttpAnswer {
                status: parts.status.as_u16(),
                headers: parts
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
                    .collect(),
                body,
            }
        })
    })
}

/// Client agents: every registry request goes to a server, the last one
/// that answered first, the next on a refused connection.
pub async fn forward_all(State(f): State<Arc<Forwarder>>, req: Request) -> Response {
    f.to_servers(req).await
}

fn rpc_error(e: &str) -> Response {
    text(
        StatusCode::INTERNAL_SERVER_ERROR,
        &ForwardError::Rpc(e.to_string()).to_string(),
    )
}

/// Server agents: middleware that answers registry requests here or sends
/// them to the leader, and stamps the leader headers.
pub async fn dispatch(State(f): State<Arc<Forwarder>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let Some(server) = f.server.clone() else {
        return next.run(req).await;
    };
    if !is_registry(&path) {
        return next.run(req).await;
    }
    let p = query_params(req.uri());
    let stale = p.contains_key("stale");
    let consistent = p.contains_key("consistent");
    if stale && consistent {
        return text(
            StatusCode::BAD_REQUEST,
            "Cannot specify ?stale with ?consistent, conflicting semantics.",
        );
    }
    let forwarded = req.extensions().get::<LastHop>().is_some();
    let is_read = req.method() == axum::http::Method::GET;
    // Status and operator reads, and the datacenters by distance, are
    // this server's view, as in Consul.
    let local_only = is_read
        && (path.starts_with("/v1/status/")
            || path.starts_with("/v1/operator/")
            || path == "/v1/catalog/datacenters");
    let here = forwarded || local_only || (is_read && stale) || server.is_leader();
    if !here {
        let Some((_, leader)) = server.leader_addr() else {
            return text(StatusCode::INTERNAL_SERVER_ERROR, NO_LEADER);
        };
        let call = match call_of(Some(&f.shared.node), req, true).await {
            Ok(c) => c,
            Err(r) => return r,
        };
        return match f.send(leader, &call).await {
            Ok(r) => r,
            Err(e) => rpc_error(&e.to_string()),
        };
    }
    if consistent
        && is_read
        && let Err(e) = server.read_consistent(|_| ()).await
    {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("{NO_LEADER}: {e}"),
        );
    }
    let mut r = next.run(req).await;
    stamp(&server, r.headers_mut());
    r
}

/// Asks the leader to take server `id` out of the group (a follower
/// leaving gracefully: no waiting for the leader to hear of it through
/// gossip).
pub async fn leave_group(server: &Server, id: u64) -> Result<(), ForwardError> {
    let (_, leader) = server.leader_addr().ok_or(ForwardError::NoLeader)?;
    let call = HttpCall {
        method: "DELETE".into(),
        uri: format!("/v1/operator/raft/peer?id={id}"),
        headers: Vec::new(),
        body: Vec::new(),
        last_hop: true,
    };
    let a = server
        .pool()
        .http(leader, &call, Duration::from_secs(10))
        .await
        .map_err(|e| ForwardError::Rpc(e.to_string()))?;
    if a.status == 200 {
        Ok(())
    } else {
        Err(ForwardError::Rpc(
            String::from_utf8_lossy(&a.body).into_owned(),
        ))
    }
}

/// `X-Consul-KnownLeader` and `X-Consul-LastContact` (milliseconds) as
/// this server sees them.
fn stamp(server: &Server, h: &mut axum::http::HeaderMap) {
    let known = server.leader_addr().is_some();
    h.insert(
        "X-Consul-KnownLeader",
        HeaderValue::from_static(if known { "true" } else { "false" }),
    );
    let ms = server
        .last_contact()
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    h.insert("X-Consul-LastContact", HeaderValue::from(ms));
}
