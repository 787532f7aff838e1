//! The registry's state machine: nodes, services, health checks, KV and
//! sessions, with a Raft index per table for blocking queries. No I/O and
//! no clock of its own: Raft applies [`Command`]s in log order, each with
//! the log index and the leader's time, so every server computes the same
//! state. Consul's semantics (`../shared/docs/consul-api.md` §3–4): KV
//! `cas`, `acquire`/`release` locks with lock-delay, sessions invalidated
//! by destroy, TTL expiry, a critical check or their node's deregistration,
//! `release` or `delete` behaviour. Prepared queries (§5) with unique names
//! and at most one catch-all template, deleted with their session; their
//! parsing, templates and filters are [`crate::query`]'s.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::query::{self, PreparedQuery, QueryError};

/// Largest KV value, bytes (Consul's 512 KiB).
pub const MAX_VALUE: usize = 512 * 1024;
/// Consul's default lock-delay.
pub const DEFAULT_LOCK_DELAY: Duration = Duration::from_secs(15);
/// Longest lock-delay Consul honours.
pub const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);
/// The check every node has, driven by gossip membership.
pub const SERF_HEALTH: &str = "serfHealth";

/// Why a command was refused. The texts are Consul's (clients match them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CatalogError {
    /// A session's node is not registered.
    #[error("Missing node registration")]
    MissingNode,
    /// A lock operation names a session that does not exist.
    #[error("invalid session \"{0}\"")]
    InvalidSession(String),
    /// A lock operation without a session.
    #[error("missing session")]
    MissingSession,
    /// A session lists a check that does not exist.
    #[error("Missing check '{0}' registration")]
    MissingCheck(String),
    /// A session lists a check that is critical.
    #[error("Check '{0}' is in critical state")]
    CriticalCheck(String),
    /// A value over [`MAX_VALUE`].
    #[error("Value exceeds {MAX_VALUE} byte limit")]
    ValueTooLarge,
    /// An empty KV key where one is needed.
    #[error("Missing key name")]
    MissingKey,
    /// A service or check on a node that is not registered.
    #[error("Unknown node {0}")]
    UnknownNode(String),
    /// A check update for a check that does not exist.
    #[error("Unknown check \"{0}\"")]
    UnknownCheck(String),
    /// An index went backwards (a Raft apply out of order: a bug).
    #[error("index {got} is not after {last}")]
    IndexOrder {
        /// The index applied last.
        last: u64,
        /// The index given.
        got: u64,
    },
    /// A prepared query that fails [`PreparedQuery::validate`] (the HTTP
    /// layer validates first; this guards the table's invariants).
    #[error("Invalid prepared query: {0}")]
    InvalidQuery(QueryError),
    /// A prepared query's name (without regard to case) is another's.
    #[error("name '{0}' aliases an existing query name")]
    QueryNameTaken(String),
    /// A second catch-all template (`Name: ""`).
    #[error("a query template with an empty name already exists")]
    CatchAllTaken,
    /// A create with an ID already in use (the caller draws another).
    #[error("prepared query ID '{0}' already exists")]
    QueryIdTaken(String),
    /// An update or delete of a prepared query that does not exist.
    #[error("Cannot modify non-existent prepared query: '{0}'")]
    QueryNotFound(String),
    /// A prepared query ID that is not a UUID.
    #[error("Bad prepared query ID '{0}': not a UUID")]
    BadQueryId(String),
}

/// A health status, worst last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Healthy.
    Passing,
    /// Degraded.
    Warning,
    /// Failing.
    Critical,
}

impl Health {
    /// Consul's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
}

/// A registered node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Node name.
    pub name: String,
    /// Its address.
    pub address: String,
    /// Datacenter.
    pub datacenter: String,
    /// Free-form metadata.
    pub meta: BTreeMap<String, String>,
    /// Its node ID (a UUID, as the agent or the registration gave it; may
    /// be empty).
    pub id: String,
    /// Addresses by kind (`lan`, `wan`, …) given at registration.
    pub tagged_addresses: BTreeMap<String, String>,
    /// Raft index of its creation.
    pub create_index: u64,
    /// Raft index of its last change.
    pub modify_index: u64,
}

/// A service instance on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Service {
    /// Instance ID (unique on its node).
    pub id: String,
    /// Service name.
    pub name: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Address ("" = the node's).
    pub address: String,
    /// Port.
    pub port: u16,
    /// Free-form metadata.
    pub meta: BTreeMap<String, String>,
    /// Raft index of its creation.
    pub create_index: u64,
    /// Raft index of its last change.
    pub modify_index: u64,
}

/// A health check on a node (and maybe one of its services).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// Check ID (unique on its node).
    pub id: String,
    /// Name.
    pub name: String,
    /// Status.
    pub status: Health,
    /// Last output.
    pub output: String,
    /// What the registrant wrote about it (Consul's `Notes`).
    pub notes: String,
    /// The service it belongs to ("" = the node).
    pub service_id: String,
    /// Raft index of its creation.
    pub create_index: u64,
    /// Raft index of its last change.
    pub modify_index: u64,
}

/// What happens to a session's locks when it is invalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Behavior {
    /// Free the keys (the values stay).
    #[default]
    Release,
    /// Delete the keys.
    Delete,
}

/// A session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Its ID (a UUID, chosen by the server that received the request).
    pub id: String,
    /// Name.
    pub name: String,
    /// The node it belongs to.
    pub node: String,
    /// Checks of that node that must stay non-critical.
    pub checks: Vec<String>,
    /// Lock-delay after invalidation.
    pub lock_delay: Duration,
    /// Release or delete on invalidation.
    pub behavior: Behavior,
    /// TTL (invalidated if not renewed within twice that).
    pub ttl: Option<Duration>,
    /// Raft index of its creation.
    pub create_index: u64,
    /// Raft index of its last change.
    pub modify_index: u64,
}

/// A KV entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvEntry {
    /// The key.
    pub key: String,
    /// Opaque flags.
    pub flags: u64,
    /// The value.
    pub value: Vec<u8>,
    /// Times the key was locked.
    pub lock_index: u64,
    /// The session holding the lock.
    pub session: Option<String>,
    /// Raft index of its creation.
    pub create_index: u64,
    /// Raft index of its last change.
    pub modify_index: u64,
}

/// A KV write: Consul's `PUT /v1/kv/:key` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvSet {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// Flags.
    pub flags: u64,
    /// `cas`: 0 = create only, n = only if `ModifyIndex == n`.
    pub cas: Option<u64>,
    /// `acquire`: lock with this session.
    pub acquire: Option<String>,
    /// `release`: unlock if this session holds it.
    pub release: Option<String>,
}

/// A state change, as Raft carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Register or update a node.
    RegisterNode {
        /// Name.
        name: String,
        /// Address.
        address: String,
        /// Datacenter.
        datacenter: String,
        /// Metadata.
        meta: BTreeMap<String, String>,
        /// Node ID ("" = none given).
        id: String,
        /// Tagged addresses.
        tagged_addresses: BTreeMap<String, String>,
    },
    /// Deregister a node with its services and checks; its sessions are
    /// invalidated.
    DeregisterNode {
        /// Name.
        name: String,
    },
    /// Register or update a service instance on a registered node.
    RegisterService {
        /// The node.
        node: String,
        /// The instance (indexes are set by the catalog).
        service: Service,
    },
    /// Remove a service instance and its checks.
    DeregisterService {
        /// The node.
        node: String,
        /// Instance ID.
        id: String,
    },
    /// Register or update a check on a registered node.
    RegisterCheck {
        /// The node.
        node: String,
        /// The check (indexes are set by the catalog).
        check: Check,
    },
    /// Remove a check.
    DeregisterCheck {
        /// The node.
        node: String,
        /// Check ID.
        id: String,
    },
    /// A check's new status; sessions that list it are invalidated when it
    /// turns critical.
    UpdateCheck {
        /// The node.
        node: String,
        /// Check ID.
        id: String,
        /// Status.
        status: Health,
        /// Output.
        output: String,
    },
    /// A KV write.
    KvSet(KvSet),
    /// A KV delete (`recurse`: the whole prefix; `cas`: only at that index).
    KvDelete {
        /// Key or prefix.
        key: String,
        /// Delete every key with this prefix.
        recurse: bool,
        /// Only if `ModifyIndex` matches (0 never deletes).
        cas: Option<u64>,
    },
    /// Create a session.
    SessionCreate(Session),
    /// Destroy (invalidate) a session.
    SessionDestroy {
        /// Its ID.
        id: String,
    },
    /// Several commands applied in order at one Raft index: writes that
    /// arrived together (one log entry, one fsync), or a registration that
    /// must be seen whole (node, service and checks together).
    Batch(Vec<Command>),
    /// Create a prepared query under its `id` (a UUID the caller drew;
    /// indexes are set by the catalog). Its name must be free, its session
    /// (if any) must exist.
    QueryCreate(PreparedQuery),
    /// Replace a prepared query whole (same `id`); its create index stays.
    QueryUpdate(PreparedQuery),
    /// Delete a prepared query.
    QueryDelete {
        /// Its ID.
        id: String,
    },
}

/// What applying a command answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// Done.
    Done,
    /// A conditional write's result (KV `true`/`false`, `catalog/register`).
    Bool(bool),
    /// The created session's ID.
    Session(String),
    /// Each command's answer, for a [`Command::Batch`].
    Batch(Vec<Result<Outcome, CatalogError>>),
    /// The ID of the prepared query created or updated.
    Query(String),
}

/// The last Raft index that changed each table (what a blocking query on
/// it waits for).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableIndexes {
    /// Nodes.
    pub nodes: u64,
    /// Services.
    pub services: u64,
    /// Checks.
    pub checks: u64,
    /// KV (deletes included).
    pub kv: u64,
    /// Sessions.
    pub sessions: u64,
    /// Prepared queries (deletes included, and those of ended sessions).
    pub queries: u64,
}

/// The registry's whole state (what a Raft snapshot holds).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    nodes: BTreeMap<String, Node>,
    /// (node, service ID) → service.
    services: BTreeMap<(String, String), Service>,
    /// (node, check ID) → check.
    checks: BTreeMap<(String, String), Check>,
    kv: BTreeMap<String, KvEntry>,
    /// Keys in their lock-delay window → until when (leader time).
    lock_delays: BTreeMap<String, Duration>,
    sessions: BTreeMap<String, Session>,
    index: TableIndexes,
    last_applied: u64,
    /// Prepared queries by ID.
    queries: BTreeMap<String, PreparedQuery>,
}

impl Catalog {
    /// An empty catalog.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last index applied.
    pub fn last_applied(&self) -> u64 {
        self.last_applied
    }

    /// Each table's last change.
    pub fn indexes(&self) -> TableIndexes {
        self.index
    }

    /// Applies `cmd` at Raft index `index`, the leader's clock reading
    /// `now` (for lock-delays). A refused command changes nothing but
    /// still consumes its index.
    pub fn apply(
        &mut self,
        index: u64,
        now: Duration,
        cmd: Command,
    ) -> Result<Outcome, CatalogError> {
        if index <= self.last_applied {
            return Err(CatalogError::IndexOrder {
                last: self.last_applied,
                got: index,
            });
        }
        self.last_applied = index;
        self.apply_one(index, now, cmd)
    }

    fn apply_one(
        &mut self,
        index: u64,
        now: Duration,
        cmd: Command,
    ) -> Result<Outcome, CatalogError> {
        match cmd {
            // In order, all at this index; each answers for itself (one
            // refused does not undo the others).
            Command::Batch(cmds) => Ok(Outcome::Batch(
                cmds.into_iter()
                    .map(|c| self.apply_one(index, now, c))
                    .collect(),
            )),
            Command::RegisterNode {
                name,
                address,
                datacenter,
                meta,
                id,
                tagged_addresses,
            } => {
                // As Consul (`IsSame`): registering what is already there
                // changes nothing, index included, so an agent's periodic
                // re-sync wakes no watcher.
                if let Some(n) = self.nodes.get(&name)
                    && n.address == address
                    && n.datacenter == datacenter
                    && n.meta == meta
                    && n.id == id
                    && n.tagged_addresses == tagged_addresses
                {
                    return Ok(Outcome::Bool(true));
                }
                let create_index = self.nodes.get(&name).map_or(index, |n| n.create_index);
                self.nodes.insert(
                    name.clone(),
                    Node {
                        name,
                        address,
                        datacenter,
                        meta,
                        id,
                        tagged_addresses,
                        create_index,
                        modify_index: index,
                    },
                );
                self.index.nodes = index;
                Ok(Outcome::Bool(true))
            }
            Command::DeregisterNode { name } => {
                if self.nodes.remove(&name).is_none() {
                    return Ok(Outcome::Bool(true));
                }
                self.index.nodes = index;
                let before = self.services.len();
                self.services.retain(|(n, _), _| *n != name);
                if self.services.len() != before {
                    self.index.services = index;
                }
                let before = self.checks.len();
                self.checks.retain(|(n, _), _| *n != name);
                if self.checks.len() != before {
                    self.index.checks = index;
                }
                let doomed: Vec<String> = self
                    .sessions
                    .values()
                    .filter(|s| s.node == name)
                    .map(|s| s.id.clone())
                    .collect();
                for id in doomed {
                    self.invalidate(index, now, &id);
                }
                Ok(Outcome::Bool(true))
            }
            Command::RegisterService { node, mut service } => {
                if !self.nodes.contains_key(&node) {
                    return Err(CatalogError::UnknownNode(node));
                }
                let key = (node, service.id.clone());
                if let Some(old) = self.services.get(&key) {
                    service.create_index = old.create_index;
                    service.modify_index = old.modify_index;
                    if service == *old {
                        return Ok(Outcome::Bool(true)); // the same: no change
                    }
                }
                service.create_index = self.services.get(&key).map_or(index, |s| s.create_index);
                service.modify_index = index;
                self.services.insert(key, service);
                self.index.services = index;
                Ok(Outcome::Bool(true))
            }
            Command::DeregisterService { node, id } => {
                if self.services.remove(&(node.clone(), id.clone())).is_some() {
                    self.index.services = index;
                    let before = self.checks.len();
                    self.checks
                        .retain(|(n, _), c| !(*n == node && c.service_id == id));
                    if self.checks.len() != before {
                        self.index.checks = index;
                    }
                }
                Ok(Outcome::Bool(true))
            }
            Command::RegisterCheck { node, mut check } => {
                if !self.nodes.contains_key(&node) {
                    return Err(CatalogError::UnknownNode(node));
                }
                let key = (node.clone(), check.id.clone());
                if let Some(old) = self.checks.get(&key) {
                    check.create_index = old.create_index;
                    check.modify_index = old.modify_index;
                    if check == *old {
                        return Ok(Outcome::Bool(true)); // the same: no change
                    }
                }
                check.create_index = self.checks.get(&key).map_or(index, |c| c.create_index);
                check.modify_index = index;
                let critical = check.status == Health::Critical;
                let id = check.id.clone();
                self.checks.insert(key, check);
                self.index.checks = index;
                if critical {
                    self.invalidate_by_check(index, now, &node, &id);
                }
                Ok(Outcome::Bool(true))
            }
            Command::DeregisterCheck { node, id } => {
                if self.checks.remove(&(node, id)).is_some() {
                    self.index.checks = index;
                }
                Ok(Outcome::Bool(true))
            }
            Command::UpdateCheck {
                node,
                id,
                status,
                output,
            } => {
                let Some(c) = self.checks.get_mut(&(node.clone(), id.clone())) else {
                    return Err(CatalogError::UnknownCheck(id));
                };
                if c.status == status && c.output == output {
                    return Ok(Outcome::Done);
                }
                c.status = status;
                c.output = output;
                c.modify_index = index;
                self.index.checks = index;
                if status == Health::Critical {
                    self.invalidate_by_check(index, now, &node, &id);
                }
                Ok(Outcome::Done)
            }
            Command::KvSet(set) => self.kv_set(index, now, set),
            Command::KvDelete { key, recurse, cas } => {
                Ok(Outcome::Bool(self.kv_delete(index, &key, recurse, cas)))
            }
            Command::SessionCreate(s) => self.session_create(index, s),
            Command::SessionDestroy { id } => {
                self.invalidate(index, now, &id);
                Ok(Outcome::Bool(true))
            }
            Command::QueryCreate(q) => {
                if self.queries.contains_key(&q.id) {
                    return Err(CatalogError::QueryIdTaken(q.id));
                }
                self.query_set(index, q)
            }
            Command::QueryUpdate(q) => {
                if !self.queries.contains_key(&q.id) {
                    return Err(CatalogError::QueryNotFound(q.id));
                }
                self.query_set(index, q)
            }
            Command::QueryDelete { id } => {
                if self.queries.remove(&id).is_none() {
                    return Err(CatalogError::QueryNotFound(id));
                }
                self.index.queries = index;
                Ok(Outcome::Done)
            }
        }
    }

    /// Stores `q` (new, or replacing the query with its ID) after the
    /// checks that need the whole table: Consul's state-store rules.
    fn query_set(&mut self, index: u64, mut q: PreparedQuery) -> Result<Outcome, CatalogError> {
        if q.id.is_empty() {
            return Err(CatalogError::InvalidQuery(QueryError::MissingId));
        }
        if !query::is_uuid(&q.id) {
            return Err(CatalogError::BadQueryId(q.id));
        }
        q.validate().map_err(CatalogError::InvalidQuery)?;
        let others = || self.queries.values().filter(|o| o.id != q.id);
        if !q.name.is_empty() {
            // One name index for queries and templates alike, without
            // regard to case (DNS names have none).
            if others().any(|o| o.name.eq_ignore_ascii_case(&q.name)) {
                return Err(CatalogError::QueryNameTaken(q.name));
            }
        } else if q.is_template() && others().any(|o| o.is_template() && o.name.is_empty()) {
            return Err(CatalogError::CatchAllTaken);
        }
        if !q.session.is_empty() && !self.sessions.contains_key(&q.session) {
            return Err(CatalogError::InvalidSession(q.session));
        }
        q.create_index = self.queries.get(&q.id).map_or(index, |o| o.create_index);
        q.modify_index = index;
        let id = q.id.clone();
        self.queries.insert(id.clone(), q);
        self.index.queries = index;
        Ok(Outcome::Query(id))
    }

    fn kv_set(&mut self, index: u64, now: Duration, set: KvSet) -> Result<Outcome, CatalogError> {
        if set.key.is_empty() {
            return Err(CatalogError::MissingKey);
        }
        if set.value.len() > MAX_VALUE {
            return Err(CatalogError::ValueTooLarge);
        }
        let existing = self.kv.get(&set.key);
        if let Some(cas) = set.cas {
            let ok = match existing {
                None => cas == 0,
                Some(e) => e.modify_index == cas,
            };
            if !ok {
                return Ok(Outcome::Bool(false));
            }
        }
        let mut lock_index = existing.map_or(0, |e| e.lock_index);
        let mut session = existing.and_then(|e| e.session.clone());
        if let Some(sid) = &set.acquire {
            if sid.is_empty() {
                return Err(CatalogError::MissingSession);
            }
            if !self.sessions.contains_key(sid) {
                return Err(CatalogError::InvalidSession(sid.clone()));
            }
            if self
                .lock_delays
                .get(&set.key)
                .is_some_and(|until| now < *until)
            {
                return Ok(Outcome::Bool(false));
            }
            match &session {
                Some(holder) if holder != sid => return Ok(Outcome::Bool(false)),
                Some(_) => {}
                None => {
                    lock_index += 1;
                    session = Some(sid.clone());
                }
            }
        }
        if let Some(sid) = &set.release {
            if session.as_deref() != Some(sid.as_str()) {
                return Ok(Outcome::Bool(false));
            }
            session = None;
        }
        let create_index = existing.map_or(index, |e| e.create_index);
        self.kv.insert(
            set.key.clone(),
            KvEntry {
                key: set.key,
                flags: set.flags,
                value: set.value,
                lock_index,
                session,
                create_index,
                modify_index: index,
            },
        );
        self.index.kv = index;
        Ok(Outcome::Bool(true))
    }

    fn kv_delete(&mut self, index: u64, key: &str, recurse: bool, cas: Option<u64>) -> bool {
        if let Some(cas) = cas {
            match self.kv.get(key) {
                Some(e) if cas != 0 && e.modify_index == cas => {}
                _ => return false,
            }
        }
        let doomed: Vec<String> = if recurse {
            self.kv
                .range(key.to_string()..)
                .take_while(|(k, _)| k.starts_with(key))
                .map(|(k, _)| k.clone())
                .collect()
        } else {
            self.kv
                .contains_key(key)
                .then(|| key.to_string())
                .into_iter()
                .collect()
        };
        for k in &doomed {
            self.kv.remove(k);
        }
        if !doomed.is_empty() {
            // Deletes raise the table index so that blocking readers of a
            // prefix see them.
            self.index.kv = index;
        }
        true
    }

    fn session_create(&mut self, index: u64, mut s: Session) -> Result<Outcome, CatalogError> {
        if !self.nodes.contains_key(&s.node) {
            return Err(CatalogError::MissingNode);
        }
        for c in &s.checks {
            match self.checks.get(&(s.node.clone(), c.clone())) {
                None => return Err(CatalogError::MissingCheck(c.clone())),
                Some(check) if check.status == Health::Critical => {
                    return Err(CatalogError::CriticalCheck(c.clone()));
                }
                Some(_) => {}
            }
        }
        s.lock_delay = s.lock_delay.min(MAX_LOCK_DELAY);
        s.create_index = index;
        s.modify_index = index;
        let id = s.id.clone();
        self.sessions.insert(id.clone(), s);
        self.index.sessions = index;
        Ok(Outcome::Session(id))
    }

    /// Invalidates sessions of `node` that list check `id`.
    fn invalidate_by_check(&mut self, index: u64, now: Duration, node: &str, id: &str) {
        let doomed: Vec<String> = self
            .sessions
            .values()
            .filter(|s| s.node == node && s.checks.iter().any(|c| c == id))
            .map(|s| s.id.clone())
            .collect();
        for sid in doomed {
            self.invalidate(index, now, &sid);
        }
    }

    /// Ends a session: its locks are released (or their keys deleted) and
    /// enter the lock-delay window.
    fn invalidate(&mut self, index: u64, now: Duration, id: &str) {
        let Some(s) = self.sessions.remove(id) else {
            return;
        };
        self.index.sessions = index;
        let held: Vec<String> = self
            .kv
            .values()
            .filter(|e| e.session.as_deref() == Some(id))
            .map(|e| e.key.clone())
            .collect();
        for k in held {
            match s.behavior {
                Behavior::Release => {
                    if let Some(e) = self.kv.get_mut(&k) {
                        e.session = None;
                        e.modify_index = index;
                    }
                }
                Behavior::Delete => {
                    self.kv.remove(&k);
                }
            }
            if !s.lock_delay.is_zero() {
                self.lock_delays.insert(k, now + s.lock_delay);
            }
            self.index.kv = index;
        }
        // Forget windows that have passed (bounded by the keys ever locked).
        self.lock_delays.retain(|_, until| now < *until);
        // Queries bound to the session go with it (Consul's rule: an
        // anonymous query lives exactly as long as its session).
        let before = self.queries.len();
        self.queries.retain(|_, q| q.session != id);
        if self.queries.len() != before {
            self.index.queries = index;
        }
    }

    /// A registered node.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// Every node, by name.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    /// A node's service instances.
    pub fn node_services(&self, node: &str) -> impl Iterator<Item = &Service> {
        self.services
            .range((node.to_string(), String::new())..)
            .take_while(move |((n, _), _)| n == node)
            .map(|(_, s)| s)
    }

    /// Every instance of service `name`, with its node, by node name.
    pub fn service_instances<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = (&'a Node, &'a Service)> + 'a {
        self.services
            .iter()
            .filter(move |(_, s)| s.name == name)
            .filter_map(|((n, _), s)| Some((self.nodes.get(n)?, s)))
    }

    /// Service names with the union of their tags.
    pub fn service_names(&self) -> BTreeMap<&str, Vec<&str>> {
        let mut out: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for s in self.services.values() {
            let tags = out.entry(&s.name).or_default();
            for t in &s.tags {
                if !tags.contains(&t.as_str()) {
                    tags.push(t);
                }
            }
        }
        out
    }

    /// A node's checks (its own and its services').
    pub fn node_checks(&self, node: &str) -> impl Iterator<Item = &Check> {
        self.checks
            .range((node.to_string(), String::new())..)
            .take_while(move |((n, _), _)| n == node)
            .map(|(_, c)| c)
    }

    /// The worst status among the checks that apply to a service instance
    /// (the node's own checks and the instance's), passing if none.
    pub fn instance_health(&self, node: &str, service_id: &str) -> Health {
        self.node_checks(node)
            .filter(|c| c.service_id.is_empty() || c.service_id == service_id)
            .map(|c| c.status)
            .max()
            .unwrap_or(Health::Passing)
    }

    /// A KV entry.
    pub fn kv_get(&self, key: &str) -> Option<&KvEntry> {
        self.kv.get(key)
    }

    /// Every KV entry under `prefix`, sorted by key.
    pub fn kv_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a KvEntry> + 'a {
        self.kv
            .range(prefix.to_string()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(_, e)| e)
    }

    /// Keys under `prefix`, cut after the first `separator` past the prefix
    /// and deduplicated (Consul's `?keys&separator=`).
    pub fn kv_keys(&self, prefix: &str, separator: Option<&str>) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for e in self.kv_prefix(prefix) {
            let k = match separator.filter(|s| !s.is_empty()) {
                Some(sep) => match e.key[prefix.len()..].find(sep) {
                    Some(at) => e.key[..prefix.len() + at + sep.len()].to_string(),
                    None => e.key.clone(),
                },
                None => e.key.clone(),
            };
            if out.last() != Some(&k) {
                out.push(k);
            }
        }
        out
    }

    /// A session.
    pub fn session(&self, id: &str) -> Option<&Session> {
        self.sessions.get(id)
    }

    /// Every session, by ID.
    pub fn sessions(&self) -> impl Iterator<Item = &Session> {
        self.sessions.values()
    }

    /// A prepared query by ID (as stored: templates unrendered).
    pub fn query(&self, id: &str) -> Option<&PreparedQuery> {
        self.queries.get(id)
    }

    /// Every prepared query, by ID.
    pub fn queries(&self) -> impl Iterator<Item = &PreparedQuery> {
        self.queries.values()
    }

    /// The prepared query that answers `id_or_name` for an agent in
    /// network segment `segment`, templates rendered ([`query::resolve`]:
    /// ID, then exact name, then longest-prefix template). `Ok(None)`:
    /// Consul's 404 `Query not found`.
    pub fn resolve_query(
        &self,
        id_or_name: &str,
        segment: &str,
    ) -> Result<Option<PreparedQuery>, QueryError> {
        query::resolve(self.queries.values(), id_or_name, segment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Duration = Duration::from_secs(100);

    /// A catalog with node `n1` (a passing serfHealth check) and an applier
    /// that hands out increasing indexes.
    struct Fixture {
        c: Catalog,
        next: u64,
    }

    impl Fixture {
        fn new() -> Self {
            let mut f = Fixture {
                c: Catalog::new(),
                next: 1,
            };
            f.ok(Command::RegisterNode {
                name: "n1".into(),
                address: "10.0.0.1".into(),
                datacenter: "dc1".into(),
                meta: BTreeMap::new(),
                id: String::new(),
                tagged_addresses: BTreeMap::new(),
            });
            f.ok(Command::RegisterCheck {
                node: "n1".into(),
                check: check(SERF_HEALTH, "", Health::Passing),
            });
            f
        }

        fn at(&mut self, now: Duration, cmd: Command) -> Result<Outcome, CatalogError> {
            let i = self.next;
            self.next += 1;
            self.c.apply(i, now, cmd)
        }

        fn ok(&mut self, cmd: Command) -> Outcome {
            self.at(T0, cmd).unwrap()
        }

        fn session(&mut self, id: &str, behavior: Behavior, lock_delay: Duration) {
            self.ok(Command::SessionCreate(Session {
                id: id.into(),
                name: String::new(),
                node: "n1".into(),
                checks: vec![SERF_HEALTH.into()],
                lock_delay,
                behavior,
                ttl: None,
                create_index: 0,
                modify_index: 0,
            }));
        }
    }

    fn check(id: &str, service: &str, status: Health) -> Check {
        Check {
            id: id.into(),
            name: id.into(),
            status,
            output: String::new(),
            notes: String::new(),
            service_id: service.into(),
            create_index: 0,
            modify_index: 0,
        }
    }

    fn put(key: &str, value: &str) -> KvSet {
        KvSet {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            flags: 0,
            cas: None,
            acquire: None,
            release: None,
        }
    }

    fn acquire(key: &str, value: &str, sid: &str) -> Command {
        Command::KvSet(KvSet {
            acquire: Some(sid.into()),
            ..put(key, value)
        })
    }

    #[test]
    fn kv_cas_creates_only_when_absent_and_writes_only_at_the_index() {
        let mut f = Fixture::new();
        let cas = |i| {
            Command::KvSet(KvSet {
                cas: Some(i),
                ..put("k", "v")
            })
        };
        assert_eq!(f.ok(cas(0)), Outcome::Bool(true));
        let idx = f.c.kv_get("k").unwrap().modify_index;
        assert_eq!(f.ok(cas(0)), Outcome::Bool(false), "exists: cas=0 fails");
        assert_eq!(f.ok(cas(idx + 100)), Outcome::Bool(false));
        assert_eq!(f.ok(cas(idx)), Outcome::Bool(true));
        let e = f.c.kv_get("k").unwrap();
        assert!(e.modify_index > idx);
        assert_eq!(e.create_index, idx, "create index survives updates");
        // Delete with cas: 0 never deletes; a stale index does not either.
        let del = |cas| Command::KvDelete {
            key: "k".into(),
            recurse: false,
            cas: Some(cas),
        };
        assert_eq!(f.ok(del(0)), Outcome::Bool(false));
        assert_eq!(f.ok(del(idx)), Outcome::Bool(false));
        let now = f.c.kv_get("k").unwrap().modify_index;
        assert_eq!(f.ok(del(now)), Outcome::Bool(true));
        assert!(f.c.kv_get("k").is_none());
    }

    #[test]
    fn deletes_raise_the_kv_index_and_recurse_takes_the_prefix() {
        let mut f = Fixture::new();
        for k in ["a/1", "a/2", "a/b/3", "ab", "b"] {
            f.ok(Command::KvSet(put(k, "x")));
        }
        assert_eq!(f.c.kv_keys("a/", None), ["a/1", "a/2", "a/b/3"]);
        assert_eq!(f.c.kv_keys("a/", Some("/")), ["a/1", "a/2", "a/b/"]);
        assert_eq!(f.c.kv_keys("", Some("/")), ["a/", "ab", "b"]);
        let before = f.c.indexes().kv;
        f.ok(Command::KvDelete {
            key: "a/".into(),
            recurse: true,
            cas: None,
        });
        assert!(f.c.indexes().kv > before);
        assert_eq!(f.c.kv_keys("", None), ["ab", "b"]);
        // Deleting nothing is true and leaves the index alone.
        let before = f.c.indexes().kv;
        assert_eq!(
            f.ok(Command::KvDelete {
                key: "zz".into(),
                recurse: false,
                cas: None
            }),
            Outcome::Bool(true)
        );
        assert_eq!(f.c.indexes().kv, before);
    }

    #[test]
    fn bad_writes_change_nothing() {
        let mut f = Fixture::new();
        let snapshot = f.c.clone();
        let big = KvSet {
            value: vec![0; MAX_VALUE + 1],
            ..put("k", "")
        };
        assert_eq!(
            f.at(T0, Command::KvSet(big)),
            Err(CatalogError::ValueTooLarge)
        );
        assert_eq!(
            f.at(T0, Command::KvSet(put("", "v"))),
            Err(CatalogError::MissingKey)
        );
        assert_eq!(
            f.at(T0, acquire("k", "v", "nope")),
            Err(CatalogError::InvalidSession("nope".into()))
        );
        assert_eq!(
            f.at(T0, acquire("k", "v", "")),
            Err(CatalogError::MissingSession)
        );
        let mut s = Session {
            id: "s".into(),
            name: String::new(),
            node: "ghost".into(),
            checks: vec![],
            lock_delay: Duration::ZERO,
            behavior: Behavior::Release,
            ttl: None,
            create_index: 0,
            modify_index: 0,
        };
        assert_eq!(
            f.at(T0, Command::SessionCreate(s.clone())),
            Err(CatalogError::MissingNode)
        );
        s.node = "n1".into();
        s.checks = vec!["nope".into()];
        assert_eq!(
            f.at(T0, Command::SessionCreate(s)),
            Err(CatalogError::MissingCheck("nope".into()))
        );
        assert_eq!(
            f.at(
                T0,
                Command::UpdateCheck {
                    node: "n1".into(),
                    id: "nope".into(),
                    status: Health::Critical,
                    output: String::new()
                }
            ),
            Err(CatalogError::UnknownCheck("nope".into()))
        );
        // Refused commands consume their index but change no table.
        assert_eq!(f.c.indexes(), snapshot.indexes());
        assert_eq!(f.c.kv_get("k"), None);
        assert!(f.c.sessions().next().is_none());
        assert!(f.c.last_applied() > snapshot.last_applied());
        // Out-of-order indexes are refused.
        assert!(matches!(
            f.c.apply(1, T0, Command::KvSet(put("k", "v"))),
            Err(CatalogError::IndexOrder { .. })
        ));
    }

    #[test]
    fn locks_follow_consul() {
        let mut f = Fixture::new();
        f.session("s1", Behavior::Release, Duration::from_secs(15));
        f.session("s2", Behavior::Release, Duration::ZERO);
        assert_eq!(f.ok(acquire("leader", "a", "s1")), Outcome::Bool(true));
        let e = f.c.kv_get("leader").unwrap().clone();
        assert_eq!((e.lock_index, e.session.as_deref()), (1, Some("s1")));
        // Another session cannot take it; the holder may rewrite it
        // without a new lock index.
        assert_eq!(f.ok(acquire("leader", "b", "s2")), Outcome::Bool(false));
        assert_eq!(f.ok(acquire("leader", "a2", "s1")), Outcome::Bool(true));
        let e = f.c.kv_get("leader").unwrap();
        assert_eq!((e.lock_index, e.value.as_slice()), (1, &b"a2"[..]));
        // Only the holder releases; the value stays, the lock index too.
        let release = |sid: &str| {
            Command::KvSet(KvSet {
                release: Some(sid.into()),
                ..put("leader", "a2")
            })
        };
        assert_eq!(f.ok(release("s2")), Outcome::Bool(false));
        assert_eq!(f.ok(release("s1")), Outcome::Bool(true));
        let e = f.c.kv_get("leader").unwrap();
        assert_eq!((e.lock_index, e.session.as_deref()), (1, None));
        // A plain PUT ignores locks (advisory).
        assert_eq!(f.ok(acquire("leader", "c", "s2")), Outcome::Bool(true));
        assert_eq!(
            f.ok(Command::KvSet(put("leader", "plain"))),
            Outcome::Bool(true)
        );
        assert_eq!(f.c.kv_get("leader").unwrap().lock_index, 2);
    }

    #[test]
    fn invalidation_releases_or_deletes_and_honours_lock_delay() {
        let mut f = Fixture::new();
        f.session("rel", Behavior::Release, Duration::from_secs(15));
        f.session("del", Behavior::Delete, Duration::ZERO);
        f.session("other", Behavior::Release, Duration::ZERO);
        f.ok(acquire("a", "1", "rel"));
        f.ok(acquire("b", "2", "del"));
        f.ok(Command::SessionDestroy { id: "rel".into() });
        f.ok(Command::SessionDestroy { id: "del".into() });
        assert!(f.c.session("rel").is_none());
        let a = f.c.kv_get("a").unwrap();
        assert_eq!(
            (a.session.as_deref(), a.value.as_slice()),
            (None, &b"1"[..])
        );
        assert!(f.c.kv_get("b").is_none(), "behavior=delete deletes the key");
        // "a" is in its 15 s lock-delay window: acquire fails until it ends.
        let during = T0 + Duration::from_secs(10);
        assert_eq!(
            f.at(during, acquire("a", "x", "other")),
            Ok(Outcome::Bool(false))
        );
        let after = T0 + Duration::from_secs(16);
        assert_eq!(
            f.at(after, acquire("a", "x", "other")),
            Ok(Outcome::Bool(true))
        );
        // "b" had no lock-delay.
        assert_eq!(
            f.at(T0, acquire("b", "y", "other")),
            Ok(Outcome::Bool(true))
        );
        // Destroying an unknown session is fine (idempotent).
        assert_eq!(
            f.ok(Command::SessionDestroy { id: "rel".into() }),
            Outcome::Bool(true)
        );
    }

    #[test]
    fn a_critical_check_or_a_deregistered_node_ends_sessions() {
        let mut f = Fixture::new();
        f.session("s", Behavior::Release, Duration::ZERO);
        f.ok(acquire("k", "v", "s"));
        f.ok(Command::UpdateCheck {
            node: "n1".into(),
            id: SERF_HEALTH.into(),
            status: Health::Warning,
            output: "slow".into(),
        });
        assert!(f.c.session("s").is_some(), "warning keeps the session");
        f.ok(Command::UpdateCheck {
            node: "n1".into(),
            id: SERF_HEALTH.into(),
            status: Health::Critical,
            output: "down".into(),
        });
        assert!(f.c.session("s").is_none());
        assert_eq!(f.c.kv_get("k").unwrap().session, None);
        // A session cannot be created on a critical check.
        let s = Session {
            id: "t".into(),
            name: String::new(),
            node: "n1".into(),
            checks: vec![SERF_HEALTH.into()],
            lock_delay: Duration::ZERO,
            behavior: Behavior::Release,
            ttl: None,
            create_index: 0,
            modify_index: 0,
        };
        assert_eq!(
            f.at(T0, Command::SessionCreate(s.clone())),
            Err(CatalogError::CriticalCheck(SERF_HEALTH.into()))
        );
        f.ok(Command::UpdateCheck {
            node: "n1".into(),
            id: SERF_HEALTH.into(),
            status: Health::Passing,
            output: String::new(),
        });
        f.ok(Command::SessionCreate(s));
        f.ok(Command::DeregisterNode { name: "n1".into() });
        assert!(f.c.session("t").is_none());
        assert!(f.c.node("n1").is_none());
        assert_eq!(f.c.node_checks("n1").count(), 0);
    }

    #[test]
    fn registering_what_is_there_changes_no_index() {
        let mut f = Fixture::new();
        let node = |address: &str| Command::RegisterNode {
            name: "n1".into(),
            address: address.into(),
            datacenter: "dc1".into(),
            meta: BTreeMap::new(),
            id: String::new(),
            tagged_addresses: BTreeMap::new(),
        };
        let svc = |port: u16| Command::RegisterService {
            node: "n1".into(),
            service: Service {
                id: "web".into(),
                name: "web".into(),
                tags: vec![],
                address: String::new(),
                port,
                meta: BTreeMap::new(),
                create_index: 0,
                modify_index: 0,
            },
        };
        let chk = |status| Command::RegisterCheck {
            node: "n1".into(),
            check: check("web-http", "web", status),
        };
        f.ok(svc(80));
        f.ok(chk(Health::Passing));
        let before = f.c.indexes();
        let modified = f.c.node("n1").unwrap().modify_index;
        f.ok(node("10.0.0.1"));
        f.ok(svc(80));
        f.ok(chk(Health::Passing));
        assert_eq!(
            f.c.indexes(),
            before,
            "an identical re-registration moved an index"
        );
        assert_eq!(f.c.node("n1").unwrap().modify_index, modified);
        // Any difference is a change.
        f.ok(node("10.0.0.9"));
        f.ok(svc(81));
        f.ok(chk(Health::Warning));
        let after = f.c.indexes();
        assert!(after.nodes > before.nodes && after.services > before.services);
        assert!(after.checks > before.checks);
    }

    #[test]
    fn services_checks_and_health() {
        let mut f = Fixture::new();
        let web = |id: &str, tags: &[&str]| Service {
            id: id.into(),
            name: "web".into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            address: String::new(),
            port: 80,
            meta: BTreeMap::new(),
            create_index: 0,
            modify_index: 0,
        };
        f.ok(Command::RegisterService {
            node: "n1".into(),
            service: web("web-1", &["v1"]),
        });
        f.ok(Command::RegisterService {
            node: "n1".into(),
            service: web("web-2", &["v2", "v1"]),
        });
        assert_eq!(
            f.at(
                T0,
                Command::RegisterService {
                    node: "ghost".into(),
                    service: web("x", &[])
                }
            ),
            Err(CatalogError::UnknownNode("ghost".into()))
        );
        assert_eq!(f.c.service_names()["web"], ["v1", "v2"]);
        assert_eq!(f.c.service_instances("web").count(), 2);
        f.ok(Command::RegisterCheck {
            node: "n1".into(),
            check: check("web-2-http", "web-2", Health::Critical),
        });
        assert_eq!(f.c.instance_health("n1", "web-1"), Health::Passing);
        assert_eq!(f.c.instance_health("n1", "web-2"), Health::Critical);
        // The node's own check counts for every instance.
        f.ok(Command::UpdateCheck {
            node: "n1".into(),
            id: SERF_HEALTH.into(),
            status: Health::Warning,
            output: String::new(),
        });
        assert_eq!(f.c.instance_health("n1", "web-1"), Health::Warning);
        // Deregistering a service takes its checks with it.
        f.ok(Command::DeregisterService {
            node: "n1".into(),
            id: "web-2".into(),
        });
        assert_eq!(f.c.node_services("n1").count(), 1);
        assert!(f.c.node_checks("n1").all(|c| c.service_id != "web-2"));
    }

    /// A prepared query `name` for service `service`, under the ID drawn
    /// from `seed`.
    /// (Built directly: some tests want definitions that fail validation.)
    fn pq(seed: u8, name: &str, service: &str) -> PreparedQuery {
        PreparedQuery {
            id: query::uuid_v4([seed; 16]),
            name: name.into(),
            service: query::ServiceQuery {
                service: service.into(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn catch_all(seed: u8) -> PreparedQuery {
        let mut q = PreparedQuery::from_json(&serde_json::json!({
            "Template": {"Type": "name_prefix_match"},
            "Service": {"Service": "${name.full}"},
        }))
        .unwrap();
        q.id = query::uuid_v4([seed; 16]);
        q
    }

    #[test]
    fn prepared_queries_are_created_replaced_and_deleted() {
        let mut f = Fixture::new();
        let q = pq(1, "geo-db", "db");
        let id = q.id.clone();
        assert_eq!(f.ok(Command::QueryCreate(q)), Outcome::Query(id.clone()));
        let created = f.c.query(&id).unwrap().clone();
        assert_eq!(created.create_index, created.modify_index);
        assert_eq!(f.c.indexes().queries, created.create_index);
        // An update replaces the whole definition and keeps CreateIndex.
        let mut changed = pq(1, "geo-db", "db2");
        changed.service.only_passing = true;
        f.ok(Command::QueryUpdate(changed));
        let now = f.c.query(&id).unwrap();
        assert_eq!(now.service.service, "db2");
        assert!(now.service.only_passing);
        assert_eq!(now.create_index, created.create_index);
        assert!(now.modify_index > created.modify_index);
        assert_eq!(f.c.indexes().queries, now.modify_index);
        // Renaming to its own name in another case is not a clash.
        f.ok(Command::QueryUpdate(pq(1, "GEO-DB", "db2")));
        assert_eq!(f.c.queries().count(), 1);
        // Readers: by ID, by name, rendered.
        assert_eq!(
            f.c.resolve_query("geo-db", "")
                .unwrap()
                .unwrap()
                .service
                .service,
            "db2"
        );
        assert_eq!(f.c.resolve_query("other", "").unwrap(), None);
        // Delete, then the ID is unknown to update and delete alike.
        let before = f.c.indexes().queries;
        assert_eq!(f.ok(Command::QueryDelete { id: id.clone() }), Outcome::Done);
        assert!(f.c.query(&id).is_none());
        assert!(f.c.indexes().queries > before);
        assert_eq!(
            f.at(T0, Command::QueryDelete { id: id.clone() }),
            Err(CatalogError::QueryNotFound(id.clone()))
        );
        assert_eq!(
            f.at(T0, Command::QueryUpdate(pq(1, "geo-db", "db"))),
            Err(CatalogError::QueryNotFound(id))
        );
    }

    #[test]
    fn prepared_query_names_and_ids_stay_unique() {
        let mut f = Fixture::new();
        f.ok(Command::QueryCreate(pq(1, "geo-db", "db")));
        f.ok(Command::QueryCreate(catch_all(2)));
        let snapshot = f.c.clone();
        let taken = [
            (
                Command::QueryCreate(pq(3, "Geo-DB", "x")),
                CatalogError::QueryNameTaken("Geo-DB".into()),
            ),
            (
                Command::QueryCreate(catch_all(4)),
                CatalogError::CatchAllTaken,
            ),
            (
                Command::QueryCreate(pq(1, "fresh", "x")),
                CatalogError::QueryIdTaken(query::uuid_v4([1; 16])),
            ),
            (
                // Another query cannot take the name by update either.
                Command::QueryUpdate({
                    let mut q = catch_all(2);
                    q.name = "geo-db".into();
                    q
                }),
                CatalogError::QueryNameTaken("geo-db".into()),
            ),
            (
                Command::QueryCreate(PreparedQuery {
                    id: "not-a-uuid".into(),
                    ..pq(5, "x", "x")
                }),
                CatalogError::BadQueryId("not-a-uuid".into()),
            ),
            (
                Command::QueryCreate(PreparedQuery {
                    id: String::new(),
                    ..pq(5, "x", "x")
                }),
                CatalogError::InvalidQuery(QueryError::MissingId),
            ),
            (
                Command::QueryCreate(pq(5, "x", "")),
                CatalogError::InvalidQuery(QueryError::MissingService),
            ),
            (
                Command::QueryCreate(PreparedQuery {
                    session: "ghost".into(),
                    ..pq(5, "y", "y")
                }),
                CatalogError::InvalidSession("ghost".into()),
            ),
        ];
        for (cmd, want) in taken {
            assert_eq!(f.at(T0, cmd), Err(want.clone()), "{want}");
        }
        assert_eq!(
            CatalogError::QueryNameTaken("geo-db".into()).to_string(),
            "name 'geo-db' aliases an existing query name"
        );
        // Refusals change no table.
        assert_eq!(f.c.indexes(), snapshot.indexes());
        assert_eq!(
            f.c.queries().collect::<Vec<_>>(),
            snapshot.queries().collect::<Vec<_>>()
        );
        // The catch-all may be updated in place; the name is free again
        // once its holder is gone.
        f.ok(Command::QueryUpdate(catch_all(2)));
        f.ok(Command::QueryDelete {
            id: query::uuid_v4([1; 16]),
        });
        f.ok(Command::QueryCreate(pq(3, "Geo-DB", "x")));
        // Non-template anonymous queries (bound to sessions) may be many.
        f.session("s", Behavior::Release, Duration::ZERO);
        for seed in [6, 7] {
            f.ok(Command::QueryCreate(PreparedQuery {
                session: "s".into(),
                ..pq(seed, "", "db")
            }));
        }
        assert_eq!(f.c.queries().count(), 4);
    }

    #[test]
    fn a_query_goes_with_its_session() {
        let mut f = Fixture::new();
        f.session("s1", Behavior::Release, Duration::ZERO);
        f.session("s2", Behavior::Release, Duration::ZERO);
        let bound = |seed, session: &str| PreparedQuery {
            session: session.into(),
            ..pq(seed, "", "db")
        };
        f.ok(Command::QueryCreate(bound(1, "s1")));
        f.ok(Command::QueryCreate(bound(2, "s2")));
        f.ok(Command::QueryCreate(pq(3, "free", "db")));
        let before = f.c.indexes().queries;
        f.ok(Command::SessionDestroy { id: "s1".into() });
        assert!(f.c.query(&query::uuid_v4([1; 16])).is_none());
        assert!(f.c.query(&query::uuid_v4([2; 16])).is_some());
        assert!(f.c.indexes().queries > before);
        // Invalidation by a critical check counts the same.
        f.ok(Command::UpdateCheck {
            node: "n1".into(),
            id: SERF_HEALTH.into(),
            status: Health::Critical,
            output: String::new(),
        });
        assert!(f.c.session("s2").is_none());
        assert!(f.c.query(&query::uuid_v4([2; 16])).is_none());
        assert_eq!(
            f.c.queries().map(|q| q.name.as_str()).collect::<Vec<_>>(),
            ["free"],
            "queries without a session stay"
        );
        // Ending a session with no queries leaves the index alone.
        f.ok(Command::UpdateCheck {
            node: "n1".into(),
            id: SERF_HEALTH.into(),
            status: Health::Passing,
            output: String::new(),
        });
        f.session("s3", Behavior::Release, Duration::ZERO);
        let before = f.c.indexes().queries;
        f.ok(Command::SessionDestroy { id: "s3".into() });
        assert_eq!(f.c.indexes().queries, before);
    }

    #[test]
    fn templates_resolve_through_the_catalog() {
        let mut f = Fixture::new();
        let mut t = PreparedQuery::from_json(&serde_json::json!({
            "Name": "geo-",
            "Template": {"Type": "name_prefix_match", "Regexp": "^geo-(.+)$"},
            "Service": {"Service": "${match(1)}", "Tags": ["${agent.segment}"]},
        }))
        .unwrap();
        t.id = query::uuid_v4([1; 16]);
        f.ok(Command::QueryCreate(t.clone()));
        let r = f.c.resolve_query("geo-web", "lan2").unwrap().unwrap();
        assert_eq!(
            (r.service.service.as_str(), r.service.tags.as_slice()),
            ("web", &["lan2".to_string()][..])
        );
        assert_eq!(
            f.c.query(&t.id).unwrap().service.service,
            "${match(1)}",
            "stored unrendered"
        );
        assert_eq!(f.c.resolve_query(&t.id, ""), Err(QueryError::TemplateById));
    }

    #[test]
    fn the_state_round_trips_through_a_snapshot() {
        let mut f = Fixture::new();
        f.session("s", Behavior::Delete, Duration::from_secs(5));
        f.ok(acquire("k", "v", "s"));
        f.ok(Command::QueryCreate(pq(1, "geo-db", "db")));
        f.ok(Command::QueryCreate(catch_all(2)));
        assert_eq!(f.c.queries().count(), 2);
        // postcard: the map keys are tuples, which JSON cannot carry.
        let bytes = postcard::to_allocvec(&f.c).unwrap();
        let back: Catalog = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, f.c);
    }
}
