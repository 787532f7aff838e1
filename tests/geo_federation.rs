//! Three datacenters on loopback, each one server and two client agents,
//! in one process. The servers' WAN links get the RTTs of three Azure
//! regions (`azure.ltm`, one-way = RTT / 2, in tomo's user-space link
//! emulation); agents of one datacenter are ~1 ms apart. Checks that the
//! WAN pool forms, that `/v1/catalog/datacenters` from every datacenter
//! lists them in true RTT order, `/v1/coordinate/datacenters`, `?dc=`
//! forwarding from client agents and servers, and Consul's
//! `No path to datacenter` for an unknown one.
//!
//! Needs `../shared/datasets`; skips with a message when it is absent
//! (fails instead under `TOMO_REQUIRE_EXTERNAL=1`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tomo::agent::dns::DnsConfig;
use tomo::agent::link::LinkEmulator;
use tomo::agent::{Agent, AgentConfig, WanConfig};
use tomo::server::ServerConfig;

/// The Azure regions playing dc1, dc2, dc3.
const REGIONS: [&str; 3] = ["eastus", "westus2", "japaneast"];
/// One-way delay between agents of one datacenter.
const LAN_ONE_WAY: Duration = Duration::from_micros(500);

fn datasets() -> Option<PathBuf> {
    let d = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/datasets"));
    if d.join("azure.ltm").exists() && d.join("azure.nodes.csv").exists() {
        return Some(d);
    }
    let msg = format!("azure.ltm and azure.nodes.csv are not in {}", d.display());
    if std::env::var("TOMO_REQUIRE_EXTERNAL").is_ok_and(|v| v == "1") {
        panic!("TOMO_REQUIRE_EXTERNAL=1 but {msg}");
    }
    eprintln!("skipping: {msg}");
    None
}

/// RTTs (ms) between the regions of [`REGIONS`], from the dataset.
fn region_rtts(dir: &std::path::Path) -> [[f64; 3]; 3] {
    let text = std::fs::read_to_string(dir.join("azure.ltm")).unwrap();
    let m = tomo::dataset::parse_dense(&text, None).unwrap();
    let csv = std::fs::read_to_string(dir.join("azure.nodes.csv")).unwrap();
    let index: HashMap<String, usize> = csv
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Some((f.get(2)?.to_string(), f.first()?.parse().ok()?))
        })
        .collect();
    let mut out = [[0.0; 3]; 3];
    for (a, ra) in REGIONS.iter().enumerate() {
        for (b, rb) in REGIONS.iter().enumerate() {
            // The dataset is measured both ways: use the mean.
            let (i, j) = (index[*ra], index[*rb]);
            out[a][b] = (m.at(i, j) + m.at(j, i)) / 2.0;
        }
    }
    out
}

/// One HTTP/1.1 exchange: (status, body).
fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let out = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head[9..12].parse().unwrap(), body.to_string())
}

async fn call(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let (m, p, b) = (method.to_string(), path.to_string(), body.to_vec());
    tokio::task::spawn_blocking(move || http(addr, &m, &p, &b))
        .await
        .unwrap()
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The federation: `agents[dc][0]` is the server, `[1]` and `[2]` clients.
struct Federation {
    agents: Vec<Vec<Agent>>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Federation {
    async fn start(rtt: [[f64; 3]; 3]) -> Federation {
        let mut agents: Vec<Vec<Agent>> = Vec::new();
        let mut dirs = Vec::new();
        let mut links: Vec<Vec<Arc<LinkEmulator>>> = Vec::new();
        for dc in 0..3 {
            let dir = tempfile::TempDir::new().unwrap();
            let name = format!("dc{}", dc + 1);
            let mut list = Vec::new();
            let mut dc_links = Vec::new();
            for i in 0..3 {
                let link = Arc::new(LinkEmulator::default());
                let mut cfg = AgentConfig::dev(&format!("{name}-{}", ["srv", "web1", "web2"][i]));
                cfg.datacenter = name.clone();
                cfg.probe_interval = Duration::from_millis(200);
                cfg.seed = (dc * 3 + i) as u64 + 1;
                cfg.link = Some(link.clone());
                cfg.dns = Some(DnsConfig::new("127.0.0.1:0".parse().unwrap()));
                if i == 0 {
                    cfg.server = Some(ServerConfig::new(
                        1,
                        "127.0.0.1:0".parse().unwrap(),
                        dir.path().to_path_buf(),
                    ));
                    cfg.bootstrap = true;
                    let mut w = WanConfig::new("127.0.0.1:0".parse().unwrap());
                    // Above the slowest emulated RTT (half the interval is
                    // the probe timeout).
                    w.probe_interval = Duration::from_millis(500);
                    if dc > 0 {
                        w.join = vec![agents[0][0].shared.wan.as_ref().unwrap().addr];
                    }
                    cfg.wan = Some(w);
                } else {
                    cfg.join = vec![list.first().map(|a: &Agent| a.gossip_addr).unwrap()];
                }
                list.push(Agent::start(cfg).await.unwrap());
                dc_links.push(link);
            }
            agents.push(list);
            links.push(dc_links);
            dirs.push(dir);
        }
        // Delays: LAN within a datacenter, the regions' RTTs between the
        // servers' WAN addresses.
        for (dc, dc_links) in links.iter().enumerate() {
            for (i, link) in dc_links.iter().enumerate() {
                for (j, peer) in agents[dc].iter().enumerate() {
                    if j != i {
                        link.set_delay(peer.gossip_addr, LAN_ONE_WAY);
                    }
                }
                if i == 0 {
                    for (other, list) in agents.iter().enumerate() {
                        if other != dc {
                            let to = list[0].shared.wan.as_ref().unwrap().addr;
                            link.set_delay(to, Duration::from_secs_f64(rtt[dc][other] / 2000.0));
                        }
                    }
                }
            }
        }
        Federation {
            agents,
            _dirs: dirs,
        }
    }

    fn http(&self, dc: usize, i: usize) -> SocketAddr {
        self.agents[dc][i].http_addr
    }

    async fn shutdown(self) {
        for dc in self.agents {
            for a in dc {
                a.abort();
            }
        }
    }
}

/// The datacenters in true RTT order from `dc` (ties by name).
fn true_order(rtt: &[[f64; 3]; 3], dc: usize) -> Vec<String> {
    let mut v: Vec<usize> = (0..3).collect();
    v.sort_by(|a, b| rtt[dc][*a].total_cmp(&rtt[dc][*b]).then(a.cmp(b)));
    v.into_iter().map(|i| format!("dc{}", i + 1)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datacenters_federate_over_the_wan_pool() {
    let Some(dir) = datasets() else { return };
    let rtt = region_rtts(&dir);
    let fed = Federation::start(rtt).await;

    // The WAN pool: three servers named <node>.<dc>.
    let start = Instant::now();
    loop {
        let (st, body) = call(fed.http(0, 0), "GET", "/v1/agent/members?wan", b"").await;
        assert_eq!(st, 200, "{body}");
        let alive: Vec<String> = json(&body)
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["Status"] == 1)
            .map(|m| m["Name"].as_str().unwrap().to_string())
            .collect();
        if alive.len() == 3 {
            let mut alive = alive;
            alive.sort();
            assert_eq!(
                alive,
                ["dc1-srv.dc1", "dc2-srv.dc2", "dc3-srv.dc3"],
                "{body}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "WAN pool: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Servers carry Consul's `role=consul` tag and say they are servers.
    let (_, body) = call(fed.http(0, 0), "GET", "/v1/agent/members?wan", b"").await;
    assert!(
        json(&body)
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["Tags"]["role"] == "consul"),
        "{body}"
    );
    let (_, body) = call(fed.http(0, 0), "GET", "/v1/agent/self", b"").await;
    assert_eq!(json(&body)["Config"]["Server"], true);
    let (_, body) = call(fed.http(0, 1), "GET", "/v1/agent/self", b"").await;
    assert_eq!(json(&body)["Config"]["Server"], false);
    assert_eq!(json(&body)["Member"]["Tags"]["role"], "node");
    // A client agent is in no WAN pool: Consul answers an empty list.
    let (_, body) = call(fed.http(0, 1), "GET", "/v1/agent/members?wan", b"").await;
    assert_eq!(json(&body), serde_json::json!([]));

    // Once the WAN coordinates converge, every datacenter (asked through
    // its server and through a client agent) orders the others by their
    // true RTT.
    let start = Instant::now();
    'converge: loop {
        let mut all = true;
        for dc in 0..3 {
            for i in [0, 1] {
                let (st, body) = call(fed.http(dc, i), "GET", "/v1/catalog/datacenters", b"").await;
                assert_eq!(st, 200, "{body}");
                let got: Vec<String> = serde_json::from_str(&body).unwrap();
                if got != true_order(&rtt, dc) {
                    all = false;
                }
            }
        }
        if all {
            eprintln!(
                "datacenter order equals the true RTT order everywhere after {:?}",
                start.elapsed()
            );
            break 'converge;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "datacenter order never matched the true RTT order"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // And it stays so (no flapping while coordinates keep moving).
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        for dc in 0..3 {
            let (_, body) = call(fed.http(dc, 2), "GET", "/v1/catalog/datacenters", b"").await;
            let got: Vec<String> = serde_json::from_str(&body).unwrap();
            assert_eq!(got, true_order(&rtt, dc));
        }
    }

    // /v1/coordinate/datacenters: every datacenter with its server, bare
    // node names, and a WAN estimate near the true RTT.
    let (_, body) = call(fed.http(1, 1), "GET", "/v1/coordinate/datacenters", b"").await;
    let v = json(&body);
    let dcs: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["Datacenter"].as_str().unwrap())
        .collect();
    assert_eq!(dcs, ["dc1", "dc2", "dc3"], "{body}");
    for d in v.as_array().unwrap() {
        assert_eq!(d["AreaID"], "WAN");
        let nodes: Vec<&str> = d["Coordinates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["Node"].as_str().unwrap())
            .collect();
        assert_eq!(
            nodes,
            [format!("{}-srv", d["Datacenter"].as_str().unwrap())]
        );
    }

    // ?dc=: a KV write through a dc1 client lands in dc2 only, and dc2's
    // catalog is read from dc3's server.
    let (st, body) = call(fed.http(0, 1), "PUT", "/v1/kv/where?dc=dc2", b"in-dc2").await;
    assert_eq!((st, body.as_str()), (200, "true"));
    let (st, body) = call(fed.http(1, 2), "GET", "/v1/kv/where?raw", b"").await;
    assert_eq!((st, body.as_str()), (200, "in-dc2"));
    let (st, _) = call(fed.http(0, 0), "GET", "/v1/kv/where", b"").await;
    assert_eq!(st, 404, "the write stayed in dc2");
    let (st, body) = call(fed.http(0, 0), "GET", "/v1/kv/where?dc=dc2&raw", b"").await;
    assert_eq!((st, body.as_str()), (200, "in-dc2"));
    let start = Instant::now();
    loop {
        let (st, body) = call(fed.http(2, 0), "GET", "/v1/catalog/nodes?dc=dc2", b"").await;
        assert_eq!(st, 200, "{body}");
        let mut names: Vec<String> = json(&body)
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["Node"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        if names == ["dc2-srv", "dc2-web1", "dc2-web2"] {
            assert!(json(&body)[0]["Datacenter"] == "dc2", "{body}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The LAN coordinates of another datacenter come from it.
    let (st, body) = call(fed.http(0, 2), "GET", "/v1/coordinate/nodes?dc=dc3", b"").await;
    assert_eq!(st, 200, "{body}");
    assert!(
        json(&body)
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["Node"].as_str().unwrap().starts_with("dc3-")),
        "{body}"
    );

    // An unknown datacenter, from a server and from a client agent.
    for i in [0, 1] {
        let (st, body) = call(fed.http(0, i), "GET", "/v1/catalog/nodes?dc=nowhere", b"").await;
        assert_eq!((st, body.as_str()), (500, "No path to datacenter"));
    }

    rtt_estimates(&fed, &rtt).await;
    prepared_query_fails_over_to_the_nearest_datacenter(&fed, &rtt).await;
    fed.shutdown().await;
}

/// An SRV lookup over TCP (the whole answer): the response code and the
/// targets' node names, in the order given.
async fn srv(at: SocketAddr, name: &str) -> (ResponseCode, Vec<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut m = Message::query();
    m.metadata.id = 7;
    m.add_query(Query::query(
        Name::from_ascii(name).unwrap(),
        RecordType::SRV,
    ));
    let bytes = m.to_vec().unwrap();
    let mut s = tokio::net::TcpStream::connect(at).await.unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    s.write_all(&framed).await.unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.unwrap();
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.unwrap();
    let m = Message::from_vec(&buf).unwrap();
    let nodes = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some(s.target.to_ascii().split('.').next().unwrap().to_string()),
            _ => None,
        })
        .collect();
    (m.metadata.response_code, nodes)
}

/// The datacenter an execute answered from, and its nodes.
async fn execute(at: SocketAddr, path: &str) -> (String, Vec<String>) {
    let (st, body) = call(at, "GET", path, b"").await;
    assert_eq!(st, 200, "{body}");
    let v = json(&body);
    let mut nodes: Vec<String> = v["Nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["Node"]["Node"].as_str().unwrap().to_string())
        .collect();
    nodes.sort();
    (v["Datacenter"].as_str().unwrap().to_string(), nodes)
}

/// Service `web` on both client agents of every datacenter, each with a
/// TTL check driven by hand. From dc1, a query with `NearestN` answers
/// with dc1's instances; when both fail, with those of the datacenter
/// truly nearest dc1 within a stated time; once they recover, back in
/// dc1 after the `FailbackAfter` hold, changing once each way.
async fn prepared_query_fails_over_to_the_nearest_datacenter(
    fed: &Federation,
    rtt: &[[f64; 3]; 3],
) {
    let nearest_other = true_order(rtt, 0)[1].clone();
    for dc in 0..3 {
        for i in [1, 2] {
            let body = br#"{"Name":"web","Port":80,"Check":{"TTL":"1h"}}"#;
            let (st, got) = call(fed.http(dc, i), "PUT", "/v1/agent/service/register", body).await;
            assert_eq!(st, 200, "{got}");
            let (st, _) = call(
                fed.http(dc, i),
                "PUT",
                "/v1/agent/check/pass/service:web",
                b"",
            )
            .await;
            assert_eq!(st, 200);
        }
    }
    // Bad definitions: 400 with the reason.
    let (st, body) = call(fed.http(0, 1), "POST", "/v1/query", br#"{"Name":"x"}"#).await;
    assert_eq!(st, 400, "{body}");
    assert!(
        body.contains("Must provide a Service name to query"),
        "{body}"
    );
    let (st, body) = call(fed.http(0, 1), "POST", "/v1/query", b"{not json").await;
    assert_eq!(st, 400, "{body}");
    let bad = br#"{"Name":"y","Service":{"Service":"web","Failover":{"MinHealthyFraction":2}}}"#;
    let (st, body) = call(fed.http(0, 1), "POST", "/v1/query", bad).await;
    assert_eq!(st, 400, "{body}");

    let def = br#"{"Name":"web","Service":{"Service":"web","Near":"_agent","OnlyPassing":true,
        "Failover":{"NearestN":2,"FailbackAfter":"3s"}},"DNS":{"TTL":"5s"}}"#;
    let (st, body) = call(fed.http(0, 1), "POST", "/v1/query", def).await;
    assert_eq!(st, 200, "{body}");
    let id = json(&body)["ID"].as_str().unwrap().to_string();
    let (st, body) = call(fed.http(0, 2), "GET", &format!("/v1/query/{id}"), b"").await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        json(&body)[0]["Service"]["Failover"]["NearestN"],
        2,
        "{body}"
    );
    let (st, body) = call(fed.http(0, 0), "GET", "/v1/query/web/explain", b"").await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(json(&body)["Query"]["ID"], id.as_str());

    // Healthy at home: dc1's instances, the asking agent first.
    let start = Instant::now();
    loop {
        let (dc, nodes) = execute(fed.http(0, 1), "/v1/query/web/execute").await;
        if nodes.len() == 2 {
            assert_eq!(
                (dc.as_str(), nodes),
                ("dc1", vec!["dc1-web1".to_string(), "dc1-web2".into()])
            );
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{dc} {nodes:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (st, body) = call(fed.http(0, 1), "GET", "/v1/query/web/execute", b"").await;
    assert_eq!(st, 200);
    let v = json(&body);
    assert_eq!(
        v["Nodes"][0]["Node"]["Node"], "dc1-web1",
        "Near _agent: {body}"
    );
    assert_eq!(
        (v["Failovers"].as_u64(), v["DNS"]["TTL"].as_str()),
        (Some(0), Some("5s"))
    );
    // DNS from the same agent: the query keeps its Near order (the
    // asking agent first); plain lookups are nearest first too.
    let dns = fed.agents[0][1].dns_addr.unwrap();
    let (code, nodes) = srv(dns, "web.query.consul.").await;
    assert_eq!(
        (code, nodes.first().map(String::as_str)),
        (ResponseCode::NoError, Some("dc1-web1")),
        "{nodes:?}"
    );
    assert_eq!(nodes.len(), 2);
    let (code, nodes) = srv(dns, "web.service.consul.").await;
    assert_eq!(
        (code, nodes.first().map(String::as_str)),
        (ResponseCode::NoError, Some("dc1-web1")),
        "{nodes:?}"
    );
    let (_, nodes) = srv(dns, "web.service.dc2.consul.").await;
    let mut nodes = nodes;
    nodes.sort();
    assert_eq!(nodes, ["dc2-web1", "dc2-web2"]);

    // ?dc= sends the execute to that datacenter, where (as in Consul) the
    // query must be defined: dc3 does not know it.
    let (st, body) = call(
        fed.http(0, 1),
        "GET",
        &format!("/v1/query/{id}/execute?dc=dc3"),
        b"",
    )
    .await;
    assert_eq!((st, body.as_str()), (404, "Query not found"));

    // dc1's instances fail: answers move to the truly nearest datacenter.
    for i in [1, 2] {
        let (st, _) = call(
            fed.http(0, i),
            "PUT",
            "/v1/agent/check/fail/service:web",
            b"",
        )
        .await;
        assert_eq!(st, 200);
    }
    let failed = Instant::now();
    const MOVE_WITHIN: Duration = Duration::from_secs(5);
    loop {
        let (dc, nodes) = execute(fed.http(0, 2), "/v1/query/web/execute").await;
        if dc != "dc1" {
            assert_eq!(dc, nearest_other, "failed over to the wrong datacenter");
            assert_eq!(nodes.len(), 2, "{nodes:?}");
            assert!(
                nodes.iter().all(|n| n.starts_with(&format!("{dc}-"))),
                "{nodes:?}"
            );
            break;
        }
        assert!(
            nodes.is_empty() || failed.elapsed() < MOVE_WITHIN,
            "still dc1: {nodes:?}"
        );
        assert!(
            failed.elapsed() < MOVE_WITHIN,
            "did not fail over within {MOVE_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let moved = failed.elapsed();
    // DNS follows: the query answers with the nearest datacenter's
    // instances; the plain lookup (no failover in Consul) has no healthy
    // instance here, so NXDOMAIN.
    let (code, nodes) = srv(dns, "web.query.consul.").await;
    assert_eq!(code, ResponseCode::NoError);
    assert!(
        nodes.len() == 2
            && nodes
                .iter()
                .all(|n| n.starts_with(&format!("{nearest_other}-"))),
        "{nodes:?}"
    );
    let (code, nodes) = srv(dns, "web.service.consul.").await;
    assert_eq!((code, nodes.len()), (ResponseCode::NXDomain, 0));

    // Recovery: answers stay away for the hold, then come back, changing
    // once.
    for i in [1, 2] {
        let (st, _) = call(
            fed.http(0, i),
            "PUT",
            "/v1/agent/check/pass/service:web",
            b"",
        )
        .await;
        assert_eq!(st, 200);
    }
    let recovered = Instant::now();
    let mut seen: Vec<String> = Vec::new();
    let mut back = None;
    while recovered.elapsed() < Duration::from_secs(8) {
        let (dc, _) = execute(fed.http(0, 1), "/v1/query/web/execute").await;
        if seen.last() != Some(&dc) {
            seen.push(dc.clone());
        }
        if dc == "dc1" && back.is_none() {
            // The hold starts when the leader first sees dc1 healthy again,
            // which is after `recovered`.
            let t = recovered.elapsed();
            assert!(
                t >= Duration::from_secs(3),
                "failed back after {t:?}, before the 3s hold"
            );
            back = Some(t);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        seen,
        [nearest_other.clone(), "dc1".to_string()],
        "answers flapped"
    );
    let (_, nodes) = srv(dns, "web.query.consul.").await;
    assert_eq!(
        nodes.first().map(String::as_str),
        Some("dc1-web1"),
        "{nodes:?}"
    );
    let (_, nodes) = srv(dns, "web.service.consul.").await;
    assert_eq!(
        nodes.first().map(String::as_str),
        Some("dc1-web1"),
        "{nodes:?}"
    );
    eprintln!(
        "prepared query: failed over {moved:?} after the failure; back in dc1 {back:?} after the recovery (3s hold)"
    );

    // Unknown datacenter and unknown query.
    let (st, body) = call(
        fed.http(0, 1),
        "GET",
        "/v1/query/web/execute?dc=nowhere",
        b"",
    )
    .await;
    assert_eq!((st, body.as_str()), (500, "No path to datacenter"));
    let (st, body) = call(fed.http(0, 1), "GET", "/v1/query/nope/execute", b"").await;
    assert_eq!(st, 404, "{body}");
}

/// `tomo` with `args` against the agent at `http`: (success, stdout, stderr).
async fn tomo(http: SocketAddr, args: &[&str]) -> (bool, String, String) {
    let mut full: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    full.extend(["-http-addr".to_string(), http.to_string()]);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tomo"))
            .args(&full)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `/v1/rtt` and `tomo rtt`: p50/p99 between nodes (LAN) and between
/// datacenters (WAN), measured where the answering agent probes one end,
/// predicted otherwise, near the emulated truth.
async fn rtt_estimates(fed: &Federation, rtt: &[[f64; 3]; 3]) {
    let get = |at: SocketAddr, q: String| async move {
        let (st, body) = call(at, "GET", &format!("/v1/rtt?{q}"), b"").await;
        (st, body)
    };
    // A LAN pair with the answering agent at one end: measured, ~1 ms.
    let start = Instant::now();
    loop {
        let (st, body) = get(fed.http(0, 1), "from=dc1-web1&to=dc1-srv".into()).await;
        assert_eq!(st, 200, "{body}");
        let v = json(&body);
        assert_eq!(v["Pool"], "LAN");
        if v["Source"] == "measured" {
            let (p50, p99) = (v["P50"].as_f64().unwrap(), v["P99"].as_f64().unwrap());
            assert!(p50 > 0.0 && p50 < 0.02, "LAN p50 {p50} s");
            assert!(p99 >= p50, "{body}");
            assert!(v["Samples"].as_u64().unwrap() > 0);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never measured: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Two other nodes: predicted from coordinates.
    let (_, body) = get(fed.http(0, 1), "from=dc1-web2&to=dc1-srv".into()).await;
    assert_eq!(json(&body)["Source"], "predicted", "{body}");

    // Datacenters, asked through a client agent (a server answers): dc1's
    // server probes dc2's, so dc1<->dc2 is measured, near the true RTT.
    let start = Instant::now();
    loop {
        let (st, body) = get(fed.http(0, 2), "from=dc:dc1&to=dc:dc2".into()).await;
        assert_eq!(st, 200, "{body}");
        let v = json(&body);
        assert_eq!(v["Pool"], "WAN");
        let p50 = v["P50"].as_f64().unwrap() * 1000.0;
        let truth = rtt[0][1];
        if v["Source"] == "measured" && (p50 - truth).abs() < 0.25 * truth {
            assert!(v["P99"].as_f64().unwrap() * 1000.0 >= p50, "{body}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "dc1<->dc2 {body} (true {truth} ms)"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // dc2<->dc3 from dc1: neither end here, predicted.
    let (st, body) = get(fed.http(0, 0), "from=dc:dc2&to=dc:dc3".into()).await;
    assert_eq!(st, 200, "{body}");
    let v = json(&body);
    let p50 = v["P50"].as_f64().unwrap() * 1000.0;
    assert_eq!(v["Source"], "predicted", "{body}");
    assert!(
        (p50 - rtt[1][2]).abs() < 0.35 * rtt[1][2],
        "dc2<->dc3 p50 {p50} ms, true {}",
        rtt[1][2]
    );

    // Bad input.
    let (st, _) = get(fed.http(0, 0), "to=dc:dc2".into()).await;
    assert_eq!(st, 400);
    let (st, _) = get(fed.http(0, 0), "from=dc:dc1&to=dc1-web1".into()).await;
    assert_eq!(st, 400);
    let (st, body) = get(fed.http(0, 0), "from=dc:nowhere&to=dc:dc1".into()).await;
    assert_eq!((st, body.as_str()), (500, "No path to datacenter"));
    let (st, _) = get(fed.http(0, 0), "from=ghost&to=dc1-srv".into()).await;
    assert_eq!(st, 404);

    // The command line.
    let (ok, out, err) = tomo(fed.http(0, 1), &["rtt", "dc1-web1", "dc1-srv"]).await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with("Estimated dc1-web1 <-> dc1-srv rtt: "),
        "{out}"
    );
    assert!(
        out.contains("(using LAN coordinates)") && out.contains("p99"),
        "{out}"
    );
    // The WAN estimate converges to the truth (within 25 %); the command
    // prints it as `consul rtt -wan` does.
    let start = Instant::now();
    loop {
        let (ok, out, err) = tomo(
            fed.http(0, 1),
            &["rtt", "-wan", "dc1-srv.dc1", "dc3-srv.dc3"],
        )
        .await;
        assert!(ok, "{err}");
        assert!(out.contains("(using WAN coordinates)"), "{out}");
        let ms: f64 = out
            .split("rtt: ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        if (ms - rtt[0][2]).abs() < 0.25 * rtt[0][2] {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{out} (true {} ms)",
            rtt[0][2]
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (ok, out, err) = tomo(fed.http(0, 1), &["rtt", "dc:dc3"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("p50") && out.contains("p99"), "{out}");
    let (ok, _, err) = tomo(fed.http(0, 1), &["rtt", "-wan", "no-dc-suffix"]).await;
    assert!(!ok && err.contains("<node>.<datacenter>"), "{err}");
}
