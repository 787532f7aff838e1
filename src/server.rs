//! A registry server: one member of the Raft group (openraft) that holds the
//! [`Catalog`](crate::catalog::Catalog), with the peer RPC on TCP (Consul's
//! server port, 8300 by default) and writes forwarded to the leader.
//!
//! Peer RPC frames are `[length u32 BE][kind u8][payload]`, one request and
//! one reply per frame, on connections kept open and pooled
//! ([`RpcPool`]). Raft's own requests are postcard (kind 2) and their
//! replies JSON, because openraft's error types only round-trip through
//! self-describing formats; HTTP requests forwarded from client agents and
//! followers (kind 1) are postcard both ways, so a 512 KiB KV value is not
//! blown up into a JSON array; forwarded writes and status checks are
//! JSON (kind 0).
//!
//! For the fault-injection harness (`tests/faults`) only: with
//! `TOMO_FAULT_BLOCK_FILE` set, a server refuses to send peer RPCs to the
//! addresses listed in that file ([`fault`]), which is how the harness
//! partitions servers without touching the host's network.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use openraft::error::{
    ClientWriteError, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, ChangeMembers, Raft, RaftMetrics, SnapshotPolicy, StorageError, Vote};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::catalog::Catalog;
use crate::raft::store::{self, StateMachine, StoreError};
use crate::raft::{Request, Response, TypeConfig};

/// Largest RPC frame accepted, bytes (a snapshot chunk or a batch of
/// entries with 512 KiB values, JSON-encoded).
const MAX_FRAME: usize = 256 << 20;

/// What can go wrong running a server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory's store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The RPC port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// openraft refused to start or to act.
    #[error("raft: {0}")]
    Raft(String),
    /// No leader is known (an election is under way, or no quorum).
    #[error("No cluster leader")]
    NoLeader,
    /// The leader could not be reached to forward a write.
    #[error("forwarding to the leader {addr}: {reason}")]
    Forward {
        /// The leader's RPC address.
        addr: String,
        /// Why.
        reason: String,
    },
}

/// A server's parameters.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Raft node ID (unique in the group, never reused).
    pub id: u64,
    /// Where the peer RPC listens (port 0: any).
    pub rpc: SocketAddr,
    /// Where the Raft store lives.
    pub data_dir: PathBuf,
    /// Leader heartbeat.
    pub heartbeat: Duration,
    /// Election timeout range.
    pub election_timeout: (Duration, Duration),
    /// Log entries applied since the last snapshot that trigger a new one
    /// (Consul's `raft_snapshot_threshold`).
    pub snapshot_threshold: u64,
    /// Log entries kept behind a snapshot for slow followers, so that they
    /// catch up from the log rather than a whole snapshot (Consul's
    /// `raft_trailing_logs`).
    pub trailing_logs: u64,
}

impl ServerConfig {
    /// LAN defaults: 100 ms heartbeats, elections after 300–600 ms of
    /// silence.
    pub fn new(id: u64, rpc: SocketAddr, data_dir: PathBuf) -> Self {
        ServerConfig {
            id,
            rpc,
            data_dir,
            heartbeat: Duration::from_millis(100),
            election_timeout: (Duration::from_millis(300), Duration::from_millis(600)),
            snapshot_threshold: 16384,
            trailing_logs: 10240,
        }
    }
}

/// A peer RPC.
#[derive(Debug, Serialize, Deserialize)]
enum Rpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// A write forwarded by a follower: committed as it is (a batch
    /// already, or a single write).
    Write(Request),
    /// A write forwarded by a client agent: batched with others.
    WriteBatched(Request),
    /// Whether the receiver belongs to a Raft group already (asked before
    /// bootstrapping, so a new server never starts a second group).
    Status,
}

/// Its reply.
#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Append(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    Snapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    Write(Result<Response, String>),
    Status { initialized: bool },
}

/// An HTTP request forwarded to a server: a client agent's registry
/// requests, or a follower's writes and reads for the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HttpCall {
    /// `GET`, `PUT`, …
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
    /// Sent by a server to its leader: answer it there, whatever the role
    /// (no further hop). Not a header, so no outside client can set it.
    pub last_hop: bool,
}

/// The answer to an [`HttpCall`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HttpAnswer {
    /// Status code.
    pub status: u16,
    /// Headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
}

/// What answers forwarded HTTP requests on a server: the agent's own
/// HTTP router.
pub type HttpHandler =
    Arc<dyn Fn(HttpCall) -> Pin<Box<dyn Future<Output = HttpAnswer> + Send>> + Send + Sync>;

/// Why a forwarded write did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// It was not applied (the connection was refused, or the server
    /// answered with an error): safe to send again.
    #[error("{0}")]
    NotApplied(String),
    /// The connection failed or timed out after the request went out: it
    /// may have been applied, so it must not be sent again.
    #[error("{0}")]
    Unknown(String),
}

/// Frame kinds.
const KIND_JSON: u8 = 0;
const KIND_HTTP: u8 = 1;
/// A Raft RPC in postcard (compact: a KV value is not a JSON array of
/// numbers), answered in JSON (openraft's errors need it).
const KIND_RAFT: u8 = 2;

async fn write_frame(s: &mut TcpStream, kind: u8, bytes: &[u8]) -> std::io::Result<()> {
    // One write: header and payload leave in one segment.
    let mut frame = Vec::with_capacity(bytes.len() + 5);
    frame.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    frame.push(kind);
    frame.extend_from_slice(bytes);
    s.write_all(&frame).await?;
    s.flush().await
}

async fn read_frame(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!("frame of {len} bytes")));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    Ok((head[4], buf))
}

fn to_json<T: Serialize>(v: &T) -> std::io::Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(std::io::Error::other)
}

fn from_json<T: for<'de> Deserialize<'de>>(b: &[u8]) -> std::io::Result<T> {
    serde_json::from_slice(b).map_err(std::io::Error::other)
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "RPC timed out")
}

pub mod fault {
    //! A partition hook for the fault-injection harness (`tests/faults`);
    //! nothing else uses it.
    //!
    //! If the environment variable `TOMO_FAULT_BLOCK_FILE` is set when the
    //! server process starts, the file it names lists peer RPC addresses
    //! (`host:port` as in `-server-port`, one per line; a missing or empty
    //! file blocks nothing) this process must not talk to: every outgoing
    //! peer RPC to one of them (Raft's append, vote and snapshot requests,
    //! and [`RpcPool`](super::RpcPool) calls: forwarded writes and HTTP
    //! requests, bootstrap checks) fails at once as if the connection had
    //! been refused, and the open connections to it are dropped when next
    //! used. The file is re-read at most every [`REREAD`], so the harness
    //! changes a partition by rewriting it (atomically, by rename).
    //!
    //! Only connections this process opens are cut: a peer not blocked
    //! here still reaches it and hears its replies on the peer's own
    //! connection. A symmetric partition is both sides' files naming each
    //! other; one side alone is a one-way (asymmetric) fault. Gossip (UDP)
    //! and the HTTP API are not affected.
    //!
    //! Unset, it costs one initialized `OnceLock` read per RPC.
    use std::collections::HashSet;
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::sync::{Mutex, OnceLock};
    use std::time::{Duration, Instant};

    /// The environment variable naming the block file.
    pub const ENV: &str = "TOMO_FAULT_BLOCK_FILE";
    /// How stale the blocked set may be.
    pub const REREAD: Duration = Duration::from_millis(50);

    struct Blocklist {
        path: PathBuf,
        /// When the file was last read, and what it said.
        state: Mutex<(Option<Instant>, HashSet<SocketAddr>)>,
    }

    static BLOCKLIST: OnceLock<Option<Blocklist>> = OnceLock::new();

    /// The block list, if the variable was set (read once per process).
    fn list() -> Option<&'static Blocklist> {
        BLOCKLIST
            .get_or_init(|| {
                std::env::var_os(ENV).map(|p| Blocklist {
                    path: PathBuf::from(p),
                    state: Mutex::new((None, HashSet::new())),
                })
            })
            .as_ref()
    }

    /// Whether peer RPCs to `addr` must fail now.
    pub fn blocked(addr: SocketAddr) -> bool {
        let Some(b) = list() else {
            return false;
        };
        // A poisoned lock only means a reader panicked: the set is whole.
        let mut state = b.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.0.is_none_or(|t| t.elapsed() >= REREAD) {
            // Tiny and usually in tmpfs: read in place, even on a runtime
            // thread. Unreadable (missing) blocks nothing.
            state.1 = std::fs::read_to_string(&b.path)
                .map(|text| {
                    text.lines()
                        .filter_map(|l| l.trim().parse::<SocketAddr>().ok())
                        .collect()
                })
                .unwrap_or_default();
            state.0 = Some(Instant::now());
        }
        state.1.contains(&addr)
    }

    /// Like [`blocked`], for an address kept as text (Raft's `BasicNode`);
    /// one that does not parse is never blocked.
    pub fn blocked_str(addr: &str) -> bool {
        list().is_some() && addr.parse().is_ok_and(blocked)
    }

    /// The error a blocked call fails with: refused, so callers treat it
    /// as "never sent" (safe to retry elsewhere) and openraft as
    /// unreachable.
    pub fn refused() -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "blocked by the fault-injection file",
        )
    }
}

/// A server that led before it stopped comes back as a follower of its
/// old term, not as its leader. openraft 0.9 restores a restarted leader
/// at once in the same term (`Engine::startup`), and this store lets
/// replication send entries before they are on disk; a leader killed
/// between the two would, back in the same term, write different entries
/// at indexes a follower already holds under the same (term, index), and
/// the follower would keep its own as a match (a log ID names the term
/// and the leader, which are the same). Lowering the saved vote from
/// committed to merely granted makes it win an election first, in a new
/// term. (Votes compare as before: only a candidate that already
/// outranks this vote gets this server's.)
async fn step_down_on_restart(log: &mut store::LogStore, id: u64) -> Result<(), ServerError> {
    use openraft::storage::RaftLogStorage;
    let raft_err = |e: StorageError<u64>| ServerError::Raft(e.to_string());
    if let Some(v) = log.read_vote().await.map_err(raft_err)?
        && v.committed
        && v.leader_id.voted_for() == Some(id)
    {
        let granted = Vote::new(v.leader_id.term, id);
        log.save_vote(&granted).await.map_err(raft_err)?;
    }
    Ok(())
}

/// Whether the Raft core behind `metrics` still runs: its task drops the
/// sender when it panics, and reports a fatal state when it stops
/// otherwise.
fn core_running(metrics: &tokio::sync::watch::Receiver<RaftMetrics<u64, BasicNode>>) -> bool {
    metrics.has_changed().is_ok() && metrics.borrow().running_state.is_ok()
}

/// Pooled connections to servers' RPC ports, for the calls that are not
/// Raft's own (forwarded writes and HTTP requests, bootstrap checks). A
/// connection is taken for one call and put back after a whole reply;
/// one that failed or timed out mid-call is dropped.
#[derive(Default)]
pub struct RpcPool {
    idle: Mutex<HashMap<SocketAddr, Vec<TcpStream>>>,
}

impl RpcPool {
    /// An empty pool.
    pub fn new() -> Arc<RpcPool> {
        Arc::new(RpcPool::default())
    }

    async fn call(
        &self,
        addr: SocketAddr,
        kind: u8,
        bytes: &[u8],
        ttl: Duration,
    ) -> std::io::Result<Vec<u8>> {
        if fault::blocked(addr) {
            // Partitioned by the fault harness: the pooled connections go
            // too, so a healed partition starts from fresh ones.
            self.idle.lock().expect("not poisoned").remove(&addr);
            return Err(fault::refused());
        }
        // A pooled connection the server closed meanwhile reads as EOF
        // now: drop it before anything is sent on it. (No call is ever
        // resent: a request that may have reached a server may have been
        // applied, and a write must not be applied twice.)
        let pooled = loop {
            let Some(s) = self
                .idle
                .lock()
                .expect("not poisoned")
                .get_mut(&addr)
                .and_then(|v| v.pop())
            else {
                break None;
            };
            let mut probe = [0u8; 1];
            match s.try_read(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Some(s),
                // Closed, failed, or stray bytes: not reusable.
                _ => continue,
            }
        };
        let attempt = async move {
            let mut s = match pooled {
                Some(s) => s,
                None => {
                    // Refused here means the request went nowhere: the
                    // one error a caller may retry elsewhere.
                    let s = TcpStream::connect(addr).await?;
                    s.set_nodelay(true)?;
                    s
                }
            };
            write_frame(&mut s, kind, bytes).await?;
            let (k, reply) = read_frame(&mut s).await?;
            if k != kind {
                return Err(std::io::Error::other("reply of another kind"));
            }
            Ok::<_, std::io::Error>((s, reply))
        };
        let r = tokio::time::timeout(ttl, attempt)
            .await
            .unwrap_or_else(|_| Err(timed_out()));
        let (s, reply) = r?;
        self.idle
            .lock()
            .expect("not poisoned")
            .entry(addr)
            .or_default()
            .push(s);
        Ok(reply)
    }

    /// Forwards an HTTP request to the server at `addr`.
    pub async fn http(
        &self,
        addr: SocketAddr,
        call: &HttpCall,
        ttl: Duration,
    ) -> std::io::Result<HttpAnswer> {
        let bytes = postcard::to_allocvec(call).map_err(std::io::Error::other)?;
        let reply = self.call(addr, KIND_HTTP, &bytes, ttl).await?;
        postcard::from_bytes(&reply).map_err(std::io::Error::other)
    }

    /// Has the server at `addr` commit `req` (it batches it with other
    /// writes and forwards to its leader).
    pub async fn write(&self, addr: SocketAddr, req: &Request) -> Result<Response, WriteError> {
        self.send_write(addr, Rpc::WriteBatched(req.clone())).await
    }

    async fn send_write(&self, addr: SocketAddr, rpc: Rpc) -> Result<Response, WriteError> {
        let bytes = to_json(&rpc).map_err(|e| WriteError::NotApplied(e.to_string()))?;
        let reply = self
            .call(addr, KIND_JSON, &bytes, Duration::from_secs(10))
            .await
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    WriteError::NotApplied(e.to_string())
                } else {
                    WriteError::Unknown(e.to_string())
                }
            })?;
        match from_json::<Reply>(&reply).map_err(|e| WriteError::Unknown(e.to_string()))? {
            // The server answered: an error means it did not apply it.
            Reply::Write(r) => r.map_err(WriteError::NotApplied),
            other => Err(WriteError::Unknown(format!("unexpected reply {other:?}"))),
        }
    }

    /// Whether the server at `addr` belongs to a Raft group.
    pub async fn initialized(&self, addr: SocketAddr) -> std::io::Result<bool> {
        let bytes = to_json(&Rpc::Status)?;
        let reply = self
            .call(addr, KIND_JSON, &bytes, Duration::from_secs(2))
            .await?;
        match from_json::<Reply>(&reply)? {
            Reply::Status { initialized } => Ok(initialized),
            _ => Err(std::io::Error::other("unexpected reply")),
        }
    }
}

/// A connection to one peer, opened on first use and reopened after an
/// error.
struct Peer {
    target: u64,
    addr: String,
    stream: Option<TcpStream>,
}

impl Peer {
    async fn call(&mut self, rpc: &Rpc, ttl: Duration) -> std::io::Result<Reply> {
        if fault::blocked_str(&self.addr) {
            // Partitioned by the fault harness (refused reads as
            // unreachable to openraft).
            self.stream = None;
            return Err(fault::refused());
        }
        // The connection is taken out for the call and put back only
        // after a whole reply. openraft wraps this future in a timeout of
        // its own (the same TTL) and drops it when that fires first: had
        // the connection stayed in `self.stream`, the next call would read
        // this call's late reply as its own, and a stale success would
        // count as a follower holding entries it may not have. Dropped
        // mid-call, the connection is closed with the future instead.
        let taken = self.stream.take();
        let addr = self.addr.clone();
        let r = tokio::time::timeout(ttl, async move {
            let mut s = match taken {
                Some(s) => s,
                None => {
                    let s = TcpStream::connect(&addr).await?;
                    s.set_nodelay(true)?;
                    s
                }
            };
            let bytes = postcard::to_allocvec(rpc).map_err(std::io::Error::other)?;
            write_frame(&mut s, KIND_RAFT, &bytes).await?;
            let (_, reply) = read_frame(&mut s).await?;
            Ok::<_, std::io::Error>((s, from_json(&reply)?))
        })
        .await
        .unwrap_or_else(|_| Err(timed_out()));
        // On an error the connection is gone: whatever state it was in,
        // it is not reused.
        let (s, reply) = r?;
        self.stream = Some(s);
        Ok(reply)
    }

    fn fail<E: std::error::Error>(&self, e: std::io::Error) -> RPCError<u64, BasicNode, E> {
        if matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::TimedOut
        ) {
            RPCError::Unreachable(Unreachable::new(&e))
        } else {
            RPCError::Network(NetworkError::new(&e))
        }
    }

    fn unexpected<E: std::error::Error>(&self) -> RPCError<u64, BasicNode, E> {
        RPCError::Network(NetworkError::new(&std::io::Error::other(format!(
            "node {} answered another RPC",
            self.target
        ))))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self.call(&Rpc::Append(rpc), option.hard_ttl()).await {
            Ok(Reply::Append(r)) => r.map_err(|e| RemoteError::new(self.target, e).into()),
            Ok(_) => Err(self.unexpected()),
            Err(e) => Err(self.fail(e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        match self.call(&Rpc::Snapshot(rpc), option.hard_ttl()).await {
            Ok(Reply::Snapshot(r)) => r.map_err(|e| RemoteError::new(self.target, e).into()),
            Ok(_) => Err(self.unexpected()),
            Err(e) => Err(self.fail(e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self.call(&Rpc::Vote(rpc), option.hard_ttl()).await {
            Ok(Reply::Vote(r)) => r.map_err(|e| RemoteError::new(self.target, e).into()),
            Ok(_) => Err(self.unexpected()),
            Err(e) => Err(self.fail(e)),
        }
    }
}

/// Makes [`Peer`]s.
struct Network;

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Peer {
        Peer {
            target,
            addr: node.addr.clone(),
            stream: None,
        }
    }
}

/// What the RPC listener shares with the server.
struct Ctx {
    raft: Raft<TypeConfig>,
    /// Writes, batched (forwarded ones included).
    batcher: Batcher,
    /// `?consistent` reads, sharing leadership checks.
    barrier: ReadBarrier,
    /// Answers forwarded HTTP requests, once the agent has set it.
    http: OnceLock<HttpHandler>,
    /// Milliseconds since `started` when a leader last reached us.
    last_contact_ms: AtomicU64,
    started: Instant,
}

/// A running server.
pub struct Server {
    /// Raft node ID.
    pub id: u64,
    /// Where the peer RPC listens.
    pub rpc_addr: SocketAddr,
    raft: Raft<TypeConfig>,
    sm: StateMachine,
    ctx: Arc<Ctx>,
    pool: Arc<RpcPool>,
    listener: JoinHandle<()>,
}

impl Server {
    /// Opens the store under `cfg.data_dir` (what a previous run left is
    /// kept), binds the RPC port and starts the Raft member. A new server
    /// waits to be initialized or added.
    pub async fn start(cfg: ServerConfig) -> Result<Server, ServerError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            ServerError::Store(StoreError::Corrupt {
                path: cfg.data_dir.display().to_string(),
                what: e.to_string(),
            })
        })?;
        let (mut log, sm) = store::open(&cfg.data_dir)?;
        step_down_on_restart(&mut log, cfg.id).await?;
        let listener = TcpListener::bind(cfg.rpc)
            .await
            .map_err(|source| ServerError::Bind {
                addr: cfg.rpc,
                source,
            })?;
        let rpc_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: cfg.rpc,
            source,
        })?;
        let config = openraft::Config {
            cluster_name: "tomo".into(),
            heartbeat_interval: cfg.heartbeat.as_millis() as u64,
            election_timeout_min: cfg.election_timeout.0.as_millis() as u64,
            election_timeout_max: cfg.election_timeout.1.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_threshold.max(1)),
            max_payload_entries: MAX_PAYLOAD_ENTRIES,
            max_in_snapshot_log_to_keep: cfg.trailing_logs,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ServerError::Raft(e.to_string()))?;
        let raft = Raft::new(cfg.id, Arc::new(config), Network, log, sm.clone())
            .await
            .map_err(|e| ServerError::Raft(e.to_string()))?;
        let pool = RpcPool::new();
        let batcher = Batcher::start(raft.clone(), pool.clone());
        let ctx = Arc::new(Ctx {
            barrier: ReadBarrier::start(raft.clone()),
            batcher,
            raft: raft.clone(),
            http: OnceLock::new(),
            last_contact_ms: AtomicU64::new(u64::MAX),
            started: Instant::now(),
        });
        let listener = tokio::spawn(serve(listener, ctx.clone()));
        Ok(Server {
            id: cfg.id,
            rpc_addr,
            raft,
            sm,
            ctx,
            pool,
            listener,
        })
    }

    /// Sets what answers HTTP requests forwarded to this server (once).
    pub fn set_http_handler(&self, h: HttpHandler) {
        let _ = self.ctx.http.set(h);
    }

    /// The pool this server forwards through.
    pub fn pool(&self) -> &Arc<RpcPool> {
        &self.pool
    }

    /// Initializes a new group with these members (ID → RPC address). Do it
    /// once, on one server (or on all with the same members).
    pub async fn initialize(&self, members: BTreeMap<u64, SocketAddr>) -> Result<(), ServerError> {
        let nodes: BTreeMap<u64, BasicNode> = members
            .into_iter()
            .map(|(id, addr)| (id, BasicNode::new(addr.to_string())))
            .collect();
        self.raft
            .initialize(nodes)
            .await
            .map_err(|e| ServerError::Raft(e.to_string()))
    }

    /// Whether this server belongs to a group (initialized, or added by a
    /// leader, in this run or a previous one).
    pub async fn is_initialized(&self) -> bool {
        self.raft.is_initialized().await.unwrap_or(true)
    }

    /// Adds a server to the group as a voter (leader only): first as a
    /// learner until it has caught up, then promoted.
    pub async fn add_voter(&self, id: u64, addr: SocketAddr) -> Result<(), ServerError> {
        self.raft
            .add_learner(id, BasicNode::new(addr.to_string()), true)
            .await
            .map_err(|e| ServerError::Raft(e.to_string()))?;
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| ServerError::Raft(e.to_string()))?;
        Ok(())
    }

    /// Removes a server from the group (leader only; Consul's
    /// `operator raft remove-peer` and a server's graceful leave).
    pub async fn remove(&self, id: u64) -> Result<(), ServerError> {
        let (members, _) = self.configuration();
        if !members.iter().any(|(m, _, _)| *m == id) {
            return Err(ServerError::Raft(format!("server {id} is not a member")));
        }
        self.raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
            .await
            .map_err(|e| ServerError::Raft(e.to_string()))?;
        // A learner left behind would still be replicated to.
        let _ = self
            .raft
            .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
            .await;
        Ok(())
    }

    /// The current leader's ID, if one is known.
    pub async fn leader(&self) -> Option<u64> {
        self.raft.current_leader().await
    }

    /// The current leader's ID and RPC address, from the latest metrics
    /// (no waiting).
    pub fn leader_addr(&self) -> Option<(u64, SocketAddr)> {
        // Borrowed, not cloned: every registry request asks.
        let metrics = self.raft.metrics();
        // A Raft core that stopped (a panic in it) leaves its last metrics
        // behind: it must not go on naming itself, or anyone, leader.
        if !core_running(&metrics) {
            return None;
        }
        let m = metrics.borrow();
        let id = m.current_leader?;
        let addr = m.membership_config.nodes().find(|(n, _)| **n == id)?.1;
        Some((id, addr.addr.parse().ok()?))
    }

    /// Whether this server is the leader now.
    pub fn is_leader(&self) -> bool {
        let metrics = self.raft.metrics();
        core_running(&metrics) && metrics.borrow().current_leader == Some(self.id)
    }

    /// Waits until the Raft core stops (on its own: a fatal error such as a
    /// panic in it or a storage failure; or by [`Server::stop`]) and says
    /// why. It never returns while the server runs; a process should
    /// exit then, so that its supervisor restarts it from its data dir
    /// rather than it going on answering as a member that no longer takes
    /// part.
    pub async fn failed(&self) -> String {
        let mut rx = self.raft.metrics();
        loop {
            if let Err(e) = &rx.borrow_and_update().running_state {
                return e.to_string();
            }
            if rx.changed().await.is_err() {
                // The core's task ended without a last report: it panicked.
                return "the Raft core panicked".to_string();
            }
        }
    }

    /// How long since a leader last reached this server (zero on the
    /// leader; `None` if never): Consul's `X-Consul-LastContact`.
    pub fn last_contact(&self) -> Option<Duration> {
        if self.is_leader() {
            return Some(Duration::ZERO);
        }
        let at = self.ctx.last_contact_ms.load(Ordering::Relaxed);
        if at == u64::MAX {
            return None;
        }
        let now = self.ctx.started.elapsed().as_millis() as u64;
        Some(Duration::from_millis(now.saturating_sub(at)))
    }

    /// The group as this server sees it: (ID, RPC address, voter) for every
    /// member, by ID, and the leader's ID.
    pub fn configuration(&self) -> (Vec<(u64, String, bool)>, Option<u64>) {
        let metrics = self.raft.metrics();
        let running = core_running(&metrics);
        let m = metrics.borrow().clone();
        let voters: BTreeSet<u64> = m.membership_config.voter_ids().collect();
        let members = m
            .membership_config
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone(), voters.contains(id)))
            .collect();
        // A stopped core's last metrics name a leader nobody follows.
        (members, m.current_leader.filter(|_| running))
    }

    /// The last log index covered by this server's latest snapshot, and
    /// the last one purged from its log (compaction), if any.
    pub fn snapshot_state(&self) -> (Option<u64>, Option<u64>) {
        let m = self.raft.metrics().borrow().clone();
        (m.snapshot.map(|l| l.index), m.purged.map(|l| l.index))
    }

    /// The last log index applied to this server's catalog.
    pub fn applied(&self) -> u64 {
        self.sm.read(|c| c.last_applied())
    }

    /// Commits `req` through the leader (forwarding it if this server is a
    /// follower) and returns what applying it answered.
    pub async fn write(&self, req: Request) -> Result<Response, ServerError> {
        self.ctx.batcher.write(req).await
    }

    /// Follows the catalog's last applied index: a blocking query waits
    /// for it to move.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.sm.subscribe()
    }

    /// Reads this server's catalog as it is (Consul's `?stale`).
    pub fn read<T>(&self, f: impl FnOnce(&Catalog) -> T) -> T {
        self.sm.read(f)
    }

    /// Reads after confirming leadership with a quorum and waiting for
    /// everything committed to be applied (Consul's `?consistent`). Only the
    /// leader can answer.
    pub async fn read_consistent<T>(
        &self,
        f: impl FnOnce(&Catalog) -> T,
    ) -> Result<T, ServerError> {
        self.ctx.barrier.wait().await?;
        Ok(self.sm.read(f))
    }

    /// Stops the member (as a crash would: nothing is handed over).
    pub async fn stop(&self) {
        self.listener.abort();
        let _ = self.raft.shutdown().await;
    }

    /// Stops answering peers at once (the Raft tasks end with the
    /// runtime).
    pub fn abort_rpc(&self) {
        self.listener.abort();
    }
}

/// Shares one leadership check among the `?consistent` reads waiting for
/// one: each read is answered after a check that began after it arrived
/// (so it sees every write acknowledged before it), and concurrent reads
/// cost one quorum round between them, not one each.
#[derive(Clone)]
struct ReadBarrier {
    tx: tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<Result<(), String>>>,
}

impl ReadBarrier {
    fn start(raft: Raft<TypeConfig>) -> ReadBarrier {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<
            tokio::sync::oneshot::Sender<Result<(), String>>,
        >();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut waiting = vec![first];
                while let Ok(w) = rx.try_recv() {
                    waiting.push(w);
                }
                // Confirms leadership with a quorum, then waits until
                // everything committed so far is applied.
                let r = raft
                    .ensure_linearizable()
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string());
                for w in waiting {
                    let _ = w.send(r.clone());
                }
            }
        });
        ReadBarrier { tx }
    }

    async fn wait(&self) -> Result<(), ServerError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(tx)
            .map_err(|_| ServerError::Raft("the server has stopped".into()))?;
        rx.await
            .map_err(|_| ServerError::Raft("the server has stopped".into()))?
            .map_err(ServerError::Raft)
    }
}

/// How many batches may be in Raft at once: while they are, new writes
/// queue up and go together in the next one (group commit).
const BATCHES_IN_FLIGHT: usize = 2;
/// The most writes in one batch.
const BATCH_MAX: usize = 256;
/// A batch stops growing past this many bytes of keys and values (one
/// more 512 KiB value may follow).
const BATCH_BYTES: usize = 4 << 20;
/// Log entries in one AppendEntries: with batches of ≤ 4.5 MiB, a frame
/// stays under [`MAX_FRAME`] even JSON-encoded.
const MAX_PAYLOAD_ENTRIES: u64 = 16;

/// About how many bytes a command adds to a log entry.
fn approx_size(cmd: &crate::catalog::Command) -> usize {
    use crate::catalog::Command;
    match cmd {
        Command::KvSet(k) => k.key.len() + k.value.len() + 64,
        Command::Batch(v) => v.iter().map(approx_size).sum(),
        _ => 512,
    }
}

type Pending = (
    Request,
    tokio::sync::oneshot::Sender<Result<Response, ServerError>>,
);

/// Gathers concurrent writes into one log entry ([`Command::Batch`]): one
/// entry, one replication round and one fsync on each server for all of
/// them, instead of one each. A write alone goes as it is.
///
/// [`Command::Batch`]: crate::catalog::Command::Batch
#[derive(Clone)]
struct Batcher {
    tx: tokio::sync::mpsc::UnboundedSender<Pending>,
}

impl Batcher {
    fn start(raft: Raft<TypeConfig>, pool: Arc<RpcPool>) -> Batcher {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Pending>();
        let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                // Everything that queued while the slots were busy, up to
                // a size that keeps a log entry (and an AppendEntries of
                // several) well inside a frame.
                let mut bytes = approx_size(&first.0.cmd);
                let mut batch = vec![first];
                while batch.len() < BATCH_MAX && bytes < BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(p) => {
                            bytes += approx_size(&p.0.cmd);
                            batch.push(p);
                        }
                        Err(_) => break,
                    }
                }
                let (raft, pool) = (raft.clone(), pool.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    commit_batch(&raft, &pool, batch).await;
                });
            }
        });
        Batcher { tx }
    }

    async fn write(&self, req: Request) -> Result<Response, ServerError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send((req, tx))
            .map_err(|_| ServerError::Raft("the server has stopped".into()))?;
        rx.await
            .map_err(|_| ServerError::Raft("the server has stopped".into()))?
    }
}

async fn commit_batch(raft: &Raft<TypeConfig>, pool: &RpcPool, mut batch: Vec<Pending>) {
    use crate::catalog::{Command, Outcome};
    if batch.len() == 1 {
        let (req, reply) = batch.pop().expect("one");
        let _ = reply.send(write(raft, pool, req).await);
        return;
    }
    // The latest clock reading of the batch (they are milliseconds apart).
    let now = batch.iter().map(|(r, _)| r.now).max().unwrap_or_default();
    let (reqs, replies): (Vec<Request>, Vec<_>) = batch.into_iter().unzip();
    let cmds = reqs.into_iter().map(|r| r.cmd).collect();
    let req = Request {
        now,
        cmd: Command::Batch(cmds),
    };
    match write(raft, pool, req).await {
        Ok(Ok(Outcome::Batch(outcomes))) if outcomes.len() == replies.len() => {
            for (o, reply) in outcomes.into_iter().zip(replies) {
                let _ = reply.send(Ok(o));
            }
        }
        Ok(other) => {
            for reply in replies {
                let _ = reply.send(Err(ServerError::Raft(format!(
                    "unexpected batch answer {other:?}"
                ))));
            }
        }
        Err(e) => {
            let no_leader = matches!(e, ServerError::NoLeader);
            let e = e.to_string();
            for reply in replies {
                let _ = reply.send(Err(if no_leader {
                    ServerError::NoLeader
                } else {
                    ServerError::Raft(e.clone())
                }));
            }
        }
    }
}

/// Commits `req`, forwarding to the leader when told to, retrying while an
/// election is under way (up to ~5 s).
async fn write(
    raft: &Raft<TypeConfig>,
    pool: &RpcPool,
    req: Request,
) -> Result<Response, ServerError> {
    let mut last = ServerError::NoLeader;
    for attempt in 0..50u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match raft.client_write(req.clone()).await {
            Ok(r) => return Ok(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                let Some(addr) = f
                    .leader_node
                    .and_then(|n| n.addr.parse::<SocketAddr>().ok())
                else {
                    last = ServerError::NoLeader;
                    continue;
                };
                match pool.send_write(addr, Rpc::Write(req.clone())).await {
                    Ok(r) => return Ok(r),
                    // The leader moved on meanwhile, or could not be
                    // reached: ask again.
                    Err(WriteError::NotApplied(reason)) => {
                        last = ServerError::Forward {
                            addr: addr.to_string(),
                            reason,
                        }
                    }
                    // Lost after it went out: it may have been applied, so
                    // it is not sent again (the caller hears it failed).
                    Err(WriteError::Unknown(reason)) => {
                        return Err(ServerError::Forward {
                            addr: addr.to_string(),
                            reason,
                        });
                    }
                }
            }
            Err(e) => return Err(ServerError::Raft(e.to_string())),
        }
    }
    Err(last)
}

/// Answers one JSON RPC.
async fn answer(ctx: &Ctx, rpc: Rpc) -> Reply {
    let raft = &ctx.raft;
    match rpc {
        Rpc::Append(r) => {
            let at = ctx.started.elapsed().as_millis() as u64;
            ctx.last_contact_ms.store(at, Ordering::Relaxed);
            Reply::Append(raft.append_entries(r).await)
        }
        Rpc::Vote(r) => Reply::Vote(raft.vote(r).await),
        Rpc::Snapshot(r) => Reply::Snapshot(raft.install_snapshot(r).await),
        // Only the leader commits forwarded writes; a follower that was
        // leader a moment ago says so and the sender asks again.
        Rpc::Write(req) => Reply::Write(match raft.client_write(req).await {
            Ok(r) => Ok(r.data),
            Err(e) => Err(e.to_string()),
        }),
        Rpc::WriteBatched(req) => {
            Reply::Write(ctx.batcher.write(req).await.map_err(|e| e.to_string()))
        }
        Rpc::Status => Reply::Status {
            initialized: raft.is_initialized().await.unwrap_or(true),
        },
    }
}

/// Answers peers' RPCs until aborted.
async fn serve(listener: TcpListener, ctx: Arc<Ctx>) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            while let Ok((kind, bytes)) = read_frame(&mut s).await {
                let reply = match kind {
                    KIND_JSON | KIND_RAFT => {
                        let rpc = if kind == KIND_JSON {
                            from_json::<Rpc>(&bytes).ok()
                        } else {
                            postcard::from_bytes::<Rpc>(&bytes).ok()
                        };
                        let Some(rpc) = rpc else {
                            break;
                        };
                        match to_json(&answer(&ctx, rpc).await) {
                            Ok(b) => b,
                            Err(_) => break,
                        }
                    }
                    KIND_HTTP => {
                        let Ok(call) = postcard::from_bytes::<HttpCall>(&bytes) else {
                            break;
                        };
                        let answer = match ctx.http.get() {
                            Some(h) => h(call).await,
                            None => HttpAnswer {
                                status: 500,
                                headers: Vec::new(),
                                body: b"this server does not serve HTTP".to_vec(),
                            },
                        };
                        match postcard::to_allocvec(&answer) {
                            Ok(b) => b,
                            Err(_) => break,
                        }
                    }
                    _ => break,
                };
                if write_frame(&mut s, kind, &reply).await.is_err() {
                    break;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that answers the first frame it gets late, with
    /// `initialized: false`, and every later one at once, with `true`.
    async fn slow_then_fast_peer() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let first = first.clone();
                tokio::spawn(async move {
                    while let Ok((kind, _)) = read_frame(&mut s).await {
                        let slow = first.swap(false, Ordering::SeqCst);
                        if slow {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        let reply = to_json(&Reply::Status { initialized: !slow }).unwrap();
                        if write_frame(&mut s, kind, &reply).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_call_dropped_mid_flight_leaves_no_reply_for_the_next_one() {
        let addr = slow_then_fast_peer().await;
        let mut peer = Peer {
            target: 1,
            addr: addr.to_string(),
            stream: None,
        };
        // The caller gives up first (as openraft's replication does, with
        // the same deadline as the call's own).
        let dropped = tokio::time::timeout(
            Duration::from_millis(50),
            peer.call(&Rpc::Status, Duration::from_secs(5)),
        )
        .await;
        assert!(dropped.is_err(), "the slow reply came early");
        // The next call hears its own reply (`initialized: false` is the
        // late one's).
        match peer.call(&Rpc::Status, Duration::from_secs(5)).await {
            Ok(Reply::Status { initialized }) => assert!(initialized, "a stale reply"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_core_names_no_leader_and_says_it_stopped() {
        let dir = tempfile::TempDir::new().unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let s = Server::start(ServerConfig::new(1, any, dir.path().to_path_buf()))
            .await
            .unwrap();
        s.initialize(BTreeMap::from([(1, s.rpc_addr)]))
            .await
            .unwrap();
        let t = std::time::Instant::now();
        while !s.is_leader() {
            assert!(t.elapsed() < Duration::from_secs(10), "no leader");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(s.leader_addr().is_some());
        s.stop().await;
        let why = tokio::time::timeout(Duration::from_secs(5), s.failed())
            .await
            .expect("failed() returns once the core stopped");
        assert!(!why.is_empty());
        assert!(!s.is_leader());
        assert_eq!(s.leader_addr(), None);
        assert_eq!(s.configuration().1, None, "/v1/status/leader would name it");
    }

    /// Waits for `s` to lead; its term then.
    async fn lead(s: &Server) -> u64 {
        let t = std::time::Instant::now();
        while !s.is_leader() {
            assert!(t.elapsed() < Duration::from_secs(10), "no leader");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.raft.metrics().borrow().current_term
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_leader_leads_again_only_in_a_new_term() {
        let dir = tempfile::TempDir::new().unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let cfg = ServerConfig::new(1, any, dir.path().to_path_buf());
        let s = Server::start(cfg.clone()).await.unwrap();
        s.initialize(BTreeMap::from([(1, s.rpc_addr)]))
            .await
            .unwrap();
        let before = lead(&s).await;
        s.stop().await;
        drop(s);
        // The store's last tasks may hold the database a moment after the
        // stop (a process that exits frees it at once).
        let t = std::time::Instant::now();
        let s = loop {
            match Server::start(cfg.clone()).await {
                Ok(s) => break s,
                Err(e) => {
                    assert!(t.elapsed() < Duration::from_secs(10), "{e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let after = lead(&s).await;
        assert!(after > before, "led again in term {after} (was {before})");
        s.stop().await;
    }

    #[tokio::test]
    async fn the_block_file_is_off_without_its_variable() {
        // The test process does not set TOMO_FAULT_BLOCK_FILE.
        assert!(std::env::var_os(fault::ENV).is_none());
        assert!(!fault::blocked("127.0.0.1:1".parse().unwrap()));
        assert!(!fault::blocked_str("127.0.0.1:1"));
    }
}
