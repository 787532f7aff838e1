//! The DNS interface (`agent::dns`) on loopback, over UDP and TCP, with
//! messages built and read by hickory-proto: Consul's names and answers
//! (A, SRV with the additional section, tags, RFC 2782, nodes, addresses,
//! prepared queries, NXDOMAIN/NOERROR with the SOA, REFUSED outside the
//! domain, health filtering, TTLs), tomo's order (nearest first with a
//! bounded spread; a prepared query's order kept), truncation with TC over
//! UDP and the whole answer over TCP, answers from a client agent, the
//! `-dns-port` flag, and a replayed corpus of malformed packets that gets
//! FORMERR or nothing, never a panic, while the server keeps answering.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use rand::{RngExt, SeedableRng};
use serde_json::json;
use tomo::agent::dns::DnsConfig;
use tomo::agent::{Agent, AgentConfig};
use tomo::server::ServerConfig;

// ---------------------------------------------------------------- HTTP

/// One HTTP/1.1 exchange: (status, body).
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head[9..12].parse().unwrap(), body.to_string())
}

async fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let (m, p, b) = (method.to_string(), path.to_string(), body.to_string());
    tokio::task::spawn_blocking(move || http(addr, &m, &p, &b))
        .await
        .unwrap()
}

async fn ok(addr: SocketAddr, method: &str, path: &str, body: serde_json::Value) -> String {
    let (st, b) = call(addr, method, path, &body.to_string()).await;
    assert_eq!(st, 200, "{method} {path}: {b}");
    b
}

/// Registers `node` at `address` with an instance of `service` (port,
/// tags, its own address) whose check has `status`.
#[allow(clippy::too_many_arguments)]
async fn register(
    http: SocketAddr,
    node: &str,
    address: &str,
    service: &str,
    port: u16,
    tags: &[&str],
    svc_address: &str,
    status: &str,
) {
    let id = format!("{service}-{node}");
    ok(
        http,
        "PUT",
        "/v1/catalog/register",
        json!({
            "Node": node,
            "Address": address,
            "NodeMeta": {"rack": "r1", "rfc1035-zone": "z9"},
            "Service": {"ID": id, "Service": service, "Port": port, "Tags": tags, "Address": svc_address},
            "Check": {"CheckID": format!("check-{id}"), "Name": "alive", "Status": status, "ServiceID": id},
        }),
    )
    .await;
}

/// Places `node` at `ms` milliseconds from the origin in the agent's LAN
/// coordinate table.
async fn place(http: SocketAddr, node: &str, ms: f64) {
    let mut v = vec![0.0; 8];
    v[0] = ms / 1000.0;
    ok(
        http,
        "PUT",
        "/v1/coordinate/update",
        json!({"Node": node, "Coord": {"Vec": v, "Error": 0.2, "Adjustment": 0.0, "Height": 1e-5}}),
    )
    .await;
}

// ---------------------------------------------------------------- agents

/// The tests' DNS configuration: an ephemeral loopback port, TTLs that
/// tell where they came from.
fn dns_config() -> DnsConfig {
    let mut d = DnsConfig::new("127.0.0.1:0".parse().unwrap());
    d.node_ttl = Duration::from_secs(11);
    d.service_ttl.insert("*".into(), Duration::from_secs(3));
    d.service_ttl.insert("db".into(), Duration::from_secs(5));
    d.soa_min_ttl = Duration::from_secs(7);
    d
}

/// A `-dev`-like agent (one bootstrapped server) with DNS on an ephemeral
/// loopback port, once it is leader and its node is in the catalog.
async fn dev_agent(name: &str, dir: &tempfile::TempDir) -> Agent {
    let mut cfg = AgentConfig::dev(name);
    cfg.server = Some(ServerConfig::new(
        1,
        "127.0.0.1:0".parse().unwrap(),
        dir.path().to_path_buf(),
    ));
    cfg.bootstrap = true;
    cfg.dns = Some(dns_config());
    let agent = Agent::start(cfg).await.unwrap();
    let start = Instant::now();
    loop {
        let (st, body) = call(
            agent.http_addr,
            "GET",
            &format!("/v1/catalog/node/{name}"),
            "",
        )
        .await;
        if st == 200 && body != "null" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{name} never registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent
}

// ---------------------------------------------------------------- DNS

/// A query for `name`/`qtype` with `id`, with an EDNS size if given.
fn query(id: u16, name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

/// Sends `bytes` over UDP; the raw answer, if one comes within 3 s.
async fn udp_raw(addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(bytes, addr).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let n = tokio::time::timeout(Duration::from_secs(3), s.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf.truncate(n);
    Some(buf)
}

/// Sends `bytes` framed over a new TCP connection; the answer, if any.
async fn tcp_raw(addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    s.write_all(&framed).await.ok()?;
    let read = async {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.ok()?;
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut buf).await.ok()?;
        Some(buf)
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()?
}

/// The agent's DNS interface.
struct Dns(SocketAddr);

impl Dns {
    /// Over TCP (the whole answer).
    async fn tcp(&self, name: &str, qtype: RecordType) -> Message {
        let id = rand::random();
        let raw = tcp_raw(self.0, &query(id, name, qtype, None))
            .await
            .unwrap_or_else(|| panic!("no TCP answer for {name} {qtype}"));
        let m = Message::from_vec(&raw).unwrap();
        assert_eq!(m.metadata.id, id);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        m
    }

    /// Over UDP, with an EDNS size if given; (message, its size).
    async fn udp(&self, name: &str, qtype: RecordType, edns: Option<u16>) -> (Message, usize) {
        let id = rand::random();
        let raw = udp_raw(self.0, &query(id, name, qtype, edns))
            .await
            .unwrap_or_else(|| panic!("no UDP answer for {name} {qtype}"));
        let m = Message::from_vec(&raw).unwrap();
        assert_eq!(m.metadata.id, id);
        (m, raw.len())
    }
}

/// The answer section's A addresses, in order.
fn a_records(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

/// The answer section's SRV (target, port, weight), in order.
fn srv_records(m: &Message) -> Vec<(String, u16, u16)> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.target.to_ascii(), s.port, s.weight)),
            _ => None,
        })
        .collect()
}

/// The additional section's (name, A address).
fn additional_a(m: &Message) -> Vec<(String, String)> {
    m.additionals
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((r.name.to_ascii(), a.0.to_string())),
            _ => None,
        })
        .collect()
}

/// The SRV targets' node names, in order.
fn srv_nodes(m: &Message) -> Vec<String> {
    srv_records(m)
        .into_iter()
        .map(|(t, _, _)| t.split('.').next().unwrap().to_string())
        .collect()
}

/// NXDOMAIN (or NOERROR) with nothing but the SOA in the authority section.
fn assert_soa_only(m: &Message, code: ResponseCode, what: &str) {
    assert_eq!(m.metadata.response_code, code, "{what}: {m:?}");
    assert!(m.answers.is_empty(), "{what}: {m:?}");
    assert_eq!(m.authorities.len(), 1, "{what}: {m:?}");
    let RData::SOA(soa) = &m.authorities[0].data else {
        panic!("{what}: no SOA: {m:?}");
    };
    assert_eq!(m.authorities[0].name.to_ascii(), "consul.");
    assert_eq!(soa.mname.to_ascii(), "ns.consul.");
    assert_eq!(soa.rname.to_ascii(), "hostmaster.consul.");
    assert_eq!((soa.refresh, soa.retry, soa.expire), (3600, 600, 86400));
    // The negative TTL from the configuration.
    assert_eq!((soa.minimum, m.authorities[0].ttl), (7, 7));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (soa.serial as i64 - now).abs() < 60,
        "serial {}",
        soa.serial
    );
    assert!(m.metadata.authoritative, "{what}");
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_answer_as_consul_in_tomo_order() {
    let dir = tempfile::TempDir::new().unwrap();
    let agent = dev_agent("dns-node", &dir).await;
    let h = agent.http_addr;
    let dns = Dns(agent.dns_addr.expect("DNS is on"));

    // `web`: an instance on this agent's node and on four others at
    // known distances from it.
    register(
        h,
        "dns-node",
        "127.0.0.1",
        "web",
        8080,
        &["v1"],
        "",
        "passing",
    )
    .await;
    for (node, ip, ms) in [
        ("near-a", "10.0.0.1", 1.0),
        ("near-b", "10.0.0.2", 1.05),
        ("mid", "10.0.0.3", 4.0),
        ("far", "10.0.0.4", 50.0),
    ] {
        register(h, node, ip, "web", 8080, &["v1"], "", "passing").await;
        place(h, node, ms).await;
    }

    // A: every instance, nearest first; TTL from `service_ttl["*"]`.
    let m = dns.tcp("web.service.consul.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative && !m.metadata.truncation);
    let a = a_records(&m);
    assert_eq!(a.len(), 5, "{m:?}");
    assert_eq!(a[0], "127.0.0.1");
    assert_eq!(a[3..], ["10.0.0.3", "10.0.0.4"]);
    assert!(m.answers.iter().all(|r| r.ttl == 3));
    assert_eq!(m.answers[0].name.to_ascii(), "web.service.consul.");

    // Nearest first with a bounded spread: this node (0 ms), then near-a
    // and near-b (1 and 1.05 ms: within 0.5 ms) in either order, then mid,
    // then far, every time; both near ones come second sometimes.
    let mut second = HashSet::new();
    for _ in 0..40 {
        let m = dns.tcp("web.service.consul.", RecordType::SRV).await;
        let nodes = srv_nodes(&m);
        assert_eq!(nodes[0], "dns-node");
        let band: HashSet<&str> = nodes[1..3].iter().map(String::as_str).collect();
        assert_eq!(band, HashSet::from(["near-a", "near-b"]));
        assert_eq!(nodes[3..], ["mid", "far"]);
        second.insert(nodes[1].clone());
    }
    assert_eq!(second.len(), 2, "no spread between near-equal instances");

    // SRV: `<node>.node.<dc>.consul.` targets, port, weight 1, and the
    // targets' addresses in the additional section.
    let m = dns.tcp("web.service.consul.", RecordType::SRV).await;
    let srv = srv_records(&m);
    assert_eq!(srv.len(), 5);
    assert!(
        srv.iter()
            .all(|(t, port, w)| t.ends_with(".node.dc1.consul.") && *port == 8080 && *w == 1)
    );
    let extra: HashMap<String, String> = additional_a(&m).into_iter().collect();
    assert_eq!(extra["near-a.node.dc1.consul."], "10.0.0.1");
    assert_eq!(extra["dns-node.node.dc1.consul."], "127.0.0.1");
    assert_eq!(extra.len(), 5);
    // The datacenter named, in both spellings, and any case.
    for name in [
        "web.service.dc1.consul.",
        "web.service.dc1.dc.consul.",
        "WEB.Service.CONSUL.",
    ] {
        let m = dns.tcp(name, RecordType::A).await;
        assert_eq!(a_records(&m).len(), 5, "{name}: {m:?}");
    }
    // A datacenter there is no path to: NXDOMAIN.
    let m = dns.tcp("web.service.dc9.consul.", RecordType::A).await;
    assert_soa_only(&m, ResponseCode::NXDomain, "unknown datacenter");
    // A known name without records of the asked type: NOERROR and the SOA.
    let m = dns.tcp("web.service.consul.", RecordType::AAAA).await;
    assert_soa_only(&m, ResponseCode::NoError, "AAAA of an IPv4 service");
    let m = dns.tcp("web.service.consul.", RecordType::MX).await;
    assert_soa_only(&m, ResponseCode::NoError, "MX of a service");

    // Tags, and RFC 2782 (`_tcp`: no tag; `_x`: tag x), case-insensitive.
    register(
        h,
        "near-a",
        "10.0.0.1",
        "db",
        5432,
        &["primary"],
        "",
        "passing",
    )
    .await;
    register(
        h,
        "near-b",
        "10.0.0.2",
        "db",
        5432,
        &["replica"],
        "",
        "passing",
    )
    .await;
    for (name, want) in [
        ("primary.db.service.consul.", vec!["near-a"]),
        ("PRIMARY.db.service.consul.", vec!["near-a"]),
        ("_db._primary.service.consul.", vec!["near-a"]),
        ("replica.db.service.dc1.consul.", vec!["near-b"]),
        ("_db._tcp.service.consul.", vec!["near-a", "near-b"]),
        ("_db._tcp.service.dc1.consul.", vec!["near-a", "near-b"]),
        ("db.service.consul.", vec!["near-a", "near-b"]),
    ] {
        let m = dns.tcp(name, RecordType::SRV).await;
        let mut got = srv_nodes(&m);
        got.sort();
        assert_eq!(got, want, "{name}");
        // `service_ttl["db"]`.
        assert!(m.answers.iter().all(|r| r.ttl == 5), "{name}");
    }
    let m = dns.tcp("standby.db.service.consul.", RecordType::A).await;
    assert_soa_only(&m, ResponseCode::NXDomain, "a tag nobody has");

    // Health: critical instances are never answered; warning ones are
    // (`only_passing` is off), with their `Weights.Warning`.
    register(h, "sick", "10.0.1.1", "api", 9000, &[], "", "critical").await;
    register(h, "tired", "10.0.1.2", "api", 9000, &[], "", "warning").await;
    register(h, "fine", "10.0.1.3", "api", 9000, &[], "", "passing").await;
    let m = dns.tcp("api.service.consul.", RecordType::SRV).await;
    let mut got = srv_nodes(&m);
    got.sort();
    assert_eq!(got, ["fine", "tired"]);
    register(h, "sick2", "10.0.1.4", "down", 9000, &[], "", "critical").await;
    let m = dns.tcp("down.service.consul.", RecordType::A).await;
    assert_soa_only(&m, ResponseCode::NXDomain, "no healthy instance");
    let m = dns.tcp("nothing.service.consul.", RecordType::A).await;
    assert_soa_only(&m, ResponseCode::NXDomain, "unknown service");

    // An instance with an address of its own: `<hex>.addr.<dc>.consul.`.
    register(
        h,
        "mid",
        "10.0.0.3",
        "cache",
        6379,
        &[],
        "192.0.2.10",
        "passing",
    )
    .await;
    let m = dns.tcp("cache.service.consul.", RecordType::SRV).await;
    assert_eq!(
        srv_records(&m),
        [("c000020a.addr.dc1.consul.".to_string(), 6379, 1)]
    );
    assert_eq!(
        additional_a(&m),
        [(
            "c000020a.addr.dc1.consul.".to_string(),
            "192.0.2.10".to_string()
        )]
    );
    let m = dns.tcp("cache.service.consul.", RecordType::A).await;
    assert_eq!(a_records(&m), ["192.0.2.10"]);
    let m = dns.tcp("c000020a.addr.dc1.consul.", RecordType::A).await;
    assert_eq!(a_records(&m), ["192.0.2.10"]);
    let m = dns.tcp("c000020a.addr.consul.", RecordType::AAAA).await;
    assert_soa_only(&m, ResponseCode::NoError, "AAAA of an IPv4 addr");

    // Nodes: A with `node_ttl`, TXT of the metadata, NXDOMAIN unknown.
    let m = dns.tcp("near-a.node.consul.", RecordType::A).await;
    assert_eq!(a_records(&m), ["10.0.0.1"]);
    assert_eq!(m.answers[0].ttl, 11);
    for name in ["NEAR-A.NODE.consul.", "near-a.node.dc1.consul."] {
        assert_eq!(
            a_records(&dns.tcp(name, RecordType::A).await),
            ["10.0.0.1"],
            "{name}"
        );
    }
    let m = dns.tcp("near-a.node.consul.", RecordType::TXT).await;
    let mut txt: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
    txt.sort();
    assert_eq!(txt.len(), 2, "{m:?}");
    assert!(
        txt[0].contains("rack=r1") && txt[1].contains("z9") && !txt[1].contains("rfc1035"),
        "{txt:?}"
    );
    let m = dns.tcp("near-a.node.consul.", RecordType::SRV).await;
    assert_soa_only(&m, ResponseCode::NoError, "SRV of a node");
    let m = dns.tcp("nobody.node.consul.", RecordType::A).await;
    assert_soa_only(&m, ResponseCode::NXDomain, "unknown node");
    let m = dns.tcp("x.connect.consul.", RecordType::A).await;
    assert_soa_only(&m, ResponseCode::NXDomain, "an unsupported form");
    let m = dns.tcp("consul.", RecordType::SOA).await;
    assert!(matches!(m.answers[0].data, RData::SOA(_)), "{m:?}");

    // Outside the domain: REFUSED (no recursors), never authoritative.
    for name in ["example.com.", "consul.example.", "."] {
        let (m, _) = dns.udp(name, RecordType::A, None).await;
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{name}");
        assert!(m.answers.is_empty() && !m.metadata.authoritative);
    }

    // Prepared queries: the execute's order reaches the client as it is
    // (`Near: "_agent"`: this node first, then by distance, every time),
    // where a plain lookup spreads near-a and near-b. `DNS.TTL` wins.
    let (st, body) = call(
        h,
        "POST",
        "/v1/query",
        &json!({"Name": "web-near", "Service": {"Service": "web", "Near": "_agent"}, "DNS": {"TTL": "9s"}})
            .to_string(),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let want = ["dns-node", "near-a", "near-b", "mid", "far"];
    for i in 0..20 {
        let name = if i % 2 == 0 {
            "web-near.query.consul."
        } else {
            "_web-near._tcp.query.dc1.consul."
        };
        let m = dns.tcp(name, RecordType::SRV).await;
        assert_eq!(srv_nodes(&m), want, "{name}");
        assert!(m.answers.iter().all(|r| r.ttl == 9));
        assert_eq!(additional_a(&m).len(), 5);
    }
    let m = dns.tcp("web-near.query.consul.", RecordType::A).await;
    assert_eq!(
        a_records(&m),
        ["127.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
    );
    let m = dns.tcp("no-such-query.query.consul.", RecordType::A).await;
    assert_soa_only(&m, ResponseCode::NXDomain, "unknown prepared query");

    // Not a query: NOTIMP. Two questions: FORMERR.
    let mut notify =
        Message::from_vec(&query(77, "web.service.consul.", RecordType::A, None)).unwrap();
    notify.metadata.op_code = OpCode::Notify;
    let m = Message::from_vec(&udp_raw(dns.0, &notify.to_vec().unwrap()).await.unwrap()).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
    let mut two =
        Message::from_vec(&query(78, "web.service.consul.", RecordType::A, None)).unwrap();
    two.add_query(Query::query(
        Name::from_ascii("db.service.consul.").unwrap(),
        RecordType::A,
    ));
    let m = Message::from_vec(&udp_raw(dns.0, &two.to_vec().unwrap()).await.unwrap()).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);

    // The same answers from a client agent, through its servers: its
    // node first in a `Near: "_agent"` query.
    let mut cfg = AgentConfig::dev("dns-client");
    cfg.join = vec![agent.gossip_addr];
    cfg.dns = Some(dns_config());
    let client = Agent::start(cfg).await.unwrap();
    let cdns = Dns(client.dns_addr.unwrap());
    let start = Instant::now();
    loop {
        let m = cdns.tcp("web.service.consul.", RecordType::A).await;
        if a_records(&m).len() == 5 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the client never answered: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    register(
        h,
        "dns-client",
        "127.0.0.9",
        "web",
        8081,
        &[],
        "",
        "passing",
    )
    .await;
    place(h, "dns-client", 0.0).await;
    let m = cdns.tcp("web-near.query.consul.", RecordType::SRV).await;
    let nodes = srv_nodes(&m);
    assert_eq!(nodes.len(), 6, "{m:?}");
    assert_eq!(nodes[0], "dns-client");
    let m = cdns.tcp("near-b.node.consul.", RecordType::A).await;
    assert_eq!(a_records(&m), ["10.0.0.2"]);
    let m = cdns.tcp("nobody.node.consul.", RecordType::A).await;
    assert_soa_only(&m, ResponseCode::NXDomain, "unknown node via a client");
    client.shutdown().await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_are_cut_with_tc_over_udp_and_whole_over_tcp() {
    let dir = tempfile::TempDir::new().unwrap();
    let agent = dev_agent("big-node", &dir).await;
    let h = agent.http_addr;
    let dns = Dns(agent.dns_addr.unwrap());
    for i in 0..40 {
        let node = format!("many-node-{i:02}");
        register(
            h,
            &node,
            &format!("10.1.0.{}", i + 1),
            "many",
            7000,
            &[],
            "",
            "passing",
        )
        .await;
    }
    register(h, "few-node", "10.2.0.1", "few", 7000, &[], "", "passing").await;

    // TCP: all of them, each SRV with its address.
    let m = dns.tcp("many.service.consul.", RecordType::SRV).await;
    assert!(!m.metadata.truncation);
    assert_eq!((m.answers.len(), m.additionals.len()), (40, 40));
    let m = dns.tcp("many.service.consul.", RecordType::A).await;
    assert_eq!(a_records(&m).len(), 40);

    // Plain UDP (512 bytes): `udp_answer_limit` (3) answers, and TC so
    // that the resolver asks again over TCP.
    let (m, size) = dns.udp("many.service.consul.", RecordType::A, None).await;
    assert_eq!(a_records(&m).len(), 3);
    assert!(m.metadata.truncation && size <= 512);
    let (m, size) = dns.udp("many.service.consul.", RecordType::SRV, None).await;
    assert_eq!((m.answers.len(), m.additionals.len()), (3, 3));
    assert!(m.metadata.truncation && size <= 512);
    // A small answer: whole, no TC.
    let (m, _) = dns.udp("few.service.consul.", RecordType::SRV, None).await;
    assert_eq!(m.answers.len(), 1);
    assert!(!m.metadata.truncation);

    // EDNS 1232: as many as fit, each SRV cut with its address, TC set.
    let (m, size) = dns
        .udp("many.service.consul.", RecordType::SRV, Some(1232))
        .await;
    let n = m.answers.len();
    assert!(n > 3 && n < 40, "{n} answers in {size} bytes");
    assert_eq!(m.additionals.len(), n);
    assert!(m.metadata.truncation && size <= 1232, "{size}");
    assert!(m.edns.is_some(), "EDNS is answered with EDNS");
    let targets: HashSet<String> = srv_records(&m).into_iter().map(|(t, _, _)| t).collect();
    assert!(
        additional_a(&m)
            .iter()
            .all(|(name, _)| targets.contains(name))
    );
    // EDNS 4096 holds all 40 A records (a client's larger size is capped
    // at 4096).
    let (m, size) = dns
        .udp("many.service.consul.", RecordType::A, Some(65000))
        .await;
    assert_eq!(a_records(&m).len(), 40);
    assert!(!m.metadata.truncation && size <= 4096);
    agent.shutdown().await;
}

/// Malformed packets that must get FORMERR or nothing; (packet, whether
/// any answer at all is allowed).
fn malformed_corpus(valid: &[u8]) -> Vec<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    let header = |qd: u16, an: u16, ns: u16, ar: u16| {
        let mut h = vec![0x12, 0x34, 0x01, 0x00];
        for c in [qd, an, ns, ar] {
            h.extend_from_slice(&c.to_be_bytes());
        }
        h
    };
    let tail = [0x00, 0x01, 0x00, 0x01];
    // Truncated headers: silence (shorter than a header).
    for cut in 0..12 {
        out.push((valid[..cut].to_vec(), false));
    }
    // Truncated questions: FORMERR.
    for cut in 12..valid.len() {
        out.push((valid[..cut].to_vec(), true));
    }
    // Label lengths past the end, and the reserved label types 01/10.
    for first in [0x3f, 0x40, 0x80, 0x7f, 0xbf] {
        let mut p = valid.to_vec();
        p[12] = first;
        out.push((p, true));
    }
    // Compression pointers: to itself, forward, past the end, a loop of two.
    for name in [
        vec![0xc0, 0x0c],
        vec![0xc0, 0x10],
        vec![0xff, 0xff],
        vec![0x01, b'a', 0xc0, 0x0e],
        vec![0x01, b'a', 0xc0, 0x0c],
    ] {
        let mut p = header(1, 0, 0, 0);
        p.extend(name);
        p.extend(tail);
        out.push((p, true));
    }
    // A name over 255 octets.
    let mut p = header(1, 0, 0, 0);
    for _ in 0..5 {
        p.push(63);
        p.extend([b'a'; 63]);
    }
    p.extend([6, b'c', b'o', b'n', b's', b'u', b'l', 0]);
    p.extend(tail);
    out.push((p, true));
    // Huge counts with nothing behind them.
    for (qd, an, ns, ar) in [
        (0xffff, 0, 0, 0),
        (1, 0xffff, 0, 0),
        (1, 0, 0xffff, 0),
        (1, 0, 0, 0xffff),
        (0xffff, 0xffff, 0xffff, 0xffff),
    ] {
        let mut p = valid.to_vec();
        p[4..12].copy_from_slice(&header(qd, an, ns, ar)[4..12]);
        out.push((p, true));
    }
    // No question at all: FORMERR from tomo.
    out.push((header(0, 0, 0, 0), true));
    // An OPT record whose data runs past the end.
    let mut p = valid.to_vec();
    p[10..12].copy_from_slice(&1u16.to_be_bytes());
    p.extend([
        0x00, 0x00, 0x29, 0x10, 0x00, 0, 0, 0, 0, 0x00, 0x40, 0x00, 0x0a,
    ]);
    out.push((p, true));
    // Responses are never answered (no reflection).
    let mut p = valid.to_vec();
    p[2] |= 0x80;
    out.push((p, false));
    out
}

/// Panics on this test's runtime threads (where the DNS server's tasks
/// run).
static PANICS: AtomicUsize = AtomicUsize::new(0);
const FUZZ_THREADS: &str = "dns-fuzz-worker";

#[test]
fn garbage_gets_formerr_or_nothing_and_never_a_panic() {
    // Counted by thread name, so other tests' failures do not count here.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some(FUZZ_THREADS) {
            PANICS.fetch_add(1, Ordering::SeqCst);
        }
        previous(info);
    }));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(FUZZ_THREADS)
        .enable_all()
        .build()
        .unwrap()
        .block_on(fuzz());
}

/// Replays the corpus against a running agent.
async fn fuzz() {
    let dir = tempfile::TempDir::new().unwrap();
    let agent = dev_agent("fuzz-node", &dir).await;
    register(
        agent.http_addr,
        "fuzz-node",
        "127.0.0.1",
        "web",
        80,
        &[],
        "",
        "passing",
    )
    .await;
    let dns = Dns(agent.dns_addr.unwrap());
    let valid = query(0, "web.service.consul.", RecordType::A, None);

    // The corpus: the malformed packets above (strict: FORMERR or
    // nothing), then seeded random bytes and mutations of valid queries
    // (any well-formed answer to the right ID, or nothing).
    let mut corpus: Vec<(Vec<u8>, bool, bool)> = malformed_corpus(&valid)
        .into_iter()
        .map(|(p, may_answer)| (p, may_answer, true))
        .collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0xd15);
    let seeds = [
        valid.clone(),
        query(
            0,
            "_web._tcp.service.dc1.consul.",
            RecordType::SRV,
            Some(1232),
        ),
        query(0, "web-near.query.consul.", RecordType::SRV, None),
        query(0, "c000020a.addr.consul.", RecordType::AAAA, Some(4096)),
    ];
    for i in 0..600 {
        let p = if i % 3 == 0 {
            let len = rng.random_range(0..600);
            (0..len).map(|_| rng.random::<u8>()).collect()
        } else {
            let mut p = seeds[i % seeds.len()].clone();
            for _ in 0..rng.random_range(1..5) {
                let at = rng.random_range(0..p.len());
                match rng.random_range(0..4) {
                    0 => p[at] ^= 1 << rng.random_range(0..8),
                    1 => p[at] = rng.random(),
                    2 => {
                        p.insert(at, rng.random());
                    }
                    _ => p.truncate(at.max(1)),
                }
            }
            p
        };
        corpus.push((p, true, false));
    }
    // Every packet that has one gets its own ID (the answers are matched
    // by it).
    for (i, (p, _, _)) in corpus.iter_mut().enumerate() {
        if p.len() >= 2 {
            p[..2].copy_from_slice(&(1000 + i as u16).to_be_bytes());
        }
    }

    // Replayed over UDP, answers collected until the server is quiet.
    let sock = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let rx = sock.clone();
    let collector = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(3), rx.recv(&mut buf)).await
        {
            got.push(buf[..n].to_vec());
        }
        got
    });
    for (i, (p, _, _)) in corpus.iter().enumerate() {
        sock.send_to(p, dns.0).await.unwrap();
        if i % 25 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let answers = collector.await.unwrap();
    let mut formerr = 0;
    for raw in &answers {
        let m = Message::from_vec(raw)
            .unwrap_or_else(|e| panic!("an answer that does not decode: {e}"));
        assert_eq!(m.metadata.message_type, MessageType::Response);
        let i = m.metadata.id.checked_sub(1000).map(usize::from);
        let Some((p, may_answer, strict)) = i.and_then(|i| corpus.get(i)) else {
            panic!("an answer to nothing sent: {m:?}");
        };
        assert!(*may_answer, "{p:02x?} should get no answer, got {m:?}");
        if *strict {
            assert_eq!(
                m.metadata.response_code,
                ResponseCode::FormErr,
                "{p:02x?}: {m:?}"
            );
            formerr += 1;
        }
    }
    let strict = corpus.iter().filter(|c| c.2 && c.1).count();
    assert_eq!(formerr, strict, "FORMERR for every malformed packet");

    // Over TCP too: FORMERR or nothing, connection by connection.
    for (p, may_answer) in malformed_corpus(&valid)
        .into_iter()
        .filter(|c| c.0.len() >= 12)
    {
        if let Some(raw) = tcp_raw(dns.0, &p).await {
            let m = Message::from_vec(&raw).unwrap();
            assert!(may_answer, "{p:02x?}");
            assert_eq!(m.metadata.response_code, ResponseCode::FormErr, "{p:02x?}");
        }
    }
    // A frame that announces more than it sends, then hangs up.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(dns.0).await.unwrap();
        s.write_all(&[0xff, 0xff, 0x12, 0x34]).await.unwrap();
    }

    // The server still answers, over both transports.
    let (m, _) = dns.udp("web.service.consul.", RecordType::A, None).await;
    assert_eq!(a_records(&m), ["127.0.0.1"]);
    let m = dns.tcp("web.service.consul.", RecordType::A).await;
    assert_eq!(a_records(&m), ["127.0.0.1"]);
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dns_port_flag_and_dns_config() {
    // Off in `AgentConfig::dev` (in-process agents and `tomo demo`).
    let dir = tempfile::TempDir::new().unwrap();
    let mut cfg = AgentConfig::dev("quiet");
    cfg.server = Some(ServerConfig::new(
        1,
        "127.0.0.1:0".parse().unwrap(),
        dir.path().to_path_buf(),
    ));
    let quiet = Agent::start(cfg).await.unwrap();
    assert_eq!(quiet.dns_addr, None);
    quiet.shutdown().await;

    // A port that is no port.
    let err = common::tomo_fails_cleanly(&["agent", "-dev", "-dns-port", "70000"]);
    assert!(err.contains("-dns-port"), "{err}");

    // `tomo agent -dev -dns-port P` answers on P, over UDP and TCP (the
    // flag wins over the file's `ports.dns`), with the file's `dns_config`.
    let port = common::free_udp_tcp();
    let http = common::free_tcp();
    let conf = dir.path().join("agent.hcl");
    std::fs::write(
        &conf,
        format!(
            "ports {{\n  dns = {}\n}}\ndns_config {{\n  node_ttl = \"13s\"\n}}\n",
            common::free_udp()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tomo"))
        .args([
            "agent",
            "-dev",
            "-node",
            "flagged",
            "-dns-port",
            &port.to_string(),
        ])
        .args([
            "-http-port",
            &http.to_string(),
            "-serf-lan-port",
            &common::free_udp().to_string(),
        ])
        .args(["-data-dir", dir.path().join("flagged").to_str().unwrap()])
        .args(["-config-file", conf.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("agent.err")).unwrap())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let start = Instant::now();
    let answered = loop {
        // Nothing here may panic while the child runs.
        let raw = udp_raw(addr, &query(5, "flagged.node.consul.", RecordType::A, None)).await;
        if let Some(m) = raw.and_then(|r| Message::from_vec(&r).ok())
            && a_records(&m) == ["127.0.0.1"]
        {
            break Some(m.answers[0].ttl);
        }
        if start.elapsed() > Duration::from_secs(30) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let over_tcp = tcp_raw(addr, &query(6, "consul.", RecordType::SOA, None)).await;
    let _ = child.kill();
    let _ = child.wait();
    let ttl = answered.unwrap_or_else(|| {
        panic!(
            "tomo agent -dns-port {port} never answered; its stderr:\n{}",
            std::fs::read_to_string(dir.path().join("agent.err")).unwrap_or_default()
        )
    });
    assert_eq!(ttl, 13, "dns_config.node_ttl");
    let m = Message::from_vec(&over_tcp.expect("a TCP answer")).unwrap();
    assert!(matches!(m.answers[0].data, RData::SOA(_)));
}
