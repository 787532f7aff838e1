//! The agent's HTTP API in Consul's shapes (`../shared/docs/consul-api.md`
//! §1 and §2.2): agent self and members, join and leave, and the LAN
//! coordinate endpoints. Compact JSON by default, `?pretty` for 4-space
//! indentation, `X-Consul-Index` on reads, text/plain error bodies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Shared;
use crate::vivaldi::Coordinate;

/// The routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/agent/self", get(agent_self))
        .route("/v1/agent/members", get(members))
        // GET too: python-consul 0.7.1 sends it.
        .route("/v1/agent/join/{address}", put(join).get(join))
        .route("/v1/agent/leave", put(leave))
        .route("/v1/coordinate/nodes", get(coordinate_nodes))
        .route("/v1/coordinate/node/{node}", get(coordinate_node))
        .route("/v1/coordinate/update", put(coordinate_update))
        .route("/v1/tomo/link/drop/{address}", put(link_drop))
        .with_state(shared)
}

type Params = Query<HashMap<String, String>>;

/// A JSON body, pretty with `?pretty`, with `X-Consul-Index`.
pub(crate) fn json_reply(
    shared: &Shared,
    params: &HashMap<String, String>,
    v: &impl Serialize,
) -> Response {
    let body = if params.contains_key("pretty") {
        let mut out = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        if v.serialize(&mut ser).is_err() {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed");
        }
        out.push(b'\n');
        out
    } else {
        match serde_json::to_vec(v) {
            Ok(b) => b,
            Err(_) => return text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed"),
        }
    };
    let index = shared.index.load(Ordering::Relaxed).max(1);
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert("X-Consul-Index", HeaderValue::from(index));
    h.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    r
}

fn text(status: StatusCode, msg: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg.to_string(),
    )
        .into_response()
}

/// A member entry as `/v1/agent/members` shows it.
fn member(id: &crate::gossip::Id, dc: &str, status: u8) -> Value {
    let (name, addr) = (&id.name, id.addr);
    // Consul's `role` tag: `consul` for servers, `node` for client agents.
    let role = if id.server.is_some() {
        "consul"
    } else {
        "node"
    };
    json!({
        "Name": name,
        "Addr": addr.ip().to_string(),
        "Port": addr.port(),
        "Tags": {"dc": dc, "role": role, "port": addr.port().to_string(), "vsn": "2", "build": concat!("tomo:", env!("CARGO_PKG_VERSION"))},
        // 1 alive (suspects included, as Consul shows them), 4 failed.
        "Status": status,
        "ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2,
        "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4,
    })
}

async fn agent_self(State(s): State<Arc<Shared>>, Query(p): Params) -> Response {
    let (coord, stats, me) = {
        let g = s.gossip.lock().expect("not poisoned");
        (
            g.engine().published().clone(),
            g.stats(),
            g.identity().clone(),
        )
    };
    let v = json!({
        "Config": {
            "Datacenter": s.datacenter,
            "PrimaryDatacenter": s.datacenter,
            "NodeName": s.node,
            "NodeID": "",
            "Revision": "",
            "Server": me.server.is_some(),
            "Version": env!("CARGO_PKG_VERSION"),
            "BuildDate": "",
        },
        "DebugConfig": {},
        "Coord": coord,
        "Member": member(&me, &s.datacenter, 1),
                "Stats": {"tomo": {"uptime_s": s.started.elapsed().as_secs()}, "gossip": stats},
        "Meta": {},
    });
    json_reply(&s, &p, &v)
}

/// A blocking query on the agent's own index: returns once the index has
/// moved past the one asked for, or the wait is over.
async fn block(s: &Shared, p: &HashMap<String, String>) -> Result<(), Response> {
    let q = |k: &str| p.get(k).map(|v| v.as_str());
    let Some((index, deadline)) = super::wire::blocking(q("index"), q("wait"))
        .map_err(|e| text(StatusCode::BAD_REQUEST, e))?
    else {
        return Ok(());
    };
    loop {
        let changed = s.changed.notified();
        if s.index.load(Ordering::Relaxed) > index {
            return Ok(());
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            return Ok(());
        }
    }
}

async fn members(State(s): State<Arc<Shared>>, Query(p): Params) -> Response {
    if let Err(r) = block(&s, &p).await {
        return r;
    }
    // `?wan`: the WAN pool (servers of every datacenter, named
    // `<node>.<datacenter>`); empty on a client agent, as in Consul.
    let pool = pool_of(&p);
    let wan = pool == super::Pool::Wan;
    let list: Vec<Value> = match s.pool(pool) {
        None => Vec::new(),
        Some(g) => {
            let g = g.lock().expect("not poisoned");
            let me = g.identity();
            let dc_of = |name: &str| {
                if wan {
                    super::split_wan_name(name)
                        .map_or("", |(_, dc)| dc)
                        .to_string()
                } else {
                    s.datacenter.clone()
                }
            };
            let mut v = vec![member(me, &s.datacenter, 1)];
            let mut others = g.membership();
            others.sort_by(|a, b| a.0.name.cmp(&b.0.name));
            for (id, state) in others {
                // Consul: 1 alive, 3 left, 4 failed.
                let status = match state {
                    foca::State::Down if g.has_left(&id.name) => 3,
                    foca::State::Down => 4,
                    _ => 1,
                };
                v.push(member(&id, &dc_of(&id.name), status));
            }
            v
        }
    };
    json_reply(&s, &p, &list)
}

/// `?wan` (presence) names the WAN pool, as in Consul.
fn pool_of(p: &HashMap<String, String>) -> super::Pool {
    if p.contains_key("wan") {
        super::Pool::Wan
    } else {
        super::Pool::Lan
    }
}

/// `PUT|GET /v1/agent/join/:address`, with `?wan` (presence) the WAN pool.
async fn join(
    State(s): State<Arc<Shared>>,
    Path(address): Path<String>,
    Query(p): Params,
) -> Response {
    let Ok(addr) = address.parse::<SocketAddr>() else {
        return text(
            StatusCode::BAD_REQUEST,
            &format!("Invalid address {address:?}: want host:port"),
        );
    };
    let pool = pool_of(&p);
    match s.join(pool, addr).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn leave(State(s): State<Arc<Shared>>) -> Response {
    match s.leave().await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// One entry of the coordinate endpoints.
#[derive(Serialize)]
struct CoordEntry {
    #[serde(rename = "Node")]
    node: String,
    #[serde(rename = "Segment")]
    segment: String,
    #[serde(rename = "Coord")]
    coord: Coordinate,
}

fn coordinate_table(s: &Shared) -> Vec<CoordEntry> {
    let g = s.gossip.lock().expect("not poisoned");
    let mut v: Vec<CoordEntry> = g
        .table()
        .map(|(name, e)| CoordEntry {
            node: name.to_string(),
            segment: String::new(),
            coord: e.coordinate.clone(),
        })
        .collect();
    // This agent's own coordinate, even before it has published one (a
    // lone agent never does), as Consul's agents always report theirs.
    if !v.iter().any(|e| e.node == s.node) {
        v.push(CoordEntry {
            node: s.node.clone(),
            segment: String::new(),
            coord: g.engine().coordinate().clone(),
        });
    }
    v.sort_by(|a, b| a.node.cmp(&b.node));
    v
}

async fn coordinate_nodes(State(s): State<Arc<Shared>>, Query(p): Params) -> Response {
    if let Err(r) = block(&s, &p).await {
        return r;
    }
    let v = coordinate_table(&s);
    json_reply(&s, &p, &v)
}

async fn coordinate_node(
    State(s): State<Arc<Shared>>,
    Path(node): Path<String>,
    Query(p): Params,
) -> Response {
    if let Err(r) = block(&s, &p).await {
        return r;
    }
    let v: Vec<CoordEntry> = coordinate_table(&s)
        .into_iter()
        .filter(|e| e.node == node)
        .collect();
    if v.is_empty() {
        // Consul: 404 with an empty body.
        return StatusCode::NOT_FOUND.into_response();
    }
    json_reply(&s, &p, &v)
}

/// `PUT /v1/coordinate/update` body.
#[derive(Deserialize)]
struct CoordUpdate {
    #[serde(rename = "Node")]
    node: String,
    #[serde(rename = "Coord")]
    coord: Coordinate,
}

async fn coordinate_update(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    // Parse loosely first so NaN-like values (which JSON cannot carry but
    // clients send as huge numbers or strings) give Consul's texts.
    let u: CoordUpdate = match serde_json::from_slice(&body) {
        Ok(u) => u,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("Request decode failed: {e}"),
            );
        }
    };
    if u.node.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing node name");
    }
    let mut g = s.gossip.lock().expect("not poisoned");
    if u.coord.vec.len() != g.engine().config().dimensionality {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "incompatible coordinate");
    }
    if !u.coord.is_valid() {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "invalid coordinate");
    }
    let now = s.started.elapsed();
    match g.insert_coordinate(u.node, u.coord, now) {
        Ok(()) => {
            drop(g);
            s.bump();
            StatusCode::OK.into_response()
        }
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "invalid coordinate"),
    }
}

/// tomo extension for tests and demos: start (`?enable=true`, default) or
/// stop (`?enable=false`) dropping datagrams to a gossip address.
async fn link_drop(
    State(s): State<Arc<Shared>>,
    Path(address): Path<String>,
    Query(p): Params,
) -> Response {
    let Some(link) = &s.link else {
        return text(
            StatusCode::BAD_REQUEST,
            "link emulation is off on this agent",
        );
    };
    let Ok(addr) = address.parse::<SocketAddr>() else {
        return text(
            StatusCode::BAD_REQUEST,
            &format!("Invalid address {address:?}: want host:port"),
        );
    };
    let enable = p.get("enable").is_none_or(|v| v != "false");
    link.set_dropped(addr, enable);
    StatusCode::OK.into_response()
}
