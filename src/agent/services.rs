//! Consul's agent service and check endpoints (`consul-api.md` §3.4) on
//! any agent: register and deregister services with their checks, TTL
//! checks turned critical when not updated in time, TCP and HTTP checks
//! run every interval, `check/pass|warn|fail|update`, node and service
//! maintenance (`agent/maintenance`, `agent/service/maintenance/:id`).
//! IDs in paths may contain `/`. GET is accepted
//! where python-consul 0.7.1 (Patroni's) sends it. The agent keeps its
//! services and checks itself (what `/v1/agent/*` shows) and writes every
//! change to the catalog through the registry; a change the registry did
//! not take is written again every second until it does (anti-entropy).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::forward::Forwarder;
use super::kv::parse_go_duration;
use super::wire::{field, object, request, service_from, str_of, text};
use crate::catalog::{Check, Command, Health, Service};

/// How a check is run.
#[derive(Debug, Clone)]
enum Probe {
    /// Updated by the application; critical when `ttl` passes without.
    Ttl(Duration),
    /// `GET url`: 2xx passing, 429 warning, else critical.
    Http(String),
    /// A TCP connect.
    Tcp(String),
    /// Node or service maintenance (`_node_maintenance`,
    /// `_service_maintenance:<id>`): critical until maintenance ends,
    /// never run.
    Maintenance,
}

#[derive(Debug, Clone)]
struct LocalCheck {
    /// What the catalog should show.
    check: Check,
    probe: Probe,
    interval: Duration,
    timeout: Duration,
    /// TTL: when it expires; others: when it runs next.
    due: Instant,
    /// Deregister the check's service after it has been critical this long
    /// (`DeregisterCriticalServiceAfter`).
    deregister_after: Option<Duration>,
    /// Since when it has been critical.
    critical_since: Option<Instant>,
}

impl LocalCheck {
    fn set(&mut self, status: Health, output: String, now: Instant) {
        self.check.status = status;
        self.check.output = output;
        self.critical_since = match status {
            Health::Critical => Some(self.critical_since.unwrap_or(now)),
            _ => None,
        };
    }
}

/// Consul's floor for `DeregisterCriticalServiceAfter`.
pub const DEREGISTER_CRITICAL_MIN: Duration = Duration::from_secs(60);

/// The agent's local services and checks.
pub struct AgentServices {
    fwd: Arc<Forwarder>,
    node: String,
    datacenter: String,
    services: Mutex<BTreeMap<String, Service>>,
    checks: Mutex<BTreeMap<String, LocalCheck>>,
    /// Catalog writes that failed, retried every tick (in order).
    unsynced: Mutex<Vec<Command>>,
    /// The shortest `DeregisterCriticalServiceAfter` honoured.
    deregister_min: Duration,
}

type Params = Query<HashMap<String, String>>;

fn dur_of(m: &Map<String, Value>, k: &str) -> Result<Option<Duration>, String> {
    match field(m, k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => parse_go_duration(s)
            .map(Some)
            .ok_or_else(|| format!("Request decode failed: invalid duration {s:?} for {k}")),
        Some(Value::Number(n)) => Ok(Some(Duration::from_nanos(n.as_u64().unwrap_or(0)))),
        Some(_) => Err(format!("Request decode failed: {k}")),
    }
}

impl AgentServices {
    /// The endpoints for agent `node` in `datacenter`, writing to the
    /// catalog through `fwd`.
    /// `DeregisterCriticalServiceAfter` below `deregister_min` is raised to
    /// it (Consul: one minute).
    pub fn new(
        fwd: Arc<Forwarder>,
        node: String,
        datacenter: String,
        deregister_min: Duration,
    ) -> Arc<AgentServices> {
        Arc::new(AgentServices {
            fwd,
            node,
            datacenter,
            services: Mutex::new(BTreeMap::new()),
            checks: Mutex::new(BTreeMap::new()),
            unsynced: Mutex::new(Vec::new()),
            deregister_min,
        })
    }

    /// Writes `cmd` to the catalog. A registry that cannot be reached gets
    /// it later (the agent's state already changed); one that refuses it
    /// says why.
    async fn write(&self, cmd: Command) -> Result<(), String> {
        {
            // Behind writes still waiting for a server, a write waits its
            // turn: sent now it could overtake them (a deregistration
            // before the registration it undoes, which then comes back).
            let mut queued = self.unsynced.lock().expect("not poisoned");
            if !queued.is_empty() {
                queued.push(cmd);
                return Ok(());
            }
        }
        match self.fwd.write(request(cmd.clone())).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => {
                self.unsynced.lock().expect("not poisoned").push(cmd);
                Ok(())
            }
        }
    }

    /// Retries catalog writes that did not get through.
    async fn sync(&self) {
        let pending = std::mem::take(&mut *self.unsynced.lock().expect("not poisoned"));
        let mut rest = pending.into_iter();
        for cmd in rest.by_ref() {
            if self.fwd.write(request(cmd.clone())).await.is_err() {
                let mut u = self.unsynced.lock().expect("not poisoned");
                let later = std::mem::take(&mut *u);
                u.push(cmd);
                u.extend(rest);
                u.extend(later);
                return;
            }
        }
    }

    /// Parses a check definition and registers it (catalog and runner).
    /// Parses a check definition (nothing changes on an error).
    fn parse_check(
        &self,
        c: &Map<String, Value>,
        service_id: &str,
        fallback_id: String,
    ) -> Result<LocalCheck, String> {
        let ttl = dur_of(c, "TTL")?;
        let interval = dur_of(c, "Interval")?.unwrap_or(Duration::from_secs(10));
        let timeout = dur_of(c, "Timeout")?.unwrap_or(Duration::from_secs(10));
        let deregister_after = dur_of(c, "DeregisterCriticalServiceAfter")?
            .filter(|d| !d.is_zero())
            .map(|d| d.max(self.deregister_min));
        let (http, tcp) = (str_of(c, "HTTP"), str_of(c, "TCP"));
        let probe = match (ttl, http.is_empty(), tcp.is_empty()) {
            (Some(t), _, _) => Probe::Ttl(t),
            (None, false, _) => Probe::Http(http),
            (None, true, false) => Probe::Tcp(tcp),
            _ => return Err("Check types that are not TTL, HTTP or TCP are not supported".into()),
        };
        let id = [str_of(c, "CheckID"), str_of(c, "ID")]
            .into_iter()
            .find(|i| !i.is_empty())
            .unwrap_or(fallback_id);
        let status = match str_of(c, "Status").as_str() {
            "passing" => Health::Passing,
            "warning" => Health::Warning,
            // Consul's checks start critical until they pass.
            _ => Health::Critical,
        };
        let name = Some(str_of(c, "Name"))
            .filter(|n| !n.is_empty())
            .unwrap_or(id.clone());
        let service_id = Some(str_of(c, "ServiceID"))
            .filter(|s| !s.is_empty())
            .unwrap_or(service_id.to_string());
        let check = Check {
            id,
            name,
            status,
            output: String::new(),
            notes: str_of(c, "Notes"),
            service_id,
            create_index: 0,
            modify_index: 0,
        };
        let due = Instant::now()
            + match probe {
                Probe::Ttl(t) => t,
                _ => Duration::ZERO,
            };
        Ok(LocalCheck {
            critical_since: (check.status == Health::Critical).then(Instant::now),
            deregister_after,
            check,
            probe,
            interval,
            timeout,
            due,
        })
    }

    /// Registers a parsed check (catalog and runner).
    async fn add_check(&self, local: LocalCheck) -> Result<(), String> {
        self.write(Command::RegisterCheck {
            node: self.node.clone(),
            check: local.check.clone(),
        })
        .await?;
        self.checks
            .lock()
            .expect("not poisoned")
            .insert(local.check.id.clone(), local);
        Ok(())
    }

    async fn set_status(&self, id: &str, status: Health, output: String) -> Result<(), String> {
        if let Some(c) = self.checks.lock().expect("not poisoned").get_mut(id) {
            if let Probe::Ttl(t) = c.probe {
                c.due = Instant::now() + t;
            }
            c.set(status, output.clone(), Instant::now());
        }
        self.write(Command::UpdateCheck {
            node: self.node.clone(),
            id: id.to_string(),
            status,
            output,
        })
        .await
    }

    /// Runs due checks and expires TTLs; call it every second or so.
    pub async fn tick(&self, now: Instant) {
        self.sync().await;
        let due: Vec<(String, LocalCheck)> = {
            let mut checks = self.checks.lock().expect("not poisoned");
            let mut due = Vec::new();
            for (id, c) in checks.iter_mut() {
                if c.due <= now {
                    due.push((id.clone(), c.clone()));
                    c.due = match c.probe {
                        // Expired: stays critical until updated.
                        Probe::Ttl(_) | Probe::Maintenance => now + Duration::from_secs(24 * 3600),
                        _ => now + c.interval,
                    };
                }
            }
            due
        };
        for (id, c) in due {
            let (status, output) = match &c.probe {
                Probe::Ttl(_) => (Health::Critical, "TTL expired".to_string()),
                Probe::Tcp(addr) => run_tcp(addr, c.timeout).await,
                Probe::Http(url) => run_http(url, c.timeout).await,
                Probe::Maintenance => continue,
            };
            if let Some(l) = self.checks.lock().expect("not poisoned").get_mut(&id) {
                l.set(status, output.clone(), now);
            }
            let _ = self
                .write(Command::UpdateCheck {
                    node: self.node.clone(),
                    id,
                    status,
                    output,
                })
                .await;
        }
        // Services whose check has been critical too long go (Consul's
        // reaper).
        let reap: Vec<String> = self
            .checks
            .lock()
            .expect("not poisoned")
            .values()
            .filter(|c| !c.check.service_id.is_empty())
            .filter(|c| {
                matches!((c.deregister_after, c.critical_since),
                    (Some(after), Some(since)) if now.saturating_duration_since(since) >= after)
            })
            .map(|c| c.check.service_id.clone())
            .collect();
        for id in reap {
            let _ = self.remove_service(&id).await;
        }
    }

    /// Deregisters a local service and its checks; false if unknown.
    async fn remove_service(&self, id: &str) -> Result<bool, String> {
        if self
            .services
            .lock()
            .expect("not poisoned")
            .remove(id)
            .is_none()
        {
            return Ok(false);
        }
        self.checks
            .lock()
            .expect("not poisoned")
            .retain(|_, k| k.check.service_id != id);
        self.write(Command::DeregisterService {
            node: self.node.clone(),
            id: id.to_string(),
        })
        .await?;
        Ok(true)
    }
}

async fn run_tcp(addr: &str, timeout: Duration) -> (Health, String) {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => (Health::Passing, format!("TCP connect {addr}: Success")),
        Ok(Err(e)) => (Health::Critical, format!("dial tcp {addr}: {e}")),
        Err(_) => (Health::Critical, format!("dial tcp {addr}: i/o timeout")),
    }
}

/// A plain `http://host:port/path` GET.
async fn run_http(url: &str, timeout: Duration) -> (Health, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(rest) = url.strip_prefix("http://") else {
        return (Health::Critical, format!("unsupported URL {url}"));
    };
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(host).await?;
        s.write_all(
            format!(
                "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: Consul Health Check\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await?;
        Ok::<String, std::io::Error>(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    match tokio::time::timeout(timeout, fetch).await {
        Ok(Ok(head)) => {
            let code: u16 = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
            let status = match code {
                200..=299 => Health::Passing,
                429 => Health::Warning,
                _ => Health::Critical,
            };
            (status, format!("HTTP GET {url}: {code}"))
        }
        Ok(Err(e)) => (Health::Critical, format!("Get {url}: {e}")),
        Err(_) => (Health::Critical, format!("Get {url}: timeout")),
    }
}

/// `PUT /v1/agent/service/register`.
pub async fn register_service(State(st): State<Arc<AgentServices>>, body: Bytes) -> Response {
    let m = match object(&body) {
        Ok(m) => m,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e),
    };
    let Some(service) = service_from(&m, "Name") else {
        return text(StatusCode::BAD_REQUEST, "Missing service name");
    };
    let id = service.id.clone();
    let mut defs: Vec<Map<String, Value>> = Vec::new();
    if let Some(Value::Object(c)) = field(&m, "Check") {
        defs.push(c.clone());
    }
    if let Some(Value::Array(a)) = field(&m, "Checks") {
        defs.extend(a.iter().filter_map(|c| c.as_object().cloned()));
    }
    // Every check parses before anything is registered.
    let n = defs.len();
    let mut checks = Vec::new();
    for (k, c) in defs.iter_mut().enumerate() {
        // Consul's name for an unnamed service check.
        if str_of(c, "Name").is_empty() {
            c.insert(
                "Name".into(),
                Value::String(format!("Service '{}' check", service.name)),
            );
        }
        // Consul's IDs for unnamed service checks.
        let fallback = if n == 1 {
            format!("service:{id}")
        } else {
            format!("service:{id}:{}", k + 1)
        };
        match st.parse_check(c, &id, fallback) {
            Ok(l) => checks.push(l),
            Err(e) => return text(StatusCode::BAD_REQUEST, &e),
        }
    }
    st.services
        .lock()
        .expect("not poisoned")
        .insert(id.clone(), service.clone());
    if let Err(e) = st
        .write(Command::RegisterService {
            node: st.node.clone(),
            service,
        })
        .await
    {
        return text(StatusCode::INTERNAL_SERVER_ERROR, &e);
    }
    for l in checks {
        if let Err(e) = st.add_check(l).await {
            return text(StatusCode::INTERNAL_SERVER_ERROR, &e);
        }
    }
    StatusCode::OK.into_response()
}

/// `PUT|GET /v1/agent/service/deregister/:id`.
pub async fn deregister_service(
    State(st): State<Arc<AgentServices>>,
    Path(id): Path<String>,
) -> Response {
    match st.remove_service(&id).await {
        Ok(true) => StatusCode::OK.into_response(),
        Ok(false) => text(
            StatusCode::NOT_FOUND,
            &format!(
                "Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."
            ),
        ),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

/// `GET /v1/agent/services`: `{id: service}`.
pub async fn services(State(st): State<Arc<AgentServices>>) -> Response {
    let v: Map<String, Value> = st
        .services
        .lock()
        .expect("not poisoned")
        .values()
        .map(|s| {
            (
                s.id.clone(),
                json!({"ID": s.id, "Service": s.name, "Tags": s.tags, "Meta": s.meta,
                       "Port": s.port, "Address": s.address,
                       "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": false,
                       "Datacenter": st.datacenter}),
            )
        })
        .collect();
    axum::Json(Value::Object(v)).into_response()
}

/// `GET /v1/agent/checks`: `{id: check}`.
pub async fn checks(State(st): State<Arc<AgentServices>>) -> Response {
    let names: HashMap<String, String> = st
        .services
        .lock()
        .expect("not poisoned")
        .values()
        .map(|s| (s.id.clone(), s.name.clone()))
        .collect();
    let v: Map<String, Value> = st
        .checks
        .lock()
        .expect("not poisoned")
        .values()
        .map(|l| {
            let k = &l.check;
            (
                k.id.clone(),
                json!({"Node": st.node, "CheckID": k.id, "Name": k.name, "Status": k.status.as_str(),
                       "Notes": k.notes, "Output": k.output, "ServiceID": k.service_id,
                       "ServiceName": names.get(&k.service_id).cloned().unwrap_or_default()}),
            )
        })
        .collect();
    axum::Json(Value::Object(v)).into_response()
}

/// `PUT /v1/agent/check/register`.
pub async fn register_check(State(st): State<Arc<AgentServices>>, body: Bytes) -> Response {
    let m = match object(&body) {
        Ok(m) => m,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e),
    };
    let name = str_of(&m, "Name");
    if name.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing check name");
    }
    let local = match st.parse_check(&m, "", name) {
        Ok(l) => l,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e),
    };
    match st.add_check(local).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

/// `PUT|GET /v1/agent/check/deregister/:id`.
pub async fn deregister_check(
    State(st): State<Arc<AgentServices>>,
    Path(id): Path<String>,
) -> Response {
    st.checks.lock().expect("not poisoned").remove(&id);
    match st
        .write(Command::DeregisterCheck {
            node: st.node.clone(),
            id,
        })
        .await
    {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

async fn mark(st: &AgentServices, id: String, status: Health, output: String) -> Response {
    let known = st.checks.lock().expect("not poisoned").contains_key(&id);
    if !known {
        return text(
            StatusCode::NOT_FOUND,
            &format!(
                "Unknown check ID {id:?}. Ensure that the check ID is passed, not the check name."
            ),
        );
    }
    match st.set_status(&id, status, output).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

/// `PUT|GET /v1/agent/check/{pass,warn,fail}/:id?note=`.
pub async fn verdict(
    State(st): State<Arc<AgentServices>>,
    Path((verdict, id)): Path<(String, String)>,
    Query(p): Params,
) -> Response {
    let status = match verdict.as_str() {
        "pass" => Health::Passing,
        "warn" => Health::Warning,
        "fail" => Health::Critical,
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let note = p.get("note").cloned().unwrap_or_default();
    mark(&st, id, status, note).await
}

/// `PUT /v1/agent/check/update/:id` with `{"Status", "Output"}`.
pub async fn update(
    State(st): State<Arc<AgentServices>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let m = match object(&body) {
        Ok(m) => m,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e),
    };
    let status = match str_of(&m, "Status").as_str() {
        "passing" => Health::Passing,
        "warning" => Health::Warning,
        "critical" => Health::Critical,
        other => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("Invalid check status: {other:?}"),
            );
        }
    };
    mark(&st, id, status, str_of(&m, "Output")).await
}

/// Consul's check ID for node maintenance.
const NODE_MAINTENANCE: &str = "_node_maintenance";

impl AgentServices {
    /// Starts or ends maintenance of the node (`service_id` empty) or of
    /// one of its services: as in Consul, a critical check
    /// (`_node_maintenance`, `_service_maintenance:<id>`) that takes the
    /// node's or the service's instances out of passing answers, with
    /// the reason (or Consul's default text) as its `Notes`.
    async fn maintenance(
        &self,
        service_id: &str,
        enable: bool,
        reason: &str,
    ) -> Result<(), String> {
        let (id, name, what) = if service_id.is_empty() {
            (
                NODE_MAINTENANCE.to_string(),
                "Node Maintenance Mode",
                "node",
            )
        } else {
            (
                format!("_service_maintenance:{service_id}"),
                "Service Maintenance Mode",
                "service",
            )
        };
        let known = self.checks.lock().expect("not poisoned").contains_key(&id);
        if !enable {
            if !known {
                return Ok(());
            }
            self.checks.lock().expect("not poisoned").remove(&id);
            return self
                .write(Command::DeregisterCheck {
                    node: self.node.clone(),
                    id,
                })
                .await;
        }
        // Already in maintenance: Consul keeps the first reason.
        if known {
            return Ok(());
        }
        let notes = if reason.is_empty() {
            format!(
                "Maintenance mode is enabled for this {what}, but no reason was provided. This is a default message."
            )
        } else {
            reason.to_string()
        };
        let check = Check {
            id,
            name: name.to_string(),
            status: Health::Critical,
            output: String::new(),
            notes,
            service_id: service_id.to_string(),
            create_index: 0,
            modify_index: 0,
        };
        self.add_check(LocalCheck {
            check,
            probe: Probe::Maintenance,
            interval: Duration::ZERO,
            timeout: Duration::ZERO,
            due: Instant::now() + Duration::from_secs(24 * 3600),
            deregister_after: None,
            critical_since: None,
        })
        .await
    }
}

/// `?enable=` (required, a Go bool; python-consul sends `True`) and
/// `?reason=` of the maintenance endpoints.
/// `Err`: the 400 text.
fn maintenance_params(p: &HashMap<String, String>) -> Result<(bool, String), String> {
    let enable = match p.get("enable").map(String::as_str) {
        None | Some("") => return Err("Missing value for enable".into()),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True") => true,
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => false,
        Some(v) => return Err(format!("Invalid value for enable: {v:?}")),
    };
    Ok((enable, p.get("reason").cloned().unwrap_or_default()))
}

/// `PUT /v1/agent/maintenance?enable=&reason=`.
pub async fn node_maintenance(State(st): State<Arc<AgentServices>>, Query(p): Params) -> Response {
    let (enable, reason) = match maintenance_params(&p) {
        Ok(v) => v,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e),
    };
    match st.maintenance("", enable, &reason).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

/// `PUT /v1/agent/service/maintenance/:id?enable=&reason=`; 404 for a
/// service this agent does not have, as Consul.
pub async fn service_maintenance(
    State(st): State<Arc<AgentServices>>,
    Path(id): Path<String>,
    Query(p): Params,
) -> Response {
    let (enable, reason) = match maintenance_params(&p) {
        Ok(v) => v,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e),
    };
    if !st.services.lock().expect("not poisoned").contains_key(&id) {
        return text(
            StatusCode::NOT_FOUND,
            &format!("No service registered with ID {id:?}"),
        );
    }
    match st.maintenance(&id, enable, &reason).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

/// The routes. IDs are everything after the prefix, `/` included (Patroni
/// registers `<scope>/<name>`, so its service check is
/// `service:<scope>/<name>`).
pub fn router(st: Arc<AgentServices>) -> axum::Router {
    use axum::routing::{get, put};
    axum::Router::new()
        .route("/v1/agent/services", get(services))
        .route("/v1/agent/checks", get(checks))
        .route("/v1/agent/service/register", put(register_service))
        .route(
            "/v1/agent/service/deregister/{*id}",
            put(deregister_service).get(deregister_service),
        )
        .route("/v1/agent/check/register", put(register_check))
        .route(
            "/v1/agent/check/deregister/{*id}",
            put(deregister_check).get(deregister_check),
        )
        .route("/v1/agent/check/{verdict}/{*id}", put(verdict).get(verdict))
        .route("/v1/agent/check/update/{*id}", put(update))
        .route("/v1/agent/maintenance", put(node_maintenance))
        .route(
            "/v1/agent/service/maintenance/{*id}",
            put(service_maintenance),
        )
        .with_state(st)
}
