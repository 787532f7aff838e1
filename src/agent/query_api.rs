//! Consul's prepared queries over HTTP (`consul-api.md` §2.7, §5): create,
//! list, read, update, delete, `/execute` and `/explain`, on servers.
//!
//! Execution follows Consul: resolve (ID, exact name, longest template
//! prefix), the service's healthy instances after the query's filters,
//! shuffled, sorted by estimated RTT from the `Near` node (stable; the
//! source first if it is among the first 10), `?limit`. Failover is where
//! tomo goes further, with optional fields of `Service.Failover`:
//! - `MinHealthyFraction`: the local datacenter fails over when its
//!   healthy fraction drops below it, not only at zero;
//! - `MaxP99`: candidates whose estimated p99 RTT exceeds it are skipped;
//! - `Deadline`: a remote datacenter that has not answered by then is
//!   skipped;
//! - `FailbackAfter`: after failing over, answers come back to the local
//!   datacenter only once it has been able to serve for that long
//!   ([`crate::routing::Chooser`]), so they do not flap.
//!
//! Remote datacenters run the definition sent whole
//! (`POST /v1/internal/query/execute-remote?dc=`), shuffled and limited,
//! without an RTT sort (Consul's `ExecuteRemote`).

// Helpers return the handler's early answer as their error: one response
// per request, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use rand::seq::SliceRandom;
use serde_json::{Value, json};

use super::Shared;
use super::catalog_api::{check_service_node_json, param, reply};
use super::forward::Forwarder;
use super::wire::{request, text};
use crate::catalog::{Catalog, Command, Outcome};
use crate::query::{LocalHealth, PreparedQuery, ServiceQuery};
use crate::routing::{Chooser, FailoverPolicy, Hysteresis};
use crate::server::Server;

/// Header a client agent adds to what it forwards: its node, which a
/// query's `Near: "_agent"` means.
pub const AGENT_HEADER: &str = "x-tomo-agent";

/// What the handlers share.
pub struct QueryApi {
    server: Arc<Server>,
    agent: Arc<Shared>,
    fwd: Arc<Forwarder>,
    /// Fail-back state per query (ID and rendered name): which datacenter
    /// answers now, and since when the others can serve.
    choosers: Mutex<HashMap<String, Chooser>>,
    started: Instant,
}

type Params = Query<Vec<(String, String)>>;

fn bad(msg: impl std::fmt::Display) -> Response {
    text(StatusCode::BAD_REQUEST, &msg.to_string())
}

fn parse_body(body: &Bytes) -> Result<Value, Response> {
    serde_json::from_slice(body).map_err(|e| bad(format!("Request decode failed: {e}")))
}

fn parse_def(v: &Value) -> Result<PreparedQuery, Response> {
    PreparedQuery::from_json(v).map_err(|e| bad(format!("Invalid prepared query: {e}")))
}

/// Fail-back states kept at most (names reach a template from callers).
const MAX_CHOOSERS: usize = 10_000;
/// A remote datacenter's run is abandoned after this long when the query
/// sets no `Deadline`.
const DEFAULT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

impl QueryApi {
    /// Drops the fail-back state of query `id` (all the names it served).
    fn forget(&self, id: &str) {
        self.choosers
            .lock()
            .expect("not poisoned")
            .retain(|k, _| !k.starts_with(&format!("{id}/")));
    }

    async fn commit(&self, cmd: Command) -> Result<Outcome, Response> {
        match self.server.write(request(cmd)).await {
            Ok(Ok(o)) => Ok(o),
            // The catalog's refusals (a taken name, an unknown session, a
            // missing query) are the caller's mistake.
            Ok(Err(e)) => Err(bad(e)),
            Err(e) => Err(text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())),
        }
    }
}

/// `POST /v1/query`: `{"ID": …}`.
async fn create(State(api): State<Arc<QueryApi>>, body: Bytes) -> Response {
    let mut q = match parse_body(&body).and_then(|v| parse_def(&v)) {
        Ok(q) => q,
        Err(r) => return r,
    };
    q.id = crate::query::uuid_v4(rand::random());
    match api.commit(Command::QueryCreate(q)).await {
        Ok(Outcome::Query(id)) => reply(&json!({ "ID": id }), api.server.applied()),
        Ok(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "unexpected outcome"),
        Err(r) => r,
    }
}

/// `GET /v1/query`.
async fn list(State(api): State<Arc<QueryApi>>) -> Response {
    let (v, index) = api.server.read(|c| {
        let v: Vec<Value> = c.queries().map(PreparedQuery::to_json).collect();
        (v, c.indexes().queries)
    });
    reply(&Value::Array(v), index)
}

/// `GET /v1/query/:id`.
async fn read(State(api): State<Arc<QueryApi>>, Path(id): Path<String>) -> Response {
    let (q, index) = api.server.read(|c| {
        (
            c.query(&id).map(PreparedQuery::to_json),
            c.indexes().queries,
        )
    });
    match q {
        Some(q) => reply(&json!([q]), index),
        None => text(StatusCode::NOT_FOUND, "Query not found"),
    }
}

/// `PUT /v1/query/:id`: the body replaces the whole definition.
async fn update(State(api): State<Arc<QueryApi>>, Path(id): Path<String>, body: Bytes) -> Response {
    let mut q = match parse_body(&body).and_then(|v| parse_def(&v)) {
        Ok(q) => q,
        Err(r) => return r,
    };
    // A new definition may change the failover policy: start afresh.
    api.forget(&id);
    q.id = id;
    match api.commit(Command::QueryUpdate(q)).await {
        Ok(_) => empty(),
        Err(r) => r,
    }
}

/// `DELETE /v1/query/:id`.
async fn delete(State(api): State<Arc<QueryApi>>, Path(id): Path<String>) -> Response {
    api.forget(&id);
    match api.commit(Command::QueryDelete { id }).await {
        Ok(_) => empty(),
        Err(r) => r,
    }
}

fn empty() -> Response {
    Response::new(Body::empty())
}

/// Resolves and renders `id_or_name` (400 for a template asked by ID, 404
/// when nothing matches).
fn resolve(api: &QueryApi, id_or_name: &str) -> Result<(PreparedQuery, u64), Response> {
    let (q, index) = api
        .server
        .read(|c| (c.resolve_query(id_or_name, ""), c.indexes().queries));
    match q {
        Ok(Some(q)) => Ok((q, index)),
        Ok(None) => Err(text(StatusCode::NOT_FOUND, "Query not found")),
        Err(e) => Err(bad(e)),
    }
}

/// `GET /v1/query/:id/explain`: `{"Query": <rendered>}`.
async fn explain(State(api): State<Arc<QueryApi>>, Path(id): Path<String>) -> Response {
    match resolve(&api, &id) {
        Ok((q, index)) => reply(&json!({ "Query": q.to_json() }), index),
        Err(r) => r,
    }
}

/// One local run of a query: the healthy instances as `CheckServiceNode`
/// JSON with their node names, and the healthy fraction.
struct LocalRun {
    nodes: Vec<(String, Value)>,
    health: LocalHealth,
}

fn run_local(c: &Catalog, s: &ServiceQuery) -> LocalRun {
    // One scan: every candidate counts, the healthy ones are answered.
    let all = s.candidates(c);
    let total = all.len();
    let nodes: Vec<(String, Value)> = all
        .into_iter()
        .filter(|i| s.passes_health(&i.checks))
        .map(|i| {
            let v = check_service_node_json(c, i.node, i.service, i.checks.iter().copied());
            (i.node.name.clone(), v)
        })
        .collect();
    LocalRun {
        health: LocalHealth {
            healthy: nodes.len(),
            total,
        },
        nodes,
    }
}

fn limit_of(p: &[(String, String)]) -> Result<usize, Response> {
    match param(p, "limit") {
        None | Some("") => Ok(0),
        Some(l) => l
            .parse()
            .map_err(|_| bad(format!("Bad limit {l:?}: want a non-negative integer"))),
    }
}

/// The execute answer (Consul's `PreparedQueryExecuteResponse`).
fn answer(q: &PreparedQuery, dc: &str, nodes: Vec<Value>, failovers: usize) -> Value {
    json!({
        "Service": q.service.service,
        "Nodes": nodes,
        "DNS": {"TTL": q.dns.ttl},
        "Datacenter": dc,
        "Failovers": failovers,
        "Index": 0,
        "LastContact": 0,
        "KnownLeader": true,
        "ConsistencyLevel": "leader",
        "NotModified": false,
        "Backend": 0,
        "ResultsFilteredByACLs": false,
    })
}

/// A remote datacenter's run: its nodes and healthy fraction.
struct RemoteRun {
    nodes: Vec<Value>,
    fraction: f64,
}

impl QueryApi {
    /// The source node of the distance sort: `?near`, else the query's
    /// `Near`; `_agent` is the agent that took the request, `_ip` the node
    /// whose address is the caller's (the first `X-Forwarded-For` entry,
    /// else the connection's peer).
    fn source(
        &self,
        q: &PreparedQuery,
        p: &[(String, String)],
        h: &HeaderMap,
        peer: Option<std::net::IpAddr>,
    ) -> Option<String> {
        let near = param(p, "near")
            .filter(|n| !n.is_empty())
            .unwrap_or(&q.service.near);
        match near {
            "" => None,
            "_agent" => Some(
                h.get(AGENT_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or(&self.agent.node)
                    .to_string(),
            ),
            "_ip" => {
                let ip = h
                    .get("x-forwarded-for")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.split(',').next())
                    .and_then(|v| v.trim().parse::<std::net::IpAddr>().ok())
                    .or(peer)?
                    .to_string();
                self.server
                    .read(|c| c.nodes().find(|n| n.address == ip).map(|n| n.name.clone()))
            }
            n => Some(n.to_string()),
        }
    }

    /// Shuffles, then sorts by estimated RTT from `source` (stable, nodes
    /// without a coordinate last), then puts the source first if it is
    /// among the first 10 (Consul's rule).
    fn order(&self, nodes: &mut [(String, Value)], source: Option<&str>) {
        nodes.shuffle(&mut rand::rng());
        let Some(source) = source else { return };
        let coords = self.agent.lan_coordinates();
        let Some(from) = coords.get(source) else {
            return;
        };
        let dist = |n: &str| coords.get(n).map_or(f64::INFINITY, |c| from.distance_to(c));
        nodes.sort_by(|a, b| dist(&a.0).total_cmp(&dist(&b.0)));
        if let Some(i) = nodes.iter().take(10).position(|(n, _)| n == source) {
            nodes.swap(0, i);
        }
    }

    /// Runs `q` in datacenter `dc` through the federation, within the
    /// query's `Deadline` (if any).
    async fn remote(&self, q: &PreparedQuery, dc: &str, limit: usize) -> Option<RemoteRun> {
        let body = json!({"Query": q.to_json_with_token(), "Limit": limit}).to_string();
        let req = axum::http::Request::builder()
            .method("POST")
            .uri(format!("/v1/internal/query/execute-remote?dc={dc}"))
            .body(Body::from(body))
            .ok()?;
        let call = self.fwd.to_datacenter(dc, req);
        let deadline = q.service.failover.deadline.unwrap_or(DEFAULT_DEADLINE);
        let resp = tokio::time::timeout(deadline, call).await.ok()?;
        if resp.status() != StatusCode::OK {
            return None;
        }
        let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
            .await
            .ok()?;
        let v: Value = serde_json::from_slice(&bytes).ok()?;
        Some(RemoteRun {
            nodes: v["Nodes"].as_array().cloned().unwrap_or_default(),
            fraction: v["HealthyFraction"].as_f64().unwrap_or(0.0),
        })
    }

    fn policy(&self, q: &PreparedQuery) -> FailoverPolicy {
        let f = &q.service.failover;
        let mut datacenters = f.datacenters.clone();
        datacenters.extend(f.targets.iter().map(|t| t.datacenter.clone()));
        FailoverPolicy {
            nearest_n: f.nearest_n as usize,
            datacenters,
            min_healthy_fraction: f.min_healthy_fraction,
            max_p99_ms: f.max_p99.map(|d| d.as_secs_f64() * 1000.0),
            hysteresis: match f.failback_after {
                Some(hold) => Hysteresis {
                    hold,
                    min_evaluations: 1,
                },
                None => Hysteresis::NONE,
            },
        }
    }
}

/// `GET /v1/query/:idOrName/execute`.
async fn execute(
    State(api): State<Arc<QueryApi>>,
    Path(id): Path<String>,
    Query(p): Params,
    headers: HeaderMap,
    ext: axum::http::Extensions,
) -> Response {
    let peer = ext
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let (q, index) = match resolve(&api, &id) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let limit = match limit_of(&p) {
        Ok(l) => l,
        Err(r) => return r,
    };
    let local = api.server.read(|c| run_local(c, &q.service));
    let policy = api.policy(&q);
    let local_fraction = local.health.fraction();
    let here = &api.agent.datacenter;
    let ordering = super::federation::datacenters_by_distance(&api.agent);
    let candidates = policy.candidates(here, &ordering, |dc| {
        super::federation::datacenter_estimate(&api.agent, dc).map(|e| e.p99 * 1000.0)
    });
    // One fail-back state per name asked: a template serves many.
    let key = format!("{}/{}", q.id, id.to_ascii_lowercase());
    let now = api.started.elapsed();
    // Remote runs are needed only when the answers may leave (or are
    // away from) the local datacenter.
    let away = {
        let ch = api.choosers.lock().expect("not poisoned");
        ch.get(&key)
            .and_then(|c| c.current().map(|d| d != here.as_str()))
            .unwrap_or(false)
    };
    let mut remote: HashMap<String, RemoteRun> = HashMap::new();
    if (away || !policy.can_serve(local_fraction)) && !candidates.is_empty() {
        // All candidates at once: the wait is the slowest one's (within the
        // deadline), not their sum.
        let mut set = tokio::task::JoinSet::new();
        for dc in &candidates {
            let (api, q, dc) = (api.clone(), q.clone(), dc.clone());
            set.spawn(async move {
                let r = api.remote(&q, &dc, limit).await;
                (dc, r)
            });
        }
        while let Some(done) = set.join_next().await {
            if let Ok((dc, Some(r))) = done {
                remote.insert(dc, r);
            }
        }
    }
    let decision = {
        let mut ch = api.choosers.lock().expect("not poisoned");
        if ch.len() >= MAX_CHOOSERS && !ch.contains_key(&key) {
            ch.clear();
        }
        let chooser = match ch.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                match Chooser::new(here.clone(), policy.clone()) {
                    Ok(c) => e.insert(c),
                    Err(err) => return bad(err),
                }
            }
        };
        chooser.choose(now, &candidates, |dc| {
            if dc == here.as_str() {
                local_fraction
            } else {
                remote.get(dc).map_or(0.0, |r| r.fraction)
            }
        })
    };
    let mut r = match decision.datacenter.as_deref() {
        Some(dc) if dc != here.as_str() => {
            let nodes = remote.remove(dc).map(|r| r.nodes).unwrap_or_default();
            // The rank among local-then-candidates: Consul's count of
            // remote datacenters tried, the one that answered included.
            reply(&answer(&q, dc, nodes, decision.rank), index)
        }
        _ => {
            let mut nodes = local.nodes;
            let source = api.source(&q, &p, &headers, peer);
            api.order(&mut nodes, source.as_deref());
            if limit > 0 {
                nodes.truncate(limit);
            }
            let nodes = nodes.into_iter().map(|(_, v)| v).collect();
            reply(&answer(&q, here, nodes, 0), index)
        }
    };
    // Why the answer is where it is (tomo).
    if let Ok(v) = HeaderValue::from_str(&format!("{:?}", decision.reason).to_lowercase()) {
        r.headers_mut().insert("X-Tomo-Failover-Reason", v);
    }
    r
}

/// `POST /v1/internal/query/execute-remote` (tomo, between datacenters):
/// runs the definition sent whole, shuffled and limited, and reports the
/// healthy fraction for the caller's failover decision.
async fn execute_remote(State(api): State<Arc<QueryApi>>, body: Bytes) -> Response {
    let (v, q) = match parse_body(&body).and_then(|v| Ok((parse_def(&v["Query"])?, v))) {
        Ok((q, v)) => (v, q),
        Err(r) => return r,
    };
    let limit = v["Limit"].as_u64().unwrap_or(0) as usize;
    let run = api.server.read(|c| run_local(c, &q.service));
    let mut nodes = run.nodes;
    nodes.shuffle(&mut rand::rng());
    if limit > 0 {
        nodes.truncate(limit);
    }
    let fraction = run.health.fraction();
    let mut a = answer(
        &q,
        &api.agent.datacenter,
        nodes.into_iter().map(|(_, v)| v).collect(),
        0,
    );
    a["HealthyFraction"] = json!(fraction);
    reply(&a, api.server.applied())
}

/// The routes, on servers.
pub fn router(server: Arc<Server>, agent: Arc<Shared>, fwd: Arc<Forwarder>) -> Router {
    let api = Arc::new(QueryApi {
        server,
        agent,
        fwd,
        choosers: Mutex::new(HashMap::new()),
        started: Instant::now(),
    });
    Router::new()
        .route("/v1/query", post(create).get(list))
        .route("/v1/query/{id}", get(read).put(update).delete(delete))
        .route("/v1/query/{id}/execute", get(execute))
        .route("/v1/query/{id}/explain", get(explain))
        .route("/v1/internal/query/execute-remote", post(execute_remote))
        .with_state(api)
}
