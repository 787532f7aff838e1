//! `/v1/status/leader`, `/v1/status/peers` and
//! `/v1/operator/raft/configuration` (`consul-api.md` §3.4) from the Raft
//! state of the server this agent runs.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

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

/// `GET /v1/operator/raft/configuration`.
pub async fn configuration(State(server): State<Arc<Server>>) -> Response {
    let (members, leader) = server.configuration();
    let servers: Vec<Value> = members
        .into_iter()
        .map(|(id, addr, voter)| {
            json!({
                "ID": id.to_string(),
                "Node": format!("server-{id}"),
                "Address": addr,
                "Leader": Some(id) == leader,
                "Voter": voter,
                "ProtocolVersion": "3",
            })
        })
        .collect();
    axum::Json(json!({"Servers": servers, "Index": server.applied()})).into_response()
}

/// The routes.
pub fn router(server: Arc<Server>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/v1/status/leader", get(leader))
        .route("/v1/status/peers", get(peers))
        .route("/v1/operator/raft/configuration", get(configuration))
        .with_state(server)
}
