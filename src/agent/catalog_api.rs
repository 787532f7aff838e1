//! Consul's catalog and health endpoints (`consul-api.md` §3.2–3.3) on an
//! agent that runs a server, with `?near=` (§2.6): results sorted, stably,
//! by the estimated RTT from the named node (`_agent`: this one) using the
//! LAN coordinate table this agent holds; nodes without a coordinate last,
//! nothing filtered. Reads block on `?index=&wait=`; the lists (nodes,
//! a service's instances and checks, checks by state) go through
//! [`super::watch`], so their watchers share one rendering and answer
//! only when their answer changes.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::Shared;
use super::wire::{field, object, request, service_from, str_of, string_map, text};
use crate::catalog::{Catalog, Check, Command, Health, Node, Service};
use crate::server::Server;
use crate::vivaldi::Coordinate;

/// What the handlers share.
pub struct CatalogApi {
    server: Arc<Server>,
    agent: Arc<Shared>,
    /// Service and health reads, shared by their watchers.
    watches: super::watch::Watches,
}

type Params = Query<Vec<(String, String)>>;

/// The first value of query parameter `k`.
pub(super) fn param<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
    p.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

fn has(p: &[(String, String)], k: &str) -> bool {
    p.iter().any(|(n, _)| n == k)
}

/// A JSON answer with `X-Consul-Index` (never 0).
pub(super) fn reply(v: &Value, index: u64) -> Response {
    reply_body(Bytes::from(v.to_string()), index)
}

/// An already serialized JSON answer with `X-Consul-Index` (never 0).
fn reply_body(body: Bytes, index: u64) -> Response {
    let mut r = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response();
    let h = r.headers_mut();
    // X-Consul-KnownLeader and LastContact: stamped by `forward::dispatch`.
    h.insert("X-Consul-Index", HeaderValue::from(index.max(1)));
    r
}

/// Whether a node's metadata has every `node-meta=key:value` asked for.
fn meta_ok(p: &[(String, String)], meta: &std::collections::BTreeMap<String, String>) -> bool {
    p.iter().filter(|(k, _)| k == "node-meta").all(|(_, kv)| {
        let (k, v) = kv.split_once(':').unwrap_or((kv.as_str(), ""));
        meta.get(k).is_some_and(|m| m == v)
    })
}

/// Blocks a read for `?index=N` until `index_of(catalog)` passes N or the
/// wait runs out.
async fn block(
    server: &Server,
    p: &[(String, String)],
    index_of: impl Fn(&Catalog) -> u64,
) -> Result<(), Response> {
    match super::wire::blocking(param(p, "index"), param(p, "wait")) {
        Err(e) => Err(text(StatusCode::BAD_REQUEST, e)),
        Ok(None) => Ok(()),
        Ok(Some((index, deadline))) => {
            super::wire::wait_catalog(server, index, deadline, index_of).await;
            Ok(())
        }
    }
}

/// A node's tagged addresses: the ones registered, and Consul's defaults
/// (the node's address) for `lan`, `lan_ipv4`, `wan`, `wan_ipv4` not given.
fn tagged(n: &Node) -> std::collections::BTreeMap<String, String> {
    let mut t = n.tagged_addresses.clone();
    for k in ["lan", "lan_ipv4", "wan", "wan_ipv4"] {
        t.entry(k.to_string()).or_insert_with(|| n.address.clone());
    }
    t
}

fn node_json(n: &Node) -> Value {
    json!({
        "ID": n.id,
        "Node": n.name,
        "Address": n.address,
        "Datacenter": n.datacenter,
        "TaggedAddresses": tagged(n),
        "Meta": n.meta,
        "CreateIndex": n.create_index,
        "ModifyIndex": n.modify_index,
    })
}

fn node_service_json(s: &Service) -> Value {
    json!({
        "ID": s.id,
        "Service": s.name,
        "Tags": s.tags,
        "Address": s.address,
        "Meta": s.meta,
        "Port": s.port,
        "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": false,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    })
}

fn service_node_json(n: &Node, s: &Service) -> Value {
    json!({
        "ID": n.id,
        "Node": n.name,
        "Address": n.address,
        "Datacenter": n.datacenter,
        "TaggedAddresses": tagged(n),
        "NodeMeta": n.meta,
        "ServiceKind": "",
        "ServiceID": s.id,
        "ServiceName": s.name,
        "ServiceTags": s.tags,
        "ServiceAddress": s.address,
        "ServiceWeights": {"Passing": 1, "Warning": 1},
        "ServiceMeta": s.meta,
        "ServicePort": s.port,
        "ServiceEnableTagOverride": false,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    })
}

fn check_json(c: &Catalog, node: &str, k: &Check) -> Value {
    let svc = (!k.service_id.is_empty())
        .then(|| c.node_services(node).find(|s| s.id == k.service_id))
        .flatten();
    json!({
        "Node": node,
        "CheckID": k.id,
        "Name": k.name,
        "Status": k.status.as_str(),
        "Notes": k.notes,
        "Output": k.output,
        "ServiceID": k.service_id,
        "ServiceName": svc.map(|s| s.name.as_str()).unwrap_or(""),
        "ServiceTags": svc.map(|s| s.tags.clone()).unwrap_or_default(),
        "Type": "",
        "Interval": "",
        "Timeout": "",
        "Definition": {"Interval": "0s", "Timeout": "0s", "DeregisterCriticalServiceAfter": "0s"},
        "CreateIndex": k.create_index,
        "ModifyIndex": k.modify_index,
    })
}

/// One `CheckServiceNode` (health and prepared-query answers): the node,
/// the instance and the checks that judge it.
pub(super) fn check_service_node_json<'a>(
    c: &Catalog,
    n: &Node,
    s: &Service,
    checks: impl Iterator<Item = &'a Check>,
) -> Value {
    let checks: Vec<Value> = checks.map(|k| check_json(c, &n.name, k)).collect();
    json!({
        "Node": node_json(n),
        "Service": node_service_json(s),
        "Checks": checks,
    })
}

impl CatalogApi {
    /// Whether `?dc=` (if any) names this agent's datacenter, in any case
    /// as the router compares it.
    fn this_dc(&self, p: &[(String, String)]) -> bool {
        param(p, "dc").is_none_or(|dc| dc.eq_ignore_ascii_case(&self.agent.datacenter))
    }

    /// The coordinates `?near=` sorts by: the source's and a lookup for
    /// every node (`None` without `near` or when the source has none).
    fn near(&self, p: &[(String, String)]) -> Option<(Coordinate, HashMap<String, Coordinate>)> {
        let near = param(p, "near").filter(|n| !n.is_empty())?;
        if !self.this_dc(p) {
            return None;
        }
        let source = if near == "_agent" {
            self.agent.node.as_str()
        } else {
            near
        };
        let all = self.agent.lan_coordinates();
        let from = all.get(source)?.clone();
        Some((from, all))
    }

    /// Sorts `items` (stably) by estimated RTT from the `near` node to
    /// each item's node; +∞ for nodes without a coordinate.
    fn sort_near<T>(&self, p: &[(String, String)], items: &mut [T], node_of: impl Fn(&T) -> &str) {
        let Some((from, coords)) = self.near(p) else {
            return;
        };
        let dist = |t: &T| {
            coords
                .get(node_of(t))
                .map_or(f64::INFINITY, |c| from.distance_to(c))
        };
        items.sort_by(|a, b| dist(a).partial_cmp(&dist(b)).unwrap_or(Ordering::Equal));
    }
}

impl CatalogApi {
    /// A read of `(node, entry)` pairs through [`super::watch::Watches`]:
    /// rendered once per index for every caller, blocking until the
    /// answer changes, sorted by `?near=` once per source.
    async fn shared_read(
        &self,
        endpoint: &str,
        name: &str,
        p: &[(String, String)],
        index_of: impl Fn(&Catalog) -> u64,
        render: impl Fn(&Catalog) -> Vec<(String, Value)>,
    ) -> Response {
        let blocking = match super::wire::blocking(param(p, "index"), param(p, "wait")) {
            Err(e) => return text(StatusCode::BAD_REQUEST, e),
            Ok(b) => b,
        };
        let key = super::watch::key(endpoint, name, p);
        let r = self
            .watches
            .read(&self.server, key, blocking, index_of, render)
            .await;
        // Sorted bodies are shared by source; unsorted ones by "". (An
        // unknown source sorts nothing and so shares its own body.)
        let source = match param(p, "near") {
            Some(n) if self.this_dc(p) => n,
            _ => "",
        };
        let body = r.body(source, |items| self.sort_near(p, items, |(n, _)| n));
        reply_body(body, r.index)
    }
}

fn health_of(s: &str) -> Option<Health> {
    match s {
        "passing" | "" => Some(Health::Passing),
        "warning" => Some(Health::Warning),
        "critical" => Some(Health::Critical),
        _ => None,
    }
}

/// Commits a registration's commands as one log entry, so that no reader
/// (a blocking query above all) sees a node without its service or a
/// service without its checks, as Consul applies a registration whole.
async fn commit(api: &CatalogApi, cmds: Vec<Command>) -> Response {
    use crate::catalog::Outcome;
    let failed =
        |e: &dyn std::fmt::Display| text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
    match api.server.write(request(Command::Batch(cmds))).await {
        Ok(Ok(Outcome::Batch(outs))) => {
            if let Some(Err(e)) = outs.iter().find(|o| o.is_err()) {
                return failed(e);
            }
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return failed(&e),
        Err(e) => return failed(&e),
    }
    reply(&json!(true), api.server.applied())
}

/// `PUT /v1/catalog/register`.
pub async fn register(State(api): State<Arc<CatalogApi>>, body: Bytes) -> Response {
    let m = match object(&body) {
        Ok(m) => m,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e),
    };
    let node = str_of(&m, "Node");
    let address = str_of(&m, "Address");
    if node.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Must provide node");
    }
    if address.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Must provide address");
    }
    let dc = Some(str_of(&m, "Datacenter"))
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| api.agent.datacenter.clone());
    let mut cmds = vec![Command::RegisterNode {
        name: node.clone(),
        address,
        datacenter: dc,
        meta: string_map(&m, "NodeMeta"),
        id: str_of(&m, "ID"),
        tagged_addresses: string_map(&m, "TaggedAddresses"),
    }];
    if let Some(Value::Object(s)) = field(&m, "Service") {
        let Some(service) = service_from(s, "Service") else {
            return text(StatusCode::BAD_REQUEST, "Must provide service name");
        };
        cmds.push(Command::RegisterService {
            node: node.clone(),
            service,
        });
    }
    let mut checks: Vec<&Map<String, Value>> = Vec::new();
    if let Some(Value::Object(c)) = field(&m, "Check") {
        checks.push(c);
    }
    if let Some(Value::Array(a)) = field(&m, "Checks") {
        checks.extend(a.iter().filter_map(Value::as_object));
    }
    for c in checks {
        let Some(status) = health_of(&str_of(c, "Status")) else {
            return text(StatusCode::BAD_REQUEST, "Invalid check status");
        };
        let id = Some(str_of(c, "CheckID"))
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| str_of(c, "Name"));
        cmds.push(Command::RegisterCheck {
            node: node.clone(),
            check: Check {
                name: Some(str_of(c, "Name"))
                    .filter(|n| !n.is_empty())
                    .unwrap_or(id.clone()),
                id,
                status,
                output: str_of(c, "Output"),
                notes: str_of(c, "Notes"),
                service_id: str_of(c, "ServiceID"),
                create_index: 0,
                modify_index: 0,
            },
        });
    }
    commit(&api, cmds).await
}

/// `PUT /v1/catalog/deregister`.
pub async fn deregister(State(api): State<Arc<CatalogApi>>, body: Bytes) -> Response {
    let m = match object(&body) {
        Ok(m) => m,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e),
    };
    let node = str_of(&m, "Node");
    if node.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Must provide node");
    }
    let (sid, cid) = (str_of(&m, "ServiceID"), str_of(&m, "CheckID"));
    let cmd = if !sid.is_empty() {
        Command::DeregisterService { node, id: sid }
    } else if !cid.is_empty() {
        Command::DeregisterCheck { node, id: cid }
    } else {
        Command::DeregisterNode { name: node }
    };
    commit(&api, vec![cmd]).await
}

/// `GET /v1/catalog/datacenters`.
pub async fn datacenters(State(api): State<Arc<CatalogApi>>) -> Response {
    let dcs: Vec<String> = super::federation::datacenters_by_distance(&api.agent)
        .into_iter()
        .map(|(dc, _)| dc)
        .collect();
    reply(&json!(dcs), api.server.applied())
}

/// `GET /v1/catalog/nodes`.
pub async fn nodes(State(api): State<Arc<CatalogApi>>, Query(p): Params) -> Response {
    let render = |c: &Catalog| {
        c.nodes()
            .filter(|n| meta_ok(&p, &n.meta))
            .map(|n| (n.name.clone(), node_json(n)))
            .collect()
    };
    api.shared_read("catalog/nodes", "", &p, |c| c.indexes().nodes, render)
        .await
}

/// `GET /v1/catalog/services`.
pub async fn services(State(api): State<Arc<CatalogApi>>, Query(p): Params) -> Response {
    if let Err(r) = block(&api.server, &p, |c| c.indexes().services).await {
        return r;
    }
    let (v, index) = api.server.read(|c| {
        let filtered = p.iter().any(|(k, _)| k == "node-meta");
        let m: Map<String, Value> = c
            .service_names()
            .into_iter()
            .filter(|(n, _)| {
                !filtered
                    || c.service_instances(n)
                        .any(|(node, _)| meta_ok(&p, &node.meta))
            })
            .map(|(n, tags)| (n.to_string(), json!(tags)))
            .collect();
        (Value::Object(m), c.indexes().services)
    });
    reply(&v, index)
}

/// Instances of `name` with every `tag` asked for, on nodes with every
/// `node-meta` asked for, by node then ID.
fn instances(c: &Catalog, name: &str, p: &[(String, String)]) -> Vec<(Node, Service)> {
    let tags: Vec<&str> = p
        .iter()
        .filter(|(k, _)| k == "tag")
        .map(|(_, v)| v.as_str())
        .collect();
    c.service_instances(name)
        .filter(|(n, s)| tags.iter().all(|t| s.tags.iter().any(|x| x == t)) && meta_ok(p, &n.meta))
        .map(|(n, s)| (n.clone(), s.clone()))
        .collect()
}

fn service_index(c: &Catalog) -> u64 {
    c.indexes().services.max(c.indexes().nodes)
}

/// `GET /v1/catalog/service/:name`.
pub async fn service(
    State(api): State<Arc<CatalogApi>>,
    Path(name): Path<String>,
    Query(p): Params,
) -> Response {
    let render = |c: &Catalog| {
        instances(c, &name, &p)
            .into_iter()
            .map(|(n, s)| {
                let v = service_node_json(&n, &s);
                (n.name, v)
            })
            .collect()
    };
    api.shared_read("catalog/service", &name, &p, service_index, render)
        .await
}

/// `GET /v1/catalog/node/:node`: `null` for an unknown node.
pub async fn node(
    State(api): State<Arc<CatalogApi>>,
    Path(name): Path<String>,
    Query(p): Params,
) -> Response {
    if let Err(r) = block(&api.server, &p, service_index).await {
        return r;
    }
    let (v, index) = api.server.read(|c| {
        let v = match c.node(&name) {
            None => Value::Null,
            Some(n) => {
                let services: Map<String, Value> = c
                    .node_services(&name)
                    .map(|s| (s.id.clone(), node_service_json(s)))
                    .collect();
                json!({"Node": node_json(n), "Services": services})
            }
        };
        (v, service_index(c))
    });
    reply(&v, index)
}

fn health_index(c: &Catalog) -> u64 {
    service_index(c).max(c.indexes().checks)
}

/// `GET /v1/health/service/:name`: `[{Node, Service, Checks}]`.
pub async fn health_service(
    State(api): State<Arc<CatalogApi>>,
    Path(name): Path<String>,
    Query(p): Params,
) -> Response {
    let passing = has(&p, "passing")
        && param(&p, "passing").is_none_or(|v| !matches!(v, "0" | "false" | "False"));
    let render = |c: &Catalog| {
        instances(c, &name, &p)
            .into_iter()
            .filter(|(n, s)| !passing || c.instance_health(&n.name, &s.id) == Health::Passing)
            .map(|(n, s)| {
                let checks = c
                    .node_checks(&n.name)
                    .filter(|k| k.service_id.is_empty() || k.service_id == s.id);
                let v = check_service_node_json(c, &n, &s, checks);
                (n.name, v)
            })
            .collect()
    };
    api.shared_read("health/service", &name, &p, health_index, render)
        .await
}

/// `GET /v1/health/node/:node`.
pub async fn health_node(
    State(api): State<Arc<CatalogApi>>,
    Path(name): Path<String>,
    Query(p): Params,
) -> Response {
    if let Err(r) = block(&api.server, &p, |c| c.indexes().checks).await {
        return r;
    }
    let (v, index) = api.server.read(|c| {
        let list: Vec<Value> = c
            .node_checks(&name)
            .map(|k| check_json(c, &name, k))
            .collect();
        (Value::Array(list), c.indexes().checks)
    });
    reply(&v, index)
}

/// `GET /v1/health/checks/:service`.
pub async fn health_checks(
    State(api): State<Arc<CatalogApi>>,
    Path(name): Path<String>,
    Query(p): Params,
) -> Response {
    let render = |c: &Catalog| {
        let mut list = Vec::new();
        for (n, s) in c
            .service_instances(&name)
            .filter(|(n, _)| meta_ok(&p, &n.meta))
        {
            for k in c.node_checks(&n.name).filter(|k| k.service_id == s.id) {
                list.push((n.name.clone(), check_json(c, &n.name, k)));
            }
        }
        list
    };
    api.shared_read("health/checks", &name, &p, health_index, render)
        .await
}

/// `GET /v1/health/state/:state` (`any`, `passing`, `warning`, `critical`).
pub async fn health_state(
    State(api): State<Arc<CatalogApi>>,
    Path(state): Path<String>,
    Query(p): Params,
) -> Response {
    let want = match state.as_str() {
        "any" => None,
        s => match health_of(s).filter(|_| !s.is_empty()) {
            Some(h) => Some(h),
            None => return text(StatusCode::BAD_REQUEST, "Invalid state"),
        },
    };
    let render = |c: &Catalog| {
        let mut list = Vec::new();
        for n in c.nodes().filter(|n| meta_ok(&p, &n.meta)) {
            for k in c.node_checks(&n.name) {
                if want.is_none_or(|w| k.status == w) {
                    list.push((n.name.clone(), check_json(c, &n.name, k)));
                }
            }
        }
        list
    };
    api.shared_read("health/state", &state, &p, |c| c.indexes().checks, render)
        .await
}

/// The catalog and health routes.
pub fn router(server: Arc<Server>, agent: Arc<Shared>) -> axum::Router {
    use axum::routing::{get, put};
    let api = Arc::new(CatalogApi {
        server,
        agent,
        watches: Default::default(),
    });
    axum::Router::new()
        .route("/v1/catalog/register", put(register))
        .route("/v1/catalog/deregister", put(deregister))
        .route("/v1/catalog/datacenters", get(datacenters))
        .route("/v1/catalog/nodes", get(nodes))
        .route("/v1/catalog/services", get(services))
        .route("/v1/catalog/service/{name}", get(service))
        .route("/v1/catalog/node/{node}", get(node))
        .route("/v1/health/service/{name}", get(health_service))
        .route("/v1/health/node/{node}", get(health_node))
        .route("/v1/health/checks/{name}", get(health_checks))
        .route("/v1/health/state/{state}", get(health_state))
        .with_state(api)
}
