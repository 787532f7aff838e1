//! Prometheus' `consul_sd_configs` (`consul-api.md` §8.2) against
//! `tomo agent -dev`, two ways:
//!
//! - `prometheus_consul_sd_follows_tomo`: a real Prometheus with two Consul
//!   SD jobs (every service; `services: [web]` with `tags: [prod]`) pointed
//!   at the agent. Services registered, re-tagged, added and deregistered
//!   in tomo must show up in (and leave) `GET /api/v1/targets` with
//!   Prometheus' `__meta_consul_*` labels, and Prometheus must count no
//!   Consul RPC failure (`prometheus_sd_consul_rpc_failures_total`), which
//!   is what proves the blocking queries and the JSON decode cleanly for
//!   Go's `consul/api`. `TOMO_PROMETHEUS` names the binary (default:
//!   `prometheus` on the PATH). Debian has built Prometheus without Consul
//!   SD since 2.33.5+ds1-4 ("Disable Consul SD until its Debian package is
//!   back in shape"; bookworm's 2.42 and sid's 3.5 refuse the config), so
//!   `.ci/run` fetches bullseye's 2.24.1 package, which has it. Skips when
//!   the binary is missing or lacks Consul SD; `TOMO_REQUIRE_EXTERNAL=1`
//!   makes either a failure.
//! - `consul_sd_requests_as_go_consul_api_sees_them`: always runs. It makes
//!   the requests Prometheus' Consul SD makes, in its order and with its
//!   parameters (`agent/self`, then blocking `catalog/services` and
//!   `health/service/<name>` with `wait=120000ms&stale=` and repeated
//!   `tag=`), and decodes the answers into the types of Go's `consul/api`
//!   with Go's rules (a string where Go has an `int`, a `""` duration or a
//!   tagged address that is not an object fails the whole decode there,
//!   which is a Prometheus RPC failure), then derives the targets as
//!   Prometheus does.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

mod common;
use common::{Answer, free_tcp, free_udp, http_full, json};

/// A child process killed (and reaped) on drop, panics included.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `tomo agent -dev` on free loopback ports.
struct Agent {
    _proc: Proc,
    port: u16,
    node: String,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts it and waits until it leads and its node is in the catalog.
    fn start(node: &str) -> Agent {
        let dir = tempfile::TempDir::new().unwrap();
        let port = free_tcp();
        let child = Command::new(env!("CARGO_BIN_EXE_tomo"))
            .args(["agent", "-dev", "-node", node, "-http-port"])
            .arg(port.to_string())
            .arg("-serf-lan-port")
            .arg(free_udp().to_string())
            .args(["-dns-port", "0", "-data-dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tomo agent");
        let mut proc = Proc(child);
        let start = Instant::now();
        loop {
            let listed = json(port, "/v1/catalog/nodes").is_some_and(|v| {
                v.as_array()
                    .is_some_and(|a| a.iter().any(|n| n["Node"] == node))
            });
            if listed {
                break;
            }
            if let Ok(Some(status)) = proc.0.try_wait() {
                panic!("tomo agent exited early: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "agent {node} not ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Agent {
            _proc: proc,
            port,
            node: node.to_string(),
            _dir: dir,
        }
    }

    /// A request that must answer 200; returns the whole answer.
    fn call(&self, method: &str, path: &str, body: &str) -> Answer {
        let a = http_full(method, self.port, path, body, Duration::from_secs(150))
            .unwrap_or_else(|| panic!("{method} {path}: no answer"));
        assert_eq!(a.status, 200, "{method} {path}: {}", a.body);
        a
    }

    fn put(&self, path: &str, body: &str) {
        self.call("PUT", path, body);
    }

    /// `web-1` on this agent: address 127.0.0.2 (loopback: Prometheus may
    /// try to scrape it), port 9100, these tags, service meta `team=core`.
    fn register_web1(&self, tags: &[&str]) {
        let body = serde_json::json!({
            "Name": "web", "ID": "web-1", "Address": "127.0.0.2", "Port": 9100,
            "Tags": tags, "Meta": {"team": "core"},
        });
        self.put("/v1/agent/service/register", &body.to_string());
    }

    /// `web-2` through the catalog on node `ext` (127.0.0.3, node meta
    /// `rack=r1`), without a service address: the node's is the target's.
    fn register_web2(&self, tags: &[&str]) {
        let body = serde_json::json!({
            "Node": "ext", "Address": "127.0.0.3", "NodeMeta": {"rack": "r1"},
            "Service": {"Service": "web", "ID": "web-2", "Port": 9200, "Tags": tags},
            "Check": {"CheckID": "web-2-alive", "Name": "alive", "Status": "warning",
                      "ServiceID": "web-2"},
        });
        self.put("/v1/catalog/register", &body.to_string());
    }
}

// ---------------------------------------------------------------------
// Go's consul/api types, as far as Prometheus reads them. Every field is
// optional because Go takes absent and `null` as the zero value; what Go
// rejects is a value of the wrong type, and so does serde here.

/// `api.ServiceEntry`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceEntry {
    node: Option<GoNode>,
    service: Option<AgentService>,
    checks: Option<Vec<HealthCheck>>,
}

/// `api.Node`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
#[allow(dead_code)] // decoded for the types; not every field is read
struct GoNode {
    #[serde(rename = "ID")]
    id: Option<String>,
    node: Option<String>,
    address: Option<String>,
    datacenter: Option<String>,
    tagged_addresses: Option<BTreeMap<String, String>>,
    meta: Option<BTreeMap<String, String>>,
    create_index: Option<u64>,
    modify_index: Option<u64>,
}

/// `api.AgentService`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
#[allow(dead_code)]
struct AgentService {
    kind: Option<String>,
    #[serde(rename = "ID")]
    id: Option<String>,
    service: Option<String>,
    tags: Option<Vec<String>>,
    meta: Option<BTreeMap<String, String>>,
    port: Option<i64>,
    address: Option<String>,
    tagged_addresses: Option<BTreeMap<String, ServiceAddress>>,
    weights: Option<AgentWeights>,
    enable_tag_override: Option<bool>,
    create_index: Option<u64>,
    modify_index: Option<u64>,
    namespace: Option<String>,
    partition: Option<String>,
    datacenter: Option<String>,
}

/// `api.ServiceAddress`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
#[allow(dead_code)]
struct ServiceAddress {
    address: Option<String>,
    port: Option<i64>,
}

/// `api.AgentWeights`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
#[allow(dead_code)]
struct AgentWeights {
    passing: Option<i64>,
    warning: Option<i64>,
}

/// `api.HealthCheck`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
#[allow(dead_code)]
struct HealthCheck {
    node: Option<String>,
    #[serde(rename = "CheckID")]
    check_id: Option<String>,
    name: Option<String>,
    status: Option<String>,
    notes: Option<String>,
    output: Option<String>,
    #[serde(rename = "ServiceID")]
    service_id: Option<String>,
    service_name: Option<String>,
    service_tags: Option<Vec<String>>,
    #[serde(rename = "Type")]
    kind: Option<String>,
    exposed_port: Option<i64>,
    definition: Option<HealthCheckDefinition>,
    create_index: Option<u64>,
    modify_index: Option<u64>,
}

/// `api.HealthCheckDefinition`, whose `UnmarshalJSON` reads the three
/// durations as Go duration strings or numbers (nanoseconds); anything
/// else, `""` included, fails the decode.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
#[allow(dead_code)]
struct HealthCheckDefinition {
    interval: Option<GoDuration>,
    timeout: Option<GoDuration>,
    deregister_critical_service_after: Option<GoDuration>,
    #[serde(rename = "HTTP")]
    http: Option<String>,
    #[serde(rename = "TCP")]
    tcp: Option<String>,
    header: Option<BTreeMap<String, Vec<String>>>,
    method: Option<String>,
    body: Option<String>,
    #[serde(rename = "TLSServerName")]
    tls_server_name: Option<String>,
    #[serde(rename = "TLSSkipVerify")]
    tls_skip_verify: Option<bool>,
}

#[derive(Debug)]
#[allow(dead_code)]
struct GoDuration(Duration);

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::Number(n) => Ok(GoDuration(Duration::from_nanos(
                n.as_f64().unwrap_or(0.0).max(0.0) as u64,
            ))),
            Value::String(s) => go_duration(&s)
                .map(GoDuration)
                .ok_or_else(|| D::Error::custom(format!("time: invalid duration {s:?}"))),
            other => Err(D::Error::custom(format!("bad duration {other}"))),
        }
    }
}

/// Go's `time.ParseDuration` (unsigned): `0`, or numbers with units.
fn go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let (mut rest, mut secs) = (s, 0f64);
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&n| n > 0)?;
        let v: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        secs += v * scale;
        rest = &rest[u..];
    }
    Some(Duration::from_secs_f64(secs))
}

/// `api.HealthChecks.AggregatedStatus`: maintenance, then the worst of
/// critical, warning, passing; `""` for any other status.
fn aggregated_status(checks: &[HealthCheck]) -> &'static str {
    let (mut passing, mut warning, mut critical, mut maintenance) = (false, false, false, false);
    for c in checks {
        let id = c.check_id.as_deref().unwrap_or("");
        if id == "_node_maintenance" || id.starts_with("_service_maintenance:") {
            maintenance = true;
            continue;
        }
        match c.status.as_deref().unwrap_or("") {
            "passing" => passing = true,
            "warning" => warning = true,
            "critical" => critical = true,
            _ => return "",
        }
    }
    if maintenance {
        "maintenance"
    } else if critical {
        "critical"
    } else if warning {
        "warning"
    } else if passing || checks.is_empty() {
        "passing"
    } else {
        ""
    }
}

/// What `consul/api` reads from the headers of a query (`parseQueryMeta`):
/// `X-Consul-Index` and `X-Consul-LastContact` must parse as integers.
fn query_meta(a: &Answer, what: &str) -> u64 {
    let last = a.header("X-Consul-LastContact");
    assert!(
        last.is_some_and(|l| l.parse::<u64>().is_ok()),
        "{what}: X-Consul-LastContact {last:?}"
    );
    let index: u64 = a
        .header("X-Consul-Index")
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("{what}: X-Consul-Index {:?}", a.header("X-Consul-Index")));
    // Prometheus does nothing until the index moves off its initial 0.
    assert!(index > 0, "{what}: X-Consul-Index 0");
    index
}

/// One Prometheus target as its Consul SD builds it: the address and the
/// `__meta_consul_*` labels.
fn target_of(dc: &str, e: &ServiceEntry) -> BTreeMap<String, String> {
    let node = e.node.as_ref().expect("ServiceEntry.Node");
    let svc = e.service.as_ref().expect("ServiceEntry.Service");
    let s = |o: &Option<String>| o.clone().unwrap_or_default();
    let port = svc.port.unwrap_or(0);
    let host = match s(&svc.address) {
        a if a.is_empty() => s(&node.address),
        a => a,
    };
    let tags = svc.tags.clone().unwrap_or_default();
    let mut l = BTreeMap::from([
        ("__address__".to_string(), format!("{host}:{port}")),
        ("__meta_consul_dc".into(), dc.to_string()),
        ("__meta_consul_address".into(), s(&node.address)),
        ("__meta_consul_node".into(), s(&node.node)),
        ("__meta_consul_tags".into(), format!(",{},", tags.join(","))),
        ("__meta_consul_service".into(), s(&svc.service)),
        ("__meta_consul_service_address".into(), s(&svc.address)),
        ("__meta_consul_service_port".into(), port.to_string()),
        ("__meta_consul_service_id".into(), s(&svc.id)),
        (
            "__meta_consul_health".into(),
            aggregated_status(e.checks.as_deref().unwrap_or(&[])).to_string(),
        ),
    ]);
    for (k, v) in node.meta.iter().flatten() {
        l.insert(format!("__meta_consul_metadata_{k}"), v.clone());
    }
    for (k, v) in svc.meta.iter().flatten() {
        l.insert(format!("__meta_consul_service_metadata_{k}"), v.clone());
    }
    for (k, v) in node.tagged_addresses.iter().flatten() {
        l.insert(format!("__meta_consul_tagged_address_{k}"), v.clone());
    }
    l
}

/// The query string `consul/api` builds for Prometheus' watches: `index`
/// only once there is one (a `WaitIndex` of 0 is not sent), the wait in
/// milliseconds, `stale` as an empty flag (`allow_stale` defaults to true).
fn watch_query(index: u64) -> String {
    match index {
        0 => "wait=120000ms&stale=".to_string(),
        i => format!("index={i}&wait=120000ms&stale="),
    }
}

/// Prometheus' `catalog/services` watch: `(index, services)`.
fn catalog_services(a: &Agent, index: u64) -> (u64, BTreeMap<String, Option<Vec<String>>>) {
    let path = format!("/v1/catalog/services?{}", watch_query(index));
    let ans = a.call("GET", &path, "");
    let idx = query_meta(&ans, &path);
    let m = serde_json::from_str(&ans.body)
        .unwrap_or_else(|e| panic!("Go would fail to decode {path}: {e}: {}", ans.body));
    (idx, m)
}

/// Prometheus' `health/service/<name>` watch (`passing` never set):
/// `(index, targets by address)`.
fn health_targets(
    a: &Agent,
    dc: &str,
    name: &str,
    tags: &[&str],
    index: u64,
) -> (u64, BTreeMap<String, BTreeMap<String, String>>) {
    let mut path = format!("/v1/health/service/{name}?{}", watch_query(index));
    for t in tags {
        path.push_str(&format!("&tag={t}"));
    }
    let ans = a.call("GET", &path, "");
    let idx = query_meta(&ans, &path);
    let entries: Vec<ServiceEntry> = serde_json::from_str(&ans.body)
        .unwrap_or_else(|e| panic!("Go would fail to decode {path}: {e}: {}", ans.body));
    let targets = entries
        .iter()
        .map(|e| target_of(dc, e))
        .map(|l| (l["__address__"].clone(), l))
        .collect();
    (idx, targets)
}

/// Sends `method path` with `body` from another thread ~300 ms from now,
/// while the caller holds a blocking query that this change must release.
fn soon(
    port: u16,
    method: &'static str,
    path: String,
    body: String,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let a = http_full(method, port, &path, &body, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{method} {path}: no answer"));
        assert_eq!(a.status, 200, "{method} {path}: {}", a.body);
    })
}

/// Asserts a blocking query came back because of a change, not the wait.
fn assert_released(t: Instant, what: &str) {
    let e = t.elapsed();
    assert!(
        e >= Duration::from_millis(250) && e < Duration::from_secs(20),
        "{what}: the blocking query returned after {e:?}, not on the change"
    );
}

#[test]
fn consul_sd_requests_as_go_consul_api_sees_them() {
    let agent = Agent::start("prom-go");

    // 1. `Agent().Self()` decodes as map[string]map[string]interface{};
    // Prometheus needs Config.Datacenter as a string.
    let me = agent.call("GET", "/v1/agent/self", "");
    let top: BTreeMap<String, Option<serde_json::Map<String, Value>>> =
        serde_json::from_str(&me.body)
            .unwrap_or_else(|e| panic!("agent/self is not map[string]map[string]any: {e}"));
    let dc = top["Config"].as_ref().expect("Config")["Datacenter"]
        .as_str()
        .expect("Config.Datacenter is a string")
        .to_string();
    assert_eq!(dc, "dc1");

    // 2. The first catalog watch (index 0) answers at once.
    let (idx0, services) = catalog_services(&agent, 0);
    assert!(!services.contains_key("web"), "{services:?}");

    // 3. A registration releases the blocking catalog watch, which then
    // lists the service with its tags.
    let body = serde_json::json!({
        "Name": "web", "ID": "web-1", "Address": "127.0.0.2", "Port": 9100,
        "Tags": ["prod", "v1"], "Meta": {"team": "core"},
        "Check": {"TTL": "30s", "Status": "passing"},
    });
    let t = Instant::now();
    let bg = soon(
        agent.port,
        "PUT",
        "/v1/agent/service/register".into(),
        body.to_string(),
    );
    let (idx1, services) = catalog_services(&agent, idx0);
    bg.join().unwrap();
    assert_released(t, "catalog/services on a registration");
    assert!(idx1 > idx0, "index {idx0} -> {idx1}");
    assert_eq!(
        services.get("web"),
        Some(&Some(vec!["prod".to_string(), "v1".to_string()])),
        "{services:?}"
    );

    // 4. The service's health watch: one target with Prometheus' labels.
    let (h1, targets) = health_targets(&agent, &dc, "web", &[], 0);
    let t1 = &targets["127.0.0.2:9100"];
    assert_eq!(t1["__meta_consul_service"], "web");
    assert_eq!(t1["__meta_consul_service_id"], "web-1");
    assert_eq!(t1["__meta_consul_node"], agent.node);
    assert_eq!(t1["__meta_consul_address"], "127.0.0.1");
    assert_eq!(t1["__meta_consul_tags"], ",prod,v1,");
    assert_eq!(t1["__meta_consul_service_port"], "9100");
    assert_eq!(t1["__meta_consul_service_metadata_team"], "core");
    assert_eq!(t1["__meta_consul_tagged_address_lan"], "127.0.0.1");
    assert_eq!(t1["__meta_consul_health"], "passing");
    assert_eq!(targets.len(), 1, "{targets:?}");

    // 5. Nothing changes: the watch holds for its wait and gives the same
    // index back (so Prometheus does nothing, and does not spin).
    let t = Instant::now();
    let path = format!("/v1/health/service/web?index={h1}&wait=1s&stale=");
    let same = query_meta(&agent.call("GET", &path, ""), &path);
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(same, h1);

    // 6. A second instance through the catalog, on another node without a
    // service address: the node's address makes the target, the node's
    // meta and a warning check show in the labels.
    let body = serde_json::json!({
        "Node": "ext", "Address": "127.0.0.3", "NodeMeta": {"rack": "r1"},
        "Service": {"Service": "web", "ID": "web-2", "Port": 9200, "Tags": ["canary"]},
        "Check": {"CheckID": "web-2-alive", "Name": "alive", "Status": "warning",
                  "ServiceID": "web-2"},
    });
    let t = Instant::now();
    let bg = soon(
        agent.port,
        "PUT",
        "/v1/catalog/register".into(),
        body.to_string(),
    );
    let (h2, targets) = health_targets(&agent, &dc, "web", &[], h1);
    bg.join().unwrap();
    assert_released(t, "health/service on a second instance");
    assert!(h2 > h1);
    let t2 = &targets["127.0.0.3:9200"];
    assert_eq!(t2["__meta_consul_node"], "ext");
    assert_eq!(t2["__meta_consul_service_address"], "");
    assert_eq!(t2["__meta_consul_metadata_rack"], "r1");
    assert_eq!(t2["__meta_consul_health"], "warning");
    assert_eq!(t2["__meta_consul_tags"], ",canary,");
    assert_eq!(targets.len(), 2, "{targets:?}");

    // 7. `tags:` in the config: repeated `tag=` keeps instances with all.
    let (_, prod) = health_targets(&agent, &dc, "web", &["prod", "v1"], 0);
    assert_eq!(prod.keys().collect::<Vec<_>>(), ["127.0.0.2:9100"]);
    let (_, none) = health_targets(&agent, &dc, "web", &["prod", "canary"], 0);
    assert!(none.is_empty(), "{none:?}");

    // 8. A TTL check going critical moves the index and the health label.
    let t = Instant::now();
    let bg = soon(
        agent.port,
        "PUT",
        "/v1/agent/check/fail/service:web-1?note=down".into(),
        String::new(),
    );
    let (h3, targets) = health_targets(&agent, &dc, "web", &[], h2);
    bg.join().unwrap();
    assert_released(t, "health/service on a check change");
    assert!(h3 > h2);
    assert_eq!(
        targets["127.0.0.2:9100"]["__meta_consul_health"],
        "critical"
    );

    // 9. Re-tagging (a re-registration) updates the catalog's tag union.
    let (idx1, _) = catalog_services(&agent, 0);
    let body = serde_json::json!({
        "Name": "web", "ID": "web-1", "Address": "127.0.0.2", "Port": 9100,
        "Tags": ["prod", "v2"],
    });
    let t = Instant::now();
    let bg = soon(
        agent.port,
        "PUT",
        "/v1/agent/service/register".into(),
        body.to_string(),
    );
    let (idx2, services) = catalog_services(&agent, idx1);
    bg.join().unwrap();
    assert_released(t, "catalog/services on a re-tag");
    assert!(idx2 > idx1);
    let mut tags = services["web"].clone().unwrap_or_default();
    tags.sort();
    assert_eq!(tags, ["canary", "prod", "v2"]);

    // 10. Deregistering both: the health watch empties, and the catalog
    // watch drops the service (Prometheus then clears its target group).
    agent.put("/v1/agent/service/deregister/web-1", "");
    let (_, targets) = health_targets(&agent, &dc, "web", &[], 0);
    assert_eq!(targets.keys().collect::<Vec<_>>(), ["127.0.0.3:9200"]);
    let (idx3, services) = catalog_services(&agent, 0);
    assert!(idx3 > idx2 && services.contains_key("web"), "{services:?}");
    let t = Instant::now();
    let bg = soon(
        agent.port,
        "PUT",
        "/v1/catalog/deregister".into(),
        r#"{"Node":"ext"}"#.into(),
    );
    let (_, services) = catalog_services(&agent, idx3);
    bg.join().unwrap();
    assert_released(t, "catalog/services on a deregistration");
    assert!(!services.contains_key("web"), "{services:?}");
    let (_, targets) = health_targets(&agent, &dc, "web", &[], 0);
    assert!(targets.is_empty(), "{targets:?}");
}

// ---------------------------------------------------------------------
// The real Prometheus.

/// The Prometheus binary to run, if there is one.
fn prometheus_binary() -> Option<String> {
    let bin = std::env::var("TOMO_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
    Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        .then_some(bin)
}

/// Prometheus' config: one job for every service, one for `web` with the
/// `prod` tag; a short refresh and, since only discovery matters, an
/// hour between scrapes.
fn prometheus_config(consul_port: u16) -> String {
    format!(
        "global:
  scrape_interval: 1h
scrape_configs:
  - job_name: consul-all
    consul_sd_configs:
      - server: 127.0.0.1:{consul_port}
        refresh_interval: 1s
  - job_name: consul-web-prod
    consul_sd_configs:
      - server: 127.0.0.1:{consul_port}
        services: [web]
        tags: [prod]
        refresh_interval: 1s
"
    )
}

/// A running Prometheus and where its log goes.
struct Prometheus {
    proc: Proc,
    port: u16,
    log: std::path::PathBuf,
}

/// How starting Prometheus went.
enum Started {
    Up(Prometheus),
    /// It refused the config because it has no Consul SD.
    NoConsulSd(String),
}

fn start_prometheus(bin: &str, dir: &Path, consul_port: u16) -> Started {
    let config = dir.join("prometheus.yml");
    std::fs::write(&config, prometheus_config(consul_port)).unwrap();
    let log = dir.join("prometheus.log");
    let port = free_tcp();
    let child = Command::new(bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn prometheus");
    let mut proc = Proc(child);
    let start = Instant::now();
    loop {
        if common::http("GET", port, "/-/ready").is_some_and(|(s, _)| s == 200) {
            return Started::Up(Prometheus { proc, port, log });
        }
        if let Ok(Some(status)) = proc.0.try_wait() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("consul_sd_configs not found") {
                return Started::NoConsulSd(text);
            }
            panic!("prometheus exited ({status}):\n{text}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "prometheus not ready:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A GET to Prometheus as HTTP/1.0, so that Go answers unchunked (the
/// shared helper does not decode chunks, and larger answers come chunked
/// to HTTP/1.1 requests).
fn prom_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_string()))
}

impl Prometheus {
    /// The active targets of `job`: address → discovered labels.
    fn targets(&self, job: &str) -> BTreeMap<String, HashMap<String, String>> {
        let v: Value = prom_get(self.port, "/api/v1/targets?state=active")
            .and_then(|b| serde_json::from_str(&b).ok())
            .expect("/api/v1/targets");
        v["data"]["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["scrapePool"] == job)
            .filter_map(|t| {
                let labels: HashMap<String, String> =
                    serde_json::from_value(t["discoveredLabels"].clone()).ok()?;
                Some((labels.get("__address__")?.clone(), labels))
            })
            .collect()
    }

    /// Polls (fast, for up to a minute: the discovery manager passes
    /// updates on every 5 s) until `job`'s targets satisfy `ok`.
    fn wait_for(
        &mut self,
        job: &str,
        what: &str,
        ok: impl Fn(&BTreeMap<String, HashMap<String, String>>) -> bool,
    ) -> BTreeMap<String, HashMap<String, String>> {
        let start = Instant::now();
        loop {
            let t = self.targets(job);
            if ok(&t) {
                return t;
            }
            if let Ok(Some(status)) = self.proc.0.try_wait() {
                panic!("prometheus exited ({status}):\n{}", self.log_text());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{job}: {what} never happened; targets {t:#?}\nlog:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A counter from Prometheus' own `/metrics`.
    fn counter(&self, name: &str) -> Option<f64> {
        let body = prom_get(self.port, "/metrics")?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }
}

#[test]
fn prometheus_consul_sd_follows_tomo() {
    let Some(bin) = prometheus_binary() else {
        let msg = "no `prometheus` binary (apt-get install prometheus, or set TOMO_PROMETHEUS)";
        if std::env::var("TOMO_REQUIRE_EXTERNAL").is_ok_and(|v| v == "1") {
            panic!("TOMO_REQUIRE_EXTERNAL=1: {msg}");
        }
        eprintln!("skipping: {msg} (set TOMO_REQUIRE_EXTERNAL=1 to make this a failure)");
        return;
    };
    let agent = Agent::start("prom");
    let dir = tempfile::TempDir::new().unwrap();
    let mut prom = match start_prometheus(&bin, dir.path(), agent.port) {
        Started::Up(p) => p,
        Started::NoConsulSd(log) => {
            let msg = format!(
                "{bin} was built without Consul service discovery (`consul_sd_configs` \
                 refused, as Debian's since 2.33.5+ds1-4); set TOMO_PROMETHEUS to a build \
                 with it (`.ci/run` fetches bullseye's 2.24.1)\n{log}"
            );
            if std::env::var("TOMO_REQUIRE_EXTERNAL").is_ok_and(|v| v == "1") {
                panic!("TOMO_REQUIRE_EXTERNAL=1: {msg}");
            }
            eprintln!("skipping: {msg}");
            return;
        }
    };
    let web1 = "127.0.0.2:9100";
    let web2 = "127.0.0.3:9200";

    // A service registered on the agent appears in both jobs, labelled.
    agent.register_web1(&["prod", "v1"]);
    let all = prom.wait_for("consul-all", "web-1 appears", |t| t.contains_key(web1));
    let l = &all[web1];
    let expect = [
        ("__meta_consul_service", "web"),
        ("__meta_consul_service_id", "web-1"),
        ("__meta_consul_node", agent.node.as_str()),
        ("__meta_consul_dc", "dc1"),
        ("__meta_consul_address", "127.0.0.1"),
        ("__meta_consul_service_address", "127.0.0.2"),
        ("__meta_consul_service_port", "9100"),
        ("__meta_consul_tags", ",prod,v1,"),
        ("__meta_consul_service_metadata_team", "core"),
        ("__meta_consul_tagged_address_lan", "127.0.0.1"),
        ("__meta_consul_health", "passing"),
    ];
    for (k, v) in expect {
        assert_eq!(l.get(k).map(String::as_str), Some(v), "{k} in {l:#?}");
    }
    prom.wait_for("consul-web-prod", "web-1 appears", |t| t.contains_key(web1));

    // A second instance through the catalog, without the `prod` tag: only
    // the job for every service sees it, at its node's address.
    agent.register_web2(&["canary"]);
    let all = prom.wait_for("consul-all", "web-2 appears", |t| t.contains_key(web2));
    assert_eq!(all[web2]["__meta_consul_node"], "ext");
    assert_eq!(all[web2]["__meta_consul_metadata_rack"], "r1");
    assert_eq!(all[web2]["__meta_consul_health"], "warning");
    assert!(!prom.targets("consul-web-prod").contains_key(web2));

    // Tag changes: web-1 re-tagged, web-2 given `prod` (so the filtered
    // job now has it too).
    agent.register_web1(&["prod", "v2"]);
    prom.wait_for("consul-all", "web-1 re-tagged", |t| {
        t.get(web1)
            .is_some_and(|l| l["__meta_consul_tags"] == ",prod,v2,")
    });
    agent.register_web2(&["prod"]);
    prom.wait_for("consul-web-prod", "web-2 tagged prod", |t| {
        t.contains_key(web1) && t.contains_key(web2)
    });

    // Deregistrations take the targets away.
    agent.put("/v1/agent/service/deregister/web-1", "");
    prom.wait_for("consul-all", "web-1 leaves", |t| {
        !t.contains_key(web1) && t.contains_key(web2)
    });
    agent.put("/v1/catalog/deregister", r#"{"Node":"ext"}"#);
    prom.wait_for("consul-all", "web-2 leaves", |t| t.is_empty());
    prom.wait_for("consul-web-prod", "every target leaves", |t| t.is_empty());

    // Every Consul call decoded and answered: no RPC failure counted, no
    // error logged by the Consul discovery.
    assert_eq!(
        prom.counter("prometheus_sd_consul_rpc_failures_total"),
        Some(0.0),
        "log:\n{}",
        prom.log_text()
    );
    let errors: Vec<String> = prom
        .log_text()
        .lines()
        .filter(|l| l.contains("level=error") && l.contains("consul"))
        .map(str::to_string)
        .collect();
    assert!(errors.is_empty(), "Consul SD errors: {errors:#?}");
}
