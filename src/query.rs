//! Prepared queries (`../shared/docs/consul-api.md` §2.7, §5): the
//! definition, its JSON both ways, validation, templates and the
//! instance filter. No I/O: the catalog stores definitions
//! ([`crate::catalog::Command::QueryCreate`]), the HTTP and DNS front ends
//! parse and render them with this module, and routing (distance sort,
//! failover across datacenters) works on what [`ServiceQuery::instances`]
//! and [`ServiceQuery::local_health`] return.
//!
//! - **Stored form.** [`PreparedQuery`] is plain serde (no flatten, no
//!   untagged, no skipped fields) so that postcard (Raft log, snapshots)
//!   and serde_json (peer RPC) both carry it. Consul's JSON shape is a
//!   separate rendering ([`PreparedQuery::to_json`]).
//! - **Parsing.** [`PreparedQuery::from_json`] matches keys without regard
//!   to case, `_` or `-` (python-consul sends `nearestn`, `onlypassing`,
//!   `dns: {ttl}`), treats `null` as absent (Go clients send nil slices as
//!   `null`), and refuses unknown keys: Consul silently drops a misplaced
//!   `Near` and leaves answers unsorted (consul#2327), tomo says so.
//! - **Beyond Consul**, inside `Failover`: `MinHealthyFraction`, `MaxP99`,
//!   `Deadline` and `FailbackAfter` (alias `Hysteresis`); see
//!   [`QueryFailover`].
//! - **Templates** (`name_prefix_match`): [`resolve`] picks the query for a
//!   name or ID as Consul's state store does, and [`PreparedQuery::render`]
//!   interpolates `${name.full}`, `${name.prefix}`, `${name.suffix}`,
//!   `${match(N)}` and `${agent.segment}` into the strings under `Service`.
//!   Consul evaluates full HIL there (`${40 + 2}` works); tomo takes only
//!   these five forms and the `$${` escape, and refuses anything else when
//!   the template is stored.

use std::collections::BTreeMap;
use std::time::Duration;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::catalog::{Catalog, Check, Health, Node, Service};

/// What reads show instead of a query's token (Consul's `<hidden>`).
pub const REDACTED_TOKEN: &str = "<hidden>";
/// The one template type Consul has.
pub const NAME_PREFIX_MATCH: &str = "name_prefix_match";

/// Why a definition was refused, or a name could not be resolved. The
/// texts are the 400 reasons; where Consul has one, it is Consul's.
/// (Consul's RPC layer prefixes `Invalid prepared query: `; tomo's HTTP
/// layer may do the same.)
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum QueryError {
    /// The body is not the shape of a definition (a field of the wrong
    /// JSON type, or not an object at all).
    #[error("Request decode failed: {0}")]
    Decode(String),
    /// A key that no definition has.
    #[error("Unknown field \"{field}\"{hint}")]
    UnknownField {
        /// Its path, e.g. `Service.Nearr`.
        field: String,
        /// Where it probably belongs ("" when there is no guess).
        hint: String,
    },
    /// Two keys that name the same field (`Name` and `name`, or
    /// `Hysteresis` and `FailbackAfter`).
    #[error(
        "Field \"{0}\" is given more than once (keys match without regard to case, `_` or `-`, and aliases name the same field)"
    )]
    DuplicateField(String),
    /// `Service.Service` is missing or empty.
    #[error("Must provide a Service name to query")]
    MissingService,
    /// A query with no name, no template and no session could never be
    /// found again except by ID, and would never expire.
    #[error("Must be bound to a session")]
    NoSession,
    /// A name that looks like a UUID could shadow another query's ID.
    #[error("Bad Name '{0}': a query name must not look like a query ID (a UUID)")]
    NameLooksLikeId(String),
    /// A read's redacted token sent back as the token.
    #[error(
        "Bad Token '<hidden>', it looks like a query definition with a redacted token was submitted"
    )]
    RedactedToken,
    /// A template type other than `name_prefix_match`.
    #[error("Bad Template.Type '{0}'")]
    BadTemplateType(String),
    /// `Template.Regexp` does not compile.
    #[error("Bad Regexp: {0}")]
    BadRegexp(String),
    /// A template string under `Service` that cannot be interpolated.
    #[error("Bad format '{value}' in Service{path}: {reason}")]
    BadFormat {
        /// The field, e.g. `.Tags[0]`.
        path: String,
        /// The string as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A negative `NearestN`.
    #[error("Bad NearestN '{0}', must be >= 0")]
    BadNearestN(i64),
    /// `Targets` together with `NearestN` or `Datacenters`.
    #[error("Targets cannot be populated with NearestN or Datacenters")]
    TargetsWithNearestN,
    /// A failover target without a datacenter.
    #[error("Bad Failover.Targets[{0}]: a target needs a Datacenter")]
    EmptyTarget(usize),
    /// `MinHealthyFraction` outside 0..=1.
    #[error("Bad MinHealthyFraction '{0}', must be between 0 and 1")]
    BadFraction(String),
    /// A duration field that is not a duration, or out of range.
    #[error("Bad {field} '{value}': {reason}")]
    BadDuration {
        /// The field, e.g. `Service.Failover.MaxP99`.
        field: String,
        /// The value as given.
        value: String,
        /// Why.
        reason: String,
    },
    /// `DNS.TTL` is not a duration.
    #[error("Bad DNS TTL '{value}': {reason}")]
    BadDnsTtl {
        /// The value as given.
        value: String,
        /// Why.
        reason: String,
    },
    /// A Consul field tomo has no machinery for (cluster peering,
    /// Enterprise namespaces and partitions, sameness groups). Refused
    /// rather than ignored, so that answers never silently differ from
    /// what the definition asks.
    #[error("{field} '{value}' is not supported: {reason}")]
    Unsupported {
        /// The field.
        field: String,
        /// The value given.
        value: String,
        /// Why.
        reason: String,
    },
    /// An empty ID or name to resolve.
    #[error("Missing query ID")]
    MissingId,
    /// A template looked up by its ID (Consul's text).
    #[error("prepared query templates can only be resolved up by name, not by ID")]
    TemplateById,
}

/// The kind of template a query is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TemplateType {
    /// Not a template: the query answers to its exact name or its ID.
    #[default]
    None,
    /// `name_prefix_match`: answers to every name starting with its name.
    NamePrefixMatch,
}

/// `Template`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryTemplate {
    /// `Type`.
    pub kind: TemplateType,
    /// `Regexp`: matched against the full name; its groups are `${match(N)}`.
    pub regexp: String,
    /// `RemoveEmptyTags`: drop tags that interpolate to "".
    pub remove_empty_tags: bool,
}

/// One `Failover.Targets` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverTarget {
    /// `Datacenter`.
    pub datacenter: String,
    /// `Peer` (always empty: peering is refused at validation; kept so the
    /// JSON shape is Consul's).
    pub peer: String,
}

/// `Service.Failover`: where to look when the local datacenter cannot
/// serve, and (beyond Consul) when it counts as unable to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueryFailover {
    /// `NearestN`: try this many other datacenters, nearest first.
    pub nearest_n: u32,
    /// `Datacenters`: then these, in order (unknown ones are skipped).
    pub datacenters: Vec<String>,
    /// `Targets`: instead of the two above.
    pub targets: Vec<FailoverTarget>,
    /// `MinHealthyFraction` (tomo): fail over when the local healthy
    /// fraction drops below this, not only when it reaches zero. 0..=1.
    pub min_healthy_fraction: Option<f64>,
    /// `MaxP99` (tomo): skip datacenters whose estimated p99 RTT exceeds this.
    pub max_p99: Option<Duration>,
    /// `Deadline` (tomo): give up on a remote datacenter after this long.
    pub deadline: Option<Duration>,
    /// `FailbackAfter`, alias `Hysteresis` (tomo): how long the local
    /// datacenter must stay healthy before answers move back to it.
    pub failback_after: Option<Duration>,
}

/// `Service`: which instances a query returns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceQuery {
    /// `Service`: the service name.
    pub service: String,
    /// `Failover`.
    pub failover: QueryFailover,
    /// `IgnoreCheckIDs`: checks not counted when judging health.
    pub ignore_check_ids: Vec<String>,
    /// `OnlyPassing`: drop warning instances too, not only critical ones.
    pub only_passing: bool,
    /// `Near`: "", `_agent`, `_ip` or a node name.
    pub near: String,
    /// `Tags`: each required; `!tag` forbidden; without regard to case.
    pub tags: Vec<String>,
    /// `NodeMeta`: exact matches required on the node.
    pub node_meta: BTreeMap<String, String>,
    /// `ServiceMeta`: exact matches required on the instance.
    pub service_meta: BTreeMap<String, String>,
    /// `Connect`: only Connect-capable instances (tomo's catalog has none
    /// yet, so such a query finds nothing locally).
    pub connect: bool,
    /// `Peer` (always empty: see [`FailoverTarget::peer`]).
    pub peer: String,
    /// `Namespace`: "" or `default` (Enterprise namespaces are refused).
    pub namespace: String,
}

/// `DNS`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryDns {
    /// `TTL`, as given (Consul echoes the string); "" = the agent's default.
    pub ttl: String,
}

impl QueryDns {
    /// The TTL, if one is set (validated definitions always parse).
    pub fn ttl(&self) -> Option<Duration> {
        if self.ttl.is_empty() {
            return None;
        }
        parse_go_duration(&self.ttl).ok()
    }
}

/// A prepared query as the catalog stores it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PreparedQuery {
    /// `ID`: a UUID chosen by the server that took the create request.
    pub id: String,
    /// `Name`: optional, unique without regard to case; a template's prefix.
    pub name: String,
    /// `Session`: the query is deleted when this session ends.
    pub session: String,
    /// `Token`: used when executing; shown as [`REDACTED_TOKEN`] on reads.
    pub token: String,
    /// `Template`.
    pub template: QueryTemplate,
    /// `Service`.
    pub service: ServiceQuery,
    /// `DNS`.
    pub dns: QueryDns,
    /// Raft index of its creation.
    pub create_index: u64,
    /// Raft index of its last change.
    pub modify_index: u64,
}

impl PreparedQuery {
    /// Parses and validates a create or update body. `ID`, `CreateIndex`,
    /// `ModifyIndex` and `RaftIndex` are accepted (a read sent back) but
    /// ignored: the ID comes from the URL or the server, indexes from Raft.
    pub fn from_json(body: &Value) -> Result<PreparedQuery, QueryError> {
        let q = decode(body)?;
        q.validate()?;
        Ok(q)
    }

    /// Whether this is a template.
    pub fn is_template(&self) -> bool {
        self.template.kind != TemplateType::None
    }

    /// Checks everything a definition must satisfy on its own (uniqueness
    /// and the session's existence are the catalog's).
    pub fn validate(&self) -> Result<(), QueryError> {
        if !self.name.is_empty() && is_uuid(&self.name) {
            return Err(QueryError::NameLooksLikeId(self.name.clone()));
        }
        if self.name.is_empty() && !self.is_template() && self.session.is_empty() {
            return Err(QueryError::NoSession);
        }
        if self.token == REDACTED_TOKEN {
            return Err(QueryError::RedactedToken);
        }
        let s = &self.service;
        if s.service.is_empty() {
            return Err(QueryError::MissingService);
        }
        let f = &s.failover;
        if !f.targets.is_empty() && (f.nearest_n != 0 || !f.datacenters.is_empty()) {
            return Err(QueryError::TargetsWithNearestN);
        }
        for (i, t) in f.targets.iter().enumerate() {
            if !t.peer.is_empty() {
                return Err(no_peering(
                    &format!("Service.Failover.Targets[{i}].Peer"),
                    &t.peer,
                ));
            }
            if t.datacenter.is_empty() {
                return Err(QueryError::EmptyTarget(i));
            }
        }
        if !s.peer.is_empty() {
            return Err(no_peering("Service.Peer", &s.peer));
        }
        if !matches!(s.namespace.as_str(), "" | "default") {
            return Err(QueryError::Unsupported {
                field: "Service.Namespace".into(),
                value: s.namespace.clone(),
                reason: "namespaces are a Consul Enterprise feature; tomo has only the default one"
                    .into(),
            });
        }
        if let Some(x) = f.min_healthy_fraction
            && !(0.0..=1.0).contains(&x)
        {
            return Err(QueryError::BadFraction(x.to_string()));
        }
        for (field, d) in [("MaxP99", f.max_p99), ("Deadline", f.deadline)] {
            if d == Some(Duration::ZERO) {
                return Err(QueryError::BadDuration {
                    field: format!("Service.Failover.{field}"),
                    value: "0s".into(),
                    reason: "must be more than 0".into(),
                });
            }
        }
        if !self.dns.ttl.is_empty() {
            parse_go_duration(&self.dns.ttl).map_err(|reason| QueryError::BadDnsTtl {
                value: self.dns.ttl.clone(),
                reason,
            })?;
        }
        if self.is_template() {
            // As Consul does: compile, then render once with the bare
            // prefix, which is the least any name that selects the
            // template can give. Syntax errors surface now, not at the
            // first DNS lookup.
            self.render(&self.name, "")?;
        }
        Ok(())
    }

    /// The query a template gives for `name` (what was looked up) on an
    /// agent in network segment `segment`: the strings under `Service`
    /// interpolated, empty tags dropped if asked. A query that is not a
    /// template comes back as it is.
    pub fn render(&self, name: &str, segment: &str) -> Result<PreparedQuery, QueryError> {
        if !self.is_template() {
            return Ok(self.clone());
        }
        let groups: Vec<String> = match compile_regexp(&self.template.regexp)? {
            Some(re) => re
                .captures(name)
                .map(|c| {
                    c.iter()
                        .map(|m| m.map_or("", |m| m.as_str()).to_string())
                        .collect()
                })
                .unwrap_or_default(),
            None => Vec::new(),
        };
        // Names resolve without regard to case, so the prefix is cut by
        // length, not by exact text (Consul's TrimPrefix would leave the
        // whole name when the case differs).
        let suffix = match name.get(..self.name.len()) {
            Some(head) if head.eq_ignore_ascii_case(&self.name) => &name[self.name.len()..],
            _ => name,
        };
        let vars = Vars {
            full: name,
            prefix: &self.name,
            suffix,
            segment,
            groups: &groups,
        };
        let mut q = self.clone();
        visit_strings(&mut q.service, &mut |path, s| {
            if !s.contains('$') {
                return Ok(());
            }
            let pieces = parse_interpolation(s).map_err(|reason| QueryError::BadFormat {
                path: path.to_string(),
                value: s.clone(),
                reason,
            })?;
            *s = vars.expand(&pieces);
            Ok(())
        })?;
        if q.template.remove_empty_tags {
            q.service.tags.retain(|t| !t.is_empty());
        }
        Ok(q)
    }

    /// Consul's JSON for reads: the token, if any, shown as `<hidden>`.
    pub fn to_json(&self) -> Value {
        let mut v = self.to_json_with_token();
        if !self.token.is_empty() {
            v["Token"] = json!(REDACTED_TOKEN);
        }
        v
    }

    /// Consul's JSON with the token in clear (for a server handing the
    /// whole definition to another datacenter, never for a client read).
    pub fn to_json_with_token(&self) -> Value {
        let s = &self.service;
        let f = &s.failover;
        let mut failover = json!({
            "NearestN": f.nearest_n,
            "Datacenters": list_or_null(&f.datacenters),
            "Targets": if f.targets.is_empty() {
                Value::Null
            } else {
                f.targets
                    .iter()
                    .map(|t| json!({"Peer": t.peer, "Datacenter": t.datacenter}))
                    .collect()
            },
        });
        // tomo's fields only when set, so Consul-shaped readers see
        // Consul's shape.
        if let Some(x) = f.min_healthy_fraction {
            failover["MinHealthyFraction"] = json!(x);
        }
        for (key, d) in [
            ("MaxP99", f.max_p99),
            ("Deadline", f.deadline),
            ("FailbackAfter", f.failback_after),
        ] {
            if let Some(d) = d {
                failover[key] = json!(format_go_duration(d));
            }
        }
        let mut service = json!({
            "Service": s.service,
            "Failover": failover,
            "IgnoreCheckIDs": list_or_null(&s.ignore_check_ids),
            "OnlyPassing": s.only_passing,
            "Near": s.near,
            "Tags": list_or_null(&s.tags),
            "NodeMeta": map_or_null(&s.node_meta),
            "ServiceMeta": map_or_null(&s.service_meta),
            "Connect": s.connect,
            "Peer": s.peer,
        });
        if !s.namespace.is_empty() {
            service["Namespace"] = json!(s.namespace);
        }
        json!({
            "ID": self.id,
            "Name": self.name,
            "Session": self.session,
            "Token": self.token,
            "Template": {
                "Type": match self.template.kind {
                    TemplateType::None => "",
                    TemplateType::NamePrefixMatch => NAME_PREFIX_MATCH,
                },
                "Regexp": self.template.regexp,
                "RemoveEmptyTags": self.template.remove_empty_tags,
            },
            "Service": service,
            "DNS": {"TTL": self.dns.ttl},
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        })
    }
}

fn no_peering(field: &str, value: &str) -> QueryError {
    QueryError::Unsupported {
        field: field.into(),
        value: value.into(),
        reason: "tomo has no cluster peering; fail over to a Datacenter".into(),
    }
}

/// Go marshals nil slices and maps as `null`, and tomo cannot tell nil
/// from empty once stored; `null` is what Consul shows for the unset case.
fn list_or_null(v: &[String]) -> Value {
    if v.is_empty() { Value::Null } else { json!(v) }
}

fn map_or_null(m: &BTreeMap<String, String>) -> Value {
    if m.is_empty() { Value::Null } else { json!(m) }
}

/// The query that answers `id_or_name`, as Consul's state store picks it:
/// a UUID-looking value that is some query's ID gives that query (an error
/// for a template); then the query with exactly that name; then the
/// template with the longest name that prefixes it (the `""` template
/// catches everything). Names compare without regard to ASCII case, as
/// Consul's lowercase name index does. Templates come back rendered for
/// `id_or_name` on an agent in segment `segment`. `Ok(None)`: no query
/// answers (Consul's 404 `Query not found`).
pub fn resolve<'a>(
    queries: impl IntoIterator<Item = &'a PreparedQuery>,
    id_or_name: &str,
    segment: &str,
) -> Result<Option<PreparedQuery>, QueryError> {
    if id_or_name.is_empty() {
        return Err(QueryError::MissingId);
    }
    let all: Vec<&PreparedQuery> = queries.into_iter().collect();
    if is_uuid(id_or_name)
        && let Some(q) = all.iter().find(|q| q.id.eq_ignore_ascii_case(id_or_name))
    {
        if q.is_template() {
            return Err(QueryError::TemplateById);
        }
        return Ok(Some((*q).clone()));
    }
    let by_name = all
        .iter()
        .find(|q| !q.name.is_empty() && q.name.eq_ignore_ascii_case(id_or_name));
    let by_prefix = || {
        all.iter()
            .filter(|q| q.is_template())
            .filter(|q| {
                id_or_name
                    .get(..q.name.len())
                    .is_some_and(|head| head.eq_ignore_ascii_case(&q.name))
            })
            .max_by_key(|q| q.name.len())
    };
    match by_name.or_else(by_prefix) {
        Some(q) => q.render(id_or_name, segment).map(Some),
        None => Ok(None),
    }
}

/// Whether `s` looks like a UUID (8-4-4-4-12 hex digits, any case), as
/// Consul's `isUUID` decides whether a lookup is by ID.
pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// A version-4 UUID string from 16 random bytes (the caller draws them,
/// e.g. `uuid_v4(rand::random())`, so that this module stays free of
/// entropy sources and tests can pin the bytes).
pub fn uuid_v4(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

// ---------------------------------------------------------------------
// Go durations.

/// The largest duration Go can hold (`math.MaxInt64` nanoseconds).
const GO_MAX_NANOS: u128 = i64::MAX as u128;

/// Parses a Go duration (`time.ParseDuration`): an optional sign, then
/// decimal numbers with units `ns`, `us`/`µs`, `ms`, `s`, `m`, `h`
/// (`150ms`, `1h2m`, `1.5s`); `0` alone is zero. Negative durations are
/// refused (no field here can use one). `Err`: Go's message.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let invalid = || format!("time: invalid duration \"{s}\"");
    let (negative, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    let digits = |t: &str| t.bytes().take_while(u8::is_ascii_digit).count();
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let n = digits(rest);
        let int = &rest[..n];
        rest = &rest[n..];
        let mut frac = "";
        if let Some(r) = rest.strip_prefix('.') {
            let m = digits(r);
            frac = &r[..m];
            rest = &r[m..];
        }
        if int.is_empty() && frac.is_empty() {
            return Err(invalid());
        }
        let unit_len = rest
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let scale: u128 = match unit {
            "" => return Err(format!("time: missing unit in duration \"{s}\"")),
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(format!("time: unknown unit \"{unit}\" in duration \"{s}\"")),
        };
        // Integer arithmetic: `150ms` must be exactly 150 ms, which
        // floating point does not promise.
        let whole: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| invalid())?
        };
        let (mut num, mut den) = (0u128, 1u128);
        for d in frac.bytes().take(19) {
            num = num * 10 + u128::from(d - b'0');
            den *= 10;
        }
        total = whole
            .checked_mul(scale)
            .and_then(|v| v.checked_add(num * scale / den))
            .and_then(|v| v.checked_add(total))
            .filter(|v| *v <= GO_MAX_NANOS)
            .ok_or_else(invalid)?;
    }
    if negative && total != 0 {
        return Err(format!("negative duration \"{s}\""));
    }
    Ok(Duration::from_nanos(total as u64))
}

/// Go's `Duration.String()`: `150ms`, `1.5s`, `1m30s`, `2h0m0s`, `0s`.
pub fn format_go_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    // `v` in units of 10^-`digits`, with trailing zeros of the fraction cut.
    let decimal = |v: u128, digits: u32| {
        let p = 10u128.pow(digits);
        let (int, frac) = (v / p, v % p);
        if frac == 0 {
            int.to_string()
        } else {
            let f = format!("{frac:0width$}", width = digits as usize);
            format!("{int}.{}", f.trim_end_matches('0'))
        }
    };
    if ns == 0 {
        return "0s".into();
    }
    if ns < 1_000 {
        return format!("{ns}ns");
    }
    if ns < 1_000_000 {
        return format!("{}µs", decimal(ns, 3));
    }
    if ns < 1_000_000_000 {
        return format!("{}ms", decimal(ns, 6));
    }
    let secs = ns / 1_000_000_000;
    let sub = ns % 1_000_000_000;
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out += &format!("{h}h");
    }
    if h > 0 || m > 0 {
        out += &format!("{m}m");
    }
    out + &format!("{}s", decimal(s * 1_000_000_000 + sub, 9))
}

// ---------------------------------------------------------------------
// Decoding.

/// A field's canonical name and the other names it answers to.
type Schema = &'static [(&'static str, &'static [&'static str])];

const TOP: Schema = &[
    ("ID", &[]),
    ("Name", &[]),
    ("Session", &[]),
    ("Token", &[]),
    ("Template", &[]),
    ("Service", &[]),
    ("DNS", &[]),
    ("CreateIndex", &[]),
    ("ModifyIndex", &[]),
    ("RaftIndex", &[]),
];
const TEMPLATE: Schema = &[("Type", &[]), ("Regexp", &[]), ("RemoveEmptyTags", &[])];
const DNS: Schema = &[("TTL", &[])];
const SERVICE: Schema = &[
    ("Service", &[]),
    ("Failover", &[]),
    ("IgnoreCheckIDs", &[]),
    ("OnlyPassing", &[]),
    ("Near", &[]),
    ("Tags", &[]),
    ("NodeMeta", &[]),
    ("ServiceMeta", &[]),
    ("Connect", &[]),
    ("Peer", &["PeerName"]),
    ("Namespace", &[]),
    ("Partition", &[]),
    ("SamenessGroup", &[]),
];
const FAILOVER: Schema = &[
    ("NearestN", &[]),
    ("Datacenters", &[]),
    ("Targets", &[]),
    ("MinHealthyFraction", &[]),
    ("MaxP99", &[]),
    ("Deadline", &[]),
    ("FailbackAfter", &["Hysteresis"]),
];
const TARGET: Schema = &[
    ("Datacenter", &[]),
    ("Peer", &["PeerName"]),
    ("Namespace", &[]),
    ("Partition", &[]),
];

/// A key without case, `_` or `-`: `nearest_n`, `nearestn` and
/// `NearestN` are one key.
fn fold(k: &str) -> String {
    k.chars()
        .filter(|c| !matches!(c, '_' | '-'))
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn wrong_type(path: &str, key: &str, what: &str) -> QueryError {
    QueryError::Decode(format!("{}: expected {what}", join(path, key)))
}

/// One object's fields, looked up by canonical name.
struct Fields<'a> {
    path: String,
    map: BTreeMap<&'static str, &'a Value>,
}

impl<'a> Fields<'a> {
    /// `v` (absent or `null`: no fields) against `schema`.
    fn of(v: Option<&'a Value>, path: &str, schema: Schema) -> Result<Self, QueryError> {
        let mut map = BTreeMap::new();
        match v {
            None | Some(Value::Null) => {}
            Some(Value::Object(o)) => {
                for (k, val) in o {
                    let key = fold(k);
                    let Some((canon, _)) = schema.iter().find(|(c, aliases)| {
                        fold(c) == key || aliases.iter().any(|a| fold(a) == key)
                    }) else {
                        return Err(unknown_field(path, k));
                    };
                    if val.is_null() {
                        continue;
                    }
                    if map.insert(*canon, val).is_some() {
                        return Err(QueryError::DuplicateField(join(path, canon)));
                    }
                }
            }
            Some(_) => {
                return Err(QueryError::Decode(if path.is_empty() {
                    "expected a JSON object".into()
                } else {
                    format!("{path}: expected an object")
                }));
            }
        }
        Ok(Fields {
            path: path.to_string(),
            map,
        })
    }

    fn sub(&self, key: &str, schema: Schema) -> Result<Fields<'a>, QueryError> {
        Fields::of(self.map.get(key).copied(), &join(&self.path, key), schema)
    }

    fn string(&self, key: &str) -> Result<String, QueryError> {
        match self.map.get(key) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(wrong_type(&self.path, key, "a string")),
        }
    }

    fn bool(&self, key: &str) -> Result<bool, QueryError> {
        match self.map.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(wrong_type(&self.path, key, "true or false")),
        }
    }

    fn int(&self, key: &str) -> Result<i64, QueryError> {
        match self.map.get(key) {
            None => Ok(0),
            Some(v) => v
                .as_i64()
                .ok_or_else(|| wrong_type(&self.path, key, "an integer")),
        }
    }

    fn float(&self, key: &str) -> Result<Option<f64>, QueryError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| wrong_type(&self.path, key, "a number")),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, QueryError> {
        match self.map.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| wrong_type(&self.path, key, "a list of strings")),
            Some(_) => Err(wrong_type(&self.path, key, "a list of strings")),
        }
    }

    fn string_map(&self, key: &str) -> Result<BTreeMap<String, String>, QueryError> {
        match self.map.get(key) {
            None => Ok(BTreeMap::new()),
            Some(Value::Object(o)) => o
                .iter()
                .map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect::<Option<BTreeMap<_, _>>>()
                .ok_or_else(|| wrong_type(&self.path, key, "an object of strings")),
            Some(_) => Err(wrong_type(&self.path, key, "an object of strings")),
        }
    }

    /// A Go duration string, or a number of nanoseconds (how Go encodes
    /// a `time.Duration`).
    fn duration(&self, key: &str) -> Result<Option<Duration>, QueryError> {
        let bad = |value: String, reason: String| QueryError::BadDuration {
            field: join(&self.path, key),
            value,
            reason,
        };
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => parse_go_duration(s)
                .map(Some)
                .map_err(|r| bad(s.clone(), r)),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(ns) if u128::from(ns) <= GO_MAX_NANOS => Ok(Some(Duration::from_nanos(ns))),
                _ => Err(bad(
                    n.to_string(),
                    "a number is nanoseconds and must be a whole number >= 0".into(),
                )),
            },
            Some(_) => Err(wrong_type(&self.path, key, "a duration such as \"150ms\"")),
        }
    }

    /// A Consul field tomo accepts only at its default (`allowed`).
    fn only_default(&self, key: &str, allowed: &[&str], reason: &str) -> Result<(), QueryError> {
        let v = self.string(key)?;
        if allowed.contains(&v.as_str()) {
            Ok(())
        } else {
            Err(QueryError::Unsupported {
                field: join(&self.path, key),
                value: v,
                reason: reason.into(),
            })
        }
    }
}

/// An unknown key, with a hint when it is a `Service` field given at the
/// top level (Consul's docs once put `Near` there: consul#2327).
fn unknown_field(path: &str, key: &str) -> QueryError {
    let folded = fold(key);
    let in_service = SERVICE
        .iter()
        .any(|(c, a)| fold(c) == folded || a.iter().any(|x| fold(x) == folded));
    let in_failover = FAILOVER
        .iter()
        .any(|(c, a)| fold(c) == folded || a.iter().any(|x| fold(x) == folded));
    let hint = if path.is_empty() && in_service {
        " (it belongs inside Service)".to_string()
    } else if path == "Service" && in_failover {
        " (it belongs inside Service.Failover)".to_string()
    } else {
        String::new()
    };
    QueryError::UnknownField {
        field: join(path, key),
        hint,
    }
}

/// The definition in `body`, not yet validated.
fn decode(body: &Value) -> Result<PreparedQuery, QueryError> {
    const NO_ENTERPRISE: &str = "Consul Enterprise feature; tomo has only the default one";
    let top = Fields::of(Some(body), "", TOP)?;
    let template = top.sub("Template", TEMPLATE)?;
    let kind = match template.string("Type")?.as_str() {
        "" => TemplateType::None,
        NAME_PREFIX_MATCH => TemplateType::NamePrefixMatch,
        other => return Err(QueryError::BadTemplateType(other.to_string())),
    };
    let svc = top.sub("Service", SERVICE)?;
    svc.only_default("Partition", &["", "default"], NO_ENTERPRISE)?;
    svc.only_default(
        "SamenessGroup",
        &[""],
        "sameness groups are a Consul Enterprise feature; use Failover",
    )?;
    let fo = svc.sub("Failover", FAILOVER)?;
    let nearest_n = fo.int("NearestN")?;
    if nearest_n < 0 {
        return Err(QueryError::BadNearestN(nearest_n));
    }
    let nearest_n = u32::try_from(nearest_n)
        .map_err(|_| wrong_type("Service.Failover", "NearestN", "a smaller integer"))?;
    let targets = match fo.map.get("Targets") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let t = Fields::of(Some(t), &format!("Service.Failover.Targets[{i}]"), TARGET)?;
                t.only_default("Namespace", &["", "default"], NO_ENTERPRISE)?;
                t.only_default("Partition", &["", "default"], NO_ENTERPRISE)?;
                Ok(FailoverTarget {
                    datacenter: t.string("Datacenter")?,
                    peer: t.string("Peer")?,
                })
            })
            .collect::<Result<_, QueryError>>()?,
        Some(_) => return Err(wrong_type("Service.Failover", "Targets", "a list")),
    };
    let min_healthy_fraction = fo.float("MinHealthyFraction")?;
    let dns = top.sub("DNS", DNS)?;
    Ok(PreparedQuery {
        id: String::new(),
        name: top.string("Name")?,
        session: top.string("Session")?,
        token: top.string("Token")?,
        template: QueryTemplate {
            kind,
            regexp: template.string("Regexp")?,
            remove_empty_tags: template.bool("RemoveEmptyTags")?,
        },
        service: ServiceQuery {
            service: svc.string("Service")?,
            failover: QueryFailover {
                nearest_n,
                datacenters: fo.strings("Datacenters")?,
                targets,
                min_healthy_fraction,
                max_p99: fo.duration("MaxP99")?,
                deadline: fo.duration("Deadline")?,
                failback_after: fo.duration("FailbackAfter")?,
            },
            ignore_check_ids: svc.strings("IgnoreCheckIDs")?,
            only_passing: svc.bool("OnlyPassing")?,
            near: svc.string("Near")?,
            tags: svc.strings("Tags")?,
            node_meta: svc.string_map("NodeMeta")?,
            service_meta: svc.string_map("ServiceMeta")?,
            connect: svc.bool("Connect")?,
            peer: svc.string("Peer")?,
            namespace: svc.string("Namespace")?,
        },
        dns: QueryDns {
            ttl: dns.string("TTL")?,
        },
        create_index: 0,
        modify_index: 0,
    })
}

// ---------------------------------------------------------------------
// Template interpolation.

/// A piece of an interpolated string.
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Full,
    Prefix,
    Suffix,
    Segment,
    Match(i64),
}

/// What the variables stand for in one rendering.
struct Vars<'a> {
    full: &'a str,
    prefix: &'a str,
    suffix: &'a str,
    segment: &'a str,
    groups: &'a [String],
}

impl Vars<'_> {
    fn expand(&self, pieces: &[Piece]) -> String {
        pieces
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.as_str(),
                Piece::Full => self.full,
                Piece::Prefix => self.prefix,
                Piece::Suffix => self.suffix,
                Piece::Segment => self.segment,
                // Out of range or no match: "" (Consul's "safe" match()).
                Piece::Match(i) => usize::try_from(*i)
                    .ok()
                    .and_then(|i| self.groups.get(i))
                    .map_or("", String::as_str),
            })
            .collect()
    }
}

/// Splits `s` into text and `${…}` variables; `$${` is a literal `${`.
fn parse_interpolation(s: &str) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        text.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(r) = rest.strip_prefix("$${") {
            text.push_str("${");
            rest = r;
        } else if let Some(r) = rest.strip_prefix("${") {
            let end = r.find('}').ok_or("unterminated \"${\"")?;
            if !text.is_empty() {
                out.push(Piece::Text(std::mem::take(&mut text)));
            }
            out.push(parse_variable(r[..end].trim())?);
            rest = &r[end + 1..];
        } else {
            text.push('$');
            rest = &rest[1..];
        }
    }
    text.push_str(rest);
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    Ok(out)
}

fn parse_variable(e: &str) -> Result<Piece, String> {
    Ok(match e {
        "name.full" => Piece::Full,
        "name.prefix" => Piece::Prefix,
        "name.suffix" => Piece::Suffix,
        "agent.segment" => Piece::Segment,
        _ => {
            let call = e
                .strip_prefix("match")
                .map(str::trim_start)
                .and_then(|r| r.strip_prefix('('))
                .and_then(|r| r.strip_suffix(')'));
            if let Some(arg) = call {
                let n = arg
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| format!("match() takes an integer, not '{}'", arg.trim()))?;
                return Ok(Piece::Match(n));
            }
            if !e.is_empty()
                && e.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            {
                return Err(format!("unknown variable accessed: {e}"));
            }
            return Err(format!(
                "unsupported expression '{e}': tomo interpolates only ${{name.full}}, \
                 ${{name.prefix}}, ${{name.suffix}}, ${{match(N)}} and ${{agent.segment}}"
            ));
        }
    })
}

fn compile_regexp(re: &str) -> Result<Option<Regex>, QueryError> {
    if re.is_empty() {
        return Ok(None);
    }
    Regex::new(re).map(Some).map_err(|e| {
        // The regex crate draws a caret diagram over several lines; a
        // 400 body wants one line, and the last one says what is wrong.
        let msg = e.to_string();
        let last = msg
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or(&msg);
        QueryError::BadRegexp(last.trim().trim_start_matches("error: ").to_string())
    })
}

/// Calls `f` on every string under `Service` with its path (`.Tags[0]`),
/// as Consul's template walker does (map values, not keys).
fn visit_strings(
    s: &mut ServiceQuery,
    f: &mut dyn FnMut(&str, &mut String) -> Result<(), QueryError>,
) -> Result<(), QueryError> {
    f(".Service", &mut s.service)?;
    for (i, dc) in s.failover.datacenters.iter_mut().enumerate() {
        f(&format!(".Failover.Datacenters[{i}]"), dc)?;
    }
    for (i, t) in s.failover.targets.iter_mut().enumerate() {
        f(&format!(".Failover.Targets[{i}].Peer"), &mut t.peer)?;
        f(
            &format!(".Failover.Targets[{i}].Datacenter"),
            &mut t.datacenter,
        )?;
    }
    for (i, c) in s.ignore_check_ids.iter_mut().enumerate() {
        f(&format!(".IgnoreCheckIDs[{i}]"), c)?;
    }
    f(".Near", &mut s.near)?;
    for (i, t) in s.tags.iter_mut().enumerate() {
        f(&format!(".Tags[{i}]"), t)?;
    }
    for (k, v) in s.node_meta.iter_mut() {
        f(&format!(".NodeMeta[{k}]"), v)?;
    }
    for (k, v) in s.service_meta.iter_mut() {
        f(&format!(".ServiceMeta[{k}]"), v)?;
    }
    f(".Peer", &mut s.peer)?;
    f(".Namespace", &mut s.namespace)
}

// ---------------------------------------------------------------------
// Instances.

/// A service instance with the checks that judge it (its node's and its
/// own): one `CheckServiceNode` of an execute answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance<'a> {
    /// The node.
    pub node: &'a Node,
    /// The instance.
    pub service: &'a Service,
    /// Its node's checks and its own, by check ID.
    pub checks: Vec<&'a Check>,
}

/// How many of the local instances a query would return, out of how many
/// it considers: the input to the failover threshold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalHealth {
    /// Instances that pass the query's health rule.
    pub healthy: usize,
    /// Instances that pass every other filter (service, tags, metadata).
    pub total: usize,
}

impl LocalHealth {
    /// `healthy / total`; 0 with no instances at all.
    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.healthy as f64 / self.total as f64
        }
    }

    /// Whether the local datacenter cannot serve: nothing healthy (Consul's
    /// only rule) or, with `min_healthy_fraction`, a healthy fraction
    /// below it. Hysteresis on the way back is the caller's (it needs a
    /// clock).
    pub fn should_fail_over(&self, min_healthy_fraction: Option<f64>) -> bool {
        self.healthy == 0 || min_healthy_fraction.is_some_and(|min| self.fraction() < min)
    }
}

impl ServiceQuery {
    /// Every instance of the service that the non-health filters keep
    /// (`Tags`, `NodeMeta`, `ServiceMeta`), healthy or not, in the
    /// catalog's order (by node, then instance ID). Nothing when
    /// `Connect` is set: tomo's catalog has no Connect-capable instances.
    pub fn candidates<'a>(&self, c: &'a Catalog) -> Vec<Instance<'a>> {
        if self.connect {
            return Vec::new();
        }
        // Node by node rather than `Catalog::service_instances`, whose
        // items live only as long as the name borrowed to find them.
        c.nodes()
            .flat_map(|n| c.node_services(&n.name).map(move |s| (n, s)))
            .filter(|(_, s)| s.name == self.service)
            .filter(|(n, s)| {
                tags_match(&self.tags, &s.tags)
                    && meta_matches(&self.node_meta, &n.meta)
                    && meta_matches(&self.service_meta, &s.meta)
            })
            .map(|(node, service)| Instance {
                node,
                service,
                checks: c
                    .node_checks(&node.name)
                    .filter(|k| k.service_id.is_empty() || k.service_id == service.id)
                    .collect(),
            })
            .collect()
    }

    /// Whether checks `checks` let an instance through: none of them
    /// critical (with `OnlyPassing`, all passing), not counting
    /// `IgnoreCheckIDs`. No checks at all is healthy.
    pub fn passes_health(&self, checks: &[&Check]) -> bool {
        checks
            .iter()
            .filter(|k| !self.ignore_check_ids.contains(&k.id))
            .all(|k| match k.status {
                Health::Passing => true,
                Health::Warning => !self.only_passing,
                Health::Critical => false,
            })
    }

    /// The instances a local execution returns, before shuffling, sorting
    /// and `?limit`.
    pub fn instances<'a>(&self, c: &'a Catalog) -> Vec<Instance<'a>> {
        let mut v = self.candidates(c);
        v.retain(|i| self.passes_health(&i.checks));
        v
    }

    /// Healthy instances out of all the candidates, for the failover
    /// threshold ([`QueryFailover::min_healthy_fraction`]).
    pub fn local_health(&self, c: &Catalog) -> LocalHealth {
        let all = self.candidates(c);
        LocalHealth {
            healthy: all.iter().filter(|i| self.passes_health(&i.checks)).count(),
            total: all.len(),
        }
    }
}

/// Consul's tag filter: every tag in `wanted` present, every `!tag`
/// absent, without regard to case.
pub fn tags_match(wanted: &[String], tags: &[String]) -> bool {
    let has = |t: &str| tags.iter().any(|x| x.eq_ignore_ascii_case(t));
    wanted.iter().all(|w| match w.strip_prefix('!') {
        Some(not) => !has(not),
        None => has(w),
    })
}

/// Every `filter` key present in `meta` with exactly that value.
pub fn meta_matches(filter: &BTreeMap<String, String>, meta: &BTreeMap<String, String>) -> bool {
    filter.iter().all(|(k, v)| meta.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Command;

    fn parse(v: Value) -> Result<PreparedQuery, QueryError> {
        PreparedQuery::from_json(&v)
    }

    fn err(v: Value) -> String {
        match parse(v.clone()) {
            Ok(q) => panic!("{v} parsed: {q:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn python_consul_bodies_parse() {
        // What python-consul 0.7.1's `Query._query_data` sends.
        let q = parse(json!({
            "name": "geo-db",
            "token": "secret",
            "dns": {"ttl": "10s"},
            "template": {"type": "name_prefix_match"},
            "service": {
                "service": "db",
                "onlypassing": true,
                "tags": ["primary", "!canary"],
                "failover": {"nearestn": 3, "datacenters": ["dc2", "dc3"]}
            }
        }))
        .unwrap();
        assert_eq!(q.name, "geo-db");
        assert_eq!(q.token, "secret");
        assert!(q.is_template(), "python-consul always sends a template");
        assert_eq!(q.template.regexp, "");
        assert_eq!(q.dns.ttl(), Some(Duration::from_secs(10)));
        assert_eq!(q.service.service, "db");
        assert!(q.service.only_passing);
        assert_eq!(q.service.tags, ["primary", "!canary"]);
        assert_eq!(q.service.failover.nearest_n, 3);
        assert_eq!(q.service.failover.datacenters, ["dc2", "dc3"]);
        // Its smallest body: an empty failover dict, a session, no name.
        let q = parse(json!({
            "session": "adf4238a-882b-9ddc-4a9d-5b6758e4159e",
            "template": {"type": "name_prefix_match", "regexp": "^geo-(.*)$"},
            "service": {"service": "${match(1)}", "failover": {}}
        }))
        .unwrap();
        assert_eq!(q.session, "adf4238a-882b-9ddc-4a9d-5b6758e4159e");
        assert_eq!(q.template.regexp, "^geo-(.*)$");
        assert_eq!(q.service.failover, QueryFailover::default());
    }

    #[test]
    fn consul_bodies_parse_and_render_back_in_consul_shape() {
        // What the Go API client sends: every field, nil slices as null,
        // and a read's indexes when a definition is sent back.
        let body = json!({
            "ID": "",
            "Name": "geo-db",
            "Session": "",
            "Token": "",
            "Service": {
                "Service": "db",
                "Partition": "",
                "Peer": "",
                "Near": "_agent",
                "Failover": {"NearestN": 2, "Datacenters": ["dc2"], "Targets": null},
                "IgnoreCheckIDs": null,
                "OnlyPassing": false,
                "Tags": ["primary"],
                "NodeMeta": {"rack": "a"},
                "ServiceMeta": null,
                "Connect": false
            },
            "DNS": {"TTL": "30s"},
            "Template": {"Type": "", "Regexp": "", "RemoveEmptyTags": false},
            "CreateIndex": 7,
            "ModifyIndex": 9
        });
        let mut q = parse(body).unwrap();
        assert_eq!(
            (q.create_index, q.modify_index),
            (0, 0),
            "indexes are Raft's"
        );
        assert!(!q.is_template());
        q.id = "8f246b77-f3e1-ff88-5b48-8ec93abf3e05".into();
        q.token = "secret".into();
        q.create_index = 23;
        q.modify_index = 42;
        let expected = json!({
            "ID": "8f246b77-f3e1-ff88-5b48-8ec93abf3e05",
            "Name": "geo-db",
            "Session": "",
            "Token": "<hidden>",
            "Template": {"Type": "", "Regexp": "", "RemoveEmptyTags": false},
            "Service": {
                "Service": "db",
                "Failover": {"NearestN": 2, "Datacenters": ["dc2"], "Targets": null},
                "IgnoreCheckIDs": null,
                "OnlyPassing": false,
                "Near": "_agent",
                "Tags": ["primary"],
                "NodeMeta": {"rack": "a"},
                "ServiceMeta": null,
                "Connect": false,
                "Peer": ""
            },
            "DNS": {"TTL": "30s"},
            "CreateIndex": 23,
            "ModifyIndex": 42
        });
        assert_eq!(q.to_json(), expected);
        assert_eq!(q.to_json_with_token()["Token"], "secret");
        // No token: nothing to hide.
        q.token.clear();
        assert_eq!(q.to_json()["Token"], "");
        // A read sent back parses to the same definition (bar the ID and
        // indexes, which are not the body's to set).
        let mut again = PreparedQuery::from_json(&q.to_json()).unwrap();
        again.id = q.id.clone();
        again.create_index = q.create_index;
        again.modify_index = q.modify_index;
        assert_eq!(again, q);
        // Targets, and the nested RaftIndex older docs show.
        let q = parse(json!({
            "Name": "t",
            "Service": {"Service": "db", "Failover": {"Targets": [
                {"Datacenter": "dc3", "Peer": ""}, {"datacenter": "dc2"}
            ]}},
            "RaftIndex": {"CreateIndex": 1, "ModifyIndex": 2}
        }))
        .unwrap();
        let dcs: Vec<&str> = q
            .service
            .failover
            .targets
            .iter()
            .map(|t| t.datacenter.as_str())
            .collect();
        assert_eq!(dcs, ["dc3", "dc2"]);
        assert_eq!(
            q.to_json()["Service"]["Failover"]["Targets"],
            json!([{"Peer": "", "Datacenter": "dc3"}, {"Peer": "", "Datacenter": "dc2"}])
        );
    }

    #[test]
    fn tomo_failover_fields_parse_under_any_spelling_and_render() {
        let q = parse(json!({
            "Name": "web",
            "Service": {"Service": "web", "Failover": {
                "NearestN": 2,
                "MinHealthyFraction": 0.5,
                "MaxP99": "150ms",
                "Deadline": "2s",
                "Hysteresis": "1m30s"
            }}
        }))
        .unwrap();
        let f = &q.service.failover;
        assert_eq!(f.min_healthy_fraction, Some(0.5));
        assert_eq!(f.max_p99, Some(Duration::from_millis(150)));
        assert_eq!(f.deadline, Some(Duration::from_secs(2)));
        assert_eq!(f.failback_after, Some(Duration::from_secs(90)));
        let out = q.to_json();
        assert_eq!(
            out["Service"]["Failover"],
            json!({"NearestN": 2, "Datacenters": null, "Targets": null,
                   "MinHealthyFraction": 0.5, "MaxP99": "150ms", "Deadline": "2s",
                   "FailbackAfter": "1m30s"})
        );
        // snake_case, and a duration as Go's nanoseconds.
        let q = parse(json!({
            "name": "web",
            "service": {"service": "web", "failover": {
                "min_healthy_fraction": 1,
                "max_p99": 250_000_000u64,
                "failback_after": "10s",
                "deadline": "0.5s"
            }}
        }))
        .unwrap();
        let f = &q.service.failover;
        assert_eq!(f.min_healthy_fraction, Some(1.0));
        assert_eq!(f.max_p99, Some(Duration::from_millis(250)));
        assert_eq!(f.failback_after, Some(Duration::from_secs(10)));
        assert_eq!(f.deadline, Some(Duration::from_millis(500)));
        // Without them, Consul's shape exactly.
        let plain = parse(json!({"Name": "x", "Service": {"Service": "x"}})).unwrap();
        assert_eq!(
            plain.to_json()["Service"]["Failover"],
            json!({"NearestN": 0, "Datacenters": null, "Targets": null})
        );
    }

    #[test]
    fn bad_definitions_say_why() {
        let svc = |s: Value| json!({"Name": "q", "Service": s});
        let fo = |f: Value| svc(json!({"Service": "db", "Failover": f}));
        let cases: Vec<(Value, &str)> = vec![
            (json!({"Name": "q"}), "Must provide a Service name to query"),
            (
                svc(json!({"Service": ""})),
                "Must provide a Service name to query",
            ),
            (
                json!({"Name": "8F246B77-f3e1-ff88-5b48-8ec93abf3e05", "Service": {"Service": "db"}}),
                "Bad Name '8F246B77-f3e1-ff88-5b48-8ec93abf3e05': a query name must not look like a query ID (a UUID)",
            ),
            (
                json!({"Service": {"Service": "db"}}),
                "Must be bound to a session",
            ),
            (
                json!({"Name": "q", "Token": "<hidden>", "Service": {"Service": "db"}}),
                "Bad Token '<hidden>', it looks like a query definition with a redacted token was submitted",
            ),
            (
                json!({"Name": "q", "Template": {"Type": "name_suffix_match"}, "Service": {"Service": "db"}}),
                "Bad Template.Type 'name_suffix_match'",
            ),
            (
                fo(json!({"NearestN": -1})),
                "Bad NearestN '-1', must be >= 0",
            ),
            (
                fo(json!({"NearestN": 1, "Targets": [{"Datacenter": "dc2"}]})),
                "Targets cannot be populated with NearestN or Datacenters",
            ),
            (
                fo(json!({"Datacenters": ["dc3"], "Targets": [{"Datacenter": "dc2"}]})),
                "Targets cannot be populated with NearestN or Datacenters",
            ),
            (
                fo(json!({"Targets": [{"Datacenter": ""}]})),
                "Bad Failover.Targets[0]: a target needs a Datacenter",
            ),
            (
                fo(json!({"MinHealthyFraction": 1.5})),
                "Bad MinHealthyFraction '1.5', must be between 0 and 1",
            ),
            (
                fo(json!({"MinHealthyFraction": -0.1})),
                "Bad MinHealthyFraction '-0.1', must be between 0 and 1",
            ),
            (
                fo(json!({"MaxP99": "fast"})),
                "Bad Service.Failover.MaxP99 'fast': time: invalid duration \"fast\"",
            ),
            (
                fo(json!({"Deadline": "2"})),
                "Bad Service.Failover.Deadline '2': time: missing unit in duration \"2\"",
            ),
            (
                fo(json!({"Deadline": "0s"})),
                "Bad Service.Failover.Deadline '0s': must be more than 0",
            ),
            (
                fo(json!({"Hysteresis": "-5s"})),
                "Bad Service.Failover.FailbackAfter '-5s': negative duration \"-5s\"",
            ),
            (
                json!({"Name": "q", "DNS": {"TTL": "10x"}, "Service": {"Service": "db"}}),
                "Bad DNS TTL '10x': time: unknown unit \"x\" in duration \"10x\"",
            ),
            (
                json!({"Name": "q", "Near": "_agent", "Service": {"Service": "db"}}),
                "Unknown field \"Near\" (it belongs inside Service)",
            ),
            (
                svc(json!({"Service": "db", "NearestN": 2})),
                "Unknown field \"Service.NearestN\" (it belongs inside Service.Failover)",
            ),
            (
                svc(json!({"Service": "db", "Sort": "shuffle"})),
                "Unknown field \"Service.Sort\"",
            ),
            (
                json!({"Name": "q", "name": "r", "Service": {"Service": "db"}}),
                "Field \"Name\" is given more than once",
            ),
            (
                fo(json!({"Hysteresis": "1s", "failback_after": "2s"})),
                "Field \"Service.Failover.FailbackAfter\" is given more than once",
            ),
            (
                fo(json!({"NearestN": "3"})),
                "Request decode failed: Service.Failover.NearestN: expected an integer",
            ),
            (
                svc(json!({"Service": "db", "Tags": "primary"})),
                "Request decode failed: Service.Tags: expected a list of strings",
            ),
            (
                json!(["not", "an", "object"]),
                "Request decode failed: expected a JSON object",
            ),
            (
                svc(json!({"Service": "db", "Peer": "other"})),
                "Service.Peer 'other' is not supported: tomo has no cluster peering",
            ),
            (
                fo(json!({"Targets": [{"Peer": "other"}]})),
                "Service.Failover.Targets[0].Peer 'other' is not supported",
            ),
            (
                svc(json!({"Service": "db", "Namespace": "team-a"})),
                "Service.Namespace 'team-a' is not supported",
            ),
            (
                svc(json!({"Service": "db", "SamenessGroup": "g"})),
                "Service.SamenessGroup 'g' is not supported",
            ),
        ];
        for (body, want) in cases {
            let got = err(body.clone());
            assert!(got.starts_with(want), "{body}:\n got  {got}\n want {want}");
        }
        // Defaults that mean nothing special are fine.
        parse(svc(
            json!({"Service": "db", "Namespace": "default", "Partition": "default"}),
        ))
        .unwrap();
    }

    #[test]
    fn bad_templates_are_refused_when_stored() {
        let tpl = |re: &str, service: &str| {
            json!({"Name": "geo-", "Template": {"Type": "name_prefix_match", "Regexp": re},
                   "Service": {"Service": service}})
        };
        assert_eq!(err(tpl("^(nope$", "db")), "Bad Regexp: unclosed group");
        assert_eq!(
            err(tpl("", "${name.full")),
            "Bad format '${name.full' in Service.Service: unterminated \"${\""
        );
        assert_eq!(
            err(tpl("", "${name.nope}")),
            "Bad format '${name.nope}' in Service.Service: unknown variable accessed: name.nope"
        );
        assert!(err(tpl("", "${40 + 2}")).contains("unsupported expression '40 + 2'"));
        assert!(err(tpl("", "${match(x)}")).contains("match() takes an integer, not 'x'"));
        // The same strings in a query that is not a template are plain text.
        let q = parse(json!({"Name": "lit", "Service": {"Service": "${name.nope}"}})).unwrap();
        assert_eq!(q.render("lit", "").unwrap().service.service, "${name.nope}");
    }

    fn template(name: &str, re: &str, remove_empty: bool) -> PreparedQuery {
        PreparedQuery {
            name: name.into(),
            template: QueryTemplate {
                kind: TemplateType::NamePrefixMatch,
                regexp: re.into(),
                remove_empty_tags: remove_empty,
            },
            service: ServiceQuery {
                service: "${name.prefix} xxx ${name.full} xxx ${name.suffix} xxx ${agent.segment}"
                    .into(),
                tags: [
                    "${match(-1)}",
                    "${match(0)}",
                    "${ match( 1 ) }",
                    "${match(2)}",
                    "${match(3)}",
                    "${match(4)}",
                    "v$${lit}",
                ]
                .map(String::from)
                .to_vec(),
                node_meta: [("foo".to_string(), "${match(1)}".to_string())].into(),
                failover: QueryFailover {
                    datacenters: vec!["${match(2)}".into()],
                    ..Default::default()
                },
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn templates_interpolate_names_and_regexp_groups() {
        // Consul's own template test, less HIL arithmetic.
        let t = template("hello-", "^(.*?)-(.*?)-(.*)$", false);
        t.validate().unwrap();
        let r = t.render("hello-foo-bar-none", "segment-bar").unwrap();
        assert_eq!(
            r.service.service,
            "hello- xxx hello-foo-bar-none xxx foo-bar-none xxx segment-bar"
        );
        assert_eq!(
            r.service.tags,
            [
                "",
                "hello-foo-bar-none",
                "hello",
                "foo",
                "bar-none",
                "",
                "v${lit}"
            ]
        );
        assert_eq!(r.service.node_meta["foo"], "hello");
        assert_eq!(r.service.failover.datacenters, ["foo"]);
        assert_eq!(r.name, "hello-", "the definition's own fields stay");
        // No match: every group is "".
        let r = t.render("hello-nope", "segment-bar").unwrap();
        assert_eq!(
            r.service.service,
            "hello- xxx hello-nope xxx nope xxx segment-bar"
        );
        assert_eq!(r.service.tags, ["", "", "", "", "", "", "v${lit}"]);
        assert_eq!(r.service.node_meta["foo"], "");
        // RemoveEmptyTags drops what interpolated to nothing.
        let t = template("hello-", "^(.*?)-(.*?)-(.*)$", true);
        let r = t.render("hello-foo-bar-none", "").unwrap();
        assert_eq!(
            r.service.tags,
            ["hello-foo-bar-none", "hello", "foo", "bar-none", "v${lit}"]
        );
        let r = t.render("hello-nope", "").unwrap();
        assert_eq!(r.service.tags, ["v${lit}"]);
        // A name looked up in another case still loses its prefix.
        let r = t.render("HELLO-db", "").unwrap();
        assert!(
            r.service.service.contains("xxx db xxx"),
            "{}",
            r.service.service
        );
    }

    fn stored(id_byte: u8, name: &str, kind: TemplateType, service: &str) -> PreparedQuery {
        PreparedQuery {
            id: uuid_v4([id_byte; 16]),
            name: name.into(),
            template: QueryTemplate {
                kind,
                ..Default::default()
            },
            service: ServiceQuery {
                service: service.into(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn resolution_is_id_then_exact_name_then_longest_prefix() {
        use TemplateType::{NamePrefixMatch as T, None as S};
        let all = vec![
            stored(1, "geo-db", S, "db-static"),
            stored(2, "geo-", T, "${name.suffix}"),
            stored(3, "geo-db-", T, "long-${name.suffix}"),
            stored(4, "", T, "any-${name.full}"),
            stored(5, "", S, "anonymous"),
        ];
        let svc =
            |r: Result<Option<PreparedQuery>, QueryError>| r.unwrap().map(|q| q.service.service);
        let res = |name: &str| svc(resolve(&all, name, "seg"));
        assert_eq!(res(&all[0].id), Some("db-static".into()));
        assert_eq!(res(&all[4].id.to_uppercase()), Some("anonymous".into()));
        assert_eq!(resolve(&all, &all[1].id, ""), Err(QueryError::TemplateById));
        assert_eq!(res("geo-db"), Some("db-static".into()));
        assert_eq!(res("GEO-DB"), Some("db-static".into()), "names ignore case");
        assert_eq!(res("geo-web"), Some("web".into()));
        assert_eq!(
            res("geo-db-x"),
            Some("long-x".into()),
            "the longest prefix wins"
        );
        assert_eq!(res("Geo-Db-Y"), Some("long-Y".into()));
        assert_eq!(res("elsewhere"), Some("any-elsewhere".into()), "catch-all");
        // A UUID that is no query's ID is still a name.
        let ghost = uuid_v4([9; 16]);
        assert_eq!(res(&ghost), Some(format!("any-{ghost}")));
        assert_eq!(resolve(&all, "", ""), Err(QueryError::MissingId));
        // Without the catch-all, an unknown name finds nothing; an
        // anonymous query is never found by its empty name.
        let some: Vec<&PreparedQuery> = all
            .iter()
            .filter(|q| q.service.service != "any-${name.full}")
            .collect();
        assert_eq!(
            resolve(some.iter().copied(), "elsewhere", "").unwrap(),
            None
        );
        assert_eq!(resolve(some.iter().copied(), "ge", "").unwrap(), None);
        // The exact name of a template renders it with that name.
        assert_eq!(res("geo-"), Some("".into()));
    }

    #[test]
    fn uuids() {
        let id = uuid_v4([0xff; 16]);
        assert_eq!(id, "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert!(is_uuid(&id));
        assert!(is_uuid(&uuid_v4([0; 16])));
        assert_eq!(&uuid_v4([0; 16])[14..15], "4", "version 4");
        assert!(is_uuid("8F246B77-F3E1-FF88-5B48-8EC93ABF3E05"));
        for bad in [
            "",
            "geo-db",
            "8f246b77-f3e1-ff88-5b48-8ec93abf3e0",
            "8f246b77f3e1-ff88-5b48-8ec93abf3e05-",
            "8f246b77-f3e1-ff88-5b48-8ec93abf3e0g",
        ] {
            assert!(!is_uuid(bad), "{bad}");
        }
    }

    #[test]
    fn go_durations_parse_and_print_as_go_does() {
        let d = |s: &str| parse_go_duration(s);
        assert_eq!(d("0"), Ok(Duration::ZERO));
        assert_eq!(d("-0"), Ok(Duration::ZERO));
        assert_eq!(d("150ms"), Ok(Duration::from_millis(150)));
        assert_eq!(
            d("0.15s"),
            Ok(Duration::from_millis(150)),
            "exact, not float"
        );
        assert_eq!(d("+1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(d(".5s"), Ok(Duration::from_millis(500)));
        assert_eq!(d("1h2m3s"), Ok(Duration::from_secs(3723)));
        assert_eq!(d("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(d("250µs"), Ok(Duration::from_micros(250)));
        assert_eq!(d("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(d("1"), Err("time: missing unit in duration \"1\"".into()));
        assert_eq!(
            d("1d"),
            Err("time: unknown unit \"d\" in duration \"1d\"".into())
        );
        assert_eq!(d("-2s"), Err("negative duration \"-2s\"".into()));
        for bad in ["", "s", ".s", "1.2.3s", "1 s", "3000000h"] {
            assert!(d(bad).is_err(), "{bad:?}");
        }
        let f = |d: Duration| format_go_duration(d);
        assert_eq!(f(Duration::ZERO), "0s");
        assert_eq!(f(Duration::from_nanos(7)), "7ns");
        assert_eq!(f(Duration::from_nanos(1500)), "1.5µs");
        assert_eq!(f(Duration::from_millis(150)), "150ms");
        assert_eq!(f(Duration::from_micros(1500)), "1.5ms");
        assert_eq!(f(Duration::from_millis(1500)), "1.5s");
        assert_eq!(f(Duration::from_secs(90)), "1m30s");
        assert_eq!(f(Duration::from_secs(7200)), "2h0m0s");
        for s in ["150ms", "1.5s", "1m30s", "2h0m0s", "1h2m3.25s", "1.5µs"] {
            assert_eq!(f(d(s).unwrap()), s, "round trip");
        }
    }

    /// n1 (rack a): web-1 [v1, primary], healthy.
    /// n2 (rack b): web-2 [V1], a warning check of its own.
    /// n3 (rack a): web-3 [v1, canary] meta {version: 2}, critical check `web-3-http`.
    /// n3 also has db-1, to show the service name filters.
    fn fleet() -> Catalog {
        let mut c = Catalog::new();
        let mut i = 0;
        let mut apply = |c: &mut Catalog, cmd: Command| {
            i += 1;
            c.apply(i, Duration::ZERO, cmd).unwrap();
        };
        let svc = |id: &str, name: &str, tags: &[&str], meta: &[(&str, &str)]| Service {
            id: id.into(),
            name: name.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            address: String::new(),
            port: 80,
            meta: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            create_index: 0,
            modify_index: 0,
        };
        let check = |id: &str, service: &str, status| Check {
            id: id.into(),
            name: id.into(),
            status,
            output: String::new(),
            notes: String::new(),
            service_id: service.into(),
            create_index: 0,
            modify_index: 0,
        };
        for (node, rack) in [("n1", "a"), ("n2", "b"), ("n3", "a")] {
            apply(
                &mut c,
                Command::RegisterNode {
                    name: node.into(),
                    address: String::new(),
                    datacenter: "dc1".into(),
                    meta: [("rack".to_string(), rack.to_string())].into(),
                    id: String::new(),
                    tagged_addresses: BTreeMap::new(),
                },
            );
            apply(
                &mut c,
                Command::RegisterCheck {
                    node: node.into(),
                    check: check("serfHealth", "", Health::Passing),
                },
            );
        }
        let reg = |node: &str, service| Command::RegisterService {
            node: node.into(),
            service,
        };
        apply(
            &mut c,
            reg("n1", svc("web-1", "web", &["v1", "primary"], &[])),
        );
        apply(&mut c, reg("n2", svc("web-2", "web", &["V1"], &[])));
        apply(
            &mut c,
            reg(
                "n3",
                svc("web-3", "web", &["v1", "canary"], &[("version", "2")]),
            ),
        );
        apply(&mut c, reg("n3", svc("db-1", "db", &[], &[])));
        apply(
            &mut c,
            Command::RegisterCheck {
                node: "n2".into(),
                check: check("web-2-http", "web-2", Health::Warning),
            },
        );
        apply(
            &mut c,
            Command::RegisterCheck {
                node: "n3".into(),
                check: check("web-3-http", "web-3", Health::Critical),
            },
        );
        c
    }

    fn ids(q: &ServiceQuery, c: &Catalog) -> Vec<String> {
        q.instances(c)
            .iter()
            .map(|i| i.service.id.clone())
            .collect()
    }

    #[test]
    fn instances_are_filtered_as_consul_does() {
        let c = fleet();
        let web = ServiceQuery {
            service: "web".into(),
            ..Default::default()
        };
        assert_eq!(
            ids(&web, &c),
            ["web-1", "web-2"],
            "critical dropped, warning kept"
        );
        let passing = ServiceQuery {
            only_passing: true,
            ..web.clone()
        };
        assert_eq!(ids(&passing, &c), ["web-1"]);
        let ignoring = ServiceQuery {
            ignore_check_ids: vec!["web-3-http".into()],
            ..web.clone()
        };
        assert_eq!(ids(&ignoring, &c), ["web-1", "web-2", "web-3"]);
        let ignoring_passing = ServiceQuery {
            ignore_check_ids: vec!["web-2-http".into()],
            only_passing: true,
            ..web.clone()
        };
        assert_eq!(ids(&ignoring_passing, &c), ["web-1", "web-2"]);
        // Tags: required ones without regard to case, `!` forbids.
        let tagged = |tags: &[&str]| ServiceQuery {
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ignore_check_ids: vec!["web-3-http".into()],
            ..web.clone()
        };
        assert_eq!(ids(&tagged(&["v1"]), &c), ["web-1", "web-2", "web-3"]);
        assert_eq!(ids(&tagged(&["PRIMARY"]), &c), ["web-1"]);
        assert_eq!(ids(&tagged(&["v1", "!Canary"]), &c), ["web-1", "web-2"]);
        assert_eq!(
            ids(&tagged(&["v1", "primary", "canary"]), &c),
            Vec::<String>::new()
        );
        // Metadata: exact matches.
        let node_meta = ServiceQuery {
            node_meta: [("rack".to_string(), "a".to_string())].into(),
            ..tagged(&[])
        };
        assert_eq!(ids(&node_meta, &c), ["web-1", "web-3"]);
        let service_meta = ServiceQuery {
            service_meta: [("version".to_string(), "2".to_string())].into(),
            ..tagged(&[])
        };
        assert_eq!(ids(&service_meta, &c), ["web-3"]);
        let wrong_value = ServiceQuery {
            node_meta: [("rack".to_string(), "A".to_string())].into(),
            ..tagged(&[])
        };
        assert_eq!(ids(&wrong_value, &c), Vec::<String>::new());
        // Each instance carries its node's checks and its own only.
        let all = ignoring.instances(&c);
        let checks: Vec<&str> = all[2].checks.iter().map(|k| k.id.as_str()).collect();
        assert_eq!(checks, ["serfHealth", "web-3-http"]);
        assert_eq!(all[2].node.name, "n3");
        // Connect: tomo has no Connect-capable instances.
        let connect = ServiceQuery {
            connect: true,
            ..web.clone()
        };
        assert!(connect.instances(&c).is_empty());
    }

    #[test]
    fn the_local_healthy_fraction_drives_failover() {
        let c = fleet();
        let web = ServiceQuery {
            service: "web".into(),
            ..Default::default()
        };
        let h = web.local_health(&c);
        assert_eq!(
            h,
            LocalHealth {
                healthy: 2,
                total: 3
            }
        );
        assert!((h.fraction() - 2.0 / 3.0).abs() < 1e-12);
        assert!(!h.should_fail_over(None), "Consul: only at zero");
        assert!(!h.should_fail_over(Some(0.5)));
        assert!(h.should_fail_over(Some(0.7)));
        // The denominator is what the other filters keep.
        let canary = ServiceQuery {
            tags: vec!["canary".into()],
            ..web.clone()
        };
        let h = canary.local_health(&c);
        assert_eq!(
            h,
            LocalHealth {
                healthy: 0,
                total: 1
            }
        );
        assert!(h.should_fail_over(None));
        let passing = ServiceQuery {
            only_passing: true,
            ..web.clone()
        };
        assert_eq!(passing.local_health(&c).healthy, 1);
        // Nothing registered: fail over, fraction 0.
        let none = ServiceQuery {
            service: "nope".into(),
            ..Default::default()
        };
        let h = none.local_health(&c);
        assert_eq!((h.total, h.fraction()), (0, 0.0));
        assert!(h.should_fail_over(Some(0.0)));
    }

    #[test]
    fn the_stored_form_round_trips_postcard_and_json() {
        let mut q = template("hello-", "^(.*)$", true);
        q.id = uuid_v4([3; 16]);
        q.session = "s".into();
        q.dns.ttl = "10s".into();
        q.service.failover = QueryFailover {
            nearest_n: 2,
            datacenters: vec!["dc2".into()],
            targets: vec![],
            min_healthy_fraction: Some(0.25),
            max_p99: Some(Duration::from_millis(150)),
            deadline: None,
            failback_after: Some(Duration::from_secs(30)),
        };
        let bytes = postcard::to_allocvec(&q).unwrap();
        assert_eq!(postcard::from_bytes::<PreparedQuery>(&bytes).unwrap(), q);
        let text = serde_json::to_string(&q).unwrap();
        assert_eq!(serde_json::from_str::<PreparedQuery>(&text).unwrap(), q);
    }
}
