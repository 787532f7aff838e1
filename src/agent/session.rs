//! Consul's session endpoints (`consul-api.md` §4.2) on an agent that runs
//! a server: create, destroy, renew, info, node, list; TTLs enforced by
//! destroying a session not renewed within twice its TTL (Consul's
//! multiplier, which Patroni counts on). The TTL clock is the leader's:
//! session requests are answered there ([`super::forward`]), and a new
//! leader gives every TTL session it finds a full TTL × 2 ([`Sessions::adopt`]),
//! as Consul's does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

use super::kv::parse_go_duration;
use super::wire::{field, object, request, text};
use crate::catalog::{Behavior, Command, DEFAULT_LOCK_DELAY, Outcome, SERF_HEALTH, Session};
use crate::server::Server;

/// Consul's default `session_ttl_min`.
pub const DEFAULT_TTL_MIN: Duration = Duration::from_secs(10);
/// The longest session TTL.
const TTL_MAX: Duration = Duration::from_secs(24 * 3600);

/// The session API's state: the server and the TTL deadlines.
pub struct Sessions {
    server: Arc<Server>,
    /// This agent's node (the default `Node`).
    node: String,
    /// The shortest TTL accepted (Consul's `session_ttl_min`).
    ttl_min: Duration,
    /// Session ID → (TTL, invalidate after).
    deadlines: Mutex<HashMap<String, (Duration, Instant)>>,
}

impl Sessions {
    /// Session endpoints for `server`, on behalf of agent `node`, with
    /// TTLs of at least `ttl_min`.
    pub fn new(server: Arc<Server>, node: String, ttl_min: Duration) -> Arc<Sessions> {
        Arc::new(Sessions {
            server,
            node,
            ttl_min,
            deadlines: Mutex::new(HashMap::new()),
        })
    }

    /// Restarts the TTL clock of every session in the catalog that has a
    /// TTL, as a new leader must (renewals went to the old one): after
    /// everything committed is applied here, so that no session created
    /// at the old leader's end is missed, each gets a full TTL × 2.
    pub async fn adopt(&self) -> Result<(), crate::server::ServerError> {
        let ttls: Vec<(String, Duration)> = self
            .server
            .read_consistent(|c| {
                c.sessions()
                    .filter_map(|s| Some((s.id.clone(), s.ttl?)))
                    .collect()
            })
            .await?;
        let now = Instant::now();
        let mut d = self.deadlines.lock().expect("not poisoned");
        d.clear();
        for (id, ttl) in ttls {
            d.insert(id, (ttl, now + ttl * 2));
        }
        Ok(())
    }

    /// Forgets every deadline (on losing leadership: the next leader times
    /// the sessions, and stale deadlines must not fire if this server
    /// leads again).
    pub fn forget(&self) {
        self.deadlines.lock().expect("not poisoned").clear();
    }

    /// Destroys sessions whose TTL × 2 has passed; call it every second or
    /// so.
    pub async fn expire(&self, now: Instant) {
        let due: Vec<String> = {
            let mut d = self.deadlines.lock().expect("not poisoned");
            let due: Vec<String> = d
                .iter()
                .filter(|(_, (_, at))| *at <= now)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &due {
                d.remove(id);
            }
            due
        };
        for id in due {
            let _ = self
                .server
                .write(request(Command::SessionDestroy { id }))
                .await;
        }
    }
}

/// A session as Consul shows it.
fn session_json(s: &Session) -> Value {
    json!({
        "ID": s.id,
        "Name": s.name,
        "Node": s.node,
        "LockDelay": s.lock_delay.as_nanos() as u64,
        "Behavior": match s.behavior {
            Behavior::Release => "release",
            Behavior::Delete => "delete",
        },
        "TTL": s.ttl.map(crate::query::format_go_duration).unwrap_or_default(),
        "NodeChecks": s.checks,
        "ServiceChecks": Value::Null,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    })
}

/// A random UUID (version 4) for a new session.
fn uuid() -> String {
    crate::query::uuid_v4(rand::random())
}

/// `LockDelay`: a Go duration string or a number of nanoseconds; under
/// 1000 ns it means seconds (Consul's rule); at most 60 s.
fn lock_delay(v: &Value) -> Result<Duration, String> {
    let d = match v {
        Value::String(s) => parse_go_duration(s)
            .ok_or_else(|| format!("Request decode failed: invalid LockDelay {s:?}"))?,
        Value::Number(n) => Duration::from_nanos(n.as_f64().unwrap_or(0.0).max(0.0) as u64),
        _ => return Err("Request decode failed: LockDelay".into()),
    };
    let d = if d < Duration::from_nanos(1000) {
        Duration::from_secs(d.as_nanos() as u64)
    } else {
        d
    };
    Ok(d.min(crate::catalog::MAX_LOCK_DELAY))
}

/// `PUT /v1/session/create`.
pub async fn create(State(st): State<Arc<Sessions>>, body: Bytes) -> Response {
    let obj = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::Map::new()
    } else {
        match object(&body) {
            Ok(m) => m,
            Err(e) => return text(StatusCode::BAD_REQUEST, &e),
        }
    };
    let str_field = |k: &str| field(&obj, k).and_then(Value::as_str).map(str::to_string);
    let behavior = match str_field("Behavior").as_deref() {
        None | Some("") | Some("release") => Behavior::Release,
        Some("delete") => Behavior::Delete,
        Some(other) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("Invalid Behavior setting '{other}'"),
            );
        }
    };
    let ttl = match str_field("TTL").filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => match parse_go_duration(&t) {
            None => {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("Session TTL '{t}' invalid: time: invalid duration \"{t}\""),
                );
            }
            Some(d) if d < st.ttl_min || d > TTL_MAX => {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!(
                        "Invalid Session TTL '{}', must be between [{}=24h0m0s]",
                        d.as_nanos(),
                        crate::query::format_go_duration(st.ttl_min)
                    ),
                );
            }
            Some(d) => Some(d),
        },
    };
    let lock_delay = match field(&obj, "LockDelay") {
        None => DEFAULT_LOCK_DELAY,
        Some(v) => match lock_delay(v) {
            Ok(d) => d,
            Err(e) => return text(StatusCode::BAD_REQUEST, &e),
        },
    };
    // Any `Checks`/`NodeChecks` key replaces the default serfHealth, `[]`
    // included.
    let checks = match field(&obj, "Checks").or(field(&obj, "NodeChecks")) {
        None => vec![SERF_HEALTH.to_string()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|c| c.as_str().map(str::to_string))
            .collect(),
        Some(Value::Null) => Vec::new(),
        Some(_) => return text(StatusCode::BAD_REQUEST, "Request decode failed: Checks"),
    };
    let session = Session {
        id: uuid(),
        name: str_field("Name").unwrap_or_default(),
        node: str_field("Node")
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| st.node.clone()),
        checks,
        lock_delay,
        behavior,
        ttl,
        create_index: 0,
        modify_index: 0,
    };
    match st
        .server
        .write(request(Command::SessionCreate(session)))
        .await
    {
        Ok(Ok(Outcome::Session(id))) => {
            if let Some(t) = ttl {
                st.deadlines
                    .lock()
                    .expect("not poisoned")
                    .insert(id.clone(), (t, Instant::now() + 2 * t));
            }
            super::catalog_api::reply(&json!({ "ID": id }), st.server.applied())
        }
        Ok(Ok(other)) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("unexpected outcome {other:?}"),
        ),
        Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// `PUT /v1/session/destroy/:id`: `true`, even for an unknown ID.
pub async fn destroy(State(st): State<Arc<Sessions>>, Path(id): Path<String>) -> Response {
    st.deadlines.lock().expect("not poisoned").remove(&id);
    match st
        .server
        .write(request(Command::SessionDestroy { id }))
        .await
    {
        Ok(_) => super::catalog_api::reply(&json!(true), st.server.applied()),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// `PUT /v1/session/renew/:id`: the session, its TTL clock reset; 404 for
/// an unknown one (python-consul raises NotFound, Patroni then creates a
/// new session).
pub async fn renew(State(st): State<Arc<Sessions>>, Path(id): Path<String>) -> Response {
    let Some(s) = st.server.read(|c| c.session(&id).cloned()) else {
        return text(
            StatusCode::NOT_FOUND,
            &format!("Session id '{id}' not found"),
        );
    };
    if let Some(t) = s.ttl {
        st.deadlines
            .lock()
            .expect("not poisoned")
            .insert(id, (t, Instant::now() + 2 * t));
    }
    super::catalog_api::reply(&json!([session_json(&s)]), st.server.applied())
}

/// Answers a session read, the sessions `keep` admits: with `?index=N`
/// it waits until the session table's index passes N or the wait runs
/// out, since every session read is a blocking query (python-consul's
/// `session.list/node/info(index=, wait=)`).
async fn sessions(
    st: &Sessions,
    p: &HashMap<String, String>,
    keep: impl Fn(&Session) -> bool,
) -> Response {
    let q = |k: &str| p.get(k).map(String::as_str);
    match super::wire::blocking(q("index"), q("wait")) {
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
        Ok(None) => {}
        Ok(Some((index, deadline))) => {
            super::wire::wait_catalog(&st.server, index, deadline, |c| c.indexes().sessions).await;
        }
    }
    let (list, index) = st.server.read(|c| {
        let list: Vec<Value> = c.sessions().filter(|s| keep(s)).map(session_json).collect();
        (list, c.indexes().sessions)
    });
    super::catalog_api::reply(&Value::Array(list), index)
}

/// `GET /v1/session/info/:id`: `[session]`, or `[]` when unknown.
pub async fn info(
    State(st): State<Arc<Sessions>>,
    Path(id): Path<String>,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    sessions(&st, &p, |s| s.id == id).await
}

/// `GET /v1/session/node/:node`.
pub async fn node(
    State(st): State<Arc<Sessions>>,
    Path(node): Path<String>,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    sessions(&st, &p, |s| s.node == node).await
}

/// `GET /v1/session/list`.
pub async fn list(
    State(st): State<Arc<Sessions>>,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    sessions(&st, &p, |_| true).await
}

/// The session routes.
pub fn router(st: Arc<Sessions>) -> axum::Router {
    use axum::routing::{get, put};
    axum::Router::new()
        .route("/v1/session/create", put(create))
        .route("/v1/session/destroy/{id}", put(destroy))
        .route("/v1/session/renew/{id}", put(renew))
        .route("/v1/session/info/{id}", get(info))
        .route("/v1/session/node/{node}", get(node))
        .route("/v1/session/list", get(list))
        .with_state(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_print_as_go_does_and_ids_are_uuids() {
        assert_eq!(
            crate::query::format_go_duration(Duration::from_secs(30)),
            "30s"
        );
        assert_eq!(
            crate::query::format_go_duration(Duration::from_secs(90)),
            "1m30s"
        );
        assert_eq!(
            crate::query::format_go_duration(Duration::from_secs(3600)),
            "1h0m0s"
        );
        assert_eq!(
            crate::query::format_go_duration(Duration::from_millis(1500)),
            "1.5s"
        );
        let id = uuid();
        assert_eq!(id.len(), 36);
        assert_eq!(id.as_bytes()[14], b'4');
        assert!(
            matches!(id.as_bytes()[19], b'8' | b'9' | b'a' | b'b'),
            "{id}"
        );
        assert_ne!(uuid(), id);
    }

    #[test]
    fn lock_delays_follow_consul() {
        assert_eq!(lock_delay(&json!("15s")), Ok(Duration::from_secs(15)));
        assert_eq!(lock_delay(&json!("0.001s")), Ok(Duration::from_millis(1)));
        // Under 1000 ns means seconds.
        assert_eq!(lock_delay(&json!(15)), Ok(Duration::from_secs(15)));
        assert_eq!(
            lock_delay(&json!(2_000_000_000u64)),
            Ok(Duration::from_secs(2))
        );
        assert_eq!(lock_delay(&json!("5m")), Ok(Duration::from_secs(60)));
        assert!(lock_delay(&json!("soon")).is_err());
    }
}
