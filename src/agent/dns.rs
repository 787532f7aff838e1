//! The agent's DNS interface: Consul's names (`consul-api.md` §7) over UDP
//! and TCP, served with hickory-server.
//!
//! Every lookup is answered from the agent's own HTTP API: the handler
//! holds the agent's finished router and runs the equivalent request
//! through it (`tower::ServiceExt::oneshot`). So DNS behaves exactly as the
//! HTTP API does on the same agent: a client agent forwards to a server,
//! `<dc>` labels travel as `?dc=` to another datacenter, prepared queries
//! sort by `Near` and fail over; none of that is implemented twice.
//!
//! Names (labels case-insensitive; the domain is `consul.`; `<dc>` may also
//! be written `<dc>.dc`):
//! - `[<tag>.]<service>.service[.<dc>].consul` and the RFC 2782 form
//!   `_<service>._<tag>[.service][.<dc>].consul` (`_tcp`: no tag filter):
//!   A/AAAA of the healthy instances (none of whose checks is critical;
//!   with `only_passing`, all of them passing), SRV with
//!   `<node>.node.<dc>.consul.` targets, or `<hex-ip>.addr.<dc>.consul.`
//!   when the instance has an address of its own, and the targets'
//!   addresses in the additional section;
//! - `<node>.node[.<dc>].consul`: A/AAAA of the node, TXT of its metadata;
//! - `<query>.query[.<dc>].consul` and `_<query>._tcp.query[.<dc>].consul`:
//!   a prepared query's results (A/AAAA/SRV), the query's `DNS.TTL`
//!   overriding the service TTL;
//! - `<hex-ip>.addr[.<dc>].consul`: the address itself.
//!
//! Service, node and query names are looked up as asked, then lowercased
//! if nothing matched (DNS may change their case; the catalog does not).
//!
//! Order, the point of tomo:
//! - prepared queries keep the order the execute returned: its `Near`
//!   sort and its failover choice reach the client (Consul's DNS shuffles
//!   them away, consul#9802);
//! - plain service lookups in the agent's own datacenter come nearest
//!   first from this agent (its node at 0, the others by the LAN
//!   coordinate table, as `?near=_agent`), with a bounded spread so that
//!   clients do not herd onto one instance: see [`order_near`]. Another
//!   datacenter's answers (no LAN coordinates for them here) are shuffled,
//!   as Consul does.
//!
//! Size: over UDP an answer fits 512 bytes, or the client's EDNS size (at
//! most 4096); at 512 bytes it also has at most `udp_answer_limit`
//! answers. Answers are cut whole (an SRV record goes with its additional
//! address) from the end, so the nearest stay, and the TC bit is set
//! (`enable_truncate`, on by default in tomo where Consul's default is off)
//! so that resolvers retry over TCP, which carries everything up to 64 KiB.
//!
//! Errors: a name in `consul.` that does not exist, or a service with no
//! healthy instance, gives NXDOMAIN with the SOA in the authority section;
//! an existing name without records of the asked type NOERROR with the
//! SOA. Names outside `consul.` are REFUSED (there are no recursors). A
//! packet whose header decodes but the rest does not gets FORMERR
//! (hickory-server does that), as does one with other than one question;
//! shorter packets and responses get nothing. Opcodes other than QUERY get
//! NOTIMP; SERVFAIL when the registry cannot answer (no leader, no
//! server).

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::StatusCode;
use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponseBuilder, Queries};
use rand::seq::SliceRandom;
use serde_json::Value;
use tower::ServiceExt;

use super::Shared;

/// The largest UDP answer tomo sends, whatever EDNS size a client offers
/// (larger datagrams fragment, and fragments get lost).
const MAX_UDP: u16 = 4096;
/// Without EDNS, RFC 1035's UDP limit.
const PLAIN_UDP: u16 = 512;
/// How long a lookup may take through the HTTP API (a prepared query's
/// failover may ask other datacenters).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest HTTP answer a lookup reads.
const MAX_BODY: usize = 16 << 20;

/// What can go wrong in the DNS interface.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// A socket could not be bound.
    #[error("dns {proto} {addr}: {source}")]
    Bind {
        /// `udp` or `tcp`.
        proto: &'static str,
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A `dns_config` field of the configuration file is wrong.
    #[error("dns_config.{key}: {reason}")]
    Config {
        /// Which field.
        key: String,
        /// Why.
        reason: String,
    },
    /// The HTTP API answered a lookup with an error.
    #[error("{path}: HTTP {status}: {body}")]
    Api {
        /// The request.
        path: String,
        /// Its status.
        status: u16,
        /// Its body.
        body: String,
    },
    /// The HTTP API did not answer in time.
    #[error("{path}: no answer within {LOOKUP_TIMEOUT:?}")]
    Timeout {
        /// The request.
        path: String,
    },
    /// The HTTP API's answer could not be read.
    #[error("{path}: {reason}")]
    Decode {
        /// The request.
        path: String,
        /// Why.
        reason: String,
    },
}

/// The spread among near-equal instances (see [`order_near`]): instances
/// within `max(min, fraction × r)` of the band's nearest, at RTT r, are
/// shuffled among themselves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// The absolute tolerance (0.5 ms): below it RTT differences are
    /// noise in the estimates.
    pub min: Duration,
    /// The relative tolerance (10 %).
    pub fraction: f64,
}

impl Default for Spread {
    fn default() -> Self {
        Spread {
            min: Duration::from_micros(500),
            fraction: 0.10,
        }
    }
}

/// How the DNS interface answers (Consul's `dns_config` names).
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Where it listens, UDP and TCP on the same port (`-client` and
    /// `-dns-port`, 8600). Port 0: an ephemeral port, the same for both.
    pub bind: SocketAddr,
    /// TTL of node records (`node_ttl`, 0).
    pub node_ttl: Duration,
    /// TTL of service records by service name (`service_ttl`): an exact
    /// name, else the longest `prefix*` key, else `"*"`, else 0.
    pub service_ttl: BTreeMap<String, Duration>,
    /// The SOA's minimum, the negative-caching TTL (`soa.min_ttl`, 0).
    pub soa_min_ttl: Duration,
    /// Answers in a UDP response limited to 512 bytes
    /// (`udp_answer_limit`, 3; 0: no limit).
    pub udp_answer_limit: usize,
    /// Only instances whose checks all pass (`only_passing`, false:
    /// warning instances are answered too).
    pub only_passing: bool,
    /// Set TC when a UDP answer is cut (`enable_truncate`; tomo: true,
    /// Consul: false).
    pub enable_truncate: bool,
    /// Reads from any server, not only the leader (`allow_stale`, true).
    pub allow_stale: bool,
    /// The spread among near-equal instances (tomo).
    pub spread: Spread,
}

impl DnsConfig {
    /// Consul's defaults (tomo's for `enable_truncate`) on `bind`.
    pub fn new(bind: SocketAddr) -> Self {
        DnsConfig {
            bind,
            node_ttl: Duration::ZERO,
            service_ttl: BTreeMap::new(),
            soa_min_ttl: Duration::ZERO,
            udp_answer_limit: 3,
            only_passing: false,
            enable_truncate: true,
            allow_stale: true,
            spread: Spread::default(),
        }
    }

    /// The TTL of `service`'s records.
    pub fn service_ttl(&self, service: &str) -> Duration {
        if let Some(t) = self.service_ttl.get(service) {
            return *t;
        }
        self.service_ttl
            .iter()
            .filter_map(|(k, t)| {
                let prefix = k.strip_suffix('*')?;
                service.starts_with(prefix).then_some((prefix.len(), *t))
            })
            .max_by_key(|(len, _)| *len)
            .map_or(Duration::ZERO, |(_, t)| t)
    }

    /// Applies a configuration file's `dns_config` object (Consul's keys:
    /// `node_ttl`, `service_ttl`, `udp_answer_limit`, `only_passing`,
    /// `enable_truncate`, `allow_stale`, `soa.min_ttl`; tomo's
    /// `near_spread_min` and `near_spread_fraction`). Durations are Go
    /// strings (`"10s"`); unknown keys are ignored, as Consul's other
    /// options are not implemented.
    pub fn apply_consul_json(&mut self, v: &Value) -> Result<(), DnsError> {
        let bad = |key: &str, reason: String| DnsError::Config {
            key: key.into(),
            reason,
        };
        let duration = |key: &str, v: &Value| -> Result<Duration, DnsError> {
            let s = v
                .as_str()
                .ok_or_else(|| bad(key, format!("want a duration string, got {v}")))?;
            crate::query::parse_go_duration(s).map_err(|e| bad(key, e))
        };
        let flag = |key: &str, v: &Value| -> Result<bool, DnsError> {
            v.as_bool()
                .ok_or_else(|| bad(key, format!("want true or false, got {v}")))
        };
        let Some(m) = v.as_object() else {
            return Err(bad("", "not an object".into()));
        };
        for (k, v) in m {
            match k.as_str() {
                "node_ttl" => self.node_ttl = duration(k, v)?,
                "service_ttl" => {
                    let Some(map) = v.as_object() else {
                        return Err(bad(k, "want an object of service: duration".into()));
                    };
                    for (svc, t) in map {
                        let t = duration(&format!("service_ttl.{svc}"), t)?;
                        self.service_ttl.insert(svc.clone(), t);
                    }
                }
                "udp_answer_limit" => {
                    self.udp_answer_limit = v
                        .as_u64()
                        .ok_or_else(|| bad(k, format!("want a count, got {v}")))?
                        as usize;
                }
                "only_passing" => self.only_passing = flag(k, v)?,
                "enable_truncate" => self.enable_truncate = flag(k, v)?,
                "allow_stale" => self.allow_stale = flag(k, v)?,
                "soa" => {
                    if let Some(t) = v.get("min_ttl") {
                        // Consul gives it in seconds.
                        self.soa_min_ttl =
                            Duration::from_secs(t.as_u64().ok_or_else(|| {
                                bad("soa.min_ttl", format!("want seconds, got {t}"))
                            })?);
                    }
                }
                "near_spread_min" => self.spread.min = duration(k, v)?,
                "near_spread_fraction" => {
                    self.spread.fraction = v
                        .as_f64()
                        .filter(|f| f.is_finite() && *f >= 0.0)
                        .ok_or_else(|| bad(k, format!("want a fraction ≥ 0, got {v}")))?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// What a name in `consul.` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// `consul.` itself.
    Apex,
    /// A service's healthy instances.
    Service {
        /// The service name.
        service: String,
        /// Only instances with this tag (compared case-insensitively).
        tag: Option<String>,
        /// The datacenter, if named.
        dc: Option<String>,
    },
    /// A catalog node.
    Node {
        /// The node name.
        node: String,
        /// The datacenter, if named.
        dc: Option<String>,
    },
    /// A prepared query, by name or ID.
    Query {
        /// The name or ID.
        query: String,
        /// The datacenter, if named.
        dc: Option<String>,
    },
    /// An address spelled in hexadecimal.
    Addr {
        /// The address.
        ip: IpAddr,
    },
}

/// Why a name is not a [`Lookup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Not under `consul.`: REFUSED.
    #[error("outside the consul. domain")]
    Outside,
    /// Under `consul.` but no name tomo answers: NXDOMAIN.
    #[error("no such name")]
    NoSuchName,
}

/// The lookup kinds, by their label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Service,
    Node,
    Query,
    Addr,
    /// Consul's `connect`, `ingress`, `virtual`: not served.
    Unsupported,
}

fn kind(label: &str) -> Option<Kind> {
    match label.to_ascii_lowercase().as_str() {
        "service" => Some(Kind::Service),
        "node" => Some(Kind::Node),
        "query" => Some(Kind::Query),
        "addr" => Some(Kind::Addr),
        "connect" | "ingress" | "virtual" => Some(Kind::Unsupported),
        _ => None,
    }
}

/// Parses a name's labels (as on the wire, the root excluded) into the
/// lookup it asks for.
pub fn parse_name(labels: &[&[u8]]) -> Result<Lookup, NameError> {
    let Some((last, rest)) = labels.split_last() else {
        return Err(NameError::Outside);
    };
    if !last.eq_ignore_ascii_case(b"consul") {
        return Err(NameError::Outside);
    }
    if rest.is_empty() {
        return Ok(Lookup::Apex);
    }
    // A label that is not UTF-8 names nothing in the catalog.
    let s: Vec<&str> = rest
        .iter()
        .map(|l| std::str::from_utf8(l).map_err(|_| NameError::NoSuchName))
        .collect::<Result<_, _>>()?;
    let n = s.len();
    let under = |l: &str| l.len() > 1 && l.starts_with('_');
    // Where the kind label is, and the datacenter after it.
    let (k, dc) = if n >= 3 && s[n - 1].eq_ignore_ascii_case("dc") && kind(s[n - 3]).is_some() {
        (n - 3, Some(s[n - 2]))
    } else if kind(s[n - 1]).is_some() {
        (n - 1, None)
    } else if n >= 2 && kind(s[n - 2]).is_some() {
        (n - 2, Some(s[n - 1]))
    } else if n == 2 && under(s[0]) && under(s[1]) {
        // RFC 2782 without `.service`: `_web._tcp.consul`.
        return Ok(service_of(&s, None));
    } else {
        return Err(NameError::NoSuchName);
    };
    let parts = &s[..k];
    if parts.is_empty() {
        return Err(NameError::NoSuchName);
    }
    let dc = dc.map(str::to_string);
    match kind(s[k]).unwrap_or(Kind::Unsupported) {
        Kind::Service => Ok(service_of(parts, dc)),
        Kind::Node => Ok(Lookup::Node {
            node: parts.join("."),
            dc,
        }),
        Kind::Query => {
            let query =
                if parts.len() == 2 && under(parts[0]) && parts[1].eq_ignore_ascii_case("_tcp") {
                    parts[0][1..].to_string()
                } else {
                    parts.join(".")
                };
            Ok(Lookup::Query { query, dc })
        }
        Kind::Addr if parts.len() == 1 => match hex_ip(parts[0]) {
            Some(ip) => Ok(Lookup::Addr { ip }),
            None => Err(NameError::NoSuchName),
        },
        Kind::Addr | Kind::Unsupported => Err(NameError::NoSuchName),
    }
}

/// `[<tag>.]<service>` or RFC 2782's `_<service>._<tag>` (`_tcp`: any
/// tag; Consul takes any other `_x` as tag `x`).
fn service_of(parts: &[&str], dc: Option<String>) -> Lookup {
    let n = parts.len();
    if n == 2 && parts[0].starts_with('_') && parts[1].starts_with('_') {
        let tag = &parts[1][1..];
        return Lookup::Service {
            service: parts[0][1..].to_string(),
            tag: (!tag.eq_ignore_ascii_case("tcp")).then(|| tag.to_string()),
            dc,
        };
    }
    Lookup::Service {
        service: parts[n - 1].to_string(),
        tag: (n >= 2).then(|| parts[..n - 1].join(".")),
        dc,
    }
}

/// An address from its hex spelling: 8 digits for IPv4, 32 for IPv6.
fn hex_ip(s: &str) -> Option<IpAddr> {
    if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    match s.len() {
        8 => u32::from_str_radix(s, 16)
            .ok()
            .map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        32 => u128::from_str_radix(s, 16)
            .ok()
            .map(|v| IpAddr::V6(Ipv6Addr::from(v))),
        _ => None,
    }
}

/// The hex spelling of an address (`c000020a` for 192.0.2.10).
pub fn ip_hex(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v) => format!("{:08x}", u32::from(v)),
        IpAddr::V6(v) => format!("{:032x}", u128::from(v)),
    }
}

/// Orders `items` by estimated RTT (seconds; unknown: +∞), nearest first,
/// and shuffles each band of near-equal items: a band starts at the
/// nearest item not yet placed, at RTT r, and takes every further item
/// within `max(spread.min, spread.fraction × r)` of r. Items without an
/// estimate form the last band.
///
/// So clients spread over instances that are about as near as each other
/// (within the estimates' noise, or 10 %), and no client is ever sent to
/// an instance while one nearer by more than that tolerance is passed
/// over: the spread is bounded.
pub fn order_near<T, R: rand::Rng + ?Sized>(
    mut items: Vec<(f64, T)>,
    spread: &Spread,
    rng: &mut R,
) -> Vec<T> {
    let key = |d: f64| if d.is_nan() { f64::INFINITY } else { d };
    items.sort_by(|a, b| key(a.0).total_cmp(&key(b.0)));
    let min = spread.min.as_secs_f64();
    let mut out = Vec::with_capacity(items.len());
    let mut band: Vec<T> = Vec::new();
    let mut start = f64::NAN;
    for (d, t) in items {
        let d = key(d);
        let within = if start.is_infinite() {
            d.is_infinite()
        } else {
            d <= start + min.max(spread.fraction * start)
        };
        if !within || band.is_empty() {
            band.shuffle(rng);
            out.append(&mut band);
            start = d;
        }
        band.push(t);
    }
    band.shuffle(rng);
    out.append(&mut band);
    out
}

/// One service instance as the HTTP API describes it.
#[derive(Debug, Clone, PartialEq)]
struct Instance {
    node: String,
    node_address: String,
    datacenter: String,
    address: String,
    port: u16,
    tags: Vec<String>,
    weight: u16,
}

/// The worst status of an entry's checks: 0 passing, 1 warning, 2
/// critical.
fn worst(entry: &Value) -> u8 {
    entry["Checks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| match c["Status"].as_str() {
            Some("passing") => 0,
            Some("warning") => 1,
            _ => 2,
        })
        .max()
        .unwrap_or(0)
}

/// Whether a `CheckServiceNode` entry is answered: none of its checks is
/// critical, and with `only_passing` all of them pass (Consul's DNS rule).
fn healthy(entry: &Value, only_passing: bool) -> bool {
    let w = worst(entry);
    w == 0 || (w == 1 && !only_passing)
}

/// The instance a `CheckServiceNode` entry (`{Node, Service, Checks}`)
/// describes.
fn instance_of(entry: &Value) -> Option<Instance> {
    let node = &entry["Node"];
    let svc = &entry["Service"];
    let warning = worst(entry) == 1;
    let weights = &svc["Weights"];
    let weight = if warning {
        weights["Warning"].as_u64()
    } else {
        weights["Passing"].as_u64()
    };
    Some(Instance {
        node: node["Node"].as_str()?.to_string(),
        node_address: node["Address"].as_str().unwrap_or("").to_string(),
        datacenter: node["Datacenter"].as_str().unwrap_or("").to_string(),
        address: svc["Address"].as_str().unwrap_or("").to_string(),
        port: svc["Port"].as_u64().and_then(|p| u16::try_from(p).ok())?,
        tags: svc["Tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str().map(str::to_string))
            .collect(),
        weight: weight.map_or(1, |w| w.min(u16::MAX as u64) as u16),
    })
}

/// Percent-encodes a path segment or query value.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A name from dot-separated text and more labels, as raw bytes (node
/// names need not be hostnames).
fn name_of(first: &str, rest: &[&str]) -> Option<Name> {
    let labels: Vec<&[u8]> = first
        .split('.')
        .chain(rest.iter().copied())
        .map(str::as_bytes)
        .collect();
    if labels.iter().any(|l| l.is_empty()) {
        return None;
    }
    Name::from_labels(labels).ok()
}

/// A hostname (an address that is not an IP) as a name.
fn host_name(s: &str) -> Option<Name> {
    name_of(s.trim_end_matches('.'), &[])
}

/// One answer and what goes with it: cut whole when a response is trimmed.
#[derive(Debug, Default)]
struct Entry {
    answers: Vec<Record>,
    additionals: Vec<Record>,
}

impl From<Record> for Entry {
    /// One record with nothing in the additional section.
    fn from(r: Record) -> Self {
        Entry {
            answers: vec![r],
            additionals: Vec::new(),
        }
    }
}

/// What a lookup found.
enum Outcome {
    /// The name exists: its records of the asked type (maybe none).
    Found(Vec<Entry>),
    /// NXDOMAIN.
    NoSuchName,
    /// SERVFAIL.
    Failed,
}

/// The request handler: the agent, its router and the configuration.
/// Lookups answered at once; beyond, SERVFAIL.
const MAX_IN_FLIGHT: usize = 256;

struct Handler {
    /// Lookups in progress: each can hold HTTP and cross-datacenter calls
    /// for seconds, and hickory spawns a task per UDP packet, so a flood
    /// (spoofable over UDP) must not turn into unbounded work.
    in_flight: Arc<tokio::sync::Semaphore>,
    cfg: DnsConfig,
    shared: Arc<Shared>,
    app: Router,
    soa_name: Name,
    ns_name: Name,
    hostmaster: Name,
}

impl Handler {
    /// `?dc=<dc>` for another datacenter; nothing for ours.
    fn remote_dc(&self, dc: &Option<String>) -> Option<String> {
        dc.as_ref()
            .filter(|d| !d.eq_ignore_ascii_case(&self.shared.datacenter))
            .cloned()
    }

    /// GETs `path` through the agent's router: `Some(json)` on 200,
    /// `None` when the thing is not there (404, or no path to the
    /// datacenter).
    async fn get(
        &self,
        path: String,
        forwarded_for: Option<IpAddr>,
    ) -> Result<Option<Value>, DnsError> {
        let mut b = axum::http::Request::builder()
            .method("GET")
            .uri(path.as_str());
        if let Some(ip) = forwarded_for {
            // A prepared query's `Near: "_ip"` sorts from the DNS client.
            b = b.header("x-forwarded-for", ip.to_string());
        }
        let req = b.body(Body::empty()).map_err(|e| DnsError::Decode {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let resp = tokio::time::timeout(LOOKUP_TIMEOUT, self.app.clone().oneshot(req))
            .await
            .map_err(|_| DnsError::Timeout { path: path.clone() })?;
        let resp = match resp {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), MAX_BODY)
            .await
            .map_err(|e| DnsError::Decode {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if status == StatusCode::OK {
            return serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| DnsError::Decode {
                    path,
                    reason: e.to_string(),
                });
        }
        let text = String::from_utf8_lossy(&body).into_owned();
        if status == StatusCode::NOT_FOUND
            || (status == StatusCode::INTERNAL_SERVER_ERROR
                && text.starts_with(super::forward::NO_PATH))
        {
            return Ok(None);
        }
        Err(DnsError::Api {
            path,
            status: status.as_u16(),
            body: text,
        })
    }

    /// `?stale` (when allowed) and `?dc=`.
    fn params(&self, dc: &Option<String>) -> String {
        let mut p = Vec::new();
        if self.cfg.allow_stale {
            p.push("stale".to_string());
        }
        if let Some(dc) = self.remote_dc(dc) {
            p.push(format!("dc={}", enc(&dc)));
        }
        if p.is_empty() {
            String::new()
        } else {
            format!("?{}", p.join("&"))
        }
    }

    /// Runs `fetch` with the name as asked, then lowercased if that found
    /// nothing.
    async fn as_asked_then_lower<F, Fut>(
        &self,
        name: &str,
        fetch: F,
    ) -> Result<Option<Value>, DnsError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<Option<Value>, DnsError>>,
    {
        let found = |v: &Option<Value>| match v {
            None | Some(Value::Null) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => o
                .get("Nodes")
                .is_none_or(|n| n.as_array().is_some_and(|a| !a.is_empty())),
            Some(_) => true,
        };
        let v = fetch(name.to_string()).await?;
        let lower = name.to_lowercase();
        if found(&v) || lower == name {
            return Ok(v);
        }
        fetch(lower).await
    }

    /// The estimated RTT (seconds) from this agent to each node (its own
    /// node 0, unknown +∞): the LAN coordinate table, as `?near=_agent`.
    fn rtts(&self, nodes: &[&str]) -> Vec<f64> {
        let all = self.shared.lan_coordinates();
        let me = &self.shared.node;
        let from = &all[me];
        nodes
            .iter()
            .map(|n| {
                if *n == me.as_str() {
                    return 0.0;
                }
                match all.get(*n) {
                    Some(c) if c.vec.len() == from.vec.len() => from.distance_to(c),
                    _ => f64::INFINITY,
                }
            })
            .collect()
    }

    async fn service(
        &self,
        service: &str,
        tag: Option<&str>,
        dc: &Option<String>,
        q: &Question,
    ) -> Outcome {
        let params = self.params(dc);
        let fetched = self
            .as_asked_then_lower(service, |s| {
                self.get(format!("/v1/health/service/{}{params}", enc(&s)), None)
            })
            .await;
        let list = match fetched {
            Ok(Some(Value::Array(a))) => a,
            Ok(_) => return Outcome::NoSuchName,
            Err(_) => return Outcome::Failed,
        };
        let instances: Vec<Instance> = list
            .iter()
            .filter(|e| healthy(e, self.cfg.only_passing))
            .filter_map(instance_of)
            .filter(|i| tag.is_none_or(|t| i.tags.iter().any(|x| x.eq_ignore_ascii_case(t))))
            .collect();
        if instances.is_empty() {
            return Outcome::NoSuchName;
        }
        let ordered = if self.remote_dc(dc).is_some() {
            let mut v = instances;
            v.shuffle(&mut rand::rng());
            v
        } else {
            let names: Vec<&str> = instances.iter().map(|i| i.node.as_str()).collect();
            let rtts = self.rtts(&names);
            let items: Vec<(f64, Instance)> =
                rtts.into_iter().zip(instances.iter().cloned()).collect();
            order_near(items, &self.cfg.spread, &mut rand::rng())
        };
        let ttl = ttl_secs(self.cfg.service_ttl(service));
        Outcome::Found(self.instance_entries(&ordered, q, ttl, dc))
    }

    async fn query(&self, query: &str, dc: &Option<String>, q: &Question, src: IpAddr) -> Outcome {
        let dc_param = self
            .remote_dc(dc)
            .map(|d| format!("?dc={}", enc(&d)))
            .unwrap_or_default();
        // Query names resolve without regard to case already; one execute
        // (a second would run the failover, and its remote calls, again).
        let fetched = self
            .get(
                format!("/v1/query/{}/execute{dc_param}", enc(query)),
                Some(src),
            )
            .await;
        let v = match fetched {
            Ok(Some(v)) => v,
            Ok(None) => return Outcome::NoSuchName,
            Err(_) => return Outcome::Failed,
        };
        // The execute's order is kept: it is the query's `Near` sort (or
        // its shuffle) and its failover choice.
        let instances: Vec<Instance> = v["Nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(instance_of)
            .collect();
        if instances.is_empty() {
            return Outcome::NoSuchName;
        }
        let ttl = v["DNS"]["TTL"]
            .as_str()
            .filter(|t| !t.is_empty())
            .and_then(|t| crate::query::parse_go_duration(t).ok())
            .unwrap_or_else(|| self.cfg.service_ttl(v["Service"].as_str().unwrap_or("")));
        let answered_dc = v["Datacenter"].as_str().map(str::to_string).or(dc.clone());
        Outcome::Found(self.instance_entries(&instances, q, ttl_secs(ttl), &answered_dc))
    }

    async fn node(&self, node: &str, dc: &Option<String>, q: &Question) -> Outcome {
        let params = self.params(dc);
        let fetched = self
            .as_asked_then_lower(node, |s| {
                self.get(format!("/v1/catalog/node/{}{params}", enc(&s)), None)
            })
            .await;
        let v = match fetched {
            Ok(Some(v)) if v.is_object() => v,
            Ok(_) => return Outcome::NoSuchName,
            Err(_) => return Outcome::Failed,
        };
        let ttl = ttl_secs(self.cfg.node_ttl);
        let n = &v["Node"];
        let address = n["Address"].as_str().unwrap_or("");
        let mut entries = Vec::new();
        if let Some(r) = address_record(&q.name, address, q.qtype, ttl) {
            entries.push(Entry::from(r));
        }
        if q.qtype == RecordType::TXT {
            // Node metadata as RFC 1464 `key=value`; Consul's `rfc1035-`
            // keys as their bare value.
            for (k, val) in n["Meta"].as_object().into_iter().flatten() {
                let val = val.as_str().unwrap_or("");
                let txt = if k.starts_with("rfc1035-") {
                    val.to_string()
                } else {
                    format!("{k}={val}")
                };
                entries.push(Entry::from(Record::from_rdata(
                    q.name.clone(),
                    ttl,
                    RData::TXT(TXT::new(vec![txt])),
                )));
            }
        }
        Outcome::Found(entries)
    }

    /// The records of instances in order: addresses (deduplicated) for
    /// A/AAAA/ANY, SRV with the targets' addresses in the additional
    /// section.
    fn instance_entries(
        &self,
        instances: &[Instance],
        q: &Question,
        ttl: u32,
        dc: &Option<String>,
    ) -> Vec<Entry> {
        let mut seen: HashSet<&str> = HashSet::new();
        let mut out = Vec::new();
        for i in instances {
            let dc = if !i.datacenter.is_empty() {
                i.datacenter.clone()
            } else {
                dc.clone().unwrap_or_else(|| self.shared.datacenter.clone())
            };
            let addr = if i.address.is_empty() {
                i.node_address.as_str()
            } else {
                i.address.as_str()
            };
            match q.qtype {
                RecordType::SRV => {
                    if let Some(e) = srv_entry(&q.name, i, &dc, ttl) {
                        out.push(e);
                    }
                }
                _ => {
                    if !seen.insert(addr) {
                        continue;
                    }
                    if let Some(r) = address_record(&q.name, addr, q.qtype, ttl) {
                        out.push(Entry::from(r));
                    }
                }
            }
        }
        out
    }

    fn soa(&self) -> Record {
        let serial = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as u32;
        let min = ttl_secs(self.cfg.soa_min_ttl);
        Record::from_rdata(
            self.soa_name.clone(),
            min,
            RData::SOA(SOA::new(
                self.ns_name.clone(),
                self.hostmaster.clone(),
                serial,
                3600,
                600,
                86400,
                min,
            )),
        )
    }

    /// Answers one question.
    async fn lookup(&self, q: &Question, src: IpAddr) -> Result<Outcome, NameError> {
        let labels: Vec<&[u8]> = q.name.iter().collect();
        let outcome = match parse_name(&labels)? {
            Lookup::Apex => {
                let mut e = Entry::default();
                if matches!(q.qtype, RecordType::SOA | RecordType::ANY) {
                    e.answers.push(self.soa());
                }
                if matches!(q.qtype, RecordType::NS | RecordType::ANY) {
                    e.answers.push(Record::from_rdata(
                        self.soa_name.clone(),
                        ttl_secs(self.cfg.node_ttl),
                        RData::NS(NS(self.ns_name.clone())),
                    ));
                }
                Outcome::Found(if e.answers.is_empty() {
                    Vec::new()
                } else {
                    vec![e]
                })
            }
            Lookup::Service { service, tag, dc } => {
                self.service(&service, tag.as_deref(), &dc, q).await
            }
            Lookup::Node { node, dc } => self.node(&node, &dc, q).await,
            Lookup::Query { query, dc } => self.query(&query, &dc, q, src).await,
            Lookup::Addr { ip } => {
                let ttl = ttl_secs(self.cfg.node_ttl);
                let e = address_record(&q.name, &ip.to_string(), q.qtype, ttl).map(Entry::from);
                Outcome::Found(e.into_iter().collect())
            }
        };
        Ok(outcome)
    }
}

/// A question as asked (the name in its original case).
struct Question {
    name: Name,
    qtype: RecordType,
}

fn ttl_secs(d: Duration) -> u32 {
    d.as_secs().min(u32::MAX as u64) as u32
}

/// The record for `addr` under `owner` if the type asks for it: A or
/// AAAA for an IP, a CNAME for a hostname.
fn address_record(owner: &Name, addr: &str, qtype: RecordType, ttl: u32) -> Option<Record> {
    let wants = |t: RecordType| qtype == t || qtype == RecordType::ANY;
    let rdata = match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(v)) if wants(RecordType::A) => RData::A(A(v)),
        Ok(IpAddr::V6(v)) if wants(RecordType::AAAA) => RData::AAAA(AAAA(v)),
        Ok(_) => return None,
        Err(_) if wants(RecordType::A) || wants(RecordType::AAAA) => {
            RData::CNAME(CNAME(host_name(addr)?))
        }
        Err(_) => return None,
    };
    Some(Record::from_rdata(owner.clone(), ttl, rdata))
}

/// An instance's SRV record and the target's address: the target is
/// `<hex>.addr.<dc>.consul.` for an instance with an IP of its own,
/// `<node>.node.<dc>.consul.` for one at its node's IP, and the hostname
/// itself otherwise.
fn srv_entry(owner: &Name, i: &Instance, dc: &str, ttl: u32) -> Option<Entry> {
    let (target, ip) = if !i.address.is_empty() {
        match i.address.parse::<IpAddr>() {
            Ok(ip) => (name_of(&ip_hex(ip), &["addr", dc, "consul"])?, Some(ip)),
            Err(_) => (host_name(&i.address)?, None),
        }
    } else {
        match i.node_address.parse::<IpAddr>() {
            Ok(ip) => match name_of(&i.node, &["node", dc, "consul"]) {
                Some(n) => (n, Some(ip)),
                // A node name that is no DNS name: its address's.
                None => (name_of(&ip_hex(ip), &["addr", dc, "consul"])?, Some(ip)),
            },
            Err(_) => (host_name(&i.node_address)?, None),
        }
    };
    let srv = Record::from_rdata(
        owner.clone(),
        ttl,
        RData::SRV(SRV::new(1, i.weight, i.port, target.clone())),
    );
    let additionals = ip
        .map(|ip| {
            let rdata = match ip {
                IpAddr::V4(v) => RData::A(A(v)),
                IpAddr::V6(v) => RData::AAAA(AAAA(v)),
            };
            Record::from_rdata(target, ttl, rdata)
        })
        .into_iter()
        .collect();
    Some(Entry {
        answers: vec![srv],
        additionals,
    })
}

/// Whether the first `n` entries fit `max` bytes as encoded (the question,
/// the answers, their additional records, the OPT record).
fn fits(
    queries: &Queries,
    edns: Option<&Edns>,
    meta: Metadata,
    entries: &[Entry],
    n: usize,
    max: u16,
) -> bool {
    let answers: Vec<&Record> = entries[..n].iter().flat_map(|e| &e.answers).collect();
    let additionals: Vec<&Record> = entries[..n].iter().flat_map(|e| &e.additionals).collect();
    let mut buf = Vec::with_capacity(max as usize);
    let mut encoder = BinEncoder::new(&mut buf);
    encoder.set_max_size(max);
    let resp = MessageResponseBuilder::new(queries, edns).build(
        meta,
        answers,
        std::iter::empty(),
        std::iter::empty(),
        additionals,
    );
    match resp.destructive_emit(&mut encoder) {
        Ok(info) => !info.truncation,
        Err(_) => false,
    }
}

/// How many entries a response keeps: at most `limit`, as many as fit
/// `max` bytes (at least none).
fn fit(
    queries: &Queries,
    edns: Option<&Edns>,
    meta: Metadata,
    entries: &[Entry],
    limit: Option<usize>,
    max: u16,
) -> usize {
    let hi = limit.map_or(entries.len(), |l| l.min(entries.len()));
    if fits(queries, edns, meta, entries, hi, max) {
        return hi;
    }
    // The largest n < hi that fits (0 always does, or nothing will).
    let (mut lo, mut hi) = (0, hi);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(queries, edns, meta, entries, mid, max) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut meta = Metadata::response_from_request(&request.metadata);
        // Our EDNS answer: the size we will fill, the client's up to 4096.
        let edns = request.edns.as_ref().map(|e| {
            let mut o = Edns::new();
            o.set_max_payload(e.max_payload().clamp(PLAIN_UDP, MAX_UDP));
            o
        });
        let mut answers: Vec<Record> = Vec::new();
        let mut authorities: Vec<Record> = Vec::new();
        let mut additionals: Vec<Record> = Vec::new();
        let queries = request.queries.queries();
        if request.metadata.op_code != OpCode::Query {
            meta.response_code = ResponseCode::NotImp;
        } else if queries.len() != 1 {
            // RFC 9619: exactly one question.
            meta.response_code = ResponseCode::FormErr;
        } else if !matches!(queries[0].query_class(), DNSClass::IN | DNSClass::ANY) {
            meta.response_code = ResponseCode::Refused;
        } else {
            let q = Question {
                name: queries[0].original().name().clone(),
                qtype: queries[0].query_type(),
            };
            let permit = self.in_flight.clone().try_acquire_owned();
            let outcome = match permit {
                Ok(_permit) => self.lookup(&q, request.src().ip()).await,
                // Busy: SERVFAIL tells the resolver to try elsewhere or later.
                Err(_) => Ok(Outcome::Failed),
            };
            match outcome {
                Err(NameError::Outside) => meta.response_code = ResponseCode::Refused,
                Err(NameError::NoSuchName) | Ok(Outcome::NoSuchName) => {
                    meta.authoritative = true;
                    meta.response_code = ResponseCode::NXDomain;
                    authorities.push(self.soa());
                }
                Ok(Outcome::Failed) => meta.response_code = ResponseCode::ServFail,
                Ok(Outcome::Found(entries)) if entries.is_empty() => {
                    meta.authoritative = true;
                    authorities.push(self.soa());
                }
                Ok(Outcome::Found(entries)) => {
                    meta.authoritative = true;
                    let (max, limit) = match request.protocol() {
                        Protocol::Udp => {
                            let max = edns.as_ref().map_or(PLAIN_UDP, Edns::max_payload);
                            let limit = (max <= PLAIN_UDP && self.cfg.udp_answer_limit > 0)
                                .then_some(self.cfg.udp_answer_limit);
                            (max, limit)
                        }
                        _ => (u16::MAX, None),
                    };
                    let n = fit(&request.queries, edns.as_ref(), meta, &entries, limit, max);
                    if n < entries.len() && self.cfg.enable_truncate {
                        meta.truncation = true;
                    }
                    for e in entries.into_iter().take(n) {
                        answers.extend(e.answers);
                        additionals.extend(e.additionals);
                    }
                }
            }
        }
        let resp = MessageResponseBuilder::new(&request.queries, edns.as_ref()).build(
            meta,
            answers.iter(),
            authorities.iter(),
            std::iter::empty(),
            additionals.iter(),
        );
        match response_handle.send_response(resp).await {
            Ok(info) => info,
            Err(_) => {
                meta.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata: meta,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

/// The DNS sockets, bound (before anything else starts, so a taken port
/// fails the agent's start cleanly).
pub struct Bound {
    udp: tokio::net::UdpSocket,
    tcp: tokio::net::TcpListener,
    addr: SocketAddr,
}

/// Binds UDP and TCP on the same address; for port 0, the UDP socket's
/// ephemeral port is taken for TCP too (another one if TCP has it taken).
pub async fn bind(addr: SocketAddr) -> Result<Bound, DnsError> {
    let attempts = if addr.port() == 0 { 16 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = tokio::net::UdpSocket::bind(addr)
            .await
            .map_err(|source| DnsError::Bind {
                proto: "udp",
                addr,
                source,
            })?;
        let bound = udp.local_addr().map_err(|source| DnsError::Bind {
            proto: "udp",
            addr,
            source,
        })?;
        match tokio::net::TcpListener::bind(bound).await {
            Ok(tcp) => {
                return Ok(Bound {
                    udp,
                    tcp,
                    addr: bound,
                });
            }
            Err(source) => {
                last = Some(DnsError::Bind {
                    proto: "tcp",
                    addr: bound,
                    source,
                })
            }
        }
    }
    Err(last.unwrap_or(DnsError::Bind {
        proto: "tcp",
        addr,
        source: std::io::Error::other("no attempt made"),
    }))
}

impl Bound {
    /// Where the sockets are bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts answering with `app`, the agent's finished router.
    pub fn serve(self, cfg: DnsConfig, shared: Arc<Shared>, app: Router) -> DnsServer {
        let name = |s: &str| Name::from_ascii(s).unwrap_or_else(|_| Name::root());
        let handler = Handler {
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            cfg,
            shared,
            app,
            soa_name: name("consul."),
            ns_name: name("ns.consul."),
            hostmaster: name("hostmaster.consul."),
        };
        let mut server = Server::new(handler);
        server.register_socket(self.udp);
        // Idle TCP connections close after 10 s; 32 responses queue per
        // connection.
        server.register_listener(self.tcp, Duration::from_secs(10), 32);
        DnsServer {
            addr: self.addr,
            server,
        }
    }
}

/// A running DNS interface; it stops when dropped.
pub struct DnsServer {
    addr: SocketAddr,
    server: Server<Handler>,
}

impl DnsServer {
    /// Where it listens (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting requests and waits for those under way.
    pub async fn shutdown(mut self) {
        let _ =
            tokio::time::timeout(Duration::from_secs(2), self.server.shutdown_gracefully()).await;
    }
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("addr", &self.addr)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn parse(name: &str) -> Result<Lookup, NameError> {
        let labels: Vec<&[u8]> = name
            .trim_end_matches('.')
            .split('.')
            .filter(|l| !l.is_empty())
            .map(str::as_bytes)
            .collect();
        parse_name(&labels)
    }

    fn svc(service: &str, tag: Option<&str>, dc: Option<&str>) -> Lookup {
        Lookup::Service {
            service: service.into(),
            tag: tag.map(Into::into),
            dc: dc.map(Into::into),
        }
    }

    #[test]
    fn service_names_in_every_form() {
        assert_eq!(parse("web.service.consul."), Ok(svc("web", None, None)));
        assert_eq!(parse("Web.SERVICE.Consul"), Ok(svc("Web", None, None)));
        assert_eq!(
            parse("web.service.dc2.consul"),
            Ok(svc("web", None, Some("dc2")))
        );
        assert_eq!(
            parse("web.service.dc2.dc.consul"),
            Ok(svc("web", None, Some("dc2")))
        );
        assert_eq!(
            parse("primary.db.service.consul"),
            Ok(svc("db", Some("primary"), None))
        );
        assert_eq!(
            parse("a.b.db.service.consul"),
            Ok(svc("db", Some("a.b"), None))
        );
        // RFC 2782: `_tcp` is no tag, any other `_x` is tag x.
        assert_eq!(parse("_db._tcp.service.consul"), Ok(svc("db", None, None)));
        assert_eq!(
            parse("_db._TCP.service.dc1.consul"),
            Ok(svc("db", None, Some("dc1")))
        );
        assert_eq!(
            parse("_db._primary.service.consul"),
            Ok(svc("db", Some("primary"), None))
        );
        assert_eq!(parse("_db._tcp.consul"), Ok(svc("db", None, None)));
        // A service may be called like a keyword.
        assert_eq!(parse("node.service.consul"), Ok(svc("node", None, None)));
        assert_eq!(parse("dc.service.consul"), Ok(svc("dc", None, None)));
    }

    #[test]
    fn node_query_addr_and_apex() {
        assert_eq!(
            parse("web-1.node.consul"),
            Ok(Lookup::Node {
                node: "web-1".into(),
                dc: None
            })
        );
        assert_eq!(
            parse("web-1.NODE.dc3.consul"),
            Ok(Lookup::Node {
                node: "web-1".into(),
                dc: Some("dc3".into())
            })
        );
        assert_eq!(
            parse("geo-db.query.consul"),
            Ok(Lookup::Query {
                query: "geo-db".into(),
                dc: None
            })
        );
        assert_eq!(
            parse("_geo-db._tcp.query.dc2.consul"),
            Ok(Lookup::Query {
                query: "geo-db".into(),
                dc: Some("dc2".into())
            })
        );
        assert_eq!(
            parse("c000020a.addr.consul"),
            Ok(Lookup::Addr {
                ip: "192.0.2.10".parse().unwrap()
            })
        );
        assert_eq!(
            parse("20010db8000000000000000000000001.addr.dc1.consul"),
            Ok(Lookup::Addr {
                ip: "2001:db8::1".parse().unwrap()
            })
        );
        assert_eq!(parse("consul."), Ok(Lookup::Apex));
        assert_eq!(parse("CONSUL"), Ok(Lookup::Apex));
    }

    #[test]
    fn names_outside_or_unknown() {
        assert_eq!(parse("example.com."), Err(NameError::Outside));
        assert_eq!(parse("."), Err(NameError::Outside));
        assert_eq!(parse("consul.example."), Err(NameError::Outside));
        assert_eq!(parse("web.consul"), Err(NameError::NoSuchName));
        assert_eq!(parse("service.consul"), Err(NameError::NoSuchName));
        assert_eq!(parse("a.b.c.consul"), Err(NameError::NoSuchName));
        assert_eq!(parse("web.connect.consul"), Err(NameError::NoSuchName));
        assert_eq!(parse("xyz.addr.consul"), Err(NameError::NoSuchName));
        assert_eq!(parse("c00002.addr.consul"), Err(NameError::NoSuchName));
        assert_eq!(
            parse_name(&[b"\xff\xfe", b"service", b"consul"]),
            Err(NameError::NoSuchName)
        );
        assert_eq!(parse_name(&[]), Err(NameError::Outside));
    }

    #[test]
    fn hex_addresses_round_trip() {
        for ip in ["192.0.2.10", "10.0.0.1", "2001:db8::1", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(hex_ip(&ip_hex(ip)), Some(ip));
        }
        assert_eq!(ip_hex("192.0.2.10".parse().unwrap()), "c000020a");
        assert_eq!(hex_ip("+0000001"), None);
    }

    #[test]
    fn near_order_shuffles_only_within_bands() {
        let spread = Spread::default();
        let ms = |x: f64| x / 1000.0;
        // a/b within 0.5 ms; c is 10 % past b's band start; d, e unknown.
        let items = vec![
            (f64::INFINITY, "d"),
            (ms(20.0), "c"),
            (ms(1.3), "b"),
            (ms(1.0), "a"),
            (f64::NAN, "e"),
            (ms(0.0), "self"),
        ];
        let mut seen_first_band = HashSet::new();
        let mut seen_tail = HashSet::new();
        for seed in 0..64 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let o = order_near(items.clone(), &spread, &mut rng);
            // 0 and 1 ms are 1 ms apart: more than max(0.5 ms, 0).
            assert_eq!(o[0], "self");
            assert!(
                matches!(o[1], "a" | "b") && matches!(o[2], "a" | "b"),
                "{o:?}"
            );
            seen_first_band.insert(o[1]);
            assert_eq!(o[3], "c");
            assert!(matches!(o[4], "d" | "e"));
            seen_tail.insert(o[4]);
        }
        assert_eq!(seen_first_band.len(), 2);
        assert_eq!(seen_tail.len(), 2);
        // The relative tolerance: 10 % of 100 ms takes 109 ms in, not 111.
        let items = vec![(ms(100.0), 1), (ms(109.0), 2), (ms(111.0), 3)];
        let mut seen = HashSet::new();
        for seed in 0..64 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let o = order_near(items.clone(), &spread, &mut rng);
            assert_eq!(o[2], 3);
            seen.insert(o[0]);
        }
        assert_eq!(seen.len(), 2);
        assert!(order_near(Vec::<(f64, u8)>::new(), &spread, &mut rand::rng()).is_empty());
    }

    #[test]
    fn health_and_instances_from_json() {
        let entry = |checks: &[&str]| {
            serde_json::json!({
                "Node": {"Node": "n1", "Address": "10.0.0.1", "Datacenter": "dc1"},
                "Service": {"Address": "", "Port": 80, "Tags": ["a"], "Weights": {"Passing": 5, "Warning": 2}},
                "Checks": checks.iter().map(|s| serde_json::json!({"Status": s})).collect::<Vec<_>>(),
            })
        };
        assert!(healthy(&entry(&[]), true));
        assert!(healthy(&entry(&["passing"]), true));
        assert!(healthy(&entry(&["passing", "warning"]), false));
        assert!(!healthy(&entry(&["passing", "warning"]), true));
        assert!(!healthy(&entry(&["critical", "passing"]), false));
        let i = instance_of(&entry(&["passing"])).unwrap();
        assert_eq!((i.node.as_str(), i.port, i.weight), ("n1", 80, 5));
        assert_eq!(instance_of(&entry(&["warning"])).unwrap().weight, 2);
    }

    #[test]
    fn config_from_consul_json() {
        let mut c = DnsConfig::new("127.0.0.1:8600".parse().unwrap());
        c.apply_consul_json(&serde_json::json!({
            "node_ttl": "30s",
            "service_ttl": {"*": "5s", "web": "10s", "web-*": "20s"},
            "udp_answer_limit": 5,
            "only_passing": true,
            "enable_truncate": false,
            "soa": {"min_ttl": 60},
            "near_spread_fraction": 0.2,
            "recursors": ["1.1.1.1"],
        }))
        .unwrap();
        assert_eq!(c.node_ttl, Duration::from_secs(30));
        assert_eq!(c.service_ttl("web"), Duration::from_secs(10));
        assert_eq!(c.service_ttl("web-api"), Duration::from_secs(20));
        assert_eq!(c.service_ttl("db"), Duration::from_secs(5));
        assert_eq!(
            (c.udp_answer_limit, c.only_passing, c.enable_truncate),
            (5, true, false)
        );
        assert_eq!(c.soa_min_ttl, Duration::from_secs(60));
        assert_eq!(c.spread.fraction, 0.2);
        assert_eq!(DnsConfig::new(c.bind).service_ttl("web"), Duration::ZERO);
        let err = c
            .apply_consul_json(&serde_json::json!({"node_ttl": 5}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("node_ttl"), "{err}");
        assert!(
            c.apply_consul_json(&serde_json::json!({"service_ttl": {"x": "forever"}}))
                .is_err()
        );
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(enc("web-1.a_b~"), "web-1.a_b~");
        assert_eq!(enc("a/b?c d%"), "a%2Fb%3Fc%20d%25");
    }
}
