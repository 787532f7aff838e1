//! Datacenters: what a server knows of the others through the WAN pool,
//! and carrying `?dc=` requests there.
//!
//! Every server is in its datacenter's LAN pool and in the WAN pool of
//! all servers (members named `<node>.<datacenter>`). The WAN pool's
//! coordinates order datacenters by distance (Consul's rule, in
//! [`crate::routing`]: the upper median of the estimated RTTs from the
//! answering server to each datacenter's servers) and give the answers of
//! `/v1/coordinate/datacenters`. A request whose `?dc=` names another
//! datacenter goes whole to one of that datacenter's servers over the
//! peer RPC (nearest first, the next if one refuses the connection) and
//! runs there as a request of its own datacenter; client agents hand such
//! requests to a server of their own first.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use super::forward::{self, Forwarder, NO_PATH};
use super::wire::text;
use super::{Shared, split_wan_name};
use crate::tomography::{Estimate, Source, pair_estimate};
use crate::vivaldi::Coordinate;

/// One server of the WAN pool.
#[derive(Debug, Clone)]
pub struct WanServer {
    /// Node name (without the `.<datacenter>` suffix).
    pub node: String,
    /// Its datacenter.
    pub datacenter: String,
    /// Where its peer RPC listens.
    pub rpc: Option<SocketAddr>,
    /// Up (alive or suspect), as the WAN pool sees it.
    pub alive: bool,
    /// Its last known WAN coordinate.
    pub coord: Option<Coordinate>,
}

/// The WAN pool as this server sees it, itself included (alive, with its
/// own coordinate). Members that left are not listed. Empty on a client
/// agent.
pub fn wan_servers(shared: &Shared) -> Vec<WanServer> {
    let Some(wan) = &shared.wan else {
        return Vec::new();
    };
    let g = wan.gossip.lock().expect("not poisoned");
    let coord = |name: &str| g.table_entry(name).map(|e| e.coordinate.clone());
    let me = g.identity();
    let mut v = vec![WanServer {
        node: shared.node.clone(),
        datacenter: shared.datacenter.clone(),
        rpc: me.rpc_addr(),
        alive: true,
        coord: Some(g.engine().coordinate().clone()),
    }];
    for (id, st) in g.membership_iter() {
        if st == foca::State::Down && g.has_left(&id.name) {
            continue;
        }
        let Some((node, dc)) = split_wan_name(&id.name) else {
            continue;
        };
        v.push(WanServer {
            node: node.to_string(),
            datacenter: dc.to_string(),
            rpc: id.rpc_addr(),
            alive: st != foca::State::Down,
            coord: coord(&id.name),
        });
    }
    v
}

/// Every known datacenter with its estimated RTT (seconds) from this
/// server, nearest first (`/v1/catalog/datacenters`, the `NearestN`
/// failover order): Consul's rule (the upper median over each
/// datacenter's servers, [`crate::routing::order_datacenters`]), with
/// each server's RTT taken from the distribution layer: the median of
/// this server's own WAN probes of it once it has some, the calibrated
/// coordinate estimate before. Coordinates alone misrank datacenters
/// whose paths do not fit a Euclidean space (long ocean crossings); the
/// measured medians do not (`sims/RESULTS.md` §15: the truly nearest
/// other datacenter first 94.2 % → 99.3 % on the geo model). A
/// datacenter whose servers are all down, or have no coordinate yet,
/// comes last (+∞). A client agent knows only its own.
pub fn datacenters_by_distance(shared: &Shared) -> Vec<(String, f64)> {
    let Some(wan) = &shared.wan else {
        return vec![(shared.datacenter.clone(), 0.0)];
    };
    let rtts: Vec<(String, Option<f64>)> = {
        let g = wan.gossip.lock().expect("not poisoned");
        let me = g.engine().coordinate().clone();
        let t = g.tomography();
        g.membership_iter()
            .filter(|(id, st)| !(*st == foca::State::Down && g.has_left(&id.name)))
            .filter_map(|(id, st)| {
                let (_, dc) = split_wan_name(&id.name)?;
                let rtt = (st != foca::State::Down)
                    .then(|| g.table_entry(&id.name))
                    .flatten()
                    .filter(|e| e.coordinate.vec.len() == me.vec.len())
                    .map(|e| {
                        let dist = me.distance_to(&e.coordinate);
                        match t {
                            Some(t) => pair_estimate(t, t, t.sketch(&id.name), None, dist).p50,
                            None => dist,
                        }
                    });
                Some((dc.to_string(), rtt))
            })
            .collect()
    };
    // Failed servers are left out of a datacenter's median while any of
    // its servers is up (half of them down must not make it look
    // unreachable); one with no live server at all comes last.
    let live: std::collections::HashSet<String> = rtts
        .iter()
        .filter(|(_, r)| r.is_some())
        .map(|(dc, _)| dc.clone())
        .collect();
    let mut rtts = rtts;
    rtts.retain(|(dc, r)| r.is_some() || !live.contains(dc));
    crate::routing::order_datacenters(&shared.datacenter, &rtts)
}

/// The estimated RTT distribution (p50/p99, seconds) from this server to
/// datacenter `dc`: for each of `dc`'s live servers, the pair estimate
/// from this server's WAN probes of it (measured) or from the WAN
/// coordinates and this server's calibration (predicted); the server with
/// the upper-median p50 stands for the datacenter, as in the distance
/// order. `None` on a client agent, for an unknown datacenter, or one
/// with no live server.
pub fn datacenter_estimate(shared: &Shared, dc: &str) -> Option<Estimate> {
    let wan = shared.wan.as_ref()?;
    if dc == shared.datacenter {
        return Some(Estimate {
            p50: 0.0,
            p99: 0.0,
            source: Source::Measured,
            samples: 0,
            confidence: 1.0,
        });
    }
    let g = wan.gossip.lock().expect("not poisoned");
    let t = g.tomography()?;
    let me = g.engine().coordinate();
    let mut v: Vec<Estimate> = g
        .membership_iter()
        .filter(|(id, st)| {
            *st != foca::State::Down && split_wan_name(&id.name).is_some_and(|(_, d)| d == dc)
        })
        .filter_map(|(id, _)| {
            let c = &g.table_entry(&id.name)?.coordinate;
            if c.vec.len() != me.vec.len() {
                return None;
            }
            let dist = me.distance_to(c);
            Some(pair_estimate(t, t, t.sketch(&id.name), None, dist))
        })
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.p50.total_cmp(&b.p50));
    Some(v[v.len() / 2])
}

/// The RPC addresses of `dc`'s live servers, nearest (WAN coordinate)
/// first.
pub fn servers_of(shared: &Shared, dc: &str) -> Vec<SocketAddr> {
    let servers = wan_servers(shared);
    // The first entry is this server, with its own coordinate.
    let me = servers.first().and_then(|s| s.coord.clone());
    let mut v: Vec<(f64, SocketAddr)> = servers
        .into_iter()
        .filter(|s| s.alive && s.datacenter.eq_ignore_ascii_case(dc))
        .filter_map(|s| {
            let d = match (&me, &s.coord) {
                (Some(a), Some(b)) if a.vec.len() == b.vec.len() => a.distance_to(b),
                _ => f64::INFINITY,
            };
            Some((d, s.rpc?))
        })
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    v.into_iter().map(|(_, a)| a).collect()
}

/// Paths a `?dc=` sends to another datacenter: the registry, prepared
/// queries and the LAN coordinates of that datacenter.
fn crosses_datacenters(path: &str) -> bool {
    // The datacenters by distance are this server's view whatever `dc`
    // says (Consul ignores it there).
    path != "/v1/catalog/datacenters" && forward::is_registry(path)
        || path.starts_with("/v1/query")
        || path.starts_with("/v1/internal/query/")
        || path.starts_with("/v1/coordinate/nodes")
        || path.starts_with("/v1/coordinate/node/")
}

/// Marks a request one datacenter sent to another: it is answered there
/// or refused, never sent on (a WAN view that disagrees about where a
/// datacenter is must not bounce a request forever).
pub const CROSSED_HEADER: &str = "x-tomo-crossed-dc";

/// Middleware on every agent: a request whose `?dc=` names another
/// datacenter goes there (a client agent hands it to a server of its
/// own datacenter, which carries it on). Datacenter names are compared
/// without regard to case.
pub async fn route_dc(State(f): State<Arc<Forwarder>>, req: Request, next: Next) -> Response {
    let dc = Query::<Vec<(String, String)>>::try_from_uri(req.uri())
        .ok()
        .and_then(|q| q.0.into_iter().rev().find(|(k, _)| k == "dc"))
        .map(|(_, v)| v.to_ascii_lowercase())
        .filter(|dc| !dc.is_empty() && !dc.eq_ignore_ascii_case(&f.shared().datacenter));
    match dc {
        Some(dc) if crosses_datacenters(req.uri().path()) => {
            if req.headers().contains_key(CROSSED_HEADER) {
                return no_path();
            }
            f.to_datacenter(&dc, req).await
        }
        _ => next.run(req).await,
    }
}

/// Servers' endpoints over the WAN pool.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/coordinate/datacenters", get(coordinate_datacenters))
        .with_state(shared)
}

/// One server's entry in `/v1/coordinate/datacenters`.
#[derive(Serialize)]
struct CoordEntry {
    #[serde(rename = "Node")]
    node: String,
    #[serde(rename = "Coord")]
    coord: Coordinate,
}

/// `GET /v1/coordinate/datacenters`: every server's WAN coordinate by
/// datacenter, node names without their `.<datacenter>` suffix, as this
/// server's WAN pool knows them (sorted by datacenter and node, where
/// Consul leaves map order).
async fn coordinate_datacenters(
    State(s): State<Arc<Shared>>,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    let mut by_dc: BTreeMap<String, Vec<CoordEntry>> = BTreeMap::new();
    for srv in wan_servers(&s) {
        let list = by_dc.entry(srv.datacenter).or_default();
        if let Some(coord) = srv.coord {
            list.push(CoordEntry {
                node: srv.node,
                coord,
            });
        }
    }
    let v: Vec<serde_json::Value> = by_dc
        .into_iter()
        .map(|(dc, mut coords)| {
            coords.sort_by(|a, b| a.node.cmp(&b.node));
            serde_json::json!({"Datacenter": dc, "AreaID": "WAN", "Coordinates": coords})
        })
        .collect();
    super::http::json_reply(&s, &p, &v)
}

/// `500 No path to datacenter`, Consul's answer for a datacenter no
/// server is known in.
pub fn no_path() -> Response {
    text(StatusCode::INTERNAL_SERVER_ERROR, NO_PATH).into_response()
}
