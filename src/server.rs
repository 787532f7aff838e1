//! A registry server: one member of the Raft group (openraft) that holds the
//! [`Catalog`](crate::catalog::Catalog), with the peer RPC on TCP (Consul's
//! server port, 8300 by default) and writes forwarded to the leader.
//!
//! Peer RPC frames are `[length u32 BE][JSON]`, one request and one reply per
//! frame, on a connection each peer keeps open. JSON because openraft's
//! error types are only known to round-trip through self-describing
//! formats; the cost is measured in `benches/RESULTS.md` when the
//! benchmark lands.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    ClientWriteError, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::catalog::Catalog;
use crate::raft::store::{self, StateMachine, StoreError};
use crate::raft::{Request, Response, TypeConfig};

/// Largest RPC frame accepted, bytes (a snapshot chunk or a batch of
/// entries with 512 KiB values, JSON-encoded).
const MAX_FRAME: usize = 64 << 20;

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
        }
    }
}

/// A peer RPC.
#[derive(Debug, Serialize, Deserialize)]
enum Rpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// A write forwarded by a follower.
    Write(Request),
}

/// Its reply.
#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Append(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    Snapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    Write(Result<Response, String>),
}

async fn write_frame<T: Serialize>(s: &mut TcpStream, v: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    s.write_all(&(bytes.len() as u32).to_be_bytes()).await?;
    s.write_all(&bytes).await?;
    s.flush().await
}

async fn read_frame<T: for<'de> Deserialize<'de>>(s: &mut TcpStream) -> std::io::Result<T> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!("frame of {len} bytes")));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    serde_json::from_slice(&buf).map_err(std::io::Error::other)
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
        let addr = self.addr.clone();
        let stream = &mut self.stream;
        let r = tokio::time::timeout(ttl, async {
            if stream.is_none() {
                let s = TcpStream::connect(&addr).await?;
                s.set_nodelay(true)?;
                *stream = Some(s);
            }
            let s = stream.as_mut().expect("just connected");
            write_frame(s, rpc).await?;
            read_frame(s).await
        })
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "RPC timed out",
            ))
        });
        if r.is_err() {
            // Whatever state the stream is in, do not reuse it.
            self.stream = None;
        }
        r
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

/// A running server.
pub struct Server {
    /// Raft node ID.
    pub id: u64,
    /// Where the peer RPC listens.
    pub rpc_addr: SocketAddr,
    raft: Raft<TypeConfig>,
    sm: StateMachine,
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
        let (log, sm) = store::open(&cfg.data_dir)?;
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
            ..Default::default()
        }
        .validate()
        .map_err(|e| ServerError::Raft(e.to_string()))?;
        let raft = Raft::new(cfg.id, Arc::new(config), Network, log, sm.clone())
            .await
            .map_err(|e| ServerError::Raft(e.to_string()))?;
        let listener = tokio::spawn(serve(listener, raft.clone()));
        Ok(Server {
            id: cfg.id,
            rpc_addr,
            raft,
            sm,
            listener,
        })
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

    /// The current leader's ID, if one is known.
    pub async fn leader(&self) -> Option<u64> {
        self.raft.current_leader().await
    }

    /// The group as this server sees it: (ID, RPC address, voter) for every
    /// member, by ID, and the leader's ID.
    pub fn configuration(&self) -> (Vec<(u64, String, bool)>, Option<u64>) {
        let m = self.raft.metrics().borrow().clone();
        let voters: std::collections::BTreeSet<u64> = m.membership_config.voter_ids().collect();
        let members = m
            .membership_config
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone(), voters.contains(id)))
            .collect();
        (members, m.current_leader)
    }

    /// The last log index applied to this server's catalog.
    pub fn applied(&self) -> u64 {
        self.sm.read(|c| c.last_applied())
    }

    /// Commits `req` through the leader (forwarding it if this server is a
    /// follower) and returns what applying it answered.
    pub async fn write(&self, req: Request) -> Result<Response, ServerError> {
        write(&self.raft, req).await
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
        self.raft
            .ensure_linearizable()
            .await
            .map_err(|e| ServerError::Raft(e.to_string()))?;
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

/// Commits `req`, forwarding to the leader when told to, retrying while an
/// election is under way (up to ~5 s).
async fn write(raft: &Raft<TypeConfig>, req: Request) -> Result<Response, ServerError> {
    let mut last = ServerError::NoLeader;
    for attempt in 0..50u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match raft.client_write(req.clone()).await {
            Ok(r) => return Ok(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                let Some(node) = f.leader_node else {
                    last = ServerError::NoLeader;
                    continue;
                };
                let mut peer = Peer {
                    target: f.leader_id.unwrap_or_default(),
                    addr: node.addr.clone(),
                    stream: None,
                };
                match peer
                    .call(&Rpc::Write(req.clone()), Duration::from_secs(5))
                    .await
                {
                    Ok(Reply::Write(Ok(r))) => return Ok(r),
                    // The leader moved on meanwhile: ask again. (A reply
                    // lost after the leader committed makes the retry apply
                    // the write twice, as Consul's RPC forwarding would.)
                    Ok(Reply::Write(Err(reason))) => {
                        last = ServerError::Forward {
                            addr: node.addr.clone(),
                            reason,
                        }
                    }
                    Ok(other) => {
                        return Err(ServerError::Forward {
                            addr: node.addr,
                            reason: format!("unexpected reply {other:?}"),
                        });
                    }
                    Err(e) => {
                        last = ServerError::Forward {
                            addr: node.addr.clone(),
                            reason: e.to_string(),
                        }
                    }
                }
            }
            Err(e) => return Err(ServerError::Raft(e.to_string())),
        }
    }
    Err(last)
}

/// Answers peers' RPCs until aborted.
async fn serve(listener: TcpListener, raft: Raft<TypeConfig>) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let raft = raft.clone();
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            while let Ok(rpc) = read_frame::<Rpc>(&mut s).await {
                let reply = match rpc {
                    Rpc::Append(r) => Reply::Append(raft.append_entries(r).await),
                    Rpc::Vote(r) => Reply::Vote(raft.vote(r).await),
                    Rpc::Snapshot(r) => Reply::Snapshot(raft.install_snapshot(r).await),
                    // Only the leader commits forwarded writes; a follower
                    // that was leader a moment ago says so and the sender
                    // asks again.
                    Rpc::Write(req) => Reply::Write(match raft.client_write(req).await {
                        Ok(r) => Ok(r.data),
                        Err(e) => Err(e.to_string()),
                    }),
                };
                if write_frame(&mut s, &reply).await.is_err() {
                    break;
                }
            }
        });
    }
}
