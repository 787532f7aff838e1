//! `/v1/status/leader`, `/v1/status/peers`,
//! `/v1/operator/raft/configuration` (`consul-api.md` §3.4) from the Raft
//! state of the server this agent runs, and `DELETE
//! /v1/operator/raft/peer` (on the leader).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::Shared;
use crate::server::Server;

/// `GET /v1/status/leader`: the leader's RPC address as a JSON string,
/// `""` when none is known.
pub async fn leader(State(server): State<Arc<Server>>) -> Response {
    let (members, leader) = server.configuration();
    let addr = leader
        .and_then(|l| members.iter().find(|m| m.0 == l))
        .map(|m| m.1.clone())
        .unwrap_or_default();
    axum::Json(Value::String(addr)).into_response()
}

/// `GET /v1/status/peers`: the voters' RPC addresses.
pub async fn peers(State(server): State<Arc<Server>>) -> Response {
    let (members, _) = server.configuration();
    let list: Vec<String> = members.into_iter().filter(|m| m.2).map(|m| m.1).collect();
    axum::Json(json!(list)).into_response()
}

/// Raft IDs' node names: this server's, and those gossip shows.
fn server_names(shared: &Shared, server: &Server) -> HashMap<u64, String> {
    let mut names: HashMap<u64, String> = shared
        .gossip
        .lock()
        .expect("not poisoned")
        .membership_iter()
        .filter_map(|(id, _)| Some((id.server?.raft_id, id.name.clone())))
        .collect();
    names.insert(server.id, shared.node.clone());
    names
}

/// `GET /v1/operator/raft/configuration`: `Node` is the server's node
/// name when gossip knows it.
pub async fn configuration(server: &Server, shared: &Shared) -> Response {
    let (members, leader) = server.configuration();
    let names = server_names(shared, server);
    let servers: Vec<Value> = members
        .into_iter()
        .map(|(id, addr, voter)| {
            json!({
                "ID": id.to_string(),
                "Node": names.get(&id).cloned().unwrap_or_else(|| format!("server-{id}")),
                "Address": addr,
                "Leader": Some(id) == leader,
                "Voter": voter,
                "ProtocolVersion": "3",
            })
        })
        .collect();
    axum::Json(json!({"Servers": servers, "Index": server.applied()})).into_response()
}

/// `DELETE /v1/operator/raft/peer?id=|address=`: takes a server out of
/// the group (Consul's `operator raft remove-peer`).
pub async fn remove_peer(
    State(server): State<Arc<Server>>,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    let (members, _) = server.configuration();
    let found = match (p.get("id"), p.get("address")) {
        (Some(id), _) => members
            .iter()
            .find(|m| m.0.to_string() == *id)
            .map(|m| m.0)
            .ok_or_else(|| format!("id {id:?} was not found in the Raft configuration")),
        (None, Some(a)) => members
            .iter()
            .find(|m| m.1 == *a)
            .map(|m| m.0)
            .ok_or_else(|| format!("address {a:?} was not found in the Raft configuration")),
        (None, None) => {
            return super::wire::text(
                StatusCode::BAD_REQUEST,
                "Must specify either ?id with the server's ID or ?address with IP:port of peer to remove",
            );
        }
    };
    let id = match found {
        Ok(id) => id,
        Err(e) => return super::wire::text(StatusCode::INTERNAL_SERVER_ERROR, &e),
    };
    match server.remove(id).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => super::wire::text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// The routes.
pub fn router(server: Arc<Server>, shared: Arc<Shared>) -> axum::Router {
    use axum::routing::{delete, get};
    axum::Router::new()
        .route("/v1/status/leader", get(leader))
        .route("/v1/status/peers", get(peers))
        .route(
            "/v1/operator/raft/configuration",
            get(move |State(server): State<Arc<Server>>| async move {
                configuration(&server, &shared).await
            }),
        )
        .route("/v1/operator/raft/peer", delete(remove_peer))
        .with_state(server)
}
