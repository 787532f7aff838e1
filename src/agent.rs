//! The agent process: the UDP gossip driver around [`crate::gossip`] and
//! the HTTP API in Consul's shapes: coordinate and membership endpoints
//! ([`http`]), agent services and checks ([`services`]) on every agent;
//! KV, sessions, catalog/health and status ([`kv`], [`session`],
//! [`catalog_api`], [`status`]) on servers, reached from any agent through
//! [`forward`]. A server agent also bootstraps and manages the Raft group
//! (`autopilot`) and, while leader, times sessions and drives `serfHealth`.
//! Every agent may also serve Consul's DNS names ([`dns`]), answered
//! through its own HTTP API.
//!
//! One tokio task owns the UDP socket and the timer queue and calls the
//! sans-IO [`Gossip`] core with the real clock; the HTTP handlers read the
//! core's state under a mutex. Datagrams can be delayed or dropped per
//! destination in user space ([`link::LinkEmulator`]) to emulate a
//! topology on loopback.

pub mod browser;
pub mod catalog_api;
pub mod dns;
pub mod federation;
pub mod forward;
pub mod http;
pub mod kv;
pub mod link;
pub mod query_api;
pub mod rtt;
pub mod services;
pub mod session;
pub mod status;
pub mod watch;
pub mod wire;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use foca::Timer;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use crate::gossip::{Event, Gossip, GossipConfig, Id, Output, ServerTag};
use link::LinkEmulator;

/// What can go wrong starting or driving an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A socket could not be set up.
    #[error("{what} {addr}: {source}")]
    Bind {
        /// Which socket.
        what: &'static str,
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The gossip core refused its configuration.
    #[error(transparent)]
    Gossip(#[from] crate::gossip::GossipError),
    /// The agent has stopped.
    #[error("the agent has stopped")]
    Stopped,
    /// The embedded server did not start.
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
    /// WAN operations on an agent that is not a server.
    #[error("this agent is in no WAN pool: only servers are")]
    NoWan,
    /// The DNS interface did not start.
    #[error(transparent)]
    Dns(#[from] dns::DnsError),
}

/// How to run an agent (Consul's flag names in parentheses).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Node name (`-node`).
    pub node: String,
    /// Datacenter (`-datacenter`).
    pub datacenter: String,
    /// Gossip UDP address (`-bind` and `-serf-lan-port`).
    pub bind: SocketAddr,
    /// Address announced to peers (`-advertise`); default: the bound one.
    pub advertise: Option<SocketAddr>,
    /// HTTP address (`-client` and `-http-port`).
    pub http: SocketAddr,
    /// Seeds joined at start (`-join`).
    pub join: Vec<SocketAddr>,
    /// Seeds retried until one answers (`-retry-join`).
    pub retry_join: Vec<SocketAddr>,
    /// How often a member is probed (LAN: 1 s). Other SWIM timings scale
    /// with it.
    pub probe_interval: Duration,
    /// Expected cluster size, for SWIM's suspicion and fan-out.
    pub cluster_size: u32,
    /// Seed of the core's randomness.
    pub seed: u64,
    /// Optional user-space link emulation of outgoing datagrams.
    pub link: Option<Arc<LinkEmulator>>,
    /// Run a registry server in this agent (`-server`, and `-dev`).
    pub server: Option<crate::server::ServerConfig>,
    /// Initialize a new single-server group at start (`-bootstrap`, or
    /// `-bootstrap-expect 1`, and `-dev`).
    pub bootstrap: bool,
    /// Servers expected before the group is initialized
    /// (`-bootstrap-expect N`): once gossip shows this many servers and
    /// none of them belongs to a group yet, the one with the lowest node
    /// name initializes the group with all of them; the others wait to be
    /// added. 0: never bootstrap (join an existing group).
    pub bootstrap_expect: u32,
    /// The shortest session TTL (Consul's `session_ttl_min`, 10 s).
    pub session_ttl_min: Duration,
    /// The shortest `DeregisterCriticalServiceAfter` honoured (Consul: 1
    /// minute; tests lower it).
    pub deregister_critical_min: Duration,
    /// The WAN gossip pool a server joins (`-serf-wan-port`, `-join-wan`);
    /// `None` on client agents.
    pub wan: Option<WanConfig>,
    /// The DNS interface (`-dns-port`, 8600); `None`: off.
    pub dns: Option<dns::DnsConfig>,
}

/// A server's WAN gossip pool: the servers of every datacenter, named
/// `<node>.<datacenter>` as in Consul, probing each other at WAN timings.
/// Their coordinates are the WAN coordinates (never mixed with LAN ones)
/// that order datacenters by distance.
#[derive(Debug, Clone)]
pub struct WanConfig {
    /// WAN gossip UDP address (`-bind` and `-serf-wan-port`, 8302).
    pub bind: SocketAddr,
    /// Address announced to the other datacenters (`-advertise-wan`).
    pub advertise: Option<SocketAddr>,
    /// Seeds joined at start (`-join-wan`).
    pub join: Vec<SocketAddr>,
    /// Seeds retried until one answers (`-retry-join-wan`).
    pub retry_join: Vec<SocketAddr>,
    /// How often a WAN member is probed (Consul's WAN pool: 5 s).
    pub probe_interval: Duration,
}

impl WanConfig {
    /// Consul's WAN defaults on `bind`.
    pub fn new(bind: SocketAddr) -> Self {
        WanConfig {
            bind,
            advertise: None,
            join: Vec::new(),
            retry_join: Vec::new(),
            probe_interval: Duration::from_secs(5),
        }
    }
}

impl AgentConfig {
    /// A development agent: node `name`, datacenter `dc1`, gossip and HTTP
    /// on ephemeral loopback ports.
    pub fn dev(name: &str) -> Self {
        AgentConfig {
            node: name.to_string(),
            datacenter: "dc1".into(),
            bind: "127.0.0.1:0".parse().expect("literal"),
            advertise: None,
            http: "127.0.0.1:0".parse().expect("literal"),
            join: Vec::new(),
            retry_join: Vec::new(),
            probe_interval: Duration::from_secs(1),
            cluster_size: 16,
            seed: 1,
            link: None,
            server: None,
            bootstrap: false,
            bootstrap_expect: 0,
            session_ttl_min: session::DEFAULT_TTL_MIN,
            deregister_critical_min: services::DEREGISTER_CRITICAL_MIN,
            wan: None,
            dns: None,
        }
    }

    /// The gossip core's configuration for a pool probing every
    /// `probe_interval` (the LAN's, or the WAN's).
    fn gossip_config(&self, probe_interval: Duration) -> GossipConfig {
        let mut g = GossipConfig::lan(self.cluster_size);
        // foca's LAN defaults assume a 1 s probe period; scale them all.
        let k = probe_interval.as_secs_f64();
        let scale = |d: Duration| Duration::from_secs_f64(d.as_secs_f64() * k);
        g.foca.probe_period = probe_interval;
        g.foca.probe_rtt = probe_interval / 2;
        g.foca.suspect_to_down_after = scale(g.foca.suspect_to_down_after);
        g.foca.remove_down_after = g.foca.remove_down_after.map(scale);
        for p in [
            &mut g.foca.periodic_announce,
            &mut g.foca.periodic_announce_to_down_members,
            &mut g.foca.periodic_gossip,
        ]
        .into_iter()
        .flatten()
        {
            p.frequency = scale(p.frequency);
        }
        // Versions of our coordinate publications continue from the wall
        // clock, so a restarted agent's are newer than its last life's.
        g.tomography = Some(crate::tomography::TomographyConfig::default());
        g.epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        g
    }
}

/// Requests from the HTTP side (or the embedding program) to a driver.
#[derive(Debug)]
enum Command {
    Join(SocketAddr, oneshot::Sender<()>),
    Leave(oneshot::Sender<()>),
}

/// Which gossip pool: every agent is in its datacenter's LAN pool;
/// servers are also in the WAN pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// The datacenter's pool.
    Lan,
    /// The servers of every datacenter.
    Wan,
}

/// A server's WAN pool as the HTTP side sees it.
pub struct Wan {
    /// The WAN gossip core (members named `<node>.<datacenter>`).
    pub gossip: Mutex<Gossip>,
    /// The WAN gossip address the other datacenters use.
    pub addr: SocketAddr,
    commands: mpsc::Sender<Command>,
}

/// Splits a WAN member name `<node>.<datacenter>` (datacenter names
/// hold no dot).
pub fn split_wan_name(name: &str) -> Option<(&str, &str)> {
    name.rsplit_once('.')
}

/// State shared between the driver and the HTTP handlers.
pub struct Shared {
    /// The gossip core.
    pub gossip: Mutex<Gossip>,
    /// Raises on every membership change and coordinate-table change;
    /// served as `X-Consul-Index` (never 0) by the agent's own endpoints.
    pub index: AtomicU64,
    /// Wakes blocking queries on those endpoints when `index` moves.
    pub changed: tokio::sync::Notify,
    /// Node name.
    pub node: String,
    /// Datacenter.
    pub datacenter: String,
    /// The gossip address peers use.
    pub gossip_addr: SocketAddr,
    /// When the agent started.
    pub started: Instant,
    /// The link emulator, when datagrams are delayed in user space.
    pub link: Option<Arc<LinkEmulator>>,
    /// Raised once the agent has left (`PUT /v1/agent/leave`): Consul's
    /// agent then shuts down, and `tomo agent` does too.
    pub left: tokio::sync::Notify,
    /// The WAN pool, on servers.
    pub wan: Option<Wan>,
    commands: mpsc::Sender<Command>,
}

impl Shared {
    /// Moves `index` and wakes the blocking queries waiting on it.
    pub fn bump(&self) {
        self.index.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    /// Every LAN coordinate this agent knows, by node, its own included
    /// even before it has published one (a lone agent never does): what
    /// `?near=`, prepared queries and DNS sort by.
    pub fn lan_coordinates(&self) -> HashMap<String, crate::vivaldi::Coordinate> {
        let g = self.gossip.lock().expect("not poisoned");
        let mut all: HashMap<String, crate::vivaldi::Coordinate> = g
            .table()
            .map(|(n, e)| (n.to_string(), e.coordinate.clone()))
            .collect();
        all.entry(self.node.clone())
            .or_insert_with(|| g.engine().coordinate().clone());
        all
    }

    /// The gossip core of `pool` (`None`: the WAN pool of a client).
    pub fn pool(&self, pool: Pool) -> Option<&Mutex<Gossip>> {
        match pool {
            Pool::Lan => Some(&self.gossip),
            Pool::Wan => self.wan.as_ref().map(|w| &w.gossip),
        }
    }

    async fn command(
        &self,
        pool: Pool,
        c: impl FnOnce(oneshot::Sender<()>) -> Command,
    ) -> Result<(), AgentError> {
        let commands = match pool {
            Pool::Lan => &self.commands,
            Pool::Wan => &self.wan.as_ref().ok_or(AgentError::NoWan)?.commands,
        };
        let (tx, rx) = oneshot::channel();
        commands
            .send(c(tx))
            .await
            .map_err(|_| AgentError::Stopped)?;
        rx.await.map_err(|_| AgentError::Stopped)
    }

    /// Joins `pool` through `addr` (`PUT /v1/agent/join/:address`, with
    /// `?wan` the WAN pool).
    pub async fn join(&self, pool: Pool, addr: SocketAddr) -> Result<(), AgentError> {
        self.command(pool, |tx| Command::Join(addr, tx)).await
    }

    /// Leaves the cluster gracefully (`PUT /v1/agent/leave`): the WAN pool
    /// first (a server), then the LAN pool.
    pub async fn leave(&self) -> Result<(), AgentError> {
        if self.wan.is_some() {
            self.command(Pool::Wan, Command::Leave).await?;
        }
        self.command(Pool::Lan, Command::Leave).await?;
        // A permit is stored if nobody waits yet.
        self.left.notify_one();
        Ok(())
    }
}

/// A running agent.
pub struct Agent {
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    /// Where gossip listens.
    pub gossip_addr: SocketAddr,
    /// Where the DNS interface listens (UDP and TCP), if it runs.
    pub dns_addr: Option<SocketAddr>,
    /// The DNS interface; it stops with the agent.
    dns: Option<dns::DnsServer>,
    /// State shared with the HTTP API.
    pub shared: Arc<Shared>,
    driver: tokio::task::JoinHandle<()>,
    server: tokio::task::JoinHandle<()>,
    /// The registry server this agent runs, if any.
    pub registry: Option<Arc<crate::server::Server>>,
    /// Self-registration, checks, and on servers bootstrap, membership
    /// and the leader's duties.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The gossip address announced: `-advertise` (its port 0 meaning the
/// port the socket got, as with `-serf-lan-port 0`), else the bound one.
fn advertised(advertise: Option<SocketAddr>, local: SocketAddr) -> SocketAddr {
    match advertise {
        Some(a) if a.port() == 0 => SocketAddr::new(a.ip(), local.port()),
        Some(a) => a,
        None => local,
    }
}

impl Agent {
    /// Binds the sockets and starts the gossip driver and the HTTP server.
    pub async fn start(cfg: AgentConfig) -> Result<Agent, AgentError> {
        let sock = bind_udp(cfg.bind)?;
        let local = sock.local_addr().map_err(|e| AgentError::Bind {
            what: "gossip",
            addr: cfg.bind,
            source: e,
        })?;
        let gossip_addr = advertised(cfg.advertise, local);
        // The server starts first: gossip tells the others its Raft ID and
        // RPC port.
        let registry = match cfg.server.clone() {
            Some(sc) => Some(Arc::new(crate::server::Server::start(sc).await?)),
            None => None,
        };
        let tag = registry.as_ref().map(|r| ServerTag {
            raft_id: r.id,
            rpc_port: r.rpc_addr.port(),
        });
        let id = Id {
            name: cfg.node.clone(),
            addr: gossip_addr,
            bump: 0,
            server: tag,
        };
        let gossip = Gossip::new(id, cfg.gossip_config(cfg.probe_interval), cfg.seed)?;
        let (tx, rx) = mpsc::channel(16);
        // Servers also join the WAN pool, under `<node>.<datacenter>`.
        let mut wan_driver = None;
        let wan = match (&cfg.wan, tag) {
            (Some(w), Some(_)) => {
                let sock = bind_udp(w.bind)?;
                let local = sock.local_addr().map_err(|e| AgentError::Bind {
                    what: "WAN gossip",
                    addr: w.bind,
                    source: e,
                })?;
                let addr = advertised(w.advertise, local);
                let id = Id {
                    name: format!("{}.{}", cfg.node, cfg.datacenter),
                    addr,
                    bump: 0,
                    server: tag,
                };
                let gossip =
                    Gossip::new(id, cfg.gossip_config(w.probe_interval), cfg.seed ^ 0x57a4)?;
                let (tx, rx) = mpsc::channel(16);
                wan_driver = Some((sock, rx));
                Some(Wan {
                    gossip: Mutex::new(gossip),
                    addr,
                    commands: tx,
                })
            }
            _ => None,
        };
        let shared = Arc::new(Shared {
            gossip: Mutex::new(gossip),
            index: AtomicU64::new(1),
            node: cfg.node.clone(),
            datacenter: cfg.datacenter.clone(),
            gossip_addr,
            started: Instant::now(),
            link: cfg.link.clone(),
            commands: tx,
            left: tokio::sync::Notify::new(),
            changed: tokio::sync::Notify::new(),
            wan,
        });
        let listener =
            tokio::net::TcpListener::bind(cfg.http)
                .await
                .map_err(|e| AgentError::Bind {
                    what: "http",
                    addr: cfg.http,
                    source: e,
                })?;
        let http_addr = listener.local_addr().map_err(|e| AgentError::Bind {
            what: "http",
            addr: cfg.http,
            source: e,
        })?;
        // Bound now, before any task starts, so a taken port fails cleanly.
        let dns_bound = match &cfg.dns {
            Some(d) => Some((dns::bind(d.bind).await?, d.clone())),
            None => None,
        };
        let fwd = forward::Forwarder::new(shared.clone(), registry.clone());
        let local = services::AgentServices::new(
            fwd.clone(),
            cfg.node.clone(),
            cfg.datacenter.clone(),
            cfg.deregister_critical_min,
        );
        let mut app = http::router(shared.clone())
            .merge(services::router(local.clone()))
            .merge(rtt::router(fwd.clone()));
        let mut tasks = Vec::new();
        if let Some(server) = registry.clone() {
            if cfg.bootstrap && !server.is_initialized().await {
                let me = std::collections::BTreeMap::from([(server.id, server.rpc_addr)]);
                // A group that already exists (a restart) says so: fine.
                let _ = server.initialize(me).await;
            }
            app = app.merge(kv::router(server.clone()));
            app = app.merge(status::router(server.clone(), shared.clone()));
            app = app.merge(catalog_api::router(server.clone(), shared.clone()));
            let sessions =
                session::Sessions::new(server.clone(), cfg.node.clone(), cfg.session_ttl_min);
            app = app.merge(session::router(sessions.clone()));
            app = app.merge(federation::router(shared.clone()));
            app = app.merge(query_api::router(
                server.clone(),
                shared.clone(),
                fwd.clone(),
            ));
            app = app.layer(axum::middleware::from_fn_with_state(
                fwd.clone(),
                forward::dispatch,
            ));
            app = app.layer(axum::middleware::from_fn_with_state(
                fwd.clone(),
                federation::route_dc,
            ));
            // Requests other agents forward run through the same routes.
            server.set_http_handler(forward::handler(app.clone()));
            tasks.push(tokio::spawn(autopilot(
                shared.clone(),
                server.clone(),
                cfg.bootstrap_expect,
            )));
            tasks.push(tokio::spawn(leader_duties(
                shared.clone(),
                server.clone(),
                sessions,
            )));
        } else {
            // A client agent: every registry request goes to a server.
            let f = fwd.clone();
            app = app
                .fallback(move |req: axum::extract::Request| {
                    forward::forward_all(axum::extract::State(f.clone()), req)
                })
                .layer(axum::middleware::from_fn_with_state(
                    fwd.clone(),
                    federation::route_dc,
                ));
        }
        tasks.push(tokio::spawn(register_self(
            fwd.clone(),
            local,
            cfg.node.clone(),
            cfg.datacenter.clone(),
            gossip_addr,
        )));
        // DNS answers through the finished router: forwarding, `?dc=` and
        // prepared queries as over HTTP.
        let dns = dns_bound.map(|(b, d)| b.serve(d, shared.clone(), app.clone()));
        let dns_addr = dns.as_ref().map(dns::DnsServer::addr);
        let server = tokio::spawn(async move {
            use axum::serve::ListenerExt;
            // Small answers go out at once (no Nagle delay behind the
            // client's delayed ACK).
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            // Handlers may read the caller's address (a prepared query's
            // `Near: "_ip"`).
            let app = app
                .layer(axum::middleware::from_fn(browser::refuse_cross_site))
                .into_make_service_with_connect_info::<SocketAddr>();
            let _ = axum::serve(listener, app).await;
        });
        if let (Some((sock, rx)), Some(w)) = (wan_driver, &cfg.wan) {
            let pool = Driven {
                pool: Pool::Wan,
                seeds: w.join.iter().chain(&w.retry_join).copied().collect(),
                probe_interval: w.probe_interval,
                link: cfg.link.clone(),
            };
            tasks.push(tokio::spawn(drive(
                Arc::new(sock),
                shared.clone(),
                pool,
                rx,
            )));
        }
        let pool = Driven {
            pool: Pool::Lan,
            seeds: cfg.join.iter().chain(&cfg.retry_join).copied().collect(),
            probe_interval: cfg.probe_interval,
            link: cfg.link.clone(),
        };
        let driver = tokio::spawn(drive(Arc::new(sock), shared.clone(), pool, rx));
        Ok(Agent {
            http_addr,
            gossip_addr,
            dns_addr,
            dns,
            shared,
            driver,
            server,
            registry,
            tasks,
        })
    }

    /// Leaves the cluster and stops.
    pub async fn shutdown(mut self) {
        if let Some(d) = self.dns.take() {
            d.shutdown().await;
        }
        self.step_down().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.shared.leave()).await;
        // Let the leave datagrams go out before the socket closes.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.driver.abort();
        self.server.abort();
        for t in &self.tasks {
            t.abort();
        }
        if let Some(r) = &self.registry {
            r.stop().await;
        }
    }

    /// A server that leaves gracefully first takes itself out of the Raft
    /// group (a leader directly, a follower by asking the leader), so the
    /// group's size, and its quorum, shrinks with it and a leader's
    /// successor is elected at once. The leader also removes servers that
    /// gossip says left (one that could not ask).
    pub async fn step_down(&self) {
        let Some(r) = &self.registry else { return };
        if r.configuration().0.len() <= 1 {
            return;
        }
        let done = Duration::from_secs(5);
        if r.is_leader() {
            let _ = tokio::time::timeout(done, r.remove(r.id)).await;
        } else {
            let _ = tokio::time::timeout(done, forward::leave_group(r, r.id)).await;
        }
    }

    /// Stops without leaving (as a crash would).
    pub fn abort(self) {
        self.driver.abort();
        self.server.abort();
        for t in &self.tasks {
            t.abort();
        }
        if let Some(r) = self.registry {
            // Without a runtime to wait on: the listener stops now, Raft's
            // tasks with the runtime.
            r.abort_rpc();
        }
    }
}

/// Registers this agent's node and its `serfHealth` check in the catalog
/// once a server answers (what Consul's anti-entropy does, so that
/// sessions can name the node), then every second runs the agent's due
/// checks and retries what failed to reach the catalog.
async fn register_self(
    fwd: Arc<forward::Forwarder>,
    local: Arc<services::AgentServices>,
    node: String,
    datacenter: String,
    addr: SocketAddr,
) {
    use crate::catalog::{Check, Command, Health, SERF_HEALTH};
    let cmds = [
        Command::RegisterNode {
            name: node.clone(),
            address: addr.ip().to_string(),
            datacenter,
            meta: Default::default(),
            id: String::new(),
            tagged_addresses: Default::default(),
        },
        Command::RegisterCheck {
            node,
            check: Check {
                id: SERF_HEALTH.into(),
                name: "Serf Health Status".into(),
                status: Health::Passing,
                output: "Agent alive and reachable".into(),
                notes: String::new(),
                service_id: String::new(),
                create_index: 0,
                modify_index: 0,
            },
        },
    ];
    for cmd in cmds {
        while fwd.write(wire::request(cmd.clone())).await.is_err() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        local.tick(Instant::now()).await;
    }
}

/// What only the leader does, every second: expire session TTLs (taking
/// over the sessions a previous leader timed) and drive `serfHealth` from
/// gossip.
async fn leader_duties(
    shared: Arc<Shared>,
    server: Arc<crate::server::Server>,
    sessions: Arc<session::Sessions>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut was_leader = false;
    loop {
        tick.tick().await;
        let leader = server.is_leader();
        if !leader {
            if was_leader {
                sessions.forget();
            }
            was_leader = false;
            continue;
        }
        if !was_leader {
            if sessions.adopt().await.is_err() {
                // Not confirmed as leader yet: try again next tick.
                continue;
            }
            was_leader = true;
        }
        sessions.expire(Instant::now()).await;
        sync_serf_health(&shared, &server).await;
    }
}

/// Bootstrap and membership of the Raft group, every second: with
/// `-bootstrap-expect N`, initialize the group once N servers are in
/// gossip and none is in a group yet (the lowest node name does it); on
/// the leader, add servers gossip shows that are in no group yet, and
/// remove those that left gracefully (Consul's autopilot, without
/// dead-server cleanup: a failed server stays a member until removed by
/// hand). A removed server that comes back with its old data is not
/// added again: it must start with an empty data dir.
async fn autopilot(shared: Arc<Shared>, server: Arc<crate::server::Server>, expect: u32) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        // (name, raft id, rpc address, alive, left) of every server member.
        let others: Vec<(String, u64, SocketAddr, bool, bool)> = {
            let g = shared.gossip.lock().expect("not poisoned");
            g.membership_iter()
                .filter_map(|(id, st)| {
                    let t = id.server?;
                    Some((
                        id.name.clone(),
                        t.raft_id,
                        id.rpc_addr()?,
                        st != foca::State::Down,
                        st == foca::State::Down && g.has_left(&id.name),
                    ))
                })
                .collect()
        };
        if expect > 1 && !server.is_initialized().await {
            let alive: Vec<&(String, u64, SocketAddr, bool, bool)> =
                others.iter().filter(|o| o.3).collect();
            let lowest = alive.iter().all(|o| shared.node < o.0);
            if alive.len() + 1 >= expect as usize && lowest {
                let mut any_in_group = false;
                for o in &alive {
                    // Unreachable counts as "maybe": do not risk a second
                    // group.
                    if server.pool().initialized(o.2).await.unwrap_or(true) {
                        any_in_group = true;
                    }
                }
                if !any_in_group {
                    let mut members: std::collections::BTreeMap<u64, SocketAddr> =
                        alive.iter().map(|o| (o.1, o.2)).collect();
                    members.insert(server.id, server.rpc_addr);
                    let _ = server.initialize(members).await;
                }
            }
            continue;
        }
        if !server.is_leader() {
            continue;
        }
        let (members, _) = server.configuration();
        for o in &others {
            let member = members.iter().any(|m| m.0 == o.1);
            // Only a server in no group yet is added: one that belongs
            // to another group (two `-dev` agents joined over gossip)
            // would have its log overwritten by ours.
            let learner = members.iter().any(|m| m.0 == o.1 && !m.2);
            if o.3 && !member && server.pool().initialized(o.2).await.ok() == Some(false) {
                let _ =
                    tokio::time::timeout(Duration::from_secs(30), server.add_voter(o.1, o.2)).await;
            } else if o.3 && learner {
                // An addition cut short (a timeout, a leader change) left
                // it a learner: promote it.
                let _ =
                    tokio::time::timeout(Duration::from_secs(30), server.add_voter(o.1, o.2)).await;
            } else if o.4 && member && o.1 != server.id {
                let _ = tokio::time::timeout(Duration::from_secs(10), server.remove(o.1)).await;
            }
        }
    }
}

/// Drives every catalog node's `serfHealth` check from gossip membership:
/// critical once the member is down (which invalidates its sessions, as
/// in Consul), passing while it is up. Nodes gossip does not know are
/// left alone.
async fn sync_serf_health(shared: &Shared, server: &crate::server::Server) {
    use crate::catalog::{Command, Health, SERF_HEALTH};
    let states: HashMap<String, bool> = {
        let g = shared.gossip.lock().expect("not poisoned");
        g.membership_iter()
            .map(|(id, st)| (id.name.clone(), st != foca::State::Down))
            .collect()
    };
    let changes: Vec<(String, Health)> = server.read(|c| {
        c.nodes()
            .filter_map(|n| {
                let check = c.node_checks(&n.name).find(|k| k.id == SERF_HEALTH)?;
                let up = if n.name == shared.node {
                    true
                } else {
                    *states.get(&n.name)?
                };
                let want = if up {
                    Health::Passing
                } else {
                    Health::Critical
                };
                (check.status != want).then(|| (n.name.clone(), want))
            })
            .collect()
    });
    for (node, status) in changes {
        let output = match status {
            Health::Passing => "Agent alive and reachable",
            _ => "Agent not live or unreachable",
        };
        let req = crate::raft::Request {
            now: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
            cmd: Command::UpdateCheck {
                node,
                id: SERF_HEALTH.into(),
                status,
                output: output.into(),
            },
        };
        let _ = server.write(req).await;
    }
}

/// A UDP socket with large buffers (socket2).
fn bind_udp(addr: SocketAddr) -> Result<UdpSocket, AgentError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |e| AgentError::Bind {
        what: "gossip",
        addr,
        source: e,
    };
    let s =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    // No SO_REUSEADDR: on UDP it lets two sockets share a port, and the
    // kernel may then hand an ephemeral port (bind to port 0) that another
    // such socket holds, so one pool's datagrams reach another's socket.
    // Bursts of gossip must not be lost to a small default buffer.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.set_nonblocking(true).map_err(err)?;
    s.bind(&addr.into()).map_err(err)?;
    UdpSocket::from_std(s.into()).map_err(err)
}

/// Timers ordered by deadline.
#[derive(Default)]
struct Timers {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    items: HashMap<u64, Timer<Id>>,
    seq: u64,
}

impl Timers {
    fn push(&mut self, at: Instant, t: Timer<Id>) {
        self.seq += 1;
        self.items.insert(self.seq, t);
        self.heap.push(Reverse((at, self.seq)));
    }

    fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    fn pop_due(&mut self, now: Instant) -> Option<Timer<Id>> {
        let Reverse((at, seq)) = *self.heap.peek()?;
        if at > now {
            return None;
        }
        self.heap.pop();
        self.items.remove(&seq)
    }
}

/// What one gossip driver drives.
struct Driven {
    pool: Pool,
    seeds: Vec<SocketAddr>,
    probe_interval: Duration,
    link: Option<Arc<LinkEmulator>>,
}

/// The gossip driver of one pool: socket, timers, commands.
async fn drive(
    sock: Arc<UdpSocket>,
    shared: Arc<Shared>,
    cfg: Driven,
    mut commands: mpsc::Receiver<Command>,
) {
    let Some(gossip) = shared.pool(cfg.pool) else {
        return;
    };
    let started = shared.started;
    let since = move || started.elapsed();
    let mut timers = Timers::default();
    let mut buf = vec![0u8; 65536];
    let seeds = &cfg.seeds;
    let mut retry = tokio::time::interval(cfg.probe_interval * 5);
    let mut table_version = 0;
    for s in seeds {
        let outs = gossip.lock().expect("not poisoned").announce(since(), *s);
        apply(&sock, &shared, cfg.link.as_ref(), &mut timers, outs);
    }
    loop {
        let next = timers
            .next()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                                let Ok((n, from)) = r else { continue };
                let received = Instant::now();
                let (mut outs, version) = {
                    let mut g = gossip.lock().expect("not poisoned");
                    let outs = g.handle_datagram(since(), from, &buf[..n]);
                    (outs, g.table_version())
                };
                if version != table_version {
                    table_version = version;
                    shared.bump();
                }
                // Replies carry how long we held the request, which the
                // prober subtracts from its RTT sample.
                let held = received.elapsed().as_micros().min(u32::MAX as u128) as u32;
                for o in &mut outs {
                    if let Output::Send { bytes, .. } = o {
                        crate::gossip::set_hold(bytes, held);
                    }
                }
                apply(&sock, &shared, cfg.link.as_ref(), &mut timers, outs);
            }
            _ = tokio::time::sleep_until(next.into()) => {
                let now = Instant::now();
                while let Some(t) = timers.pop_due(now) {
                    let outs = gossip.lock().expect("not poisoned").handle_timer(since(), t);
                    apply(&sock, &shared, cfg.link.as_ref(), &mut timers, outs);
                }
                // Our own publications happen on timers.
                let version = gossip.lock().expect("not poisoned").table_version();
                if version != table_version {
                    table_version = version;
                    shared.bump();
                }
            }
            _ = retry.tick() => {
                                // Keep knocking on the seeds while we know nobody: a seed
                // that was not up yet (or a healed partition) still joins.
                let alone = gossip.lock().expect("not poisoned").members().next().is_none();
                if alone {
                    for s in seeds {
                        let outs = gossip.lock().expect("not poisoned").announce(since(), *s);
                        apply(&sock, &shared, cfg.link.as_ref(), &mut timers, outs);
                    }
                }
            }
            c = commands.recv() => match c {
                Some(Command::Join(addr, done)) => {
                    let outs = gossip.lock().expect("not poisoned").announce(since(), addr);
                    apply(&sock, &shared, cfg.link.as_ref(), &mut timers, outs);
                    let _ = done.send(());
                }
                Some(Command::Leave(done)) => {
                    let outs = gossip.lock().expect("not poisoned").leave(since());
                    apply(&sock, &shared, cfg.link.as_ref(), &mut timers, outs);
                    let _ = done.send(());
                }
                None => return,
            },
        }
    }
}

/// Carries out the core's outputs: sends (through the link emulator),
/// arms timers, bumps the index on events.
fn apply(
    sock: &Arc<UdpSocket>,
    shared: &Shared,
    link: Option<&Arc<LinkEmulator>>,
    timers: &mut Timers,
    outs: Vec<Output>,
) {
    let mut changed = false;
    for o in outs {
        match o {
            Output::Send { to, bytes } => {
                let delay = match link {
                    Some(l) => l.delay_to(to),
                    None => Some(Duration::ZERO),
                };
                match delay {
                    None => {}
                    Some(d) if d.is_zero() => {
                        let _ = sock.try_send_to(&bytes, to);
                    }
                    Some(d) => {
                        let sock = sock.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(d).await;
                            let _ = sock.send_to(&bytes, to).await;
                        });
                    }
                }
            }
            Output::Timer { at, timer } => timers.push(shared.started + at, timer),
            Output::Event(Event::MemberUp(_) | Event::MemberDown(_) | Event::Rejoined(_)) => {
                changed = true
            }
            Output::Event(_) => {}
        }
    }
    if changed {
        shared.bump();
    }
}
