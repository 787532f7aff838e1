//! `GET /v1/rtt?from=&to=` (tomo): the estimated RTT distribution between
//! two nodes or two datacenters, at p50 and p99, with how it was obtained
//! and a confidence, from [`crate::tomography`].
//!
//! Each side is a node name or `dc:NAME`; `to` defaults to the answering
//! agent. Nodes are compared with LAN coordinates, datacenters with the
//! servers' WAN coordinates (never mixed: a node and a datacenter is a
//! 400). The answering agent knows the distributions of what it probes
//! itself: a pair with the answering agent (or its datacenter, on a
//! server) at one end is *measured* once it has samples; any other pair
//! is *predicted* from the coordinates and the answering agent's own
//! calibration (the other ends' factors are not gossiped yet). Client
//! agents hand datacenter pairs to a server.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use serde_json::json;

use super::forward::Forwarder;
use super::wire::text;
use super::{Shared, split_wan_name};
use crate::tomography::{Estimate, pair_estimate};

/// One side of the question.
#[derive(Debug, Clone, PartialEq)]
enum End {
    Node(String),
    Datacenter(String),
}

fn end_of(s: &str) -> End {
    match s.strip_prefix("dc:") {
        Some(dc) => End::Datacenter(dc.to_string()),
        None => End::Node(s.to_string()),
    }
}

/// The routes, on every agent.
pub fn router(fwd: Arc<Forwarder>) -> Router {
    Router::new().route("/v1/rtt", get(rtt)).with_state(fwd)
}

async fn rtt(State(f): State<Arc<Forwarder>>, req: Request) -> Response {
    let p: HashMap<String, String> = Query::try_from_uri(req.uri())
        .map(|q: Query<HashMap<String, String>>| q.0)
        .unwrap_or_default();
    let s = f.shared().clone();
    let Some(from) = p.get("from").filter(|v| !v.is_empty()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "Missing from: a node name or dc:NAME",
        );
    };
    let from = end_of(from);
    // `to` defaults to this agent, or its datacenter when `from` is one.
    let here = match from {
        End::Datacenter(_) => format!("dc:{}", s.datacenter),
        End::Node(_) => s.node.clone(),
    };
    let to = end_of(p.get("to").filter(|v| !v.is_empty()).unwrap_or(&here));
    let answer = match (&from, &to) {
        (End::Node(a), End::Node(b)) => nodes(&s, a, b).map(|e| (e, "LAN")),
        (End::Datacenter(a), End::Datacenter(b)) => {
            if s.wan.is_none() {
                // A client agent knows no WAN coordinates.
                return f.to_servers(req).await;
            }
            datacenters(&s, a, b).map(|e| (e, "WAN"))
        }
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                "from and to must both be nodes or both datacenters (dc:NAME)",
            );
        }
    };
    let (e, pool) = match answer {
        Ok(x) => x,
        Err((status, msg)) => return text(status, &msg),
    };
    let name = |e: &End| match e {
        End::Node(n) => n.clone(),
        End::Datacenter(d) => format!("dc:{d}"),
    };
    let v = json!({
        "From": name(&from),
        "To": name(&to),
        "Pool": pool,
        "P50": e.p50,
        "P99": e.p99,
        "Source": e.source,
        "Samples": e.samples,
        "Confidence": e.confidence,
    });
    super::http::json_reply(&s, &p, &v)
}

type Failed = (StatusCode, String);

fn nodes(s: &Shared, a: &str, b: &str) -> Result<Estimate, Failed> {
    let g = s.gossip.lock().expect("not poisoned");
    let coord = |n: &str| {
        if n == s.node {
            Some(g.engine().coordinate().clone())
        } else {
            g.table_entry(n).map(|e| e.coordinate.clone())
        }
    };
    let missing = |n: &str| {
        (
            StatusCode::NOT_FOUND,
            format!("No coordinate for node {n:?}"),
        )
    };
    let ca = coord(a).ok_or_else(|| missing(a))?;
    let cb = coord(b).ok_or_else(|| missing(b))?;
    let t = g
        .tomography()
        .ok_or_else(|| (StatusCode::INTERNAL_SERVER_ERROR, "no tomography".into()))?;
    let dist = ca.distance_to(&cb);
    if a == b {
        return Ok(pair_estimate(t, t, None, None, 0.0));
    }
    // The answering agent's own probes of the other end.
    let sketch = if a == s.node {
        t.sketch(&b.to_string())
    } else if b == s.node {
        t.sketch(&a.to_string())
    } else {
        None
    };
    Ok(pair_estimate(t, t, sketch, None, dist))
}

fn datacenters(s: &Shared, a: &str, b: &str) -> Result<Estimate, Failed> {
    let no_path = || {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            super::forward::NO_PATH.to_string(),
        )
    };
    let known = super::federation::datacenters_by_distance(s);
    for dc in [a, b] {
        if !known.iter().any(|(k, _)| k == dc) {
            return Err(no_path());
        }
    }
    if a == s.datacenter {
        return super::federation::datacenter_estimate(s, b).ok_or_else(no_path);
    }
    if b == s.datacenter {
        return super::federation::datacenter_estimate(s, a).ok_or_else(no_path);
    }
    // Neither end is here: the upper median over the two datacenters'
    // server pairs of their WAN coordinate distance.
    let wan = s.wan.as_ref().ok_or_else(no_path)?;
    let g = wan.gossip.lock().expect("not poisoned");
    let t = g.tomography().ok_or_else(no_path)?;
    let coords = |dc: &str| -> Vec<crate::vivaldi::Coordinate> {
        g.table()
            .filter(|(n, _)| split_wan_name(n).is_some_and(|(_, d)| d == dc))
            .map(|(_, e)| e.coordinate.clone())
            .collect()
    };
    let (ca, cb) = (coords(a), coords(b));
    let mut d: Vec<f64> = ca
        .iter()
        .flat_map(|x| cb.iter().map(move |y| x.distance_to(y)))
        .collect();
    let median = crate::routing::upper_median(&mut d).ok_or_else(no_path)?;
    Ok(pair_estimate(t, t, None, None, median))
}
